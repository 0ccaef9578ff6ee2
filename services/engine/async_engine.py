"""``AsyncEngine``: the engine on a background thread, streamed to asyncio callers.

One thread owns the ``Engine`` and is the only one that touches it: callers' requests, aborts
and other calls are queued and applied between steps, so the event loop never waits for a
forward pass. Outputs are handed back with ``call_soon_threadsafe``. A stream whose consumer
stops iterating (break, cancel, disconnect) aborts its request, which frees its blocks at once.
The KV-event callback, if any, runs on the engine thread.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from services.engine.config import EngineConfig
from services.engine.kv_transfer import KvReservation
from services.engine.llm_engine import Engine, EngineStats
from services.engine.outputs import RequestOutput
from services.engine.sampling_params import SamplingParams

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread stopped (shut down or crashed); requests are refused (maps to UNAVAILABLE)."""


class RequestEvicted(RuntimeError):
    """The worker ended a live request on purpose (a drain ran out of time); it may be resumed
    elsewhere (maps to UNAVAILABLE)."""


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._cv = threading.Condition()
        self._calls: list[tuple[Callable[[], Any], Future]] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        # Per-request callbacks run on this thread after every step (touched only by it).
        self._step_hooks: dict[str, Callable[[Engine], None]] = {}
        self._stopped = False
        self._error: BaseException | None = None
        self.last_stats: EngineStats = engine.stats()
        # Seconds spent in steps since start (read from any thread: a float store is atomic).
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._loop, name="kvmesh-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig | None = None) -> AsyncEngine:
        return cls(Engine(config))

    # --- engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._stopped and not self._calls and not self.engine.has_unfinished():
                        self._cv.wait()
                    if self._stopped:
                        return
                    calls, self._calls = self._calls, []
                for fn, fut in calls:
                    # A caller cancelled while queued (a stream closed, a deadline passed) no
                    # longer wants its call: skip it. Setting a result on its cancelled future
                    # would raise here and stop the engine thread for every other request.
                    if not fut.set_running_or_notify_cancel():
                        continue
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:  # handed to the caller, not fatal here
                        fut.set_exception(exc)
                if self.engine.has_unfinished():
                    start = time.perf_counter()
                    outputs = self.engine.step()
                    self._run_step_hooks()
                    for out in outputs:
                        self._deliver(out.request_id, out)
                    self.busy_s += time.perf_counter() - start
                self.last_stats = self.engine.stats()
        except BaseException as exc:
            self._error = exc
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"engine failed: {exc!r}"))
            with self._cv:
                for _, fut in self._calls:
                    fut.set_exception(EngineDeadError(f"engine failed: {exc!r}"))
                self._calls = []
            raise

    def _run_step_hooks(self) -> None:
        """Before the step's outputs are delivered, so a hook's work is queued ahead of them."""
        for request_id, hook in list(self._step_hooks.items()):
            try:
                hook(self.engine)
            except Exception as exc:  # the hook's request fails, not the engine
                self._step_hooks.pop(request_id, None)
                self.engine.abort(request_id)
                self._deliver(request_id, exc)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            loop.call_soon_threadsafe(queue.put_nowait, item)

    # --- caller side ------------------------------------------------------------------------
    def call(self, fn: Callable[[Engine], T]) -> Future:
        """Run ``fn(engine)`` on the engine thread between steps; returns a concurrent Future."""
        fut: Future = Future()
        with self._cv:
            if self._stopped or self._error is not None:
                raise EngineDeadError("the engine is not running")
            self._calls.append((lambda: fn(self.engine), fut))
            self._cv.notify()
        return fut

    async def run(self, fn: Callable[[Engine], T]) -> T:
        """``call`` for coroutines: e.g. ``await engine.run(lambda e: e.export_kv(rid))``."""
        return await asyncio.wrap_future(self.call(fn))

    async def generate(self, request_id: str, token_ids: Sequence[int], sampling: SamplingParams, *,
                       keep_kv: bool = False, kv: KvReservation | None = None,
                       output_token_ids: Sequence[int] = (),
                       max_tokens_per_step: int = 0, on_step: Callable[[Engine], None] | None = None,
                       ) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs until it finishes. ValueError (bad input) is raised before
        the first output. With ``kv``, continue a sequence prefilled elsewhere, its KV written into
        the blocks reserved for it, after the ``output_token_ids`` generated there. ``on_step`` runs
        on the engine thread after each step while the request lives (e.g. to export its
        newly finished blocks); if it raises, the request is aborted with that error."""
        self.engine.validate_request(token_ids, sampling)
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (loop, queue)
        finished = added = False
        try:

            def add(e: Engine) -> None:
                if kv is None:
                    e.add_request(request_id, token_ids, sampling, keep_kv=keep_kv,
                                  max_tokens_per_step=max_tokens_per_step)
                else:
                    e.start_reserved(request_id, kv.num_tokens, output_token_ids)
                if on_step is not None:
                    self._step_hooks[request_id] = on_step

            try:
                await self.run(add)
            except asyncio.CancelledError:
                added = True  # it may have run meanwhile: aborted below (a no-op if it did not)
                raise
            added = True
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if added and (on_step or not finished) and not self._stopped and self._error is None:
                # A consumer that went away frees the request's blocks now.
                self.call(lambda e: self._forget(request_id, abort=not finished))

    def _forget(self, request_id: str, abort: bool) -> None:
        self._step_hooks.pop(request_id, None)
        if abort:
            self.engine.abort(request_id)

    async def abort(self, request_id: str) -> bool:
        return await self.run(lambda e: e.abort(request_id))

    async def evict(self, request_ids: Collection[str], reason: str) -> int:
        """Abort requests and end their streams with ``RequestEvicted(reason)`` (a plain abort
        leaves a stream waiting), all in one call between two steps: a drain evicting many
        requests waits for one step boundary, not one per request. Returns how many were running."""

        def evict_now(engine: Engine) -> int:
            running = 0
            for request_id in request_ids:
                running += engine.abort(request_id)
                self._step_hooks.pop(request_id, None)
                self._deliver(request_id, RequestEvicted(reason))
            return running

        return await self.run(evict_now)

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout)
        self.engine.close()
