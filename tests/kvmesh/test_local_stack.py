"""`kvmesh up` end to end: starts, `kvmesh status --json` sees every service healthy,
SIGINT leaves no child process and frees the ports."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from kvmesh.local_stores import child_env, free_port


def kvmesh(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvmesh.cli", *args]


def wait_for_line(proc: subprocess.Popen, needle: str, timeout_s: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line.rstrip())
        if needle in line:
            return lines
    raise AssertionError(f"{needle!r} not printed; output so far:\n" + "\n".join(lines))


@pytest.mark.slow
def test_up_status_and_clean_teardown(tmp_path: Path):
    # The launcher is under test here, not the model (tests/e2e serve SmolLM2 through the same
    # launcher): a seeded random tiny model keeps the worker's start-up to a second.
    state_dir = tmp_path / "state"
    grpc_port, http_port = free_port(), free_port()
    up = subprocess.Popen(
        kvmesh("up", "--namespace", "smoke", "--state-dir", str(state_dir), "--model", "random:tiny",
               "--grpc-port", str(grpc_port), "--http-port", str(http_port)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
    )  # fmt: skip
    try:
        wait_for_line(up, "all services healthy", timeout_s=240)
        stack = json.loads((state_dir / "stack.json").read_text())
        started = {s["instance_id"] for s in stack["services"]}
        child_pids = [p.pid for p in psutil.Process(up.pid).children(recursive=True)]
        assert "kvstore-smoke" in started

        status = subprocess.run(
            kvmesh("status", "--json", "--state-dir", str(state_dir)),
            capture_output=True, text=True, timeout=60, env=child_env(),
        )  # fmt: skip
        assert status.returncode == 0, status.stdout + status.stderr
        rows = json.loads(status.stdout)
        assert {row["id"] for row in rows} == started
        assert all(row["healthy"] for row in rows), rows
        # Each instance reports its own process id, so tools can signal exactly one service.
        assert {row["id"]: row["pid"] for row in rows} == {s["instance_id"]: s["pid"] for s in stack["services"]}
        kvstore_row = next(row for row in rows if row["kind"] == "kvstore")
        assert kvstore_row["blocks"] is not None

        up.send_signal(signal.SIGINT)
        wait_for_line(up, "kvmesh: stopped", timeout_s=60)
        assert up.wait(30) == 0
    finally:
        if up.poll() is None:
            up.kill()
    time.sleep(0.5)
    alive = [pid for pid in child_pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert alive == [], f"orphans left behind: {alive}"
    assert not (state_dir / "stack.json").exists()
    for port in (int(stack["etcd_endpoint"].rsplit(":", 1)[1]), grpc_port):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
    assert os.path.isdir(state_dir / "logs")
