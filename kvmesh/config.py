"""Typed settings, one dataclass per service, read from flags and ``KVMESH_*`` variables.

Every field is both a flag and an environment variable (``etcd_endpoint`` is
``--etcd-endpoint`` and ``KVMESH_ETCD_ENDPOINT``); a flag beats the environment, the
environment beats the default. Keeping the mapping mechanical means a deployment
manifest and a command line can never drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import socket
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar, get_type_hints

INSTANCE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
WORKER_ROLES = ("aggregated", "prefill", "decode")
TRANSFER_TRANSPORTS = ("tcp", "grpc")
ROUTER_MODES = ("kv", "round_robin", "random")
KV_COSTS = ("ttft", "blocks")
ENGINES = ("real", "mock")
TRACE_EXPORTERS = ("off", "console", "otlp")
# Where a worker's disk tier (G3) goes when no directory is given: one folder per instance id.
SCRATCH_DISK_CACHE_ROOT = os.path.join(tempfile.gettempdir(), "kvmesh-kv-cache")


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclasses.dataclass
class ServiceSettings:
    """What every kvmesh service needs: where etcd is, where to listen, who it is."""

    namespace: str = dataclasses.field(default="default", metadata=_help("isolates etcd and Redis keys"))
    etcd_endpoint: str = dataclasses.field(default="127.0.0.1:2379", metadata=_help("etcd host:port"))
    host: str = dataclasses.field(default="127.0.0.1", metadata=_help("interface the gRPC server binds"))
    port: int = dataclasses.field(default=0, metadata=_help("gRPC port; 0 picks a free one"))
    advertise_host: str = dataclasses.field(
        default="", metadata=_help("host others use to reach this instance; default: --host")
    )
    instance_id: str = dataclasses.field(default="", metadata=_help("unique id; default: kind-host-random"))
    lease_ttl_s: int = dataclasses.field(default=3, metadata=_help("etcd lease TTL in seconds"))
    drain_timeout_s: float = dataclasses.field(
        default=10.0, metadata=_help("on SIGTERM, how long in-flight streams may finish")
    )
    log_level: str = dataclasses.field(default="INFO", metadata=_help("DEBUG, INFO, WARNING, ERROR"))
    metrics_port: int = dataclasses.field(
        default=0, metadata=_help("Prometheus /metrics HTTP port; 0 picks a free one, -1 = off")
    )
    trace_exporter: str = dataclasses.field(default="off", metadata=_help("traces: otlp, console or off"))
    otlp_endpoint: str = dataclasses.field(
        default="127.0.0.1:4317", metadata=_help("OTLP gRPC collector host:port (--trace-exporter otlp)")
    )
    trace_sample_ratio: float = dataclasses.field(
        default=1.0, metadata=_help("fraction of requests traced, decided at the router")
    )
    tls_cert: str = dataclasses.field(default="", metadata=_help("PEM certificate of this service; empty = no TLS"))
    tls_key: str = dataclasses.field(default="", metadata=_help("PEM private key of --tls-cert"))
    tls_ca: str = dataclasses.field(default="", metadata=_help("PEM CA that signs every mesh certificate"))
    tls_client_auth: bool = dataclasses.field(
        default=True, metadata=_help("with TLS, require callers' certificates (mutual TLS)")
    )
    mesh_token: str = dataclasses.field(
        default="", metadata=_help("without TLS: shared secret mesh-only endpoints (KV transfer) require")
    )
    etcd_username: str = dataclasses.field(default="", metadata=_help("etcd user (etcd authentication)"))
    etcd_password: str = dataclasses.field(default="", metadata=_help("password of --etcd-username"))
    etcd_ca: str = dataclasses.field(default="", metadata=_help("PEM CA of etcd's certificate: talk to etcd over TLS"))
    etcd_cert: str = dataclasses.field(default="", metadata=_help("PEM client certificate for etcd (client-cert-auth)"))
    etcd_key: str = dataclasses.field(default="", metadata=_help("PEM private key of --etcd-cert"))

    kind = "service"

    def __post_init__(self) -> None:
        if not NAMESPACE_RE.match(self.namespace):
            raise ValueError(f"namespace {self.namespace!r} must match {NAMESPACE_RE.pattern}")
        if self.instance_id and not INSTANCE_ID_RE.match(self.instance_id):
            raise ValueError(f"instance id {self.instance_id!r} must match {INSTANCE_ID_RE.pattern}")
        if not 1 <= self.lease_ttl_s <= 3600:
            raise ValueError("lease_ttl_s must be between 1 and 3600")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError("metrics_port must be between -1 (off) and 65535")
        if self.trace_exporter not in TRACE_EXPORTERS:
            raise ValueError(f"trace_exporter must be one of {', '.join(TRACE_EXPORTERS)}, not {self.trace_exporter!r}")
        if not 0 <= self.trace_sample_ratio <= 1:
            raise ValueError("trace_sample_ratio must be in [0, 1]")
        if any((self.tls_cert, self.tls_key, self.tls_ca)) and not all((self.tls_cert, self.tls_key, self.tls_ca)):
            raise ValueError("TLS needs all of tls_cert, tls_key and tls_ca")
        if bool(self.etcd_username) != bool(self.etcd_password):
            raise ValueError("etcd authentication needs both etcd_username and etcd_password")
        if (self.etcd_cert or self.etcd_key) and not (self.etcd_cert and self.etcd_key and self.etcd_ca):
            raise ValueError("an etcd client certificate needs etcd_cert, etcd_key and etcd_ca")
        if not self.instance_id:
            self.instance_id = f"{self.kind}-{socket.gethostname()[:32]}-{uuid.uuid4().hex[:8]}"
            self.instance_id = re.sub(r"[^A-Za-z0-9._-]", "-", self.instance_id)

    @property
    def public_host(self) -> str:
        return self.advertise_host or self.host


@dataclasses.dataclass
class KvStoreSettings(ServiceSettings):
    """The KV block registry."""

    redis_url: str = dataclasses.field(default="redis://127.0.0.1:6379/0", metadata=_help(
        "Redis URL (redis://[user:password@]host:port/db, rediss:// for TLS)"))
    redis_username: str = dataclasses.field(default="", metadata=_help("Redis ACL user (AUTH); beats the URL's"))
    redis_password: str = dataclasses.field(default="", metadata=_help("Redis password (AUTH); beats the URL's"))

    kind = "kvstore"


@dataclasses.dataclass
class WorkerSettings(ServiceSettings):
    """A prefill, decode or aggregated worker wrapping one engine."""

    role: str = dataclasses.field(default="aggregated", metadata=_help("aggregated, prefill or decode"))
    model: str = dataclasses.field(default="", metadata=_help("model spec; empty = SmolLM2-135M-Instruct"))
    engine: str = dataclasses.field(default="real", metadata=_help("real or mock"))
    mock_profile: str = dataclasses.field(
        default="cpu-smollm2", metadata=_help("--engine mock: timing profile, a shipped name or a JSON path")
    )
    dtype: str = dataclasses.field(default="bfloat16", metadata=_help("float32 or bfloat16"))
    device: str = dataclasses.field(default="cpu", metadata=_help("cpu or cuda"))
    block_size: int = dataclasses.field(default=16, metadata=_help("tokens per KV block"))
    kv_cache_blocks: int = dataclasses.field(default=0, metadata=_help("KV blocks in the pool; 0 = engine default"))
    host_cache_gb: float = dataclasses.field(
        default=0.5, metadata=_help("KV tier G2: host memory for blocks evicted from the device pool; 0 = off"))
    # On an H100 reading a Llama-3-8B block back from disk (page cache warm) took 1.1-2.4 ms, recomputing
    # it 0.43 ms (bench/reports/kv-tiers-h100/): there G3 makes TTFT worse, so it is off by default.
    disk_cache_gb: float = dataclasses.field(default=-1.0, metadata=_help(
        "KV tier G3: local disk for blocks evicted from host memory; 0 = off; default (-1): 2 on cpu, 0 on cuda"))
    disk_cache_dir: str = dataclasses.field(default="", metadata=_help(
        "G3 directory (kept across restarts; one per worker); default: <tmp>/kvmesh-kv-cache/<instance-id>, "
        "deleted when the worker stops if its id was generated"))
    peer_fetch: bool = dataclasses.field(
        default=True, metadata=_help("pull a prefix a peer holds (router's hint) when cheaper than recomputing it"))
    # Starting estimates only, replaced by running averages of this worker's own pulls and
    # prefills: ~0.9 ms is an fp32 SmolLM2 block at the ~800 MB/s bench/kv_transfer measured over
    # loopback gRPC; 27 ms its prefill per block on this CPU (bench/kv_tiers.py).
    peer_transfer_ms_per_block: float = dataclasses.field(
        default=1.0, metadata=_help("peer fetch: first estimate of one block's pull time"))
    prefill_ms_per_block: float = dataclasses.field(
        default=20.0, metadata=_help("peer fetch: first estimate of one block's prefill time"))
    max_num_seqs: int = dataclasses.field(default=0, metadata=_help("concurrent sequences; 0 = engine default"))
    max_model_len: int = dataclasses.field(default=0, metadata=_help("context length; 0 = the model's"))
    num_threads: int = dataclasses.field(default=0, metadata=_help("torch threads; 0 = torch's default"))
    stats_interval_ms: int = dataclasses.field(default=200, metadata=_help("load report period"))
    event_flush_ms: int = dataclasses.field(default=20, metadata=_help("how long KV events are batched"))
    prefill_chunk_tokens: int = dataclasses.field(default=256, metadata=_help(
        "disaggregated prefill: prompt tokens per engine step, finished blocks sent meanwhile; 0 = whole prompt"))
    transfer_timeout_s: float = dataclasses.field(default=60.0, metadata=_help(
        "decode worker: give up a KV pull after this long (then the next prefill worker, or prefill locally)"))
    transfer_streams: int = dataclasses.field(default=2, metadata=_help(
        "decode worker: parallel streams (connections) a KV pull is spread over, 1 to 16"))
    transfer_transport: str = dataclasses.field(default="tcp", metadata=_help(
        "decode worker: how pulled KV travels: tcp (plain connections beside the gRPC call, when the "
        "sender offers them) or grpc (the call's own streams)"))
    transfer_port: int = dataclasses.field(default=0, metadata=_help(
        "TCP port this worker offers for sending KV (0 = any free port; -1 = none, send on gRPC); never "
        "offered with TLS"))
    max_waiting_requests: int = dataclasses.field(
        default=64, metadata=_help("requests queued beyond the running batch before the worker refuses; 0 = no limit")
    )

    kind = "worker"

    def __post_init__(self) -> None:
        # A generated instance id is never seen again: the default disk tier under it is scratch.
        self._scratch_disk_cache = not self.disk_cache_dir and not self.instance_id
        super().__post_init__()
        if self.role not in WORKER_ROLES:
            raise ValueError(f"role must be one of {', '.join(WORKER_ROLES)}, got {self.role!r}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.block_size <= 0 or self.stats_interval_ms <= 0 or self.event_flush_ms < 0:
            raise ValueError("block_size and stats_interval_ms must be positive, event_flush_ms >= 0")
        if self.prefill_chunk_tokens < 0 or self.transfer_timeout_s <= 0:
            raise ValueError("prefill_chunk_tokens must be >= 0 and transfer_timeout_s positive")
        if not 1 <= self.transfer_streams <= 16:
            raise ValueError(f"transfer_streams must be 1 to 16, got {self.transfer_streams}")
        if self.transfer_transport not in TRANSFER_TRANSPORTS:
            raise ValueError(f"transfer_transport must be one of {', '.join(TRANSFER_TRANSPORTS)}, "
                             f"got {self.transfer_transport!r}")  # fmt: skip
        if not -1 <= self.transfer_port <= 65535:
            raise ValueError(f"transfer_port must be -1 to 65535, got {self.transfer_port}")
        if self.disk_cache_gb == -1.0:
            self.disk_cache_gb = 0.0 if self.device == "cuda" else 2.0
        if self.kv_cache_blocks < 0 or self.host_cache_gb < 0 or self.disk_cache_gb < 0:
            raise ValueError("kv_cache_blocks, host_cache_gb and disk_cache_gb must be >= 0 (-1: disk's default)")
        if not self.disk_cache_dir:
            self.disk_cache_dir = os.path.join(SCRATCH_DISK_CACHE_ROOT, self.instance_id)

    @property
    def disk_cache_is_scratch(self) -> bool:
        """The G3 directory is the default of a worker with a generated id: no later worker can
        find it, so it is deleted at a graceful stop (or by a later worker, see
        ``services/worker/scratch_dir.py``)."""
        return self._scratch_disk_cache


@dataclasses.dataclass
class RouterSettings(ServiceSettings):
    """The front door: gRPC Generate and the OpenAI-compatible HTTP API."""

    port: int = dataclasses.field(default=50051, metadata=_help("gRPC port"))
    http_port: int = dataclasses.field(default=8000, metadata=_help("HTTP port of the OpenAI API; -1 = off"))
    router_mode: str = dataclasses.field(default="kv", metadata=_help("kv, round_robin or random"))
    # 2, not 1: measured with `kvmesh bench serve` (2 CPU workers, concurrency 4), weight 1 let
    # one request's worth of decode load cancel a whole cached prefix, so groups spread over both
    # workers and kv routing cached no more than round-robin; at 2 it keeps prefixes sticky.
    overlap_weight: float = dataclasses.field(
        default=2.0, metadata=_help("cost of one block to prefill relative to one active decode block")
    )
    # Lower KV tiers in router/scoring.py's cost: a block copy's time over a block's prefill time,
    # medians measured with `python -m bench.kv_tiers` (SmolLM2-135M, CPU, float32, two runs at
    # load 3-8: host 0.001-0.002, disk 0.011-0.012). On a GPU compute is far faster: re-measure.
    host_tier_weight: float = dataclasses.field(
        default=0.002, metadata=_help("cost of promoting a block from a worker's host memory, in block prefills"))
    disk_tier_weight: float = dataclasses.field(
        default=0.012, metadata=_help("cost of promoting a block from a worker's disk, in block prefills"))
    router_temperature: float = dataclasses.field(
        default=0.0, metadata=_help("kv-cost blocks: softmax temperature over costs; 0 = always the cheapest")
    )
    # router/scoring.py says what each cost is. blocks stays the default: measured with `kvmesh bench
    # routing` (16 mock workers, h100-llama3-8b-measured, bench/reports/routing-ttft/README.md), it did
    # as well as ttft or better on the long trace at speed-ups 8 and 128 (hit rate, TTFT; busy max/mean
    # under 1.3 with both), because ttft's second stage moves most conversations. The slack: at speed-up
    # 4, 50 ms left 5-block system prompts pinned to their first worker (busy max/mean 1.36), 100 ms gave
    # 1.08 (long) and 1.18 (short) at 96% / 93% of the oracle's hit rate.
    kv_cost: str = dataclasses.field(
        default="blocks", metadata=_help("kv mode's cost: ttft (modelled time to first token, then the least loaded "
                                       "within --ttft-slack-ms) or blocks (weighted blocks to prefill + decode load)"))
    ttft_slack_ms: float = dataclasses.field(
        default=100.0, metadata=_help("kv-cost ttft: workers this close to the earliest first token are "
                                                  "equally good; the least loaded of them wins"))
    cost_profile: str = dataclasses.field(
        default="cpu-smollm2", metadata=_help("kv-cost ttft: timing profile the step times are modelled with (a "
                                              "shipped name or a JSON path, as the mock engine's --mock-profile)"))
    kvstore_timeout_ms: int = dataclasses.field(
        default=200, metadata=_help("FindMatches deadline; past it the request is routed on load alone")
    )
    kv_index: str = dataclasses.field(
        default="follow",
        metadata=_help("follow: match prefixes in a local copy of the index fed by the kvstore's change "
                       "stream; query: ask the kvstore (FindMatches) on every request"),
    )  # fmt: skip
    max_prompt_bytes: int = dataclasses.field(default=4 * 1024 * 1024, metadata=_help("largest prompt accepted"))
    max_local_prefill_tokens: int = dataclasses.field(
        default=256, metadata=_help("disaggregated: a decode worker prefills locally below this many uncached tokens")
    )
    prefill_queue_limit: int = dataclasses.field(
        default=8, metadata=_help("disaggregated: a prefill worker with this many waiting requests is saturated")
    )
    request_timeout_s: float = dataclasses.field(default=600.0, metadata=_help("per-request deadline"))
    api_keys: str = dataclasses.field(
        default="", metadata=_help("comma-separated API keys for both front doors; empty = no key needed")
    )
    api_key_rate_limit: float = dataclasses.field(
        default=0.0, metadata=_help("requests per second each API key may send; 0 = unlimited")
    )
    api_key_burst: int = dataclasses.field(default=0, metadata=_help("requests a key may send at once; 0 = its rate"))
    max_inflight_requests: int = dataclasses.field(
        default=256, metadata=_help("requests in flight beyond which the router answers 429; 0 = no limit")
    )
    max_body_bytes: int = dataclasses.field(default=16 * 1024 * 1024, metadata=_help("largest HTTP request body"))
    max_messages: int = dataclasses.field(default=1024, metadata=_help("most chat messages in one request"))
    max_prompt_tokens: int = dataclasses.field(default=1 << 20, metadata=_help("longest pre-tokenized prompt"))
    max_output_tokens: int = dataclasses.field(default=32768, metadata=_help("largest max_tokens accepted"))
    migration_limit: int = dataclasses.field(
        default=3, metadata=_help("times a stream broken mid-way is resumed on another worker; 0 = never")
    )
    worker_leave_grace_s: float = dataclasses.field(
        default=120.0, metadata=_help("a worker that left etcd may stream this long before its streams are cut "
                                      "and resumed elsewhere")
    )  # fmt: skip

    kind = "router"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.router_mode not in ROUTER_MODES:
            raise ValueError(f"router_mode must be one of {', '.join(ROUTER_MODES)}, got {self.router_mode!r}")
        if self.kv_index not in ("follow", "query"):
            raise ValueError(f"kv_index must be follow or query, got {self.kv_index!r}")
        if self.overlap_weight < 0 or self.router_temperature < 0 or self.ttft_slack_ms < 0:
            raise ValueError("overlap_weight, router_temperature and ttft_slack_ms must be >= 0")
        if self.kv_cost not in KV_COSTS:
            raise ValueError(f"kv_cost must be one of {', '.join(KV_COSTS)}, got {self.kv_cost!r}")
        if not (0 <= self.host_tier_weight <= 1 and 0 <= self.disk_tier_weight <= 1):
            raise ValueError("host_tier_weight and disk_tier_weight must be in [0, 1] (a copy is not dearer than a "
                             "recompute)")
        if self.worker_leave_grace_s <= 0:
            raise ValueError("worker_leave_grace_s must be > 0")
        if self.api_key_rate_limit < 0 or self.api_key_burst < 0 or self.max_inflight_requests < 0:
            raise ValueError("api_key_rate_limit, api_key_burst and max_inflight_requests must be >= 0")


PLANNER_CONNECTORS = ("local", "kubernetes")


@dataclasses.dataclass
class PlannerSettings(ServiceSettings):
    """The planner: moves workers between prefill and decode, or adds/removes them, against targets."""

    ttft_p90_ms: float = dataclasses.field(default=2000.0, metadata=_help("target: p90 time to first token"))
    itl_p90_ms: float = dataclasses.field(default=100.0, metadata=_help("target: 90th percentile inter-token latency"))
    connector: str = dataclasses.field(default="local", metadata=_help("who acts: local or kubernetes"))
    dry_run: bool = dataclasses.field(default=False, metadata=_help("only log and export decisions, change nothing"))
    interval_s: float = dataclasses.field(default=5.0, metadata=_help("seconds between two looks at the metrics"))
    window_s: float = dataclasses.field(default=60.0, metadata=_help("sliding window the percentiles are taken over"))
    cooldown_s: float = dataclasses.field(
        default=60.0, metadata=_help("after a decision, no other for this long (lets its effect show; no flapping)")
    )
    hysteresis: float = dataclasses.field(
        default=0.2, metadata=_help("a side gives up a worker only when its p90 is this fraction under its target")
    )
    min_workers: int = dataclasses.field(default=2, metadata=_help("fewest workers (prefill + decode) kept"))
    max_workers: int = dataclasses.field(default=8, metadata=_help("most workers (prefill + decode) run"))
    profile: str = dataclasses.field(
        default="cpu-smollm2", metadata=_help("calibrated timing profile that prices a pool's capacity (name or path)")
    )
    target_utilization: float = dataclasses.field(
        default=0.7, metadata=_help("busy share of a worker the capacity model plans for (headroom for bursts)")
    )
    smoothing: float = dataclasses.field(default=0.5, metadata=_help("load predictor: Holt level weight in (0, 1]"))
    trend: float = dataclasses.field(default=0.3, metadata=_help("load predictor: Holt trend weight in [0, 1]"))
    max_local_prefill_tokens: int = dataclasses.field(
        default=256, metadata=_help("as the router's: shorter prompts are prefilled on their decode worker")
    )
    prefill_chunk_tokens: int = dataclasses.field(default=256, metadata=_help("as the workers': prefill step size"))
    switch_timeout_s: float = dataclasses.field(
        default=10.0, metadata=_help("a switching worker's requests may finish for this long, then resume elsewhere")
    )
    worker_engine: str = dataclasses.field(default="real", metadata=_help("local connector: engine of added workers"))
    worker_model: str = dataclasses.field(default="", metadata=_help("local connector: model spec of added workers"))
    state_dir: str = dataclasses.field(default=".kvmesh", metadata=_help("local connector: where added workers log"))
    k8s_api_url: str = dataclasses.field(
        default="https://kubernetes.default.svc", metadata=_help("kubernetes connector: API server URL")
    )
    k8s_namespace: str = dataclasses.field(default="default", metadata=_help("kubernetes connector: namespace"))
    k8s_token_file: str = dataclasses.field(
        default="/var/run/secrets/kubernetes.io/serviceaccount/token",
        metadata=_help("kubernetes connector: file holding the bearer token"),
    )
    k8s_ca_file: str = dataclasses.field(
        default="/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        metadata=_help("kubernetes connector: CA of the API server; empty = the system's"),
    )
    prefill_deployment: str = dataclasses.field(default="prefill", metadata=_help("kubernetes: prefill Deployment"))
    decode_deployment: str = dataclasses.field(default="decode", metadata=_help("kubernetes: decode Deployment"))

    kind = "planner"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.connector not in PLANNER_CONNECTORS:
            raise ValueError(f"connector must be one of {', '.join(PLANNER_CONNECTORS)}, got {self.connector!r}")
        if self.ttft_p90_ms <= 0 or self.itl_p90_ms <= 0:
            raise ValueError("ttft_p90_ms and itl_p90_ms must be positive")
        if self.interval_s <= 0 or self.window_s <= 0 or self.cooldown_s < 0 or not 0 <= self.hysteresis < 1:
            raise ValueError("interval_s and window_s must be positive, cooldown_s >= 0, hysteresis in [0, 1)")
        if not 2 <= self.min_workers <= self.max_workers:
            raise ValueError("need 2 <= min_workers <= max_workers (one prefill and one decode at least)")
        if not 0 < self.target_utilization <= 1 or not 0 < self.smoothing <= 1 or not 0 <= self.trend <= 1:
            raise ValueError("target_utilization and smoothing must be in (0, 1], trend in [0, 1]")
        if self.worker_engine not in ENGINES:
            raise ValueError(f"worker_engine must be one of {', '.join(ENGINES)}, got {self.worker_engine!r}")


S = TypeVar("S", bound=ServiceSettings)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env(name: str) -> str:
    return "KVMESH_" + name.upper()


def _convert(raw: str, typ: Any) -> Any:
    if typ is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return typ(raw)


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[ServiceSettings]) -> None:
    """Add one flag per settings field (defaults left as None so the environment can fill in)."""
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        typ = hints[field.name]
        help_text = f"{field.metadata.get('help', '')} (env {_env(field.name)}, default {field.default!r})"
        if typ is bool:
            parser.add_argument(_flag(field.name), dest=field.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)  # fmt: skip
        else:
            parser.add_argument(_flag(field.name), dest=field.name, default=None, type=typ, help=help_text)


def settings_from_namespace(
    cls: type[S], args: argparse.Namespace, env: Mapping[str, str] | None = None
) -> S:
    """Build settings from parsed flags, falling back to ``KVMESH_*`` variables, then defaults."""
    env = os.environ if env is None else env
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        flag_value = getattr(args, field.name, None)
        if flag_value is not None:
            values[field.name] = flag_value
        elif _env(field.name) in env:
            try:
                values[field.name] = _convert(env[_env(field.name)], hints[field.name])
            except ValueError as exc:
                raise ValueError(f"{_env(field.name)}: {exc}") from exc
    return cls(**values)


def load_settings(cls: type[S], argv: Sequence[str] | None = None, prog: str | None = None) -> S:
    """Parse a service's command line into its settings object."""
    parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    add_settings_arguments(parser, cls)
    args = parser.parse_args(argv)
    try:
        return settings_from_namespace(cls, args)
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
