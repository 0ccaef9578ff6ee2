"""Store failures on a live mesh (real etcd, Redis, kvstore, SmolLM2 workers, restarted on the
same ports): requests keep being served correctly, the router says when kv routing is
degraded and why, and the index is rebuilt from the workers' resyncs once the store is back."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

from kvmesh.status import collect_status
from tests.e2e.faults import GreedyLoad, kvstore_stats, pools_idle_and_indexed, registered, router_status, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def load(fault_mesh, engine, tokenizer) -> GreedyLoad:
    return GreedyLoad.build(fault_mesh.http, engine, tokenizer, ["glaciers", "volcanoes", "deserts"], max_tokens=8)


async def kv_routing(mesh) -> tuple[str, str]:
    """(the router's degraded reason, its row in `kvmesh status`)."""
    rows = await collect_status(mesh.etcd.endpoint, mesh.namespace)
    (router,) = [row for row in rows if row["kind"] == "router"]
    return (await router_status(mesh)).kv_routing_degraded_reason, router["kv_routing"]


async def degraded_gauge(mesh, reason: str) -> float:
    rows = await collect_status(mesh.etcd.endpoint, mesh.namespace)
    (router,) = [row for row in rows if row["kind"] == "router"]
    async with httpx.AsyncClient() as client:
        text = (await client.get(router["metrics"])).text
    line = f'kvmesh_router_kv_routing_degraded{{reason="{reason}"}} '
    return float(next(row for row in text.splitlines() if row.startswith(line)).split()[-1])


async def served(load: GreedyLoad, index: int = 0) -> str:
    async with httpx.AsyncClient(timeout=120) as client:
        outcome = await load.one(client, index)
    assert outcome.status == 200 and not outcome.error, outcome
    return outcome.route


async def test_redis_down_routes_on_load_alone_and_says_so_then_workers_resync(fault_mesh, load):
    mesh = fault_mesh
    await served(load, 0)
    await served(load, 1)
    await wait_for(lambda: pools_idle_and_indexed(mesh), 20, "the index holds the workers' blocks")
    assert (await kvstore_stats(mesh)).blocks > 0

    mesh.redis.kill()
    await wait_for(lambda: _reason_is(mesh, "registry_unavailable"), 10, "the router reports Redis down")
    assert await kv_routing(mesh) == ("registry_unavailable", "degraded: registry_unavailable")
    assert await degraded_gauge(mesh, "registry_unavailable") == 1
    assert await served(load, 0) == "kv-load-only"  # served, correctly, without the index

    # Redis comes back empty (no persistence): without a single new request, the workers
    # re-publish everything they hold and kv routing resumes.
    mesh.redis.start_again()
    await wait_for(lambda: _reason_is(mesh, ""), 10, "kv routing resumes")
    await wait_for(lambda: pools_idle_and_indexed(mesh), 10, "the workers resynced the empty Redis")
    assert (await kvstore_stats(mesh)).blocks > 0
    assert await kv_routing(mesh) == ("", "ok")
    assert await degraded_gauge(mesh, "registry_unavailable") == 0
    assert await served(load, 1) == "kv"


async def _reason_is(mesh, reason: str) -> bool:
    return (await router_status(mesh)).kv_routing_degraded_reason == reason


async def test_etcd_down_keeps_existing_routes_and_everyone_registers_again(fault_mesh, load):
    mesh = fault_mesh
    before = set(await registered(mesh))
    mesh.etcd.kill()
    # Longer than the lease TTL (3 s): routes come from the last known membership.
    for turn in range(4):
        await served(load, turn % 2)
        await asyncio.sleep(1.0)
    assert len((await router_status(mesh)).workers) == 2
    mesh.etcd.start_again()
    await wait_for(lambda: _all_registered(mesh, before), 20, "every service registered again")
    assert len((await router_status(mesh)).workers) == 2
    await served(load, 0)


async def _all_registered(mesh, instance_ids: set[str]) -> bool:
    return set(await registered(mesh)) >= instance_ids


async def test_restarted_kvstore_rebuilds_the_index_from_resyncs(fault_mesh, load):
    mesh = fault_mesh
    (kvstore,) = [c for c in mesh.stack.children if c.name == "kvstore"]
    os.kill(kvstore.proc.pid, signal.SIGKILL)
    kvstore.proc.wait()
    mesh.stack.children.remove(kvstore)
    await wait_for(lambda: _reason_in(mesh, ("kvstore_unreachable", "no_kvstore")), 10, "the router notices")
    # A prompt no worker has seen, served while no kvstore listens: its blocks' events are
    # lost, only the workers' resyncs to the new kvstore can put them in the index.
    await served(load, 2)
    mesh.stack.start_kvstore()
    await wait_for(lambda: _reason_is(mesh, ""), 30, "kv routing resumes")
    await wait_for(lambda: pools_idle_and_indexed(mesh), 20, "the index matches the workers again")


async def _reason_in(mesh, reasons: tuple[str, ...]) -> bool:
    return (await router_status(mesh)).kv_routing_degraded_reason in reasons
