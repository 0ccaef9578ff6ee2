"""Publishing the engine's KV events to the kvstore: batched, ordered, resynced.

The engine calls ``on_engine_events`` from its own thread; events wait in a list under a
lock and an asyncio task ships them every ``flush_ms`` as one ``KvEventBatch`` over a
``Publish`` stream. Every new stream (first connection, kvstore restart, a broken
stream) begins with a full snapshot, taken on the engine thread together with clearing
the pending list, so the snapshot plus what follows it is exactly the engine's state. A gap the
kvstore notices (``resync_required``) also gets a snapshot. Losing the kvstore degrades
routing only: requests never wait for this path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

import grpc

from kvmesh.discovery import Discovery, Membership
from kvmesh.grpc_service import mesh_channel
from kvmesh_proto.v1 import kvstore_pb2, kvstore_pb2_grpc
from services.engine.async_engine import AsyncEngine
from services.engine.kv_events import KvEvent
from services.engine.llm_engine import Engine
from services.worker.convert import event_to_proto

log = logging.getLogger(__name__)

_RETRY_S = 0.5


class KvEventPublisher:
    def __init__(
        self,
        discovery: Discovery,
        worker_id: str,
        model: str,
        engine: AsyncEngine,
        flush_ms: int,
    ) -> None:
        self._kvstores = Membership(discovery, "kvstore")
        self._worker_id = worker_id
        self._model = model
        self._engine = engine
        self._flush_s = flush_ms / 1000
        self._lock = threading.Lock()
        self._pending: list[KvEvent] = []
        self._seq = 0
        self._task: asyncio.Task | None = None
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.batches_sent = 0
        self.resyncs = 0

    def on_engine_events(self, seq: int, events: list[KvEvent]) -> None:
        """The engine's callback (any thread)."""
        with self._lock:
            self._pending.extend(events)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._kvstores.start()
        self._task = asyncio.create_task(self._run(), name="kv-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._kvstores.stop()

    def _batch(self, events: list[KvEvent], resync: bool) -> kvstore_pb2.KvEventBatch:
        self._seq += 1
        return kvstore_pb2.KvEventBatch(
            worker_id=self._worker_id, model=self._model, seq=self._seq,
            events=[event_to_proto(e) for e in events], resync=resync,
        )  # fmt: skip

    def _snapshot_on_engine_thread(self, engine: Engine) -> list[KvEvent]:
        # Events are appended only on the engine thread, so clearing what is pending and
        # reading the pool there, in one call, leaves no event on both sides of the snapshot.
        with self._lock:
            self._pending.clear()
            return engine.resync_events()

    async def _resync_batch(self) -> kvstore_pb2.KvEventBatch:
        events = await self._engine.run(self._snapshot_on_engine_thread)
        self.resyncs += 1
        return self._batch(events, resync=True)

    def _take_pending(self) -> list[KvEvent]:
        with self._lock:
            events, self._pending = self._pending, []
        return events

    async def _run(self) -> None:
        while True:
            address = next(iter(sorted(i.address for i in self._kvstores.instances.values())), None)
            if address is None:
                await asyncio.sleep(_RETRY_S)
                continue
            try:
                await self._stream_to(address)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("KV event stream to %s broke (%s); will resync", address, exc)
            await asyncio.sleep(_RETRY_S)

    async def _stream_to(self, address: str) -> None:
        outbox: asyncio.Queue[kvstore_pb2.KvEventBatch] = asyncio.Queue()
        await outbox.put(await self._resync_batch())

        async def requests():
            while True:
                yield await outbox.get()

        async with mesh_channel(address) as channel:
            call = kvstore_pb2_grpc.KvStoreStub(channel).Publish(requests())
            acks = asyncio.create_task(self._read_acks(call, outbox))
            try:
                while not acks.done():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), timeout=1.0)
                    self._wakeup.clear()
                    await asyncio.sleep(self._flush_s)  # let a burst of steps coalesce
                    events = self._take_pending()
                    if events:
                        await outbox.put(self._batch(events, resync=False))
                await acks
            finally:
                acks.cancel()
                call.cancel()

    async def _read_acks(self, call: grpc.aio.StreamStreamCall, outbox: asyncio.Queue) -> None:
        async for ack in call:
            self.batches_sent += 1
            if ack.resync_required:
                log.warning("kvstore asks for a resync (expected batch %d, got %d; 0: its index was lost)",
                            ack.expected_seq, ack.seq)  # fmt: skip
                await outbox.put(await self._resync_batch())
        raise ConnectionError("kvstore closed the event stream")
