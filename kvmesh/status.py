"""`kvmesh status`: every registered instance, whether it answers its health check, for
the kvstore how many blocks it indexes, and for a router whether kv routing works or is
degraded to load-only (and why)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import grpc

from kvmesh.discovery import Discovery
from kvmesh.grpc_service import check_health, mesh_channel
from kvmesh_proto.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc, router_pb2, router_pb2_grpc

PLANNER_DECISIONS_SHOWN = 5


async def _kvstore_blocks(address: str) -> int | None:
    try:
        async with mesh_channel(address) as channel:
            stats = await kvstore_pb2_grpc.KvStoreStub(channel).Stats(
                kvstore_pb2.KvStoreStatsRequest(), timeout=2.0
            )
            return stats.blocks if stats.registry_available else None
    except grpc.aio.AioRpcError:
        return None


async def _kv_routing(address: str) -> str | None:
    """``ok``, ``degraded: <reason>`` (routing on load alone), or None if the router can't say."""
    try:
        async with mesh_channel(address) as channel:
            status = await router_pb2_grpc.RouterStub(channel).Status(router_pb2.StatusRequest(), timeout=2.0)
    except grpc.aio.AioRpcError:
        return None
    reason = status.kv_routing_degraded_reason
    return f"degraded: {reason}" if reason else "ok"


async def _describe(info: common_pb2.InstanceInfo) -> dict[str, Any]:
    row: dict[str, Any] = {
        "kind": info.kind,
        "id": info.instance_id,
        "address": info.address,
        "role": info.role,
        "model": info.model,
        "pid": info.pid,
        "healthy": await check_health(info.address),
    }
    if info.engine:
        row["engine"] = info.engine
    if info.http_address:
        row["http_address"] = info.http_address
    if info.metrics_port:
        row["metrics"] = f"http://{info.address.rpartition(':')[0]}:{info.metrics_port}/metrics"
    if info.kind == "kvstore":
        row["blocks"] = await _kvstore_blocks(info.address)
    if info.kind == "router":
        row["kv_routing"] = await _kv_routing(info.address)
    return row


async def collect_status(etcd_endpoint: str, namespace: str) -> list[dict[str, Any]]:
    from planner.decision_log import read_decisions

    discovery = Discovery(etcd_endpoint, namespace)
    try:
        instances = await asyncio.wait_for(discovery.list(), 5.0)
        decisions = await asyncio.wait_for(read_decisions(discovery), 5.0)
    finally:
        await discovery.close()
    ordered = sorted(instances.values(), key=lambda info: (info.kind, info.instance_id))
    rows = list(await asyncio.gather(*(_describe(info) for info in ordered)))
    for row in rows:
        if row["kind"] == "planner":
            row["decisions"] = decisions[-PLANNER_DECISIONS_SHOWN:]
    return rows


def _decision_line(d: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(d.get("at_unix", 0)))
    who = f" {', '.join(d['worker_ids'])}" if d.get("worker_ids") else ""
    return f"  {when} {d.get('action')} {d.get('role')}{who} [{d.get('outcome')}]: {d.get('reason')}"


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no instances registered"
    columns = ["kind", "id", "address", "role", "model", "healthy", "blocks", "kv_routing", "metrics"]
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    for row in rows:
        if row.get("decisions"):
            lines += [f"planner {row['id']}: last decisions", *map(_decision_line, row["decisions"])]
    return "\n".join(lines)


def print_status(etcd_endpoint: str, namespace: str, as_json: bool) -> int:
    try:
        rows = asyncio.run(collect_status(etcd_endpoint, namespace))
    except Exception as exc:
        message = f"cannot reach etcd at {etcd_endpoint}: {exc or type(exc).__name__}"
        print(json.dumps({"error": message}) if as_json else message)
        return 1
    print(json.dumps(rows, indent=2) if as_json else format_table(rows))
    return 0
