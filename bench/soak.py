"""`kvmesh bench soak`: a long run at ~80% of measured capacity with a fault injected every minute.

Starts its own stack (etcd, Redis, kvstore, router, ``--workers`` workers; ``--engine mock`` or the
real model), measures capacity with a short closed loop (or takes ``--rate``), then sends
Poisson arrivals at ``--load-fraction`` of it through the router's HTTP API for ``--duration-s``
while rotating faults every ``--fault-every-s``: SIGKILL a worker (restarted), SIGTERM a worker
(it drains; restarted), restart Redis, restart etcd. Reports per minute: requests completed,
failed (by status), migrated (router's count), p99 latency; and the RSS of every process sampled
over time, with its growth after the warm-up. Writes JSON and prints a short table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import psutil

from bench.registry import percentile
from kvmesh.launcher import LocalStack, StackOptions
from kvmesh.local_stores import free_port
from kvmesh_proto.v1 import router_pb2, router_pb2_grpc

FAULTS = ("sigkill_worker", "sigterm_worker", "redis_restart", "etcd_restart")
TOPICS = ("tides", "comets", "forests", "glaciers", "owls", "basalt", "orbits", "deserts")
RSS_EVERY_S = 5.0


@dataclass
class Result:
    started_s: float  # since the soak began
    latency_s: float
    status: int  # HTTP status; 0 = no answer (connection error, timeout)


def prompt(index: int) -> list[dict[str, str]]:
    topic = TOPICS[index % len(TOPICS)]
    return [{"role": "system", "content": f"You are a patient expert tutor on {topic}. " * 12},
            {"role": "user", "content": f"Tell me fact number {index % 5} about {topic}."}]  # fmt: skip


class Soak:
    def __init__(self, args: argparse.Namespace, stack: LocalStack, http: str, grpc_address: str) -> None:
        self.args = args
        self.stack = stack
        self.http = http
        self.grpc_address = grpc_address
        self.results: list[Result] = []
        self.faults: list[dict] = []
        self.migrations: list[tuple[float, int]] = []  # (seconds since start, router's total)
        self.rss: list[dict] = []
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def request(self, client: httpx.AsyncClient, index: int) -> Result:
        body = {"messages": prompt(index), "max_tokens": self.args.max_tokens, "temperature": 0, "ignore_eos": True}
        started = self.now()
        try:
            status = (await client.post(f"{self.http}/v1/chat/completions", json=body)).status_code
        except httpx.HTTPError:
            status = 0
        return Result(started, self.now() - started, status)

    async def measure_capacity(self, client: httpx.AsyncClient) -> float:
        """Completed requests per second of a closed loop with ``--capacity-concurrency`` in flight."""
        deadline = time.monotonic() + self.args.capacity_s
        done = 0

        async def lane(offset: int) -> None:
            nonlocal done
            index = offset
            while time.monotonic() < deadline:
                done += (await self.request(client, index)).status == 200
                index += self.args.capacity_concurrency

        start = time.monotonic()
        await asyncio.gather(*(lane(i) for i in range(self.args.capacity_concurrency)))
        return done / (time.monotonic() - start)

    async def arrivals(self, client: httpx.AsyncClient, rate: float, end_s: float) -> None:
        rng = random.Random(self.args.seed)
        pending: set[asyncio.Task] = set()
        index = 0
        while self.now() < end_s:
            await asyncio.sleep(rng.expovariate(rate))
            task = asyncio.create_task(self.request(client, index))
            task.add_done_callback(lambda t: (pending.discard(t), self.results.append(t.result())))
            pending.add(task)
            index += 1
        await asyncio.gather(*pending)

    async def inject_faults(self, end_s: float) -> None:
        turn = 0
        while True:
            await asyncio.sleep(self.args.fault_every_s)
            if self.now() >= end_s:
                return
            kind = FAULTS[turn % len(FAULTS)]
            started = self.now()
            await asyncio.to_thread(self.fault, kind, turn)
            self.faults.append({"at_s": round(started, 1), "fault": kind, "took_s": round(self.now() - started, 1)})
            turn += 1

    def fault(self, kind: str, turn: int) -> None:
        """Inject one fault and undo it (a store restarted, a worker started again)."""
        stores = {store.name: store for store in self.stack.stores}
        if kind in ("redis_restart", "etcd_restart"):
            store = stores[kind.split("_")[0]]
            store.kill()
            time.sleep(self.args.store_down_s)
            store.start_again()
            return
        workers = sorted((c for c in self.stack.children if c.name.startswith("aggregated")), key=lambda c: c.name)
        child = workers[turn % len(workers)]
        os.kill(child.proc.pid, signal.SIGKILL if kind == "sigkill_worker" else signal.SIGTERM)
        self.stack.restart_worker(child, timeout_s=120)

    async def sample(self, end_s: float) -> None:
        """Router migrations and every process's RSS, every few seconds."""
        async with grpc.aio.insecure_channel(self.grpc_address) as channel:
            router = router_pb2_grpc.RouterStub(channel)
            while self.now() < end_s + 1:
                with_status = [(c.name, c.proc.pid) for c in self.stack.children]
                with_status += [(s.name, s.proc.pid) for s in self.stack.stores]
                for name, pid in with_status:
                    try:
                        rss = psutil.Process(pid).memory_info().rss
                    except psutil.Error:
                        continue
                    self.rss.append({"t_s": round(self.now(), 1), "process": name, "pid": pid, "rss_mb": rss / 2**20})
                try:
                    status = await router.Status(router_pb2.StatusRequest(), timeout=2)
                    self.migrations.append((self.now(), status.migrations))
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(RSS_EVERY_S)

    async def run(self) -> dict:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
        async with httpx.AsyncClient(timeout=self.args.request_timeout_s, limits=limits) as client:
            if self.args.rate:
                rate, capacity = self.args.rate, self.args.rate / self.args.load_fraction
            else:
                capacity = await self.measure_capacity(client)
                rate = capacity * self.args.load_fraction
            print(f"capacity {capacity:.2f} req/s; soaking at {rate:.2f} req/s for {self.args.duration_s:.0f}s, "
                  f"a fault every {self.args.fault_every_s:.0f}s", flush=True)  # fmt: skip
            self.t0 = time.monotonic()
            end_s = self.args.duration_s
            await asyncio.gather(self.arrivals(client, rate, end_s), self.inject_faults(end_s), self.sample(end_s))
        return self.report(capacity, rate)

    def report(self, capacity: float, rate: float) -> dict:
        minutes = []
        for minute in range(int(-(-self.args.duration_s // 60))):
            rows = [r for r in self.results if minute * 60 <= r.started_s < (minute + 1) * 60]
            ok = [r.latency_s for r in rows if r.status == 200]
            failed = Counter(str(r.status) for r in rows if r.status != 200)
            minutes.append({
                "minute": minute + 1, "sent": len(rows), "completed": len(ok), "failed": sum(failed.values()),
                "failed_by_status": dict(failed), "migrated": self._migrated_between(minute * 60, (minute + 1) * 60),
                "p99_latency_s": percentile(ok, 99) if ok else None,
                "p50_latency_s": percentile(ok, 50) if ok else None,
                "faults": [f["fault"] for f in self.faults if minute * 60 <= f["at_s"] < (minute + 1) * 60],
            })  # fmt: skip
        return {
            "engine": self.args.engine, "workers": self.args.workers, "duration_s": self.args.duration_s,
            "fault_every_s": self.args.fault_every_s, "capacity_req_per_s": capacity, "rate_req_per_s": rate,
            "max_tokens": self.args.max_tokens, "load_average_1m": os.getloadavg()[0], "faults": self.faults,
            "per_minute": minutes, "rss_growth_after_warmup": self.rss_growth(), "rss_samples": self.rss,
        }  # fmt: skip

    def _migrated_between(self, start_s: float, end_s: float) -> int:
        inside = [total for t, total in self.migrations if t < end_s]
        before = [total for t, total in self.migrations if t < start_s]
        return (inside[-1] if inside else 0) - (before[-1] if before else 0)

    def rss_growth(self) -> list[dict]:
        """Per process (a restarted one is a new row): RSS at the end of its warm-up (``--warmup-s``
        after the soak began, or after the process was first seen if it started later) against its
        last sample; only processes sampled for at least a minute after their warm-up."""
        rows = []
        for key in dict.fromkeys((s["process"], s["pid"]) for s in self.rss):
            samples = [s for s in self.rss if (s["process"], s["pid"]) == key]
            warm_from = max(self.args.warmup_s, samples[0]["t_s"] + self.args.warmup_s if samples[0]["t_s"] else 0)
            start = next((s for s in samples if s["t_s"] >= warm_from), None)
            last = samples[-1]
            if start is None or last["t_s"] - start["t_s"] < 60:
                continue
            rows.append({"process": key[0], "pid": key[1], "from_s": start["t_s"], "to_s": last["t_s"],
                         "rss_mb_start": round(start["rss_mb"], 1), "rss_mb_end": round(last["rss_mb"], 1),
                         "growth_pct": round(100 * (last["rss_mb"] / start["rss_mb"] - 1), 2)})  # fmt: skip
        return rows


def format_table(result: dict) -> str:
    lines = [f"{'min':>3} {'sent':>5} {'ok':>5} {'failed':>6} {'migrated':>8} {'p50 s':>7} {'p99 s':>7}  faults"]
    for m in result["per_minute"]:
        p50 = f"{m['p50_latency_s']:.2f}" if m["p50_latency_s"] is not None else "-"
        p99 = f"{m['p99_latency_s']:.2f}" if m["p99_latency_s"] is not None else "-"
        failed = f"{m['failed']}" + (f" {m['failed_by_status']}" if m["failed"] else "")
        lines.append(f"{m['minute']:>3} {m['sent']:>5} {m['completed']:>5} {failed:>6} {m['migrated']:>8} "
                     f"{p50:>7} {p99:>7}  {', '.join(m['faults'])}")  # fmt: skip
    lines.append("RSS growth after warm-up (processes alive >= 60 s after it):")
    lines += [f"  {r['process']:<14} pid {r['pid']:<7} {r['rss_mb_start']:>7.1f} -> {r['rss_mb_end']:>7.1f} MB "
              f"({r['growth_pct']:+.1f}%) over {r['to_s'] - r['from_s']:.0f}s"
              for r in result["rss_growth_after_warmup"]]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmesh bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=600)
    parser.add_argument("--fault-every-s", type=float, default=60)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s; 0 = measure capacity first")
    parser.add_argument("--load-fraction", type=float, default=0.8, help="of the measured capacity")
    parser.add_argument("--capacity-s", type=float, default=30, help="how long capacity is measured")
    parser.add_argument("--capacity-concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--engine", choices=("real", "mock"), default="mock", help="mock workers or the real model")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup-s", type=float, default=60, help="RSS growth is measured after this")
    parser.add_argument("--store-down-s", type=float, default=2.0, help="how long Redis/etcd stay down")
    parser.add_argument("--request-timeout-s", type=float, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench/results/soak.json"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    grpc_port, http_port = free_port(), free_port()
    options = StackOptions(workers=args.workers, engine=args.engine, namespace=f"soak{time.time_ns() % 10**8}",
                           grpc_port=grpc_port, http_port=http_port,
                           state_dir=Path(tempfile.mkdtemp(prefix="kvmesh-soak-")))  # fmt: skip
    stack = LocalStack(options)
    try:
        stack.start_stores()
        stack.start_services()
        stack.wait_healthy()
        http = f"http://127.0.0.1:{http_port}"
        stack.wait_router_workers(http, args.workers)
        result = asyncio.run(Soak(args, stack, http, f"127.0.0.1:{grpc_port}").run())
    finally:
        stack.stop()
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
