"""The Redis index of which worker holds which KV block.

Key layout (``<ns>`` isolates stacks sharing one Redis; hashes are 16 lowercase hex digits):

- ``kvmesh:<ns>:blk:<model>:<hash>`` set of worker ids holding that block
- ``kvmesh:<ns>:wrk:<worker>``       set of hashes the worker holds (purge, resync, counts)
- ``kvmesh:<ns>:wtier:<worker>``     hash ``{hash: tier bitmask}`` (bit 0 device, 1 host, 2 disk) for the
  blocks the worker holds anywhere but *only* on its device; absent = device only (so a
  worker without lower tiers never writes it)
- ``kvmesh:<ns>:wmeta:<worker>``     hash ``{model, last_seq}``; exists iff the worker is known
- ``kvmesh:<ns>:workers``            set of known worker ids
- ``kvmesh:<ns>:counters``           hash ``{batches_ingested, blocks_ingested, resyncs_requested}``
- ``kvmesh:<ns>:epoch``              a random marker: gone means Redis lost the index (``registry_monitor.py``)

Every operation is one Lua script, so one round trip, and atomic: a batch's events and its
sequence number land together or not at all, and the two directions of the index
(``blk`` and ``wrk``) never disagree. A worker's model is fixed by its first batch because
its ``wrk`` set holds bare hashes: the model in ``wmeta`` is what turns them back into
``blk`` keys. The scripts build ``blk`` keys themselves, which standalone Redis allows
and Redis Cluster would not; the index is meant for one Redis (or a replicated primary).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from kvmesh_proto.v1.kvstore_pb2 import AllCleared, BlockStored, KvEvent, KvEventBatch, PublishAck
from kvstore.validation import InvalidInput, ModelMismatch, check_batch, check_query, check_worker_id

_LUA_COMMON = """
-- Locals, not globals, in the per-block loops: ingestion spends its time there.
local sub, call = string.sub, redis.call
-- Lua's unpack() overflows its C stack near 8,000 values; stay well under.
local CHUNK = 4000

local function split_hashes(hex)
  local hashes, n = {}, 0
  for i = 1, #hex, 16 do
    n = n + 1
    hashes[n] = sub(hex, i, i + 15)
  end
  return hashes
end

local function variadic(cmd, key, members)
  for i = 1, #members, CHUNK do
    call(cmd, key, unpack(members, i, math.min(i + CHUNK - 1, #members)))
  end
end

-- Empty sets vanish in Redis, so a block nobody holds leaves no key behind.
local function drop_all(blk_prefix, wrk_key, worker, tier_key)
  local hashes = call('SMEMBERS', wrk_key)
  for i = 1, #hashes do call('SREM', blk_prefix .. hashes[i], worker) end
  call('DEL', wrk_key, tier_key)
  return #hashes
end
"""

# KEYS: workers, wmeta, wrk, counters, wtier.
# ARGV: worker, model, blk_root, seq, seq-1 ('' for 0), resync '1'|'0', stored count,
#       then (op, payload) pairs: 's'|'r' (device) or 's<tier>'|'r<tier>' with concatenated
#       hex hashes, 'c' with ''.
# A block is in ``blk``/``wrk`` while the worker holds it in any tier; ``wtier`` says which
# tiers when that is not just the device. Device events of a worker with no ``wtier`` key
# take the untiered path: one SADD/SREM per block, as before tiers.
# Sequence numbers travel as decimal strings: Lua numbers are doubles and would round
# a uint64. Equal-length decimal strings without leading zeros compare like numbers.
_APPLY_BATCH = (
    _LUA_COMMON
    + """
local worker, model, blk_root = ARGV[1], ARGV[2], ARGV[3]
local seq, prev, resync = ARGV[4], ARGV[5], ARGV[6] == '1'
local meta = call('HMGET', KEYS[2], 'model', 'last_seq')
local known_model, last = meta[1], meta[2]
if known_model and known_model ~= model then return {'model', known_model} end
-- An unknown worker past its first batch was purged (its lease lapsed) while it kept
-- streaming: what it published before is gone, so only a full snapshot can help.
if not known_model and not resync and seq ~= '0' and seq ~= '1' then
  call('HINCRBY', KEYS[4], 'resyncs_requested', 1)
  return {'unknown'}
end
if known_model and not resync and last ~= prev then
  if #seq < #last or (#seq == #last and seq <= last) then return {'stale', last} end
  call('HINCRBY', KEYS[4], 'resyncs_requested', 1)
  return {'gap', last}
end
local blk_prefix = blk_root .. model .. ':'

local function tier_mask(h)
  local mask = call('HGET', KEYS[5], h)
  if mask then return tonumber(mask) end
  return call('SISMEMBER', KEYS[3], h)  -- 1: on the device only; 0: not held
end

local function apply_tiered(store, tier_bit, hashes)
  for j = 1, #hashes do
    local h = hashes[j]
    local old = tier_mask(h)
    local new = store and bit.bor(old, tier_bit) or bit.band(old, bit.bnot(tier_bit))
    if new ~= old then
      if old == 0 then
        call('SADD', blk_prefix .. h, worker)
        call('SADD', KEYS[3], h)
      elseif new == 0 then
        call('SREM', blk_prefix .. h, worker)
        call('SREM', KEYS[3], h)
      end
      if new <= 1 then call('HDEL', KEYS[5], h) else call('HSET', KEYS[5], h, new) end
    end
  end
end

if resync then drop_all(blk_prefix, KEYS[3], worker, KEYS[5]) end
for i = 8, #ARGV, 2 do
  local op = ARGV[i]
  if op == 'c' then
    drop_all(blk_prefix, KEYS[3], worker, KEYS[5])
  else
    local hashes = split_hashes(ARGV[i + 1])
    local store, tier = sub(op, 1, 1) == 's', tonumber(sub(op, 2)) or 0
    if tier == 0 and call('EXISTS', KEYS[5]) == 0 then
      local cmd = store and 'SADD' or 'SREM'
      for j = 1, #hashes do call(cmd, blk_prefix .. hashes[j], worker) end
      variadic(cmd, KEYS[3], hashes)
    else
      apply_tiered(store, bit.lshift(1, tier), hashes)
    end
  end
end
call('HSET', KEYS[2], 'model', model, 'last_seq', seq)
call('SADD', KEYS[1], worker)
call('HINCRBY', KEYS[4], 'batches_ingested', 1)
call('HINCRBY', KEYS[4], 'blocks_ingested', ARGV[7])
return {'ok'}
"""
)

# ARGV: blk prefix (with model), concatenated hex chain, then an optional worker-id filter.
# The chain is walked in steps of STEP blocks. One SINTER per step (run in C) keeps every
# worker holding the whole step, so a long match costs one call per step, not per block.
# Workers missing something in the step are then checked block by block, all together in
# one SMISMEMBER per block, which is cheap when many stop at once (a shared system prompt
# ending). Measured on the bench workload, STEP 8 beat 4, 16 and 32.
_FIND_MATCHES_WALK = """
local sub, call = string.sub, redis.call
local CHUNK, STEP = 4000, 8
local prefix, hex = ARGV[1], ARGV[2]
local blocks = #hex / 16
local result = {}

local function key_at(b) return prefix .. sub(hex, b * 16 - 15, b * 16) end

local function members_of(key, candidates)
  local found = {}
  for i = 1, #candidates, CHUNK do
    local held = call('SMISMEMBER', key, unpack(candidates, i, math.min(i + CHUNK - 1, #candidates)))
    for j = 1, #held do
      if held[j] == 1 then found[#found + 1] = candidates[i + j - 1] end
    end
  end
  return found
end

-- Of `candidates`, keeps those holding every key in `keys` (blocks first..); each other
-- one is recorded with the number of leading blocks it holds.
local function walk_step(first, keys, candidates)
  local holds_all = {}
  for _, worker in ipairs(call('SINTER', unpack(keys))) do holds_all[worker] = true end
  local kept, stopping = {}, {}
  for _, worker in ipairs(candidates) do
    if holds_all[worker] then kept[#kept + 1] = worker else stopping[#stopping + 1] = worker end
  end
  local k = 1
  while #stopping > 0 do
    local holds = {}
    for _, worker in ipairs(members_of(keys[k], stopping)) do holds[worker] = true end
    local still = {}
    for _, worker in ipairs(stopping) do
      if holds[worker] then
        still[#still + 1] = worker
      else
        result[#result + 1] = worker
        result[#result + 1] = first + k - 2
      end
    end
    stopping, k = still, k + 1
  end
  return kept
end

local alive
if #ARGV > 2 then
  local filter = {}
  for i = 3, #ARGV do filter[#filter + 1] = ARGV[i] end
  alive = members_of(key_at(1), filter)
else
  alive = call('SMEMBERS', key_at(1))
end
local done = 1
while done < blocks and #alive > 0 do
  local last = math.min(done + STEP, blocks)
  local keys = {}
  for b = done + 1, last do keys[#keys + 1] = key_at(b) end
  alive = walk_step(done + 1, keys, alive)
  done = last
end
for _, worker in ipairs(alive) do
  result[#result + 1] = worker
  result[#result + 1] = done
end
"""
_FIND_MATCHES = _FIND_MATCHES_WALK + "return result\n"

# The same walk, then each match split by tier. KEYS[1]: the ``wtier:`` key prefix (a prefix,
# not a key: like ``blk``, the script builds the keys). Returns (worker, matched, matched only
# in host memory, matched only on disk) quadruples; a block on the device counts as a device hit
# whatever else holds it, and one in both lower tiers as a host hit.
_FIND_MATCHES_BY_TIER = _FIND_MATCHES_WALK + """
local split = {}
for i = 1, #result, 2 do
  local worker, matched = result[i], result[i + 1]
  local host, disk = 0, 0
  for first = 1, matched, CHUNK do
    local fields = {}
    for b = first, math.min(first + CHUNK - 1, matched) do fields[#fields + 1] = sub(hex, b * 16 - 15, b * 16) end
    local masks = call('HMGET', KEYS[1] .. worker, unpack(fields))
    for j = 1, #masks do
      local mask = tonumber(masks[j]) or 1
      if bit.band(mask, 1) == 0 then
        if bit.band(mask, 2) ~= 0 then host = host + 1 else disk = disk + 1 end
      end
    end
  end
  split[#split + 1] = worker
  split[#split + 1] = matched
  split[#split + 1] = host
  split[#split + 1] = disk
end
return split
"""

# KEYS: workers, wmeta, wrk, wtier. ARGV: blk_root, worker.
_PURGE = (
    _LUA_COMMON
    + """
local model = call('HGET', KEYS[2], 'model')
if not model then return 0 end
local removed = drop_all(ARGV[1] .. model .. ':', KEYS[3], ARGV[2], KEYS[4])
call('DEL', KEYS[2])
call('SREM', KEYS[1], ARGV[2])
return removed
"""
)

# KEYS: workers, counters. ARGV: namespace root ('kvmesh:<ns>:').
_SNAPSHOT = """
local ids = redis.call('SMEMBERS', KEYS[1])
local rows = {}
for i = 1, #ids do
  local meta = redis.call('HMGET', ARGV[1] .. 'wmeta:' .. ids[i], 'model', 'last_seq')
  rows[#rows + 1] = {ids[i], meta[1], meta[2], redis.call('SCARD', ARGV[1] .. 'wrk:' .. ids[i])}
end
local counters = redis.call('HMGET', KEYS[2], 'batches_ingested', 'blocks_ingested', 'resyncs_requested')
return {counters, rows}
"""

_EVENT_OPS = {"stored": "s", "removed": "r"}


@dataclass(frozen=True)
class TierMatch:
    """A worker's matched prefix, and how many of its blocks it holds only in a lower tier
    (a copy to promote, not a device hit)."""

    worker_id: str
    matched_blocks: int
    host_blocks: int
    disk_blocks: int


@dataclass(frozen=True)
class RegisteredWorker:
    """A worker the index knows: its model, how many blocks it holds, its last applied batch."""

    worker_id: str
    model: str
    blocks: int
    last_seq: int


@dataclass(frozen=True)
class RegistryStats:
    """Index totals; the counters live in Redis, so they survive a kvstore restart."""

    blocks: int
    workers: list[RegisteredWorker]
    batches_ingested: int
    blocks_ingested: int
    resyncs_requested: int


class BlockRegistry:
    """Which worker holds which KV block, for one namespace of one Redis."""

    def __init__(
        self, redis: aioredis.Redis, namespace: str, on_change: Callable[[KvEventBatch], None] | None = None
    ) -> None:
        """``on_change`` sees every batch once it is applied (and a clear-only resync batch
        per purge): the index's followers (routers) replay exactly what the index did."""
        check_worker_id(namespace, "namespace")
        self._redis = redis
        self._on_change = on_change
        self._root = f"kvmesh:{namespace}:"
        self._blk_root = f"{self._root}blk:"
        self._workers_key = f"{self._root}workers"
        self._counters_key = f"{self._root}counters"
        self._apply = redis.register_script(_APPLY_BATCH)
        self._find = redis.register_script(_FIND_MATCHES)
        self._find_by_tier = redis.register_script(_FIND_MATCHES_BY_TIER)
        self._tier_root = f"{self._root}wtier:"
        self._purge = redis.register_script(_PURGE)
        self._snapshot = redis.register_script(_SNAPSHOT)

    def _worker_keys(self, worker_id: str) -> list[str]:
        return [self._workers_key, f"{self._root}wmeta:{worker_id}", f"{self._root}wrk:{worker_id}"]

    async def apply_batch(self, batch: KvEventBatch) -> PublishAck:
        """Apply one worker's batch atomically, or tell it to resync.

        In order (seq = last_seq + 1), a new worker's first batch (seq 0 or 1), or marked
        ``resync``: applied,
        a resync batch first dropping everything the worker held. A gap: nothing applied,
        ``resync_required`` with the ``expected_seq``. A duplicate or older seq: nothing
        applied and no resync, so a retried batch is harmless. ``expected_seq`` is always
        the next seq the index will accept in order.

        Raises InvalidInput for a malformed batch, ModelMismatch (an InvalidInput) when the
        worker is known under another model; neither touches the index.
        """
        check_batch(batch)
        seq = batch.seq
        event_args, stored = _event_args(batch)
        args = [
            batch.worker_id,
            batch.model,
            self._blk_root,
            str(seq),
            str(seq - 1) if seq else "",
            "1" if batch.resync else "0",
            stored,
            *event_args,
        ]
        keys = [*self._worker_keys(batch.worker_id), self._counters_key, f"{self._tier_root}{batch.worker_id}"]
        status, *detail = await self._apply(keys=keys, args=args)
        status = _text(status)
        if status == "model":
            raise ModelMismatch(
                f"worker {batch.worker_id!r} publishes model {_text(detail[0])!r}, not {batch.model!r}; "
                "a worker serving another model needs another worker_id"
            )
        if status == "unknown":
            return PublishAck(seq=seq, resync_required=True, expected_seq=1)
        if status == "gap":
            return PublishAck(seq=seq, resync_required=True, expected_seq=int(detail[0]) + 1)
        if status == "stale":
            return PublishAck(seq=seq, expected_seq=int(detail[0]) + 1)
        if self._on_change is not None:
            self._on_change(batch)
        return PublishAck(seq=seq, expected_seq=seq + 1)

    async def find_matches(
        self, model: str, block_hashes: Sequence[int], worker_ids: Sequence[str] | None = None
    ) -> list[tuple[str, int]]:
        """(worker id, leading blocks of the chain it holds), longest first, ties by id.

        A worker's count stops at its first missing block: a later block is useless to it
        without the ones before. Workers with no leading block are left out; ``worker_ids``
        restricts the answer to those workers.
        """
        check_query(model, block_hashes, worker_ids)
        if not block_hashes:
            return []
        prefix = f"{self._blk_root}{model}:"
        # A repeated id would come back twice; dict keeps the caller's order.
        args = [prefix, _hex_chain(block_hashes), *dict.fromkeys(worker_ids or ())]
        flat = await self._find(keys=[], args=args)
        matches = [(_text(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]
        matches.sort(key=lambda match: (-match[1], match[0]))
        return matches

    async def find_matches_by_tier(
        self, model: str, block_hashes: Sequence[int], worker_ids: Sequence[str] | None = None
    ) -> list[TierMatch]:
        """``find_matches``, each match split by tier (one round trip): of a worker's matched
        leading blocks, how many it holds only in host memory or only on disk."""
        check_query(model, block_hashes, worker_ids)
        if not block_hashes:
            return []
        args = [f"{self._blk_root}{model}:", _hex_chain(block_hashes), *dict.fromkeys(worker_ids or ())]
        flat = await self._find_by_tier(keys=[self._tier_root], args=args)
        matches = [TierMatch(_text(flat[i]), int(flat[i + 1]), int(flat[i + 2]), int(flat[i + 3]))
                   for i in range(0, len(flat), 4)]
        matches.sort(key=lambda match: (-match.matched_blocks, match.worker_id))
        return matches

    async def purge(self, worker_id: str) -> int:
        """Forget a worker and every block it held (it left the mesh); returns blocks removed.

        An unknown worker is not an error: purge after lease loss may race a second purge.
        """
        check_worker_id(worker_id)
        keys = [*self._worker_keys(worker_id), f"{self._tier_root}{worker_id}"]
        removed = int(await self._purge(keys=keys, args=[self._blk_root, worker_id]))
        if self._on_change is not None:
            self._on_change(KvEventBatch(worker_id=worker_id, resync=True, events=[KvEvent(cleared=AllCleared())]))
        return removed

    async def snapshot_batch(self, worker: RegisteredWorker) -> KvEventBatch:
        """What ``worker`` holds, as the resync batch that would rebuild it from nothing: one
        ``BlockStored`` per tier holding something."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.smembers(self._worker_keys(worker.worker_id)[2])
            pipe.hgetall(f"{self._tier_root}{worker.worker_id}")
            members, masks = await pipe.execute()
        by_tier: dict[int, list[int]] = {}
        for member in members:
            mask = int(masks.get(member, 1))  # no entry: on the device only
            for tier in range(mask.bit_length()):
                if mask >> tier & 1:
                    by_tier.setdefault(tier, []).append(int(member, 16))
        stored = [KvEvent(stored=BlockStored(block_hashes=hashes, tier=tier))
                  for tier, hashes in sorted(by_tier.items())]
        return KvEventBatch(worker_id=worker.worker_id, model=worker.model, seq=worker.last_seq, resync=True,
                            events=[KvEvent(cleared=AllCleared()), *stored])  # fmt: skip

    async def workers(self) -> list[RegisteredWorker]:
        """Every known worker, sorted by id."""
        return (await self.stats()).workers

    async def stats(self) -> RegistryStats:
        """Totals and per-worker rows, read in one consistent snapshot."""
        counters, rows = await self._snapshot(keys=[self._workers_key, self._counters_key], args=[self._root])
        workers = sorted(
            (
                RegisteredWorker(_text(worker_id), _text(model), int(blocks), int(last_seq))
                for worker_id, model, last_seq, blocks in rows
            ),
            key=lambda worker: worker.worker_id,
        )
        batches, blocks_ingested, resyncs = (int(value or 0) for value in counters)
        return RegistryStats(
            blocks=sum(worker.blocks for worker in workers),
            workers=workers,
            batches_ingested=batches,
            blocks_ingested=blocks_ingested,
            resyncs_requested=resyncs,
        )


def _event_args(batch: KvEventBatch) -> tuple[list[str], int]:
    """The batch's events as the script's (op, payload) pairs, and how many blocks it stores."""
    args: list[str] = []
    stored = 0
    for event in batch.events:
        kind = event.WhichOneof("event")
        if kind == "cleared":
            args += ["c", ""]
            continue
        body = getattr(event, kind)
        op = _EVENT_OPS[kind] + (str(body.tier) if body.tier else "")
        args += [op, _hex_chain(body.block_hashes)]
        if kind == "stored":
            stored += len(body.block_hashes)
    return args, stored


def _hex_chain(block_hashes: Sequence[int]) -> str:
    """Hashes as one string of 16-hex-digit keys: one Redis argument instead of one per hash."""
    try:
        return struct.pack(f">{len(block_hashes)}Q", *block_hashes).hex()
    except struct.error as exc:
        raise InvalidInput(f"block hashes must be unsigned 64-bit integers ({exc})") from None


def _text(value: bytes | str) -> str:
    """Replies are bytes unless the caller's client decodes them; accept either."""
    return value.decode() if isinstance(value, bytes) else value
