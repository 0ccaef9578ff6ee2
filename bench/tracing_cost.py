"""`kvmesh bench serve --tracing-compare`: what tracing costs, measured in one run.

One stack (workers, kvstore) and three routers on it: tracing off, OTLP at 100% sampling and
OTLP at 10%. Sampling is decided at the router; workers run with the OTLP exporter and a
sampling ratio of 0, so they record spans only for requests a router sampled (with the off
router they still hold a tracer provider whose spans never record: a few microseconds per
request). Spans go to an in-process OTLP collector, so export costs what it costs against a
live collector. Modes run in rotated order over several rounds on fresh prompts each time
(no mode profits from another's cache), and the medians are compared.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from bench.otlp_sink import OtlpSink
from bench.stack import BenchStack
from kvmesh.local_stores import free_port

MODES = {"tracing-off": None, "otlp-100": "1.0", "otlp-10": "0.1"}
EXPORT_DELAY_S = 6.0  # a little over the batch span processor's default schedule delay


def _start_routers(stack: BenchStack, endpoint: str) -> dict[str, str]:
    """The off router is the stack's own; the two traced ones are started next to it."""
    urls = {"tracing-off": stack.http["kv"]}
    for mode, ratio in MODES.items():
        if ratio is None:
            continue
        http_port = free_port()
        stack.stack.spawn(f"router-{mode}", f"router-{mode}-{stack.namespace}", "router.server",
                          ["--port", str(free_port()), "--http-port", str(http_port), "--trace-exporter", "otlp",
                           "--otlp-endpoint", endpoint, "--trace-sample-ratio", ratio])  # fmt: skip
        urls[mode] = f"http://127.0.0.1:{http_port}"
    stack.stack.wait_healthy()
    for url in urls.values():
        stack.stack.wait_router_workers(url, stack.workers)
    return urls


def tracing_compare(
    workloads: list[str], args: argparse.Namespace, run_one: Callable[[str, str, str, int], dict]
) -> tuple[list[dict], dict]:
    sink = OtlpSink(Path(tempfile.mkdtemp(prefix="kvmesh-otlp-")) / "spans.jsonl")
    worker_env = {"KVMESH_TRACE_EXPORTER": "otlp", "KVMESH_OTLP_ENDPOINT": sink.endpoint,
                  "KVMESH_TRACE_SAMPLE_RATIO": "0"}  # fmt: skip
    rows: list[dict] = []
    try:
        with BenchStack(args.workers, ["kv"], worker_env=worker_env) as stack:
            urls = _start_routers(stack, sink.endpoint)
            modes = list(MODES)
            for round_index in range(args.rounds):
                order = modes[round_index % len(modes):] + modes[:round_index % len(modes)]
                for mode in order:
                    for workload in workloads:
                        seed = args.seed + 1000 * round_index + 100 * modes.index(mode)
                        cpu_before = _router_cpu_s(stack, mode)
                        row = run_one(urls[mode], mode, workload, seed)
                        row["router_cpu_s"] = _router_cpu_s(stack, mode) - cpu_before
                        rows.append(row | {"round": round_index})
            time.sleep(EXPORT_DELAY_S)  # the batch exporters' last batches
            routers = {f"router-{mode}-{stack.namespace}": mode for mode in MODES}
            spans = collections.Counter(routers.get(span["instance"], "") for span in sink.spans())
    finally:
        sink.stop()
    return rows, _ratios(rows, spans)


def _router_cpu_s(stack: BenchStack, mode: str) -> float:
    """CPU seconds the mode's router process has used: unlike latency, not moved by other load."""
    name = "router" if MODES[mode] is None else f"router-{mode}"
    child = next(c for c in stack.stack.children if c.name == name)
    times = psutil.Process(child.proc.pid).cpu_times()
    return times.user + times.system


def _ratios(rows: list[dict], spans: collections.Counter) -> dict:
    figures = {}
    for mode in MODES:
        mine = [row["summary"] for row in rows if row["mode"] == mode]
        figures[mode] = {"output_tokens_per_s": statistics.median(s["output_tokens_per_s"] for s in mine),
                         "ttft_ms_p50": statistics.median(s["ttft_ms"]["p50"] for s in mine),
                         "router_spans": spans[mode],
                         "router_cpu_ms_per_request": 1000 * sum(r["router_cpu_s"] for r in rows if r["mode"] == mode)
                         / sum(s["requests"] for s in mine)}  # fmt: skip
    off = figures["tracing-off"]
    for values in figures.values():
        values["throughput_ratio"] = values["output_tokens_per_s"] / off["output_tokens_per_s"]
        values["ttft_ratio"] = values["ttft_ms_p50"] / off["ttft_ms_p50"]
        values["router_cpu_ratio"] = values["router_cpu_ms_per_request"] / off["router_cpu_ms_per_request"]
    return {"runs": len(rows) // len(MODES), "modes": figures}
