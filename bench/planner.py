"""`kvmesh bench planner`: a phase-changing workload on 8 mock workers, first on a fixed split
(4 prefill + 4 decode), then on the same split with the planner moving workers, in one run.

Phases (each a third of ``--duration-s``): long answers (decode-heavy), long prompts
(prefill-heavy), long answers again. Arrivals are Poisson with a fixed seed, so both arms get
the very same requests at the very same times. Reported per arm: goodput (share of requests
meeting both targets: TTFT ≤ ``--ttft-p90-ms`` and mean inter-token gap ≤ ``--itl-p90-ms``),
worker-minutes (registered workers integrated over the run), latency percentiles per phase,
and the planner's decisions. The mock engine's timing profile is ``--profile`` with every
coefficient multiplied by ``--time-scale`` (slower steps: fewer tokens per second through the
router, so the router is not what is measured on a small machine).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.replay import ReplayResult, TokenSynth, TraceRequest, replay
from bench.serve import _pct
from kvmesh.discovery import Discovery
from kvmesh.launcher import LocalStack, StackOptions
from kvmesh.local_stores import free_port
from planner.capacity import CapacityModel
from planner.decision_log import read_decisions
from services.engine.timing_model import TimingProfile

WORKERS = 8
REQUEST_TIMEOUT_S = 300.0  # past it a request has long missed both targets


@dataclass(frozen=True)
class Phase:
    name: str
    seconds: float
    rate: float  # requests per second
    prompt_tokens: int
    output_tokens: int


def default_phases(duration_s: float, scale: float) -> list[Phase]:
    """Rates chosen (for the cpu-smollm2 profile) so a 4 + 4 split is short of decode workers in
    the answer phases and of prefill workers in the prompt phase; steps ``scale``× slower take
    ``scale``× fewer requests."""
    third = duration_s / 3
    answers = Phase("long-answers", third, 2.6 / scale, 300, 256)
    prompts = Phase("long-prompts", third, 2.0 / scale, 1024, 16)
    return [answers, prompts, replace(answers, name="long-answers-again")]


def workload(phases: list[Phase], seed: int) -> tuple[list[TraceRequest], list[str]]:
    """Poisson arrivals phase by phase; every prompt distinct (no prefix-cache help)."""
    rng = random.Random(seed)
    requests, names = [], []
    start = 0.0
    next_id = 0
    for phase in phases:
        t = start + rng.expovariate(phase.rate)
        while t < start + phase.seconds:
            blocks = -(-phase.prompt_tokens // 512)
            requests.append(TraceRequest(t * 1000, phase.prompt_tokens, phase.output_tokens,
                                         list(range(next_id, next_id + blocks))))  # fmt: skip
            names.append(phase.name)
            next_id += blocks
            t += rng.expovariate(phase.rate)
        start += phase.seconds
    return requests, names


def scaled_profile(name: str, scale: float, path: Path) -> Path:
    profile = TimingProfile.load(name)
    profile.coefficients = {k: v * scale for k, v in profile.coefficients.items()}
    profile.name, profile.description = f"{profile.name}-x{scale:g}", f"{profile.description} (×{scale:g})"
    profile.save(path)
    return path


class WorkerCount:
    """Samples the registered prefill / decode workers once a second (a worker switching roles
    is out of etcd for its drain, seconds): the timeline worker-minutes are taken from."""

    def __init__(self, etcd_endpoint: str, namespace: str) -> None:
        self._discovery = Discovery(etcd_endpoint, namespace)
        self.timeline: list[tuple[float, int, int]] = []

    async def run(self) -> None:
        start = time.monotonic()
        while True:
            roles = [w.role for w in (await self._discovery.list("worker")).values()]
            self.timeline.append((round(time.monotonic() - start, 1), roles.count("prefill"), roles.count("decode")))
            await asyncio.sleep(1.0)

    def worker_minutes(self, until_s: float = math.inf) -> float:
        """Registered workers integrated over the first ``until_s`` seconds."""
        total = 0.0
        for (t0, prefill, decode), (t1, _, _) in itertools.pairwise(self.timeline):
            if t0 < until_s:
                total += (prefill + decode) * (min(t1, until_s) - t0)
        return total / 60

    async def decisions(self) -> list[dict]:
        return await read_decisions(self._discovery)

    async def close(self) -> None:
        await self._discovery.close()


def _itl_ms(r: ReplayResult) -> float:
    return (r.e2e_ms - r.ttft_ms) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0


def summarize(results: list[ReplayResult], names: list[str], ttft_ms: float, itl_ms: float) -> dict:
    def stats(rows: list[ReplayResult]) -> dict:
        ok = [r for r in rows if not r.error]
        good = [r for r in ok if r.ttft_ms <= ttft_ms and _itl_ms(r) <= itl_ms]
        return {"requests": len(rows), "errors": len(rows) - len(ok), "goodput": len(good) / max(len(rows), 1),
                "ttft_ms_p90": _pct([r.ttft_ms for r in ok], 0.9), "itl_ms_p90": _pct([_itl_ms(r) for r in ok], 0.9),
                "ttft_ms_p50": _pct([r.ttft_ms for r in ok], 0.5),
                "itl_ms_p50": _pct([_itl_ms(r) for r in ok], 0.5)}  # fmt: skip

    phases = {name: stats([r for r, n in zip(results, names, strict=True) if n == name])
              for name in dict.fromkeys(names)}  # fmt: skip
    return {"all": stats(results), "phases": phases}


def run_arm(args: argparse.Namespace, planner: bool, requests: list[TraceRequest], prompts: list[list[int]],
            names: list[str], profile: Path, state_dir: Path) -> dict:  # fmt: skip
    namespace = f"bp{uuid.uuid4().hex[:6]}"
    planner_args = ["--profile", str(profile), "--ttft-p90-ms", str(args.ttft_p90_ms), "--itl-p90-ms",
                    str(args.itl_p90_ms), "--interval-s", str(args.interval_s), "--window-s", str(args.window_s),
                    "--cooldown-s", str(args.cooldown_s), "--min-workers", str(WORKERS), "--max-workers",
                    str(WORKERS), "--target-utilization", str(args.target_utilization)]  # fmt: skip
    options = StackOptions(prefill=WORKERS // 2, decode=WORKERS // 2, engine="mock", namespace=namespace,
                           grpc_port=free_port(), http_port=free_port(), state_dir=state_dir / namespace,
                           worker_env={"KVMESH_MOCK_PROFILE": str(profile)}, planner=planner,
                           planner_args=planner_args, ready_timeout_s=300)  # fmt: skip
    stack = LocalStack(options)
    try:
        stack.start_stores()
        stack.start_kvstore()
        stack.add_mock_fleet(0, WORKERS // 2, "prefill")
        stack.add_mock_fleet(WORKERS // 2, WORKERS // 2, "decode")
        stack.add_router("router", "kv", options.grpc_port, options.http_port)
        if planner:
            stack.add_planner()
        stack.wait_healthy()
        stack.wait_router_workers(f"http://127.0.0.1:{options.http_port}", WORKERS)
        results, wall_s, count, decisions = asyncio.run(_drive(stack, requests, prompts))
    finally:
        stack.stop()
    summary = summarize(results, names, args.ttft_p90_ms, args.itl_p90_ms)
    # Over the workload (until its last arrival), and over the whole run (until the last answer).
    return {"planner": planner, "wall_s": wall_s, "worker_minutes": count.worker_minutes(args.duration_s),
            "worker_minutes_wall": count.worker_minutes(), **summary, "timeline": count.timeline,
            "decisions": decisions}  # fmt: skip


async def _drive(stack: LocalStack, requests: list[TraceRequest],
                 prompts: list[list[int]]) -> tuple[list[ReplayResult], float, WorkerCount, list[dict]]:  # fmt: skip
    count = WorkerCount(stack.etcd_endpoint, stack.options.namespace)
    sampler = asyncio.create_task(count.run())
    try:
        # A deadline per request: one stream that never ends must not hang the run (it counts as an error).
        results, wall_s = await replay(f"127.0.0.1:{stack.options.grpc_port}", requests, prompts, speedup=1.0,
                                       timeout_s=REQUEST_TIMEOUT_S)  # fmt: skip
        decisions = await count.decisions()
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        await count.close()
    return results, wall_s, count, decisions


def format_table(report: dict) -> str:
    lines = [f"{'arm':<10} {'phase':<20} {'requests':>8} {'errors':>6} {'goodput':>8} {'TTFT p90':>9} "
             f"{'ITL p90':>8} {'worker-min':>10} {'(to last answer)':>16}"]  # fmt: skip
    for arm in report["arms"]:
        label = "planner" if arm["planner"] else "fixed 4+4"
        for phase, s in [("all", arm["all"]), *arm["phases"].items()]:
            work, wall = ((f"{arm['worker_minutes']:.1f}", f"{arm['worker_minutes_wall']:.1f}") if phase == "all"
                          else ("", ""))  # fmt: skip
            lines.append(f"{label:<10} {phase:<20} {s['requests']:>8} {s['errors']:>6} {s['goodput']:>8.1%} "
                         f"{s['ttft_ms_p90']:>7.0f}ms {s['itl_ms_p90']:>6.0f}ms {work:>10} {wall:>16}")  # fmt: skip
    fixed, planned = (a["all"]["goodput"] for a in report["arms"])
    lines.append(f"goodput planner / fixed: {planned / fixed:.2f}×" if fixed else "fixed split goodput is 0")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmesh bench planner", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=600.0, help="workload length per arm")
    parser.add_argument("--ttft-p90-ms", type=float, default=0.0, help="TTFT target; 0 = 3× a long prompt's prefill")
    parser.add_argument("--itl-p90-ms", type=float, default=0.0, help="ITL target; 0 = 2× one decode step's base")
    parser.add_argument("--profile", default="cpu-smollm2", help="mock timing profile (name or path)")
    parser.add_argument("--time-scale", type=float, default=2.0, help="multiplies every profile coefficient")
    parser.add_argument("--interval-s", type=float, default=5.0)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--cooldown-s", type=float, default=30.0)
    parser.add_argument("--target-utilization", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default="fixed,planner", help="which arms to run, in order")
    parser.add_argument("--json", type=Path, default=Path("bench/results/planner.json"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    state_dir = Path(tempfile.mkdtemp(prefix="kvmesh-bench-planner-"))
    profile = scaled_profile(args.profile, args.time_scale, state_dir / "profile.json")
    capacity = CapacityModel(TimingProfile.load(str(profile)), 1.0, 1.0)
    phases = default_phases(args.duration_s, args.time_scale)
    args.ttft_p90_ms = args.ttft_p90_ms or 3000 * capacity.prefill_seconds(phases[1].prompt_tokens)
    args.itl_p90_ms = args.itl_p90_ms or 2000 * capacity.coef["base"]
    requests, names = workload(phases, args.seed)
    synth = TokenSynth(args.seed)
    prompts = [synth.prompt(r, i) for i, r in enumerate(requests)]
    print(f"{len(requests)} requests over {args.duration_s:.0f} s per arm; targets TTFT {args.ttft_p90_ms:.0f} ms, "
          f"ITL {args.itl_p90_ms:.0f} ms", flush=True)  # fmt: skip
    arms = []
    for arm in args.arms.split(","):
        arms.append(run_arm(args, arm == "planner", requests, prompts, names, profile, state_dir))
        print(f"{arm}: goodput {arms[-1]['all']['goodput']:.1%}", flush=True)
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "phases": [asdict(p) for p in phases],
              "arms": arms}  # fmt: skip
    if len(arms) == 2:
        print(format_table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"results: {args.json}")
    return 0 if all(a["all"]["errors"] == 0 for a in arms) else 1


if __name__ == "__main__":
    sys.exit(main())
