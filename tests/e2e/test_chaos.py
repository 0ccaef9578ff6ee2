"""Chaos under steady load, bounded in time and count, loopback only: a worker SIGKILLed (and
started again), Redis restarted, etcd restarted, then a rolling restart — each worker in turn
SIGTERMed (it drains: leaves etcd, refuses new requests with UNAVAILABLE so the router retries
elsewhere, finishes what it runs) and started again. Every request completes with the greedy
reference text or fails with a clear retriable status (429/503); afterwards no KV block is leaked
and the index matches the workers' blocks."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from tests.e2e.faults import GreedyLoad, pools_idle_and_indexed, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PAUSE_S = 2.0  # load between faults


async def test_chaos_loses_no_request_corrupts_no_output_and_leaks_no_block(fault_mesh, engine, tokenizer):
    mesh = fault_mesh
    load = GreedyLoad.build(mesh.http, engine, tokenizer, ["owls", "rivers", "basalt", "orbits"], max_tokens=16)
    stop = asyncio.Event()
    running = asyncio.create_task(load.run(stop))
    try:
        await wait_for(lambda: load.completed_at_least(2), 60, "load is flowing")
        first, _ = mesh.workers()

        os.kill(first.proc.pid, signal.SIGKILL)
        await asyncio.to_thread(mesh.stack.restart_worker, first)
        await asyncio.sleep(PAUSE_S)
        mesh.redis.kill()
        await asyncio.sleep(PAUSE_S)
        mesh.redis.start_again()
        await asyncio.sleep(PAUSE_S)
        mesh.etcd.kill()
        await asyncio.sleep(PAUSE_S)
        mesh.etcd.start_again()
        await asyncio.to_thread(mesh.stack.wait_router_workers, mesh.http, 2, 300)

        for child in mesh.workers():  # the rolling restart
            os.kill(child.proc.pid, signal.SIGTERM)
            await asyncio.to_thread(child.proc.wait, 60)  # the drain: at most --drain-timeout-s (30 s here)
            assert child.proc.returncode == 0
            await asyncio.to_thread(mesh.stack.restart_worker, child)
            await asyncio.to_thread(mesh.stack.wait_router_workers, mesh.http, 2, 300)
        done = load.completed()
        await wait_for(lambda: load.completed_at_least(done + 2), 60, "the recovered mesh serves")
    finally:
        stop.set()
        await running
    assert not load.failures(), load.failures()
    assert load.completed() >= 6
    await wait_for(lambda: pools_idle_and_indexed(mesh), 30, "no block leaked, the index matches the workers")

