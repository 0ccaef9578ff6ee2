"""Many mock workers in one process: ``python -m services.worker.mock_fleet --fleet-size N …``.

A mock worker's engine sleeps instead of computing, so what it costs is the process itself
(≈370 MB and ≈20 s of start-up for torch, the tokenizer and the GGUF metadata, measured on the
shared 2-core machine). Sixty-four of those do not fit; sixty-four workers in a few processes
do. Each worker here is complete and independent — its own engine thread, gRPC server, etcd
registration (``<instance-id>.<i>``) and KV-event publisher — only the process is shared.
Any worker stopping (e.g. SIGTERM, which reaches whichever registered its handler last) stops
the fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
from collections.abc import Sequence

from kvmesh.config import WorkerSettings, add_settings_arguments, settings_from_namespace
from kvmesh.logging_setup import setup_logging
from services.engine.config import DEFAULT_MODEL
from services.engine.loader import load_model_config
from services.worker.server import serve


async def serve_fleet(settings: WorkerSettings, size: int) -> None:
    # Parse the model's metadata once (memoized) before the engines are built side by side,
    # instead of once per engine thread racing to fill the cache.
    await asyncio.to_thread(load_model_config, settings.model or DEFAULT_MODEL)
    tasks = [asyncio.create_task(serve(dataclasses.replace(settings, instance_id=f"{settings.instance_id}.{i}")))
             for i in range(size)]  # fmt: skip
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kvmesh-mock-fleet", description=__doc__.split("\n\n")[0])
    add_settings_arguments(parser, WorkerSettings)
    parser.add_argument("--fleet-size", type=int, default=1, help="mock workers in this process")
    args = parser.parse_args(argv)
    settings = settings_from_namespace(WorkerSettings, args)
    if settings.engine != "mock" or args.fleet_size < 1:
        parser.error("a fleet is of mock workers (--engine mock) and at least one of them")
    setup_logging(settings.log_level, "mock-fleet")
    asyncio.run(serve_fleet(settings, args.fleet_size))


if __name__ == "__main__":
    main()
