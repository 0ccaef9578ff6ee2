"""`python -m kvmesh.health HOST:PORT`: exit 0 if the gRPC health service there answers SERVING.

For container health checks, where grpc_health_probe is not in the image but kvmesh is.
"""

from __future__ import annotations

import asyncio
import sys

from kvmesh.grpc_service import check_health


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m kvmesh.health HOST:PORT", file=sys.stderr)
        return 2
    return 0 if asyncio.run(check_health(argv[0], timeout_s=2.0)) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
