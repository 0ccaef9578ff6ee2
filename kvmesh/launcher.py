"""`kvmesh up`: the whole mesh on one machine, as child processes, torn down as one.

Children run in their own sessions, so a terminal's Ctrl-C reaches only this
supervisor, which then stops them in order (front door first, stores last). Each
child also gets PR_SET_PDEATHSIG, so even a SIGKILLed supervisor leaves no orphans.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmesh import tls
from kvmesh.certs import CA_FILE, cert_paths, write_certs
from kvmesh.local_stores import StoreProcess, child_env, free_port, start_etcd, start_redis
from kvmesh.status import collect_status

STATE_FILE = "stack.json"
_SERVICE_OF_MODULE = {"kvstore.server": "kvstore", "router.server": "router", "services.worker.server": "worker",
                      "planner.server": "planner"}  # fmt: skip
_WORKER_ROLES = ("aggregated", "prefill", "decode")
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _port_free(port: int, host: str = "127.0.0.1") -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


@dataclass
class StackOptions:
    """What `kvmesh up` was asked for (its flags)."""

    workers: int = 1
    prefill: int = 0
    decode: int = 0
    model: str = ""
    engine: str = "real"
    router_mode: str = "kv"
    http_port: int = 8000
    grpc_port: int = 50051
    namespace: str = "default"
    etcd_endpoint: str = ""
    redis_url: str = ""
    state_dir: Path = field(default_factory=lambda: Path(".kvmesh"))
    ready_timeout_s: float = 300.0
    # API keys the router requires (`--api-key`, repeatable); none = an open front door.
    api_keys: list[str] = field(default_factory=list)
    # Mutual TLS on every gRPC hop, with certificates `kvmesh certs` makes in <state_dir>/certs.
    tls: bool = False
    # Extra environment for workers (e.g. KVMESH_DTYPE=float32 in tests).
    worker_env: dict[str, str] = field(default_factory=dict)
    # KV tiers per worker: device pool blocks (0 = the worker's default), host and disk budgets
    # (None = the worker's defaults), and the root of the workers' disk-tier directories.
    kv_cache_blocks: int = 0
    host_cache_gb: float | None = None
    disk_cache_gb: float | None = None
    disk_cache_dir: Path | None = None
    # Run the planner (`kvmesh up --planner`, local connector): these are its flags.
    planner: bool = False
    planner_args: list[str] = field(default_factory=list)
    # --engine mock: workers per process (services/worker/mock_fleet.py); 1 = a process each, which
    # restart_worker needs (a fleet is one process: it stops and starts whole).
    mock_fleet_size: int = 1

    def __post_init__(self) -> None:
        if self.prefill or self.decode:
            if self.prefill < 1 or self.decode < 1:
                raise ValueError("disaggregated mode needs --prefill N and --decode M, both at least 1")
            self.workers = 0
        if self.workers < 0:
            raise ValueError("--workers must be >= 0")
        if self.mock_fleet_size < 1:
            raise ValueError("--mock-fleet-size must be >= 1")
        if self.planner and not (self.prefill and self.decode):
            raise ValueError("--planner moves workers between prefill and decode: give --prefill N --decode M")


@dataclass
class ServiceChild:
    name: str
    instance_id: str
    proc: subprocess.Popen
    log_path: Path


class LocalStack:
    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.log_dir = options.state_dir / "logs"
        self.data_dir = Path(tempfile.mkdtemp(prefix="kvmesh-"))
        self.stores: list[StoreProcess] = []
        self.children: list[ServiceChild] = []
        self.etcd_endpoint = options.etcd_endpoint
        self.redis_url = options.redis_url

    # -- starting ---------------------------------------------------------------------------
    def start_stores(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not self.etcd_endpoint:
            port = 2379 if _port_free(2379) else free_port()
            etcd = start_etcd(self.data_dir / "etcd", self.log_dir / "etcd.log", port=port)
            self.stores.append(etcd)
            self.etcd_endpoint = etcd.endpoint
        if not self.redis_url:
            port = 6379 if _port_free(6379) else free_port()
            redis = start_redis(self.data_dir / "redis", self.log_dir / "redis.log", port=port)
            self.stores.append(redis)
            self.redis_url = f"redis://{redis.endpoint}/0"

    def spawn(
        self, name: str, instance_id: str, module: str, args: list[str], env: dict[str, str] | None = None
    ) -> None:
        """Start one service child (tests add extra routers or workers this way)."""
        log_path = self.log_dir / f"{name}.log"
        env = {**self._tls_env(module), **(env or {})}
        cmd = [
            sys.executable, "-m", module,
            "--namespace", self.options.namespace,
            "--etcd-endpoint", self.etcd_endpoint,
            "--instance-id", instance_id,
            *args,
        ]  # fmt: skip
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**child_env(), **env}, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        self.children.append(ServiceChild(name, instance_id, proc, log_path))

    @property
    def cert_dir(self) -> Path | None:
        return self.options.state_dir / "certs" if self.options.tls else None

    def make_certs(self) -> None:
        """Certificates for this stack, and the supervisor's own client identity (health checks)."""
        if self.cert_dir is not None:
            write_certs(self.cert_dir)
            tls.configure(tls.TlsConfig.for_service(self.cert_dir, "client"))

    def _tls_env(self, module: str) -> dict[str, str]:
        if self.cert_dir is None:
            return {}
        cert, key = cert_paths(self.cert_dir, _SERVICE_OF_MODULE[module])
        return {"KVMESH_TLS_CERT": str(cert), "KVMESH_TLS_KEY": str(key), "KVMESH_TLS_CA": str(self.cert_dir / CA_FILE)}

    def start_kvstore(self) -> None:
        ns = self.options.namespace
        self.spawn("kvstore", f"kvstore-{ns}", "kvstore.server", ["--redis-url", self.redis_url])

    def add_worker(self, role: str, index: int | str, env: dict[str, str] | None = None) -> str:
        instance_id = f"{role}-{self.options.namespace}-{index}"
        args = ["--role", role, "--engine", self.options.engine, *self._kv_tier_args(instance_id)]
        if self.options.model:
            args += ["--model", self.options.model]
        env = {**self._thread_share(), **self.options.worker_env, **(env or {})}
        self.spawn(f"{role}-{index}", instance_id, "services.worker.server", args, env)
        return instance_id

    def _kv_tier_args(self, instance_id: str) -> list[str]:
        """The KV-cache flags `kvmesh up` passes through; each worker's disk tier gets its own
        directory, named by its (stable) id so a restarted worker finds its blocks again."""
        o = self.options
        root = o.disk_cache_dir or o.state_dir / "kv-cache"
        args = ["--disk-cache-dir", str(root / instance_id)]
        if o.kv_cache_blocks:
            args += ["--kv-cache-blocks", str(o.kv_cache_blocks)]
        if o.host_cache_gb is not None:
            args += ["--host-cache-gb", str(o.host_cache_gb)]
        if o.disk_cache_gb is not None:
            args += ["--disk-cache-gb", str(o.disk_cache_gb)]
        return args

    def restart_worker(self, child: ServiceChild, timeout_s: float = 60.0) -> str:
        """Once ``child`` (a worker) has exited, start it again under the same instance id."""
        child.proc.wait(timeout_s)
        self.children.remove(child)
        role, _, index = child.name.rpartition("-")
        return self.add_worker(role, int(index))

    def add_mock_fleet(self, first: int, size: int, role: str = "aggregated") -> list[str]:
        """``size`` mock workers of ``role`` in one process (services/worker/mock_fleet.py): a mock
        worker's cost is its process, so simulations of many workers share a few."""
        base = f"{role}-{self.options.namespace}-{first}"
        env = {**self.options.worker_env, "KVMESH_NUM_THREADS": "1"}
        args = ["--engine", "mock", "--fleet-size", str(size), "--role", role]
        if self.options.model:
            args += ["--model", self.options.model]
        if self.options.kv_cache_blocks:  # (the mock engine has no lower KV tiers)
            args += ["--kv-cache-blocks", str(self.options.kv_cache_blocks)]
        self.spawn(f"fleet-{role}-{first}", base, "services.worker.mock_fleet", args, env)
        # The fleet registers <base>.0 … <base>.<size-1>; health is awaited on the first.
        self.children[-1].instance_id = f"{base}.0"
        return [f"{base}.{i}" for i in range(size)]

    def _thread_share(self) -> dict[str, str]:
        """Workers sharing one machine split its cores: two OpenMP pools contending for the same
        cores run several times slower than each on its own share."""
        if "KVMESH_NUM_THREADS" in os.environ:
            return {}
        workers = max(self.options.workers + self.options.prefill + self.options.decode, 1)
        return {"KVMESH_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}

    def add_router(self, name: str, mode: str, grpc_port: int, http_port: int, args: Sequence[str] = ()) -> str:
        """A router; ``args`` are more of its flags."""
        instance_id = f"{name}-{self.options.namespace}"
        # Keys go by environment, not argv, so `ps` does not show them.
        env = {"KVMESH_API_KEYS": ",".join(self.options.api_keys)} if self.options.api_keys else None
        self.spawn(name, instance_id, "router.server",
                   ["--port", str(grpc_port), "--http-port", str(http_port), "--router-mode", mode, *args],
                   env)  # fmt: skip
        return instance_id

    def start_services(self) -> None:
        self.start_kvstore()
        options = self.options
        roles = [("aggregated", options.workers), ("prefill", options.prefill), ("decode", options.decode)]
        fleet = options.mock_fleet_size if options.engine == "mock" else 1
        for role, count in roles:
            if fleet > 1:
                for first in range(0, count, fleet):
                    self.add_mock_fleet(first, min(fleet, count - first), role)
                continue
            for index in range(count):
                self.add_worker(role, index)
        self.add_router("router", self.options.router_mode, self.options.grpc_port, self.options.http_port)
        if options.planner:
            self.add_planner()

    def add_planner(self) -> str:
        """The planner with the local connector: the workers it adds are its own children."""
        instance_id = f"planner-{self.options.namespace}"
        options = self.options
        args = ["--connector", "local", "--worker-engine", options.engine, "--state-dir", str(options.state_dir),
                "--max-workers", str(max(options.prefill + options.decode, 2)), *options.planner_args]  # fmt: skip
        if options.model:
            args += ["--worker-model", options.model]
        self.spawn("planner", instance_id, "planner.server", args, {**self._thread_share(), **options.worker_env})
        return instance_id

    # -- waiting ----------------------------------------------------------------------------
    def _failed_child(self) -> ServiceChild | None:
        return next((c for c in self.children if c.proc.poll() is not None and not self._removed(c)), None)

    def _removed(self, child: ServiceChild) -> bool:
        """A worker the planner stopped (SIGTERM, clean exit) has not failed."""
        return self.options.planner and child.name.startswith(_WORKER_ROLES) and child.proc.returncode == 0

    async def _healthy_ids(self) -> set[str]:
        rows = await collect_status(self.etcd_endpoint, self.options.namespace)
        return {row["id"] for row in rows if row["healthy"]}

    def _child_ids(self) -> set[str]:
        return {child.instance_id for child in self.children}

    def wait_router_workers(self, http_base: str, count: int, timeout_s: float = 120) -> None:
        """Block until the router at ``http_base`` reports ``count`` live workers on /health."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{http_base}/health", timeout=2) as response:
                    if json.load(response).get("workers") == count:
                        return
            except urllib.error.HTTPError as exc:  # 503 while it has no worker
                if json.load(exc).get("workers") == count:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"router at {http_base} never saw {count} workers")

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.options.ready_timeout_s
        while time.monotonic() < deadline:
            failed = self._failed_child()
            if failed is not None:
                tail = failed.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{failed.name} exited with {failed.proc.returncode}; log tail:\n{tail}")
            try:
                if asyncio.run(self._healthy_ids()) >= self._child_ids():
                    return
            except Exception:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"services not healthy after {self.options.ready_timeout_s}s")

    # -- reporting and stopping -------------------------------------------------------------
    def write_state(self) -> Path:
        state = {
            "namespace": self.options.namespace,
            "etcd_endpoint": self.etcd_endpoint,
            "redis_url": self.redis_url,
            "cert_dir": str(self.cert_dir or ""),
            "services": [{"name": c.name, "instance_id": c.instance_id, "pid": c.proc.pid} for c in self.children],
            "options": {k: str(v) for k, v in asdict(self.options).items()},
        }
        path = self.options.state_dir / STATE_FILE
        path.write_text(json.dumps(state, indent=2))
        return path

    def describe(self) -> str:
        lines = [f"etcd      {self.etcd_endpoint}", f"redis     {self.redis_url}"]
        lines += [f"{c.name:<9} pid {c.proc.pid}  log {c.log_path}" for c in self.children]
        if any(c.name == "router" for c in self.children):
            lines.append(f"router gRPC 127.0.0.1:{self.options.grpc_port}  HTTP http://127.0.0.1:{self.options.http_port}")
            lines.append(f"dashboard http://127.0.0.1:{self.options.http_port}/dashboard")
        return "\n".join(lines)

    def stop(self, grace_s: float = 15.0) -> None:
        """Front door first, stores last; whoever ignores SIGTERM is killed."""
        self.stop_children(grace_s)
        for store in reversed(self.stores):
            store.stop()
        (self.options.state_dir / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def stop_children(self, grace_s: float = 15.0) -> None:
        """SIGTERM the service children, last started first; kill who outlives ``grace_s``."""
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + grace_s
        for child in reversed(self.children):
            try:
                child.proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()


def run_stack(options: StackOptions) -> int:
    stack = LocalStack(options)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        stack.make_certs()
        stack.start_stores()
        stack.start_services()
        print(f"kvmesh: starting {len(stack.children)} services, logs in {stack.log_dir}", flush=True)
        stack.wait_healthy()
        stack.write_state()
        print("kvmesh: all services healthy\n" + stack.describe(), flush=True)
        print(f"kvmesh status --namespace {options.namespace} --etcd-endpoint {stack.etcd_endpoint}", flush=True)
        while stack._failed_child() is None:
            time.sleep(0.5)
        failed = stack._failed_child()
        print(f"kvmesh: {failed.name} exited with {failed.proc.returncode}; stopping", flush=True)
        return 1
    except KeyboardInterrupt:
        print("kvmesh: stopping", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"kvmesh: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop()
        print("kvmesh: stopped", flush=True)
