"""`kvmesh bench routing`: replay one trace against mock workers under several routing modes.

For every worker count a fresh stack of mock workers starts (``--engine mock``: the real
scheduler, block manager and KV events, forward passes timed by a profile), with one router per
mode over the same workers. Each mode replays the trace with its own token synthesis seed (same
prefix structure, different content), so one mode's cache never helps another. The report —
``report.md``, ``ttft_cdf.png``, ``hit_rate.png``, ``balance.png`` and ``routing.json`` — sets
each mode's cache hit rate beside the oracle's (one worker with an infinite cache).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.replay import load_trace, run_replay
from kvmesh.config import RouterSettings
from services.engine.timing_model import DEFAULT_PROFILE, TimingProfile

TARGET_WORKERS = 16


def run_matrix(args: argparse.Namespace) -> list[dict]:
    from bench.stack import BenchStack

    # Dozens of services on a few cores miss 3 s keep-alives; an expired lease makes the kvstore
    # purge a live worker's blocks (or the router lose the kvstore), which would be measured as
    # a routing failure. Every child inherits this (flags and KVMESH_* variables may override).
    os.environ.setdefault("KVMESH_LEASE_TTL_S", "20")
    profile = slowed_profile(args.profile, args.slowdown, args.out)
    # The kv router models step times with the profile the mock workers sleep by.
    os.environ.setdefault("KVMESH_COST_PROFILE", profile)
    os.environ.update(args.router_env)
    args.router_settings = {**router_env(), **args.router_env}
    if args.slowdown != 1:  # the slack is in the profile's time too
        slack_ms = float(os.environ.get("KVMESH_TTFT_SLACK_MS", RouterSettings.ttft_slack_ms))
        os.environ["KVMESH_TTFT_SLACK_MS"] = str(slack_ms * args.slowdown)
    trace = load_trace(args.trace, args.limit)
    env = {"KVMESH_MOCK_PROFILE": profile, "KVMESH_LOG_LEVEL": "WARNING",
           **dict(item.split("=", 1) for item in args.worker_env)}  # fmt: skip
    if args.kv_cache_blocks:
        env["KVMESH_KV_CACHE_BLOCKS"] = str(args.kv_cache_blocks)
    rows = []
    for workers in args.workers:
        print(f"starting {workers} mock workers ...", flush=True)
        with BenchStack(workers, args.modes, worker_env=env, engine="mock", state_dir=args.out / "stack",
                        ready_timeout_s=900, fleet_size=args.fleet_size) as stack:  # fmt: skip
            # Every replay has its own token synthesis seed: no run is helped by an earlier one's cache.
            seed = args.seed
            for speedup in args.speedup:
                for mode in args.modes:
                    result = run_replay(stack.grpc[mode], trace, speedup / args.slowdown, args.max_tokens,
                                        stack.stack.etcd_endpoint, stack.namespace, seed=seed)  # fmt: skip
                    seed += 1
                    in_profile_time(result, args.slowdown)
                    row = {"workers": workers, "speedup": speedup, "mode": mode, **result}
                    rows.append(row)
                    print(summary_line(row), flush=True)
    return rows


def slowed_profile(profile: str, slowdown: float, out: Path) -> str:
    """``profile`` with every step ``slowdown`` times longer (a JSON written under ``out``), or
    ``profile`` itself at 1."""
    if slowdown == 1:
        return profile
    slowed = TimingProfile.load(profile)
    slowed.coefficients = {k: v * slowdown for k, v in slowed.coefficients.items()}
    slowed.description = f"{slowed.name} ×{slowdown:g} slower (kvmesh bench routing --slowdown). {slowed.description}"
    path = out / f"{slowed.name}-x{slowdown:g}.json"
    slowed.save(path)
    return str(path.resolve())


def in_profile_time(result: dict, slowdown: float) -> None:
    """Latencies of a slowed run divided back to the profile's own time (hit rates and busy
    ratios need nothing: every modelled duration and every trace gap was stretched alike)."""
    if slowdown == 1:
        return
    summary = result["summary"]
    for name in ("ttft_ms", "e2e_ms"):
        summary[name] = {k: v / slowdown for k, v in summary[name].items()}
        for request in result["requests"]:
            request[name] /= slowdown


def summary_line(row: dict) -> str:
    s = row["summary"]
    return (f"{row['workers']:>3} workers ×{row['speedup']:<4g} {row['mode']:<12} {s['requests']:>4} req "
            f"{s['errors']:>3} err  "
            f"TTFT p50 {s['ttft_ms']['p50']:>7.0f} ms p99 {s['ttft_ms']['p99']:>7.0f} ms  "
            f"hit {s['cache_hit_rate']:>6.1%} (oracle {s['oracle_hit_rate']:.1%})  "
            f"busy max/mean {s.get('busy_max_over_mean', float('nan')):.2f}")


def plot(rows: list[dict], out: Path) -> list[str]:
    """The three figures; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["workers"], r["speedup"]) for r in rows})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    for ax, setting in zip(axes[0], settings, strict=True):
        for row in (r for r in rows if (r["workers"], r["speedup"]) == setting):
            ttft = sorted(q["ttft_ms"] for q in row["requests"] if not q["error"])
            ax.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=row["mode"])
        ax.set(title=setting_label(setting), xlabel="TTFT (ms)", ylabel="fraction of requests", xscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ttft_cdf.png", dpi=100)
    plt.close(fig)

    def bars(metric: str, ylabel: str, name: str, line: float | None = None, line_label: str = "") -> None:
        fig, ax = plt.subplots(figsize=(max(7, 1.5 * len(settings)), 4))
        width = 0.8 / len(modes)
        for i, mode in enumerate(modes):
            values = [next((metric_of(r, metric) for r in rows
                            if (r["workers"], r["speedup"]) == setting and r["mode"] == mode), 0.0)
                      for setting in settings]  # fmt: skip
            ax.bar([c + (i - (len(modes) - 1) / 2) * width for c in range(len(settings))], values, width, label=mode)
        if line is not None:
            ax.axhline(line, color="black", linestyle="--", label=line_label)
        ax.set(xticks=range(len(settings)), xticklabels=[setting_label(s) for s in settings], ylabel=ylabel)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)

    oracle = rows[0]["summary"]["oracle_hit_rate"]
    bars("cache_hit_rate", "prefix cache hit rate", "hit_rate.png", oracle, f"oracle {oracle:.1%}")
    bars("busy_max_over_mean", "max / mean busy time", "balance.png", 1.0, "perfect balance")
    return ["ttft_cdf.png", "hit_rate.png", "balance.png"]


def setting_label(setting: tuple[int, float]) -> str:
    workers, speedup = setting
    return f"{workers} workers ×{speedup:g}"


def metric_of(row: dict, metric: str) -> float:
    return float(row["summary"].get(metric, float("nan")))


def markdown(rows: list[dict], args: argparse.Namespace, figures: list[str]) -> str:
    lines = [
        "# Routing report", "",
        f"Trace `{args.trace}` ({rows[0]['summary']['requests']} requests) at speed-up "
        f"{', '.join(f'{x:g}' for x in args.speedup)}, mock workers with timing profile `{args.profile}`"
        + (f", {args.kv_cache_blocks} KV blocks each" if args.kv_cache_blocks else "")
        + (f"; run {args.slowdown:g}× slowed down (profile steps ×{args.slowdown:g}, trace ÷{args.slowdown:g} "
           "further), latencies given back in the profile's time" if args.slowdown != 1 else "") + ". Router settings: "
        + (", ".join(f"`{k}={v}`" for k, v in sorted(args.router_settings.items())) or "defaults") + ".", "",
        f"Oracle hit rate (one worker, infinite cache): **{rows[0]['summary']['oracle_hit_rate']:.1%}**", "",
        "| workers | speed-up | mode | requests | errors | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | hit rate "
        "| hit / oracle | busy max/mean |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        s = r["summary"]
        lines.append(f"| {r['workers']} | {r['speedup']:g} | {r['mode']} | {s['requests']} | {s['errors']} | "
                     f"{s['ttft_ms']['p50']:.0f} | "
                     f"{s['ttft_ms']['p99']:.0f} | {s['e2e_ms']['p50']:.0f} | {s['cache_hit_rate']:.1%} | "
                     f"{s['cache_hit_rate'] / max(s['oracle_hit_rate'], 1e-9):.0%} | "
                     f"{s.get('busy_max_over_mean', float('nan')):.2f} |")
    lines += ["", *targets(rows), "", *[f"![{f}]({f})" for f in figures], ""]
    return "\n".join(lines)


def router_env() -> dict[str, str]:
    """The router settings this run set in the environment (the ones kv routing reads)."""
    names = ("KVMESH_KV_COST", "KVMESH_TTFT_SLACK_MS", "KVMESH_COST_PROFILE", "KVMESH_OVERLAP_WEIGHT",
             "KVMESH_ROUTER_TEMPERATURE")  # fmt: skip
    return {name: os.environ[name] for name in names if name in os.environ}


def targets(rows: list[dict]) -> list[str]:
    """The issue's targets at 16 workers, each said met or not, at every speed-up run."""
    speedups = sorted({r["speedup"] for r in rows if r["workers"] == TARGET_WORKERS})
    if not speedups:
        return [f"(targets are judged at {TARGET_WORKERS} workers in kv mode: not run)"]
    out = []
    for speedup in speedups:
        by_mode = {r["mode"]: r["summary"] for r in rows if (r["workers"], r["speedup"]) == (TARGET_WORKERS, speedup)}
        out += targets_at(by_mode, f"Targets at {TARGET_WORKERS} workers, speed-up {speedup:g}:")
    return out


def targets_at(by_mode: dict[str, dict], title: str) -> list[str]:
    if "kv" not in by_mode:
        return [f"{title} kv mode not run"]
    kv = by_mode["kv"]
    out = [title]
    ratio = kv["cache_hit_rate"] / max(kv["oracle_hit_rate"], 1e-9)
    out.append(f"- kv hit rate ≥ 90% of oracle: {ratio:.0%} — {'met' if ratio >= 0.9 else 'NOT met'}")
    if "round_robin" in by_mode:
        rr = by_mode["round_robin"]["ttft_ms"]["p50"]
        ratio = kv["ttft_ms"]["p50"] / rr
        out.append(f"- kv TTFT p50 ≤ 1/3 of round_robin's: {ratio:.2f}× — {'met' if ratio <= 1 / 3 else 'NOT met'}")
    balance = kv.get("busy_max_over_mean", float("nan"))
    out.append(f"- kv busy max/mean < 1.3: {balance:.2f} — {'met' if balance < 1.3 else 'NOT met'}")
    return [*out, ""]


def write_report(rows: list[dict], args: argparse.Namespace) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))  # fmt: skip
    figures = plot(rows, args.out)
    report = args.out / "report.md"
    report.write_text(markdown(rows, args, figures))
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvmesh bench routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=Path(__file__).parent / "traces" / "conversations.jsonl")
    parser.add_argument("--workers", default="8,16,64", help="comma-separated worker counts")
    parser.add_argument("--modes", default="kv,round_robin,random", help="comma-separated router modes")
    parser.add_argument("--speedup", default="1", help="trace time is divided by this; comma-separated for a "
                        "sweep on the same workers")
    parser.add_argument("--slowdown", type=float, default=1.0,
                        help="run the simulation this many times slower (profile steps ×K, trace time ×K) and report "
                             "latencies in the profile's time: the same load with K× less CPU per second for the "
                             "router and the mock workers")
    parser.add_argument("--limit", type=int, default=0, help="replay only the first N requests")
    parser.add_argument("--max-tokens", type=int, default=1 << 20, help="cap on each request's output length")
    parser.add_argument("--profile", default=DEFAULT_PROFILE, help="mock timing profile (name or path)")
    parser.add_argument("--kv-cache-blocks", type=int, default=0, help="KV blocks per mock worker; 0 = default")
    parser.add_argument("--worker-env", action="append", default=[], metavar="KVMESH_X=V",
                        help="extra worker setting, e.g. KVMESH_EVENT_FLUSH_MS=100 (repeatable)")
    parser.add_argument("--router-env", action="append", default=[], metavar="KVMESH_X=V",
                        help="router setting, e.g. KVMESH_TTFT_SLACK_MS=50 (repeatable; named in the report)")
    parser.add_argument("--fleet-size", type=int, default=8, help="mock workers per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/routing"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.workers = [int(w) for w in args.workers.split(",")]
        args.speedup = [float(x) for x in args.speedup.split(",")]
    except ValueError:
        print("--workers and --speedup must be comma-separated numbers", file=sys.stderr)
        return 2
    if min(args.speedup) <= 0 or args.slowdown <= 0:
        print("--speedup and --slowdown must be positive", file=sys.stderr)
        return 2
    args.modes = args.modes.split(",")
    if any("=" not in item for item in args.worker_env + args.router_env):
        print("--worker-env and --router-env take KVMESH_NAME=VALUE", file=sys.stderr)
        return 2
    args.router_env = dict(item.split("=", 1) for item in args.router_env)
    rows = run_matrix(args)
    report = write_report(rows, args)
    print(f"report: {report}")
    return 0 if all(not r["summary"]["errors"] for r in rows) else 1
