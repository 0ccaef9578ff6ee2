"""A client that hangs up mid-stream: the worker aborts the request and frees its KV blocks."""

from __future__ import annotations

import time

import grpc
import httpx

from kvmesh_proto.v1 import router_pb2, router_pb2_grpc


def worker_load(mesh) -> dict[str, tuple[int, int]]:
    with grpc.insecure_channel(mesh.kv_grpc) as channel:
        status = router_pb2_grpc.RouterStub(channel).Status(router_pb2.StatusRequest(), timeout=5)
    return {w.worker_id: (w.running_requests + w.waiting_requests, w.kv_blocks_used) for w in status.workers}


def wait_idle(mesh, timeout_s: float) -> dict[str, tuple[int, int]]:
    deadline = time.monotonic() + timeout_s
    while True:
        load = worker_load(mesh)
        if all(running == 0 and used == 0 for running, used in load.values()) or time.monotonic() > deadline:
            return load
        time.sleep(0.2)


def test_disconnect_mid_stream_aborts_and_frees_blocks(mesh):
    wait_idle(mesh, 30)
    body = {"prompt": "Write a very long essay about the sea.", "max_tokens": 400, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{mesh.kv_http}/v1/completions", json=body) as r:
        assert r.status_code == 200
        worker = r.headers["x-kvmesh-worker"]
        lines = r.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in received)
        # The router sees the worker's load in its next stats report (every 200 ms): a few tokens
        # can reach the client first on a quiet machine.
        deadline = time.monotonic() + 5
        while (busy := worker_load(mesh)[worker]) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert busy[0] == 1 and busy[1] > 0, busy
    # The connection is closed here, long before 400 tokens.
    load = wait_idle(mesh, 10)
    assert load[worker] == (0, 0), load


def test_a_grpc_deadline_ends_the_request_on_the_worker_too(mesh):
    wait_idle(mesh, 30)
    request = router_pb2.GenerateRequest(prompt="Write a very long essay about the sea.")
    request.sampling.max_tokens, request.sampling.ignore_eos = 2000, True
    with grpc.insecure_channel(mesh.kv_grpc) as channel:
        call = router_pb2_grpc.RouterStub(channel).Generate(request, timeout=3)
        try:
            for _ in call:
                pass
            raise AssertionError("2000 tokens within 3 s: the deadline was not applied")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    load = wait_idle(mesh, 10)
    assert all(v == (0, 0) for v in load.values()), load
