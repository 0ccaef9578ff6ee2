"""Trace replay against mock workers: every request of the shipped trace is answered, the
workers' busy time is reported, and the routing report's files are written."""

from __future__ import annotations

import argparse
import json
import uuid
from pathlib import Path

import pytest

from bench.replay import load_trace, run_replay
from bench.routing import write_report
from kvmesh.launcher import LocalStack, StackOptions
from kvmesh.local_stores import StoreProcess, free_port

TRACE = Path(__file__).parents[2] / "bench" / "traces" / "conversations.jsonl"


@pytest.mark.slow
def test_replay_of_the_shipped_trace_on_four_mock_workers(etcd_server: StoreProcess, redis_server: StoreProcess,
                                                          tmp_path: Path):  # fmt: skip
    namespace = f"replay{uuid.uuid4().hex[:6]}"
    grpc_port = free_port()
    # `kvmesh up --engine mock --workers 4`'s stack: the four workers in one process (a fleet).
    options = StackOptions(workers=4, engine="mock", mock_fleet_size=4, namespace=namespace,
                           etcd_endpoint=etcd_server.endpoint, redis_url=f"redis://{redis_server.endpoint}/0",
                           state_dir=tmp_path / "stack", grpc_port=grpc_port, http_port=free_port(),
                           ready_timeout_s=240, worker_env={"KVMESH_MOCK_PROFILE": "h100-llama3-8b"})  # fmt: skip
    stack = LocalStack(options)
    stack.log_dir.mkdir(parents=True, exist_ok=True)
    stack.start_services()
    assert [child.name for child in stack.children] == ["kvstore", "fleet-aggregated-0", "router"]
    try:
        stack.wait_healthy()
        stack.wait_router_workers(f"http://127.0.0.1:{options.http_port}", 4)
        trace = load_trace(TRACE, limit=24)
        result = run_replay(f"127.0.0.1:{grpc_port}", trace, speedup=50, max_tokens=8,
                            etcd_endpoint=etcd_server.endpoint, namespace=namespace)  # fmt: skip
    finally:
        stack.stop()
    summary = result["summary"]
    assert summary["errors"] == 0, summary.get("first_error")
    assert len(result["requests"]) == 24
    assert all(r["output_tokens"] == min(8, t.output_length) for r, t in zip(result["requests"], trace, strict=True))
    # Later turns of a conversation resend earlier ones: some prompt tokens come from a cache.
    assert 0 < summary["cache_hit_rate"] <= summary["oracle_hit_rate"]
    assert len(summary["per_worker"]) == 4 and all(w["busy_ms"] > 0 for w in summary["per_worker"].values())

    args = argparse.Namespace(trace=TRACE, speedup=[50], slowdown=1.0, router_settings={}, profile="h100-llama3-8b",
                              kv_cache_blocks=0, out=tmp_path / "report")  # fmt: skip
    report = write_report([{"workers": 4, "speedup": 50, "mode": "kv", **result}], args)
    for name in ("report.md", "routing.json", "ttft_cdf.png", "hit_rate.png", "balance.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert "| 4 | 50 | kv | 24 | 0 |" in report.read_text()
    assert json.loads((tmp_path / "report" / "routing.json").read_text())["rows"][0]["mode"] == "kv"
