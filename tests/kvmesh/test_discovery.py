"""etcd discovery: register, list, watch, lease expiry and surviving an etcd restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kvmesh.discovery import Discovery, MembershipEvent, instance_key
from kvmesh.local_stores import start_etcd
from kvmesh_proto.v1 import common_pb2


def worker_info(instance_id: str, role: str = "aggregated") -> common_pb2.InstanceInfo:
    return common_pb2.InstanceInfo(
        instance_id=instance_id, kind="worker", address="127.0.0.1:1", role=role, model="m@1", block_size=16
    )


async def next_event(events, timeout_s: float = 5.0) -> MembershipEvent:
    return await asyncio.wait_for(events.__anext__(), timeout_s)


async def test_register_list_and_deregister(etcd_server, namespace):
    discovery = Discovery(etcd_server.endpoint, namespace)
    registration = await discovery.register(worker_info("w-1"), ttl_s=3)
    listed = await discovery.list("worker")
    assert list(listed) == ["w-1"]
    assert listed["w-1"].role == "aggregated"
    assert await discovery.list("router") == {}
    await registration.close()
    assert await discovery.list("worker") == {}
    await discovery.close()


async def test_watch_reports_existing_then_join_and_leave(etcd_server, namespace):
    discovery = Discovery(etcd_server.endpoint, namespace)
    first = await discovery.register(worker_info("w-a"), ttl_s=3)
    events = discovery.watch("worker")
    event = await next_event(events)
    assert (event.kind, event.info.instance_id) == ("join", "w-a")

    second = await discovery.register(worker_info("w-b", role="decode"), ttl_s=3)
    event = await next_event(events)
    assert (event.kind, event.info.instance_id, event.info.role) == ("join", "w-b", "decode")

    await first.close()
    event = await next_event(events)
    assert (event.kind, event.info.instance_id) == ("leave", "w-a")
    await events.aclose()
    await second.close()
    await discovery.close()


REGISTER_AND_SLEEP = textwrap.dedent(
    """
    import asyncio, sys
    from kvmesh.discovery import Discovery
    from kvmesh_proto.v1 import common_pb2

    async def main():
        discovery = Discovery(sys.argv[1], sys.argv[2])
        info = common_pb2.InstanceInfo(instance_id="doomed", kind="worker", address="127.0.0.1:1")
        await discovery.register(info, ttl_s=int(sys.argv[3]))
        print("registered", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def test_sigkilled_instance_disappears_within_ttl(etcd_server, namespace):
    ttl_s = 2
    proc = subprocess.Popen(
        [sys.executable, "-c", REGISTER_AND_SLEEP, etcd_server.endpoint, namespace, str(ttl_s)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "registered"
        discovery = Discovery(etcd_server.endpoint, namespace)
        events = discovery.watch("worker")
        assert (await next_event(events)).kind == "join"
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        event = await next_event(events, timeout_s=ttl_s + 3)
        elapsed = time.monotonic() - killed_at
        assert (event.kind, event.info.instance_id) == ("leave", "doomed")
        assert elapsed <= ttl_s + 1, f"left after {elapsed:.2f}s, TTL {ttl_s}s"
        await events.aclose()
        await discovery.close()
    finally:
        proc.kill()
        proc.wait()


async def wait_listed(discovery: Discovery, instance_id: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if instance_id in await discovery.list("worker"):
                return
        except Exception:
            pass
        await asyncio.sleep(0.2)
    raise AssertionError(f"{instance_id} not registered after {timeout_s}s")


@pytest.mark.parametrize("keep_data", [True, False], ids=["same-data", "data-lost"])
async def test_reregisters_and_rewatches_after_etcd_restart(tmp_path, namespace, keep_data):
    etcd = start_etcd(tmp_path / "data", tmp_path / "etcd.log")
    port = etcd.port
    discovery = Discovery(etcd.endpoint, namespace)
    watcher = Discovery(etcd.endpoint, namespace)
    registration = await discovery.register(worker_info("survivor"), ttl_s=2)
    events = watcher.watch("worker")
    assert (await next_event(events)).info.instance_id == "survivor"
    try:
        etcd.kill()
        await asyncio.sleep(1.0)
        data_dir = tmp_path / ("data" if keep_data else "fresh")
        etcd = start_etcd(data_dir, tmp_path / "etcd.log", port=port)
        await wait_listed(discovery, "survivor", timeout_s=10)
        # A newcomer after the restart is seen by the watch that was open before it.
        late = await discovery.register(worker_info("late"), ttl_s=2)
        seen = set()
        while "late" not in seen:
            event = await next_event(events, timeout_s=10)
            if event.kind == "join":
                seen.add(event.info.instance_id)
        key = instance_key(namespace, "worker", "survivor").encode()
        assert (await discovery.client.get(key)) is not None
        await late.close()
    finally:
        await events.aclose()
        await registration.close()
        await discovery.close()
        await watcher.close()
        etcd.stop()
