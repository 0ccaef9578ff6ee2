"""One log format for every kvmesh process, so interleaved logs of a local stack stay readable."""

from __future__ import annotations

import logging


def setup_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
        force=True,
    )
