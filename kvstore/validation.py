"""What the kvstore accepts from workers and routers, checked before Redis is touched.

Every check runs before the first Redis call, so a rejected request leaves the index
exactly as it was. Errors are `InvalidInput` (a `ValueError`): the gRPC server maps it
to INVALID_ARGUMENT and sends the message back, so each message says what to change.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kvmesh_proto.v1.kvstore_pb2 import KvEventBatch

WORKER_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_MODEL_LEN = 256
# A prompt of 1M tokens is 65,536 blocks of 16: nothing longer is a real request.
MAX_QUERY_BLOCKS = 65_536
# Bounds how long one batch's script holds Redis (about 1 s here; Redis answers BUSY to
# everyone after 5 s). A worker with more blocks sends its resync snapshot as a resync
# batch followed by ordinary ones. A 4 MB gRPC message carries about 400,000 hashes anyway.
MAX_BATCH_BLOCKS = 262_144
# A caller may restrict FindMatches to a set of workers; more than this is not a restriction.
MAX_QUERY_WORKERS = 4_096
MAX_U64 = 2**64 - 1


class InvalidInput(ValueError):
    """A request the kvstore refuses; the message names the field and the rule."""


class ModelMismatch(InvalidInput):
    """A worker published blocks of a model other than the one it registered with.

    The worker's hash set is keyed by its model, so accepting a second model would
    make its blocks unreachable for purge; it must come back under a new worker id.
    """


def check_worker_id(worker_id: str, field: str = "worker_id") -> str:
    if not isinstance(worker_id, str) or not WORKER_ID_PATTERN.fullmatch(worker_id):
        raise InvalidInput(f"{field} must be 1-128 characters of A-Z a-z 0-9 . _ - (got {worker_id!r:.80})")
    return worker_id


def check_model(model: str) -> str:
    if not isinstance(model, str) or not model:
        raise InvalidInput("model must be a non-empty string")
    if len(model) > MAX_MODEL_LEN:
        raise InvalidInput(f"model must be at most {MAX_MODEL_LEN} characters (got {len(model)})")
    if any(ch.isspace() for ch in model):
        raise InvalidInput(f"model must not contain whitespace (got {model!r:.80})")
    return model


def check_query(model: str, block_hashes: Sequence[int], worker_ids: Sequence[str] | None) -> None:
    """A FindMatches query: a valid model, a bounded chain, valid worker ids.

    Hash values are range-checked where they are encoded for Redis (registry), which
    costs nothing extra there and would cost a Python loop here.
    """
    check_model(model)
    if len(block_hashes) > MAX_QUERY_BLOCKS:
        raise InvalidInput(f"block_hashes has {len(block_hashes)} entries; at most {MAX_QUERY_BLOCKS} are accepted")
    if worker_ids:
        if len(worker_ids) > MAX_QUERY_WORKERS:
            raise InvalidInput(f"worker_ids has {len(worker_ids)} entries; at most {MAX_QUERY_WORKERS}")
        for worker_id in worker_ids:
            check_worker_id(worker_id, "worker_ids entry")


# Tiers are bits of a per-block mask in the index: 0 device, 1 host memory, 2 local disk, the
# rest room for more (a shared kvstore tier).
MAX_TIER = 7


def check_batch(batch: KvEventBatch) -> None:
    """A publishable batch: who sent it, for which model, and events that say something."""
    if not batch.worker_id:
        raise InvalidInput("batch has no worker_id")
    check_worker_id(batch.worker_id)
    check_model(batch.model)
    if batch.seq == MAX_U64:
        raise InvalidInput("seq 2^64-1 has no successor; restart the sequence with a resync batch")
    total = 0
    for index, event in enumerate(batch.events):
        kind = event.WhichOneof("event")
        if kind is None:
            raise InvalidInput(f"events[{index}] has no payload (stored, removed or cleared)")
        if kind != "cleared":
            body = getattr(event, kind)
            if body.tier > MAX_TIER:
                raise InvalidInput(f"events[{index}] names tier {body.tier}; tiers are 0 (device) to {MAX_TIER}")
            total += len(body.block_hashes)
    if total > MAX_BATCH_BLOCKS:
        raise InvalidInput(f"batch carries {total} block hashes; split it (at most {MAX_BATCH_BLOCKS})")
