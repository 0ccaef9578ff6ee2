"""Lower KV tiers behind the device pool (G1): host memory (G2) and local disk (G3).

A named block the device pool evicts is *demoted* instead of forgotten: copied into a host
slot (G2, pinned on CUDA so the copy is one stream-ordered DMA). When G2 is full its least
recently used block moves to disk (G3), written by a background thread so the engine loop
never waits on the file system. A prefix match that runs out of device blocks continues
here and *promotes* the blocks it finds back into the pool before prefill, which turns a
recompute into a copy. A host block is copied at once (one memcpy, or a stream-ordered DMA on
CUDA); disk blocks are read and checked on the disk thread while the engine keeps stepping,
and copied into the pool once they are in (``start_disk_load`` / ``finish_disk_load``).

G1 and G2 are exclusive (a block moves between them); G3 is inclusive: a block read back
from disk keeps its file, so evicting it again costs no second write. Every change of what
a tier holds is a KV event carrying that tier, so the kvstore knows where a block lives.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from services.engine.kv_events import BlockRemoved, BlockStored, KvEvent
from services.engine.kv_tier_files import (
    BlockFileError,
    list_block_files,
    read_block_file,
    remove_block_file,
    touch_block_file,
    write_block_file,
)
from services.engine.kv_transfer import tensor_from_bytes

log = logging.getLogger(__name__)

TIER_DEVICE, TIER_HOST, TIER_DISK = 0, 1, 2


class HostTier:
    """G2: a preallocated slab of block-sized host slots, least recently stored evicted first."""

    def __init__(self, capacity_blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype, pin: bool) -> None:
        # One allocation up front: pinning page by page per block would cost more than the copies.
        self.slab = torch.empty((capacity_blocks, *block_shape), dtype=dtype, pin_memory=pin)
        self.slots: OrderedDict[int, int] = OrderedDict()
        self.free_slots = list(range(capacity_blocks))

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.slots

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def full(self) -> bool:
        return not self.free_slots

    def oldest(self) -> int:
        return next(iter(self.slots))

    def store(self, block_hash: int, block: torch.Tensor) -> None:
        """Copy one pool block (``[layers, 2, block_size, heads, dim]``) into a free slot."""
        slot = self.free_slots.pop()
        self.slab[slot].copy_(block, non_blocking=True)
        self.slots[block_hash] = slot

    def view(self, block_hash: int) -> torch.Tensor:
        return self.slab[self.slots[block_hash]]

    def release(self, block_hash: int) -> None:
        self.free_slots.append(self.slots.pop(block_hash))


class DiskTier:
    """G3: one checksummed file per block in ``directory``, LRU by bytes; survives a restart.

    Writes, reads and deletions run in order on one background thread, so a read queued after
    a write finds the whole file and a read queued before a deletion still finds it; until a
    write lands, the block is served from the copy waiting for it, so the index is always exact
    for the engine. Only the engine thread touches the index.
    """

    def __init__(self, directory: Path, capacity_bytes: int, block_shape: tuple[int, ...], dtype: torch.dtype,
                 pin: bool = False) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.block_shape = list(block_shape)
        self.dtype = str(dtype).removeprefix("torch.")
        self.block_bytes = math.prod(block_shape) * dtype.itemsize
        self.capacity_blocks = capacity_bytes // self.block_bytes
        self.index: OrderedDict[int, None] = OrderedDict((h, None) for h in list_block_files(directory))
        self._pending: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmesh-kv-disk")
        self.dropped_corrupt = 0
        # Blocks read back for a CUDA pool land in pinned memory: their upload is then one DMA.
        self._pin = pin
        # Files left from a larger budget: trim to this one, oldest first.
        while len(self.index) > self.capacity_blocks:
            self._io.submit(remove_block_file, directory, self.index.popitem(last=False)[0])

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.index

    def __len__(self) -> int:
        return len(self.index)

    def store(self, block_hash: int, block: torch.Tensor) -> list[int]:
        """Queue a host copy of a block for writing; returns the hashes evicted to make room."""
        if block_hash in self.index:
            self.index.move_to_end(block_hash)
            return []
        evicted: list[int] = []
        while self.index and len(self.index) >= self.capacity_blocks:
            old, _ = self.index.popitem(last=False)
            self._io.submit(self._remove, old)
            evicted.append(old)
        self.index[block_hash] = None
        with self._lock:
            self._pending[block_hash] = block
        self._io.submit(self._write, block_hash, block)
        return evicted

    def load(self, block_hash: int) -> torch.Tensor | None:
        """The block's bytes, read on the calling thread (a peer's fetch), or None when its file is
        missing or fails its checksum (it is then dropped: a damaged block is never used)."""
        with self._lock:
            pending = self._pending.get(block_hash)
        data = pending if pending is not None else self._read(block_hash)
        if data is None:
            self.drop_damaged(block_hash)
            return None
        self.index.move_to_end(block_hash)
        return data

    def start_load(self, block_hashes: list[int]) -> Future:
        """Read blocks on the disk thread, behind every write and deletion queued before them;
        the future's result has, per hash, its bytes or None (missing or damaged: hand it to
        ``drop_damaged``). The blocks count as just used from now."""
        with self._lock:
            pending = {h: self._pending[h] for h in block_hashes if h in self._pending}
        for h in block_hashes:
            self.index.move_to_end(h)
        return self._io.submit(lambda: [pending[h] if h in pending else self._read(h) for h in block_hashes])

    def drop_damaged(self, block_hash: int) -> bool:
        """Forget a block whose file could not be used, and delete the file; False if it was
        already gone from the index (evicted meanwhile)."""
        self.dropped_corrupt += 1
        if block_hash not in self.index:
            return False
        del self.index[block_hash]
        self._io.submit(self._remove, block_hash)
        return True

    def _read(self, block_hash: int) -> torch.Tensor | None:
        try:
            data = tensor_from_bytes(read_block_file(self.directory, block_hash, self.block_bytes), self.dtype,
                                     self.block_shape)
        except BlockFileError as exc:
            log.warning("disk KV block %016x unusable (%s): dropped, it will be recomputed", block_hash, exc)
            return None
        touch_block_file(self.directory, block_hash)
        return data.pin_memory() if self._pin else data

    def flush(self) -> None:
        """Wait until every write, read and deletion queued so far is done."""
        self._io.submit(lambda: None).result()

    def close(self) -> None:
        """Finish every queued write and deletion."""
        self._io.shutdown(wait=True)

    def _write(self, block_hash: int, block: torch.Tensor) -> None:
        try:
            write_block_file(self.directory, block_hash, block)
        except OSError as exc:
            log.warning("could not write KV block %016x to %s: %s", block_hash, self.directory, exc)
        finally:
            with self._lock:
                self._pending.pop(block_hash, None)

    def _remove(self, block_hash: int) -> None:
        with self._lock:
            self._pending.pop(block_hash, None)
        remove_block_file(self.directory, block_hash)


class LowerTiers:
    """G2 and G3 of one engine, driven by the block manager with block ids and hashes only.

    Holds the device pool tensor so the block manager keeps moving integers; the events it
    produces (tiers 1 and 2) are taken with ``take_events``.
    """

    def __init__(self, kv_cache: torch.Tensor, host_bytes: int, disk_bytes: int, disk_dir: Path | None) -> None:
        self.kv_cache = kv_cache
        block = kv_cache[:, :, 0]
        block_bytes = block.numel() * block.element_size()
        host_blocks = host_bytes // block_bytes
        self.host = HostTier(host_blocks, tuple(block.shape), kv_cache.dtype, kv_cache.is_cuda) if host_blocks else None
        self.disk = (DiskTier(disk_dir, disk_bytes, tuple(block.shape), kv_cache.dtype, kv_cache.is_cuda)
                     if disk_dir is not None and disk_bytes >= block_bytes else None)
        self.events: list[KvEvent] = []
        self.hit_blocks = {TIER_HOST: 0, TIER_DISK: 0}
        if self.disk is not None and len(self.disk):
            # Blocks kept on disk by an earlier run of this worker: announced again.
            self.events.append(BlockStored(tuple(self.disk.index), None, TIER_DISK))

    def tier_of(self, block_hash: int) -> int | None:
        if self.host is not None and block_hash in self.host:
            return TIER_HOST
        if self.disk is not None and block_hash in self.disk:
            return TIER_DISK
        return None

    def held(self) -> dict[int, list[int]]:
        """Hashes per lower tier, for a full resync."""
        return {TIER_HOST: list(self.host.slots) if self.host else [],
                TIER_DISK: list(self.disk.index) if self.disk else []}

    def demote(self, block_hash: int, block_id: int) -> None:
        """Keep a block the device pool is about to reuse (called before its slot is overwritten)."""
        block = self.kv_cache[:, :, block_id]
        if self.host is None:
            if self.disk is not None:
                self._to_disk(block_hash, block.to("cpu", copy=True))
            return
        if block_hash in self.host:
            return
        if self.host.full:
            old = self.host.oldest()
            if self.disk is not None:
                if self.kv_cache.is_cuda:  # the slot's bytes may still be in flight from the device
                    torch.cuda.current_stream(self.kv_cache.device).synchronize()
                self._to_disk(old, self.host.view(old).clone())
            self.host.release(old)
            self.events.append(BlockRemoved((old,), TIER_HOST))
        self.host.store(block_hash, block)
        self.events.append(BlockStored((block_hash,), None, TIER_HOST))

    def _to_disk(self, block_hash: int, block: torch.Tensor) -> None:
        new = block_hash not in self.disk
        evicted = self.disk.store(block_hash, block)
        if evicted:
            self.events.append(BlockRemoved(tuple(evicted), TIER_DISK))
        if new and block_hash in self.disk:
            self.events.append(BlockStored((block_hash,), None, TIER_DISK))

    def promote_host(self, block_hash: int, block_id: int) -> None:
        """Move a host-memory block into pool block ``block_id`` (the copy is queued, not awaited:
        on CUDA it is ordered before any kernel that reads the block)."""
        self.kv_cache[:, :, block_id].copy_(self.host.view(block_hash), non_blocking=True)
        self.host.release(block_hash)
        self.events.append(BlockRemoved((block_hash,), TIER_HOST))
        self.hit_blocks[TIER_HOST] += 1

    def start_disk_load(self, block_hashes: list[int]) -> Future:
        """Start reading disk blocks (each must be held there now) in the background."""
        return self.disk.start_load(block_hashes)

    def finish_disk_load(self, block_hashes: list[int], loaded: list[torch.Tensor | None],
                         block_ids: list[int]) -> list[bool]:
        """Copy finished reads into their pool blocks; per block, whether it was usable (a
        damaged one is dropped from the disk tier and must be recomputed)."""
        usable: list[bool] = []
        for block_hash, data, block_id in zip(block_hashes, loaded, block_ids, strict=True):
            if data is None:
                if self.disk.drop_damaged(block_hash):
                    self.events.append(BlockRemoved((block_hash,), TIER_DISK))
            else:
                self.kv_cache[:, :, block_id].copy_(data, non_blocking=True)
                self.hit_blocks[TIER_DISK] += 1
            usable.append(data is not None)
        return usable

    def read(self, block_hash: int) -> torch.Tensor | None:
        """A lower-tier block's bytes on the host, left where they are (a peer's fetch)."""
        if self.host is not None and block_hash in self.host:
            if self.kv_cache.is_cuda:
                torch.cuda.current_stream(self.kv_cache.device).synchronize()
            return self.host.view(block_hash).clone()
        if self.disk is not None and block_hash in self.disk:
            data = self.disk.load(block_hash)
            if data is None:  # damaged: dropped from the disk tier
                self.events.append(BlockRemoved((block_hash,), TIER_DISK))
            return data
        return None

    def take_events(self) -> list[KvEvent]:
        events, self.events = self.events, []
        return events

    def close(self) -> None:
        """On a graceful stop, host-memory blocks go to disk too (a restart finds them), then
        every queued write finishes."""
        if self.disk is None:
            return
        if self.host is not None:
            if self.kv_cache.is_cuda:
                torch.cuda.current_stream(self.kv_cache.device).synchronize()
            for block_hash in list(self.host.slots):
                self.disk.store(block_hash, self.host.view(block_hash).clone())
        self.disk.close()
