"""Traces, metrics and the dashboard on a real disaggregated stack (1 prefill + 1 decode worker),
all services exporting spans over OTLP to a collector in the test process."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.otlp_sink import OtlpSink
from kvmesh.launcher import LocalStack
from kvmesh.status import collect_status
from tests.e2e.test_disaggregated import LOCAL_PREFILL_TOKENS, complete, http, long_text
from tests.fixtures.mesh import disaggregated_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def collector(tmp_path_factory) -> Iterator[OtlpSink]:
    sink = OtlpSink(tmp_path_factory.mktemp("otlp") / "spans.jsonl")
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def traced(etcd_server, redis_server, tmp_path_factory, collector) -> Iterator[LocalStack]:
    env = {"KVMESH_MAX_LOCAL_PREFILL_TOKENS": LOCAL_PREFILL_TOKENS, "KVMESH_TRACE_EXPORTER": "otlp",
           "KVMESH_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"}  # fmt: skip
    with disaggregated_stack(etcd_server, redis_server, tmp_path_factory.mktemp("traced"), env) as stack:
        yield stack


def wait_for(check: Callable[[], object], what: str, timeout_s: float = 60.0) -> object:
    """Poll until ``check`` returns something truthy (export and stats are asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            assert result, f"timed out waiting for {what}"
            return result
        time.sleep(0.2)


def last_record(stack: LocalStack) -> dict:
    return httpx.get(f"{http(stack)}/dashboard/data", timeout=10).json()["recent"][0]


# -- tracing -----------------------------------------------------------------------------------

EXPECTED_PARENTS = {
    # span name: (service that emits it, parent span name)
    "tokenize": ("kvmesh-router", "generate"),
    "route": ("kvmesh-router", "generate"),
    "worker.Decode": ("kvmesh-worker-decode", "generate"),
    "kv_transfer": ("kvmesh-worker-decode", "worker.Decode"),
    "worker.PullBlocks": ("kvmesh-worker-prefill", "kv_transfer"),
    "queue": ("kvmesh-worker-prefill", "worker.PullBlocks"),
    "prefill": ("kvmesh-worker-prefill", "worker.PullBlocks"),
    "decode": ("kvmesh-worker-decode", "worker.Decode"),
    "detokenize": ("kvmesh-router", "generate"),
}


def test_one_remote_request_is_one_trace_across_every_service(traced, collector):
    _, headers = complete(traced, long_text(21, 60), max_tokens=6)
    assert headers["x-kvmesh-route"] == "disagg-remote"
    record = last_record(traced)
    assert record["route"] == "disagg-remote" and record["trace_id"]

    def complete_trace() -> list[dict] | None:
        spans = collector.trace(record["trace_id"])
        return spans if {s["name"] for s in spans} >= {"generate", *EXPECTED_PARENTS} else None

    spans = wait_for(complete_trace, "every span of the request's trace")
    by_id = {s["span_id"]: s for s in spans}
    named = {s["name"]: s for s in spans}
    (root,) = [s for s in spans if not s["parent_span_id"]]
    assert root["service"] == "kvmesh-router"
    # FastAPI opens its own HTTP spans when a tracer provider is set: `generate` then sits under
    # them, all in the router, all leading up to the one root.
    generate = named["generate"]
    span = generate
    while span["parent_span_id"]:
        span = by_id[span["parent_span_id"]]
        assert span["service"] == "kvmesh-router", span["name"]
    assert span is root
    for span in spans:
        if span["parent_span_id"]:
            assert span["parent_span_id"] in by_id, f"{span['name']} has a parent outside the trace"
    for name, (service, parent) in EXPECTED_PARENTS.items():
        assert [s["name"] for s in spans].count(name) == 1, name
        assert named[name]["service"] == service, (name, named[name]["service"])
        assert by_id[named[name]["parent_span_id"]]["name"] == parent, name
    assert generate["attributes"]["gen_ai.usage.input_tokens"] == record["prompt_tokens"]
    assert generate["attributes"]["gen_ai.usage.output_tokens"] == 6
    route = named["route"]["attributes"]
    assert route["kvmesh.route.mode"] == "disagg-remote"
    assert route["kvmesh.route.worker"] == headers["x-kvmesh-worker"]
    # The router follows the index (no kvstore hop per request): the overlaps came from its own copy.
    assert route["kvmesh.route.index"] == "local"
    transfer = named["kv_transfer"]["attributes"]
    assert int(transfer["kvmesh.transfer.bytes"]) > 0 and int(transfer["kvmesh.transfer.blocks"]) > 0
    assert transfer["kvmesh.transfer.transport"] == "tcp"  # the decode worker's default: the data connections
    assert int(named["prefill"]["attributes"]["kvmesh.prefill.computed_tokens"]) > 0


# -- metrics -----------------------------------------------------------------------------------

def scrape_all(stack: LocalStack) -> dict[str, dict[tuple, float]]:
    """Every service's /metrics, parsed: instance id -> {(sample name, labels): value}."""
    rows = asyncio.run(collect_status(stack.etcd_endpoint, stack.options.namespace))
    scraped = {}
    for row in rows:
        text = httpx.get(row["metrics"], timeout=10).text
        scraped[row["id"]] = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                              for family in text_string_to_metric_families(text) for sample in family.samples}
    return scraped


def value(samples: dict[tuple, float], name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_of_every_service_parse_and_move_with_route_paths(traced):
    ids = {c.name.split("-")[0]: c.instance_id for c in traced.children}
    before = scrape_all(traced)
    assert set(before) == set(ids.values())
    _, short = complete(traced, "The copper lantern glowed", max_tokens=4)
    _, long = complete(traced, long_text(22, 60), max_tokens=4)
    assert (short["x-kvmesh-route"], long["x-kvmesh-route"]) == ("disagg-local", "disagg-remote")

    def moved(service: str, name: str, **labels: str) -> Callable[[], bool]:
        def check() -> bool:
            after = scrape_all(traced)[ids[service]]
            return value(after, name, **labels) > value(before[ids[service]], name, **labels)
        return check

    checks = [
        ("router", "kvmesh_router_requests_total", {"route": "disagg-local", "status": "ok"}),
        ("router", "kvmesh_router_requests_total", {"route": "disagg-remote", "status": "ok"}),
        ("router", "kvmesh_router_ttft_seconds_count", {"route": "disagg-remote"}),
        ("router", "kvmesh_router_itl_seconds_count", {}),
        ("decode", "kvmesh_worker_generated_tokens_total", {}),
        ("decode", "kvmesh_worker_requests_total", {"path": "local"}),
        ("decode", "kvmesh_worker_kv_transfer_bytes_total", {"direction": "received"}),
        ("decode", "kvmesh_worker_kv_transfer_seconds_count", {}),
        ("prefill", "kvmesh_worker_kv_transfer_bytes_total", {"direction": "sent"}),
        ("kvstore", "kvmesh_kvstore_batches_total", {}),
    ]
    for service, name, labels in checks:
        wait_for(moved(service, name, **labels), f"{service} {name} {labels} to move", timeout_s=30)
    after = scrape_all(traced)
    assert value(after[ids["decode"]], "kvmesh_worker_kv_blocks", state="total") > 0
    assert value(after[ids["kvstore"]], "kvmesh_kvstore_index_blocks") >= 0
    assert value(after[ids["kvstore"]], "kvmesh_kvstore_index_followers") == 1  # the router
    assert value(after[ids["router"]], "kvmesh_router_requests_total", route="disagg-local") >= 1


# -- dashboard ---------------------------------------------------------------------------------

def chromium_dom(url: str) -> str:
    """The page's DOM after its scripts ran (headless Chromium, virtual time)."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "Debian's chromium is needed (`make setup` installs it)"
    result = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_dashboard_renders_live_figures_in_headless_chromium(traced):
    for index in range(2):
        complete(traced, long_text(30 + index, 60), max_tokens=4)
    data = httpx.get(f"{http(traced)}/dashboard/data", timeout=10).json()
    total = data["requests"]["total"]
    dom = chromium_dom(f"{http(traced)}/dashboard")
    assert f'id="total-requests">{total}<' in dom, dom[:3000]
    assert 'data-route="disagg-remote"' in dom
    assert dom.count('class="request"') >= 2
    assert 'id="ttft-p50">–<' not in dom
    for worker in data["workers"]:
        assert worker["id"] in dom
