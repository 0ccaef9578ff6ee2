"""The `kvmesh` command: `up`, `status`, one subcommand per service, and `generate`."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kvmesh.config import ENGINES, ROUTER_MODES
from kvmesh.launcher import STATE_FILE, StackOptions, run_stack

# Service subcommands hand their remaining arguments to the service's own parser.
SERVICES = {
    "kvstore": "kvstore.server",
    "router": "router.server",
    "worker": "services.worker.server",
    "planner": "planner.server",
}

# Tools whose module's ``main(argv)`` takes the remaining arguments.
TOOLS: dict[str | tuple[str, str], str] = {
    "calibrate": "services.engine.calibrate",
    ("bench", "replay"): "bench.replay",
    ("bench", "routing"): "bench.routing",
    ("bench", "router-scale"): "bench.router_scale",
    ("bench", "planner"): "bench.planner",
    ("bench", "soak"): "bench.soak",
}


def _up_parser(sub: argparse._SubParsersAction) -> None:
    up = sub.add_parser("up", help="start the whole local stack; Ctrl-C stops it")
    up.add_argument("--workers", type=int, default=1, help="aggregated workers (default 1)")
    up.add_argument("--prefill", type=int, default=0, help="prefill workers (disaggregated mode)")
    up.add_argument("--decode", type=int, default=0, help="decode workers (disaggregated mode)")
    up.add_argument("--model", default="", help="model spec; default SmolLM2-135M-Instruct (offline GGUF)")
    up.add_argument("--engine", choices=ENGINES, default="real")
    up.add_argument("--mock-fleet-size", type=int, default=8,
                    help="--engine mock: workers per process (each is still its own gRPC server and registration)")
    up.add_argument("--router-mode", choices=ROUTER_MODES, default="kv")
    up.add_argument("--kv-cache-blocks", type=int, default=0, help="device KV pool blocks per worker (G1); 0 = default")
    up.add_argument("--host-cache-gb", type=float, default=None, help="host-memory KV tier per worker (G2); 0 = off")
    up.add_argument("--disk-cache-gb", type=float, default=None, help="disk KV tier per worker (G3); 0 = off")
    up.add_argument("--disk-cache-dir", type=Path, default=None,
                    help="G3 files go to DIR/<worker-id> (kept across restarts); default <state-dir>/kv-cache")
    up.add_argument("--http-port", type=int, default=8000)
    up.add_argument("--grpc-port", type=int, default=50051)
    up.add_argument("--namespace", default=os.environ.get("KVMESH_NAMESPACE", "default"))
    up.add_argument("--etcd-endpoint", default="", help="use this etcd instead of starting one")
    up.add_argument("--redis-url", default="", help="use this Redis instead of starting one")
    up.add_argument("--state-dir", type=Path, default=Path(".kvmesh"), help="logs and stack.json")
    up.add_argument("--api-key", action="append", default=[], dest="api_keys",
                    help="API key the router requires (repeatable; or KVMESH_API_KEYS, comma-separated)")
    up.add_argument("--tls", action="store_true",
                    help="mutual TLS on every gRPC hop (certificates made in <state-dir>/certs)")
    up.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for health")
    up.add_argument("--planner", action="store_true",
                    help="run the planner (local connector) over the --prefill/--decode pools")
    up.add_argument("--ttft-p90-ms", type=float, default=None, help="--planner: TTFT p90 target")
    up.add_argument("--itl-p90-ms", type=float, default=None, help="--planner: ITL p90 target")


def _status_parser(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser("status", help="list registered instances and their health")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--namespace", default=None)
    status.add_argument("--etcd-endpoint", default=None)
    status.add_argument("--state-dir", type=Path, default=Path(".kvmesh"))


def _stack_defaults(state_dir: Path) -> dict:
    """What a running `kvmesh up` wrote, so `kvmesh status` finds its etcd without flags."""
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _status(args: argparse.Namespace) -> int:
    from kvmesh.status import print_status

    stack = _stack_defaults(args.state_dir)
    endpoint = (
        args.etcd_endpoint
        or os.environ.get("KVMESH_ETCD_ENDPOINT")
        or stack.get("etcd_endpoint")
        or "127.0.0.1:2379"
    )
    namespace = args.namespace or os.environ.get("KVMESH_NAMESPACE") or stack.get("namespace") or "default"
    if stack.get("cert_dir"):  # a `kvmesh up --tls` stack: check health as its client
        from kvmesh import tls

        tls.configure(tls.TlsConfig.for_service(stack["cert_dir"], "client"))
    return print_status(endpoint, namespace, args.json)


def _planner_args(args: argparse.Namespace) -> list[str]:
    """`kvmesh up`'s planner targets as the planner's own flags (the rest: KVMESH_* variables)."""
    targets = {"--ttft-p90-ms": args.ttft_p90_ms, "--itl-p90-ms": args.itl_p90_ms}
    return [part for flag, value in targets.items() if value is not None for part in (flag, str(value))]


def _up(args: argparse.Namespace) -> int:
    try:
        options = StackOptions(
            workers=args.workers, prefill=args.prefill, decode=args.decode, model=args.model,
            engine=args.engine, router_mode=args.router_mode, http_port=args.http_port,
            grpc_port=args.grpc_port, namespace=args.namespace, etcd_endpoint=args.etcd_endpoint,
            redis_url=args.redis_url, state_dir=args.state_dir, ready_timeout_s=args.ready_timeout,
            api_keys=args.api_keys, tls=args.tls, kv_cache_blocks=args.kv_cache_blocks,
            host_cache_gb=args.host_cache_gb, disk_cache_gb=args.disk_cache_gb, disk_cache_dir=args.disk_cache_dir,
            planner=args.planner, planner_args=_planner_args(args), mock_fleet_size=args.mock_fleet_size,
        )  # fmt: skip
    except ValueError as exc:
        print(f"kvmesh up: {exc}", file=sys.stderr)
        return 2
    return run_stack(options)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SERVICES:
        module = importlib.import_module(SERVICES[argv[0]])
        module.main(argv[1:])
        return 0
    if argv and argv[0] == "generate":
        from services.engine.cli import generate_main

        return generate_main(argv[1:])
    if argv and argv[0] == "chat":
        from kvmesh.chat import main as chat_main

        return chat_main(argv[1:])
    if argv and argv[0] == "certs":
        from kvmesh.certs import main as certs_main

        return certs_main(argv[1:])
    if argv[:2] == ["bench", "serve"]:
        from bench.serve import main as bench_serve

        return bench_serve(argv[2:])
    if argv and argv[0] in TOOLS:
        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    if tuple(argv[:2]) in TOOLS:
        return importlib.import_module(TOOLS[tuple(argv[:2])]).main(argv[2:])
    parser = argparse.ArgumentParser(prog="kvmesh", description="kvmesh: a distributed LLM inference mesh")
    sub = parser.add_subparsers(dest="command", required=True)
    _up_parser(sub)
    _status_parser(sub)
    for name in SERVICES:
        sub.add_parser(name, help=f"run the {name} service (see `kvmesh {name} --help`)")
    sub.add_parser("generate", help="generate text locally with the engine (no services)")
    sub.add_parser("certs", help="make a local CA and per-service certificates: `kvmesh certs --out DIR`")
    sub.add_parser("chat", help="interactive streaming chat with a running mesh")
    sub.add_parser("bench", help="benchmarks: `kvmesh bench serve|replay|routing|router-scale|planner|soak --help`")
    sub.add_parser("calibrate", help="fit the mock engine's timing profile to the real engine")
    args = parser.parse_args(argv)
    return _up(args) if args.command == "up" else _status(args)


if __name__ == "__main__":
    sys.exit(main())
