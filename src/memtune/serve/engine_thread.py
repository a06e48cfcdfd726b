"""The engine on a thread of its own, fed from asyncio: what the HTTP layer talks to.

The engine is not thread-safe and its step is CPU/GPU work, so it runs on one thread that loops

    run queued commands (add a request, abort one, load / unload an adapter)
    one engine step if there is work, else wait for a command
    hand each step's events to the asyncio queue of the request they belong to

Handlers submit commands and await their result (an asyncio future resolved from the engine thread
with call_soon_threadsafe); they never touch the engine. `stop()` aborts what is still running, so
every stream ends and nothing waits on a thread that is gone.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .engine import Engine, StepEvent
from .scheduler import Request

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """More requests are waiting than the server accepts; the client should retry later."""


class Stopped(Exception):
    """The engine thread is stopping (server shutdown)."""


@dataclass
class Stream:
    """One request as the handler sees it: events arrive on `events`; None ends the stream."""

    request: Request
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    done: bool = False
    tokens: int = 0
    last_token_time: float | None = None
    token_gaps: list[float] = field(default_factory=list)


class EngineThread:
    def __init__(self, engine: Engine, max_queue: int = 256,
                 on_finish: Callable[[Stream], None] | None = None) -> None:
        self.engine, self.max_queue, self.on_finish = engine, max_queue, on_finish
        self.commands: queue.Queue = queue.Queue()
        self.streams: dict[int, Stream] = {}
        self._pending: set[object] = set()  # submissions not yet in the engine
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="memtune-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self.thread.start()

    # -- what the HTTP layer reads (EngineProcess offers the same) --------------------------------------
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model.config.vocab_size

    def adapters(self) -> dict[str, str]:
        return {name: ad.path for name, ad in self.engine.adapters.host.items()}

    def alive(self) -> bool:
        return self.thread.is_alive()

    async def load_adapter(self, name: str, path: str) -> None:
        await self.call(lambda e: e.add_adapter(name, path))

    async def unload_adapter(self, name: str) -> None:
        await self.call(lambda e: e.remove_adapter(name))

    def snapshot(self) -> dict:
        """The engine's state for /metrics (read between or during steps: figures may be one step old)."""
        return engine_snapshot(self.engine, self.waiting())

    # -- called from asyncio -----------------------------------------------------------------------
    async def call(self, fn: Callable[[Engine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps; its result or exception comes back."""
        if self.stopping.is_set() or not self.thread.is_alive():
            raise Stopped("the server is shutting down")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.commands.put((fn, loop, fut))
        return await fut

    async def submit(self, prompt_ids: list[int], adapter: str | None, params) -> Stream:
        """Queue a request; QueueFull when max_queue requests already wait."""
        if self.waiting() >= self.max_queue:
            raise QueueFull(f"{self.waiting()} requests are waiting (the server's limit is {self.max_queue})")
        loop = asyncio.get_running_loop()
        token = object()
        self._pending.add(token)

        def add(engine: Engine) -> Stream:
            self._pending.discard(token)
            req = engine.add_request(prompt_ids, adapter, params)
            stream = Stream(req, asyncio.Queue(), loop)
            self.streams[req.id] = stream
            return stream

        try:
            return await self.call(add)
        finally:
            self._pending.discard(token)  # (a submission whose handler is gone never counts again)

    async def abort(self, stream: Stream) -> None:
        """Cancel a request (client gone): its pages are freed before the next step."""
        if stream.done or self.stopping.is_set():
            return

        def cancel(engine: Engine) -> None:
            if not stream.done:
                engine.abort(stream.request)
                self._end(stream)

        try:
            await self.call(cancel)
        except Stopped:
            pass

    @property
    def pending(self) -> int:
        return len(self._pending)

    def waiting(self) -> int:
        return len(self.engine.scheduler.waiting) + self.pending

    # -- the engine thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self.stopping.is_set():
                self._run_commands(block=not self.engine.has_work())
                if self.engine.has_work():
                    self._deliver(self.engine.step())
        except BaseException as e:  # a bug in a step must not leave clients waiting forever
            log.exception("engine thread failed")
            self.error = e
        finally:
            self._shutdown()

    def _run_commands(self, block: bool) -> None:
        try:
            item = self.commands.get(timeout=0.05) if block else self.commands.get_nowait()
        except queue.Empty:
            return
        while True:
            fn, loop, fut = item
            try:
                result = fn(self.engine)
                loop.call_soon_threadsafe(self._resolve, fut, result, None)
            except Exception as e:  # reported to the handler (a 400, a refused adapter, ...)
                loop.call_soon_threadsafe(self._resolve, fut, None, e)
            try:
                item = self.commands.get_nowait()
            except queue.Empty:
                return

    def _deliver(self, events: list[StepEvent]) -> None:
        """One cross-thread wake-up per event loop per step, however many requests got a token."""
        now = time.perf_counter()
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for ev in events:
            stream = self.streams.get(ev.request.id)
            if stream is None:
                continue
            if stream.last_token_time is not None:
                stream.token_gaps.append(now - stream.last_token_time)
            stream.last_token_time = now
            stream.tokens += len(ev.token_ids)
            batches.setdefault(stream.loop, []).append((stream.events, ev))
            if ev.finished:
                stream.done = True
                self.streams.pop(ev.request.id, None)
                batches[stream.loop].append((stream.events, None))
                if self.on_finish is not None:
                    self.on_finish(stream)
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _end(self, stream: Stream) -> None:
        stream.done = True
        self.streams.pop(stream.request.id, None)
        stream.loop.call_soon_threadsafe(stream.events.put_nowait, None)
        if self.on_finish is not None:
            self.on_finish(stream)

    def _shutdown(self) -> None:
        self.stopping.set()
        for stream in list(self.streams.values()):
            self.engine.abort(stream.request)
            self._end(stream)
        while True:  # commands that will never run: their handlers get Stopped
            try:
                _, loop, fut = self.commands.get_nowait()
            except queue.Empty:
                break
            loop.call_soon_threadsafe(self._resolve, fut, None, Stopped("the server is shutting down"))

    def _resolve(self, fut: asyncio.Future, result, error) -> None:
        """On the asyncio thread: hand the result over; a request whose handler is gone is aborted."""
        if fut.cancelled():
            if isinstance(result, Stream):
                asyncio.ensure_future(self.abort(result))
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)

    def stop(self, timeout: float = 10.0) -> None:
        """Abort what runs (every stream ends) and join the thread."""
        self.stopping.set()
        self.thread.join(timeout)


def _put_all(items: list) -> None:
    for q, ev in items:
        q.put_nowait(ev)


def engine_snapshot(engine, waiting: int) -> dict:
    """Queue, batch, pool pages by use, adapter cache and memory figures of an engine."""
    kinds = engine.pool.kind.copy()
    st = engine.adapters
    return {"waiting": waiting, "running": len(engine.scheduler.running),
            "pages": {use: int((kinds == code).sum()) for use, code in (("free", 0), ("kv", 1), ("adapter", 2))},
            "resident": len(st.resident), "registered": len(st.host), "loads": st.loads, "hits": st.hits,
            "memory": engine.memory(), "steps": getattr(engine, "steps", 0),
            "forward_seconds": getattr(engine, "forward_seconds", 0.0)}
