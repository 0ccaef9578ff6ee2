"""The one etcd discovery client: register under a lease, list, and watch who is alive.

Layout: ``/kvmesh/<namespace>/instances/<kind>/<instance_id>`` → ``InstanceInfo`` bytes,
attached to a lease with a short TTL. A SIGKILLed instance stops refreshing its lease,
so etcd deletes its key within the TTL and every watcher sees it leave.

Every loop here survives etcd going away: registration re-grants a lease and re-puts
its key when etcd returns (with or without its old data), and a watch re-lists the
prefix and reports the difference, so no join or leave is lost across a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import aetcd
import grpc
from aetcd import rpc, watcher

from kvmesh.config import ServiceSettings
from kvmesh_proto.v1 import common_pb2

log = logging.getLogger(__name__)

_RETRY_S = 0.5
_CALL_TIMEOUT_S = 3


def instances_prefix(namespace: str, kind: str | None = None) -> str:
    base = f"/kvmesh/{namespace}/instances/"
    return base + (f"{kind}/" if kind else "")


def instance_key(namespace: str, kind: str, instance_id: str) -> str:
    return f"{instances_prefix(namespace, kind)}{instance_id}"


@dataclass(frozen=True)
class MembershipEvent:
    """An instance joined (or changed its registration) or left."""

    kind: str  # "join" | "leave"
    info: common_pb2.InstanceInfo


def _parse_endpoint(endpoint: str) -> tuple[str, int]:
    endpoint = endpoint.removeprefix("http://")
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"etcd endpoint {endpoint!r} must be host:port")
    return host, int(port)


class Registration:
    """Keeps one instance's key alive until ``close()``; re-registers after etcd restarts."""

    def __init__(self, discovery: Discovery, info: common_pb2.InstanceInfo, ttl_s: int) -> None:
        self._discovery = discovery
        self.info = info
        self.ttl_s = ttl_s
        self.key = instance_key(discovery.namespace, info.kind, info.instance_id)
        self._lease: aetcd.Lease | None = None
        self._registered = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self, timeout_s: float = 10.0) -> None:
        self._task = asyncio.create_task(self._keep_alive(), name=f"lease:{self.key}")
        await asyncio.wait_for(self._registered.wait(), timeout_s)

    async def _put(self) -> None:
        client = self._discovery.client
        if self._lease is None:
            self._lease = await client.lease(self.ttl_s)
        await client.put(self.key.encode(), self.info.SerializeToString(), lease=self._lease)
        self._registered.set()

    async def _keep_alive(self) -> None:
        need_put = True
        while True:
            try:
                if need_put:
                    await self._put()
                    need_put = False
                reply = await self._discovery.client.refresh_lease(self._lease.id)
                if reply is None or reply.TTL <= 0:
                    log.warning("lease for %s expired; registering again", self.key)
                    self._lease, need_put = None, True
                    continue
                await asyncio.sleep(max(self.ttl_s / 3, 0.2))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # etcd unreachable or restarted without our lease: once it answers, put the
                # key again under a fresh lease (an old lease that survived just expires).
                log.warning("etcd keep-alive for %s failed (%s); retrying", self.key, exc)
                self._lease, need_put = None, True
                await asyncio.sleep(_RETRY_S)

    async def update(self, info: common_pb2.InstanceInfo) -> None:
        """Publish a changed registration (e.g. a new role) under the same lease."""
        self.info = info
        await self._discovery.client.put(self.key.encode(), info.SerializeToString(), lease=self._lease)

    async def close(self) -> None:
        """Deregister at once (don't wait for the TTL) and stop the keep-alive."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._lease.revoke(), _CALL_TIMEOUT_S)


@dataclass(frozen=True)
class EtcdAccess:
    """How to get into etcd: a user (etcd authentication) and/or TLS (PEM paths; ``cert`` and
    ``key`` only when etcd checks client certificates). Empty fields: plaintext, no auth."""

    username: str = ""
    password: str = ""
    ca: str = ""
    cert: str = ""
    key: str = ""

    @classmethod
    def from_settings(cls, settings: ServiceSettings) -> EtcdAccess:
        return cls(settings.etcd_username, settings.etcd_password, settings.etcd_ca, settings.etcd_cert,
                   settings.etcd_key)  # fmt: skip

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.ca:
            return None
        cert = Path(self.cert).read_bytes() if self.cert else None
        key = Path(self.key).read_bytes() if self.key else None
        return grpc.ssl_channel_credentials(Path(self.ca).read_bytes(), key, cert)


class _EtcdClient(aetcd.Client):
    """aetcd's client, over TLS when given credentials (aetcd itself only dials plaintext)."""

    def __init__(self, credentials: grpc.ChannelCredentials | None, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._credentials = credentials

    async def connect(self) -> None:
        if self._credentials is None:
            await super().connect()
            return
        # aetcd's own connect (aetcd 1.0), with a secure channel instead of a plaintext one.
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            self.channel = grpc.aio.secure_channel(f"{self._host}:{self._port}", self._credentials,
                                                   options=self._options.items())  # fmt: skip
            if self._username is not None and self._password is not None:
                self.auth_stub = rpc.AuthStub(self.channel)
                request = rpc.AuthenticateRequest(name=self._username, password=self._password)
                self.metadata = (("token", (await self.auth_stub.Authenticate(request, timeout=self._timeout)).token),)
            self.kvstub = rpc.KVStub(self.channel)
            self.clusterstub = rpc.ClusterStub(self.channel)
            self.leasestub = rpc.LeaseStub(self.channel)
            self.maintenancestub = rpc.MaintenanceStub(self.channel)
            self._watcher = watcher.Watcher(rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


class Discovery:
    """etcd access for one namespace."""

    def __init__(self, endpoint: str, namespace: str, access: EtcdAccess = EtcdAccess()) -> None:
        host, port = _parse_endpoint(endpoint)
        self.namespace = namespace
        self.client = _EtcdClient(access.credentials(), host=host, port=port, timeout=_CALL_TIMEOUT_S,
                                  username=access.username or None, password=access.password or None)  # fmt: skip

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.close()

    async def register(self, info: common_pb2.InstanceInfo, ttl_s: int) -> Registration:
        registration = Registration(self, info, ttl_s)
        await registration.start()
        return registration

    async def list(self, kind: str | None = None) -> dict[str, common_pb2.InstanceInfo]:
        """Live instances by instance id."""
        instances, _ = await self._snapshot(kind)
        return {info.instance_id: info for info in instances.values()}

    async def _snapshot(self, kind: str | None) -> tuple[dict[bytes, common_pb2.InstanceInfo], int]:
        result = await self.client.get_prefix(instances_prefix(self.namespace, kind).encode())
        instances = {}
        for kv in result:
            info = common_pb2.InstanceInfo()
            try:
                info.ParseFromString(kv.value)
            except Exception:
                log.warning("ignoring unparsable registration at %r", kv.key)
                continue
            instances[kv.key] = info
        return instances, result.header.revision

    async def watch(self, kind: str | None = None) -> AsyncIterator[MembershipEvent]:
        """Joins and leaves, starting with a join for every instance alive now.

        Survives etcd restarts: after a broken watch it re-lists and reports only
        what changed meanwhile.
        """
        known: dict[bytes, common_pb2.InstanceInfo] = {}
        prefix = instances_prefix(self.namespace, kind).encode()
        while True:
            watch = None
            try:
                current, revision = await self._snapshot(kind)
                for key in known.keys() - current.keys():
                    yield MembershipEvent("leave", known.pop(key))
                for key, info in current.items():
                    if known.get(key) != info:
                        known[key] = info
                        yield MembershipEvent("join", info)
                watch = await self.client.watch_prefix(prefix, start_revision=revision + 1)
                async for event in watch:
                    if event.kind == "PUT":
                        info = common_pb2.InstanceInfo()
                        info.ParseFromString(event.kv.value)
                        known[event.kv.key] = info
                        yield MembershipEvent("join", info)
                    elif event.kv.key in known:
                        yield MembershipEvent("leave", known.pop(event.kv.key))
                raise ConnectionError("etcd watch ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("etcd watch on %s broke (%s); re-listing", prefix.decode(), exc)
                await asyncio.sleep(_RETRY_S)
            finally:
                if watch is not None:
                    with contextlib.suppress(Exception):
                        await watch.cancel()


class Membership:
    """A live view of one kind's instances, kept by a background watch.

    Callers read ``instances`` at any time; ``on_change`` hooks let a service act on
    a leave at once (the kvstore purges a dead worker's blocks).
    """

    def __init__(self, discovery: Discovery, kind: str | None = None) -> None:
        self._discovery = discovery
        self._kind = kind
        self.instances: dict[str, common_pb2.InstanceInfo] = {}
        self._listeners: list[Callable[[MembershipEvent], object]] = []
        self._task: asyncio.Task | None = None

    def on_change(self, listener: Callable[[MembershipEvent], object]) -> None:
        self._listeners.append(listener)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"membership:{self._kind}")

    async def _run(self) -> None:
        async for event in self._discovery.watch(self._kind):
            if event.kind == "join":
                self.instances[event.info.instance_id] = event.info
            else:
                self.instances.pop(event.info.instance_id, None)
            for listener in self._listeners:
                try:
                    result = listener(event)
                    if asyncio.iscoroutine(result):
                        await result
                except Exception:
                    log.exception("membership listener failed on %s", event)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
