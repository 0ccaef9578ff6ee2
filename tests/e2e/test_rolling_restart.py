"""A rolling restart under load: each worker in turn gets SIGTERM (it drains: leaves etcd, refuses
new requests with UNAVAILABLE so the router retries elsewhere, finishes what it runs) and is
started again. No request is lost or answered wrongly."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from tests.e2e.faults import GreedyLoad, pools_idle_and_indexed, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


async def test_rolling_restart_of_every_worker_under_load_loses_no_request(fault_mesh, engine, tokenizer):
    mesh = fault_mesh
    load = GreedyLoad.build(mesh.http, engine, tokenizer, ["tides", "comets", "forests"], max_tokens=24)
    stop = asyncio.Event()
    running = asyncio.create_task(load.run(stop))
    await wait_for(lambda: load.completed_at_least(2), 60, "load is flowing")
    for child in list(mesh.workers()):
        os.kill(child.proc.pid, signal.SIGTERM)
        started = time.monotonic()
        while child.proc.poll() is None:  # the drain: at most --drain-timeout-s (30 s here)
            assert time.monotonic() - started < 60
            await asyncio.sleep(0.1)
        assert child.proc.returncode == 0
        mesh.stack.restart_worker(child)
        await asyncio.to_thread(mesh.stack.wait_router_workers, mesh.http, 2, 240)
        served = len(load.outcomes)
        await wait_for(lambda n=served + 2: load.completed_at_least(n), 60, "the restarted mesh serves")
    stop.set()
    await running
    assert load.outcomes and all(o.status == 200 and not o.error for o in load.outcomes), [
        o for o in load.outcomes if o.error]  # fmt: skip
    await wait_for(lambda: pools_idle_and_indexed(mesh), 30, "no block leaked, the index matches the workers")

