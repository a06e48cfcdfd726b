"""The engine in a process of its own, for `memtune serve`: the HTTP layer never shares its GIL.

Why not the engine thread (engine_thread.py) in the server's process: every torch op of a step releases
the GIL and has to win it back, and the HTTP thread's Python work (parsing, SSE chunks for every token of
every stream) takes it meanwhile. Measured on 2 CPU cores: a thread busy with Python for a fifth of the
time slows a 57 ms engine step to 71 ms, a third of the time to 99 ms; in the server a step took 109 ms
against 86 ms in process. So, as vLLM's engine core, the engine runs in a child process:

    parent (HTTP)                                 child (engine)
      submit / abort / load / unload  --cmd-->      run commands between steps, step, ...
      reader thread: events per step  <--res--      [(id, text, token ids, finished, ...)] per step,
      -> each stream's asyncio queue                a state snapshot for /metrics every 0.25 s

The child builds the engine itself from a picklable factory (the model is never pickled); the parent
gets the tokenizer, context length, vocabulary size and adapter list from it once started. Requests are
mirrored in the parent as `RequestView`s (what the HTTP layer and the metrics read). `stop()` asks the
child to abort what runs and exit, and ends every stream; a child that dies ends them too.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing as mp
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

from .engine_thread import QueueFull, Stopped, Stream, _put_all, engine_snapshot

log = logging.getLogger(__name__)
SNAPSHOT_EVERY = 0.25  # seconds between the child's state snapshots


@dataclass(eq=False)
class RequestView:
    """The parent's copy of a request: what the HTTP layer and the metrics read."""

    id: int
    arrival: float
    output_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    finish_reason: str | None = None


@dataclass
class EventView:
    request: RequestView
    text: str
    token_ids: list[int]
    finished: bool


class ChildError(Exception):
    """A command failed in the engine process; the message is the child's."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _child(factory: Callable, commands: mp.Queue, results: mp.Queue) -> None:
    """The engine process: build, report, then loop over commands and steps until told to stop."""
    try:
        engine = factory()
    except BaseException as e:  # reported to the parent, which fails its start
        results.put(("failed", f"{type(e).__name__}: {e}"))
        return
    results.put(("info", {"tokenizer": engine.tokenizer, "max_len": engine.max_len,
                          "vocab_size": engine.model.config.vocab_size,
                          "adapters": {n: a.path for n, a in engine.adapters.host.items()},
                          "served": getattr(engine, "served", ("base", "")), "memory": engine.memory(),
                          "device": str(engine.device)}))
    requests, last_snapshot = {}, 0.0
    try:
        while True:
            try:
                cmd = commands.get(timeout=0.05) if not engine.has_work() else commands.get_nowait()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd[0] == "stop":
                    for req in requests.values():
                        engine.abort(req)
                    results.put(("stopped",))
                    return
                _run(engine, cmd, requests, results)
                try:
                    cmd = commands.get_nowait()
                except queue.Empty:
                    cmd = None
            events = engine.step() if engine.has_work() else []
            out = [(ev.request.id, ev.text, ev.token_ids, ev.finished, ev.request.finish_reason,
                    ev.request.first_token_time) for ev in events]
            for ev in events:
                if ev.finished:
                    requests.pop(ev.request.id, None)
            now = time.perf_counter()
            snap = None
            if now - last_snapshot > SNAPSHOT_EVERY:
                snap, last_snapshot = engine_snapshot(engine, len(engine.scheduler.waiting)), now
            if out or snap:
                results.put(("events", out, snap))
    except BaseException:
        results.put(("crashed", traceback.format_exc()))


def _run(engine, cmd: tuple, requests: dict, results: mp.Queue) -> None:
    kind = cmd[0]
    if kind == "add":
        _, rid, ids, adapter, params, arrival = cmd
        try:
            req = engine.add_request(ids, adapter, params, arrival=arrival)
            req.id = rid  # the parent's id (the engine's own counter is unused here)
            requests[rid] = req
            results.put(("reply", ("add", rid), None, None, None))
        except Exception as e:
            results.put(("reply", ("add", rid), type(e).__name__, str(e), None))
    elif kind == "abort":
        req = requests.pop(cmd[1], None)
        if req is not None:
            engine.abort(req)
    elif kind in ("load", "unload"):
        token = cmd[1]
        try:
            engine.add_adapter(cmd[2], cmd[3]) if kind == "load" else engine.remove_adapter(cmd[2])
            results.put(("reply", token, None, None, {n: a.path for n, a in engine.adapters.host.items()}))
        except Exception as e:
            results.put(("reply", token, type(e).__name__, str(e), None))


class EngineProcess:
    """EngineThread's interface, over an engine built and run in a child process."""

    def __init__(self, factory: Callable, max_queue: int = 256, on_finish=None, start_timeout: float = 600) -> None:
        self.factory, self.max_queue, self.on_finish, self.start_timeout = factory, max_queue, on_finish, start_timeout
        ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch or thread state
        self.commands, self.results = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=_child, args=(factory, self.commands, self.results), daemon=True,
                                   name="memtune-engine")
        self.streams: dict[int, Stream] = {}
        self.replies: dict = {}  # token -> (loop, future)
        self.stopping = threading.Event()
        self._ids = itertools.count()
        self._snapshot: dict = {}
        self._adapters: dict[str, str] = {}
        self.info: dict | None = None
        self.reader = threading.Thread(target=self._read, name="memtune-engine-reader", daemon=True)

    # -- life ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the child and wait until its engine is built (its errors are raised here)."""
        if self.info is not None:
            return
        self.process.start()
        try:
            msg = self.results.get(timeout=self.start_timeout)
        except queue.Empty:
            self.process.kill()
            raise RuntimeError(f"the engine process did not start in {self.start_timeout:.0f} s") from None
        if msg[0] != "info":
            self.process.join(5)
            raise RuntimeError(f"the engine process failed to start: {msg[1]}")
        self.info = msg[1]
        self._adapters = dict(self.info["adapters"])
        self.reader.start()

    def alive(self) -> bool:
        return self.process.is_alive() and not self.stopping.is_set()

    def stop(self, timeout: float = 10.0) -> None:
        if self.stopping.is_set():
            return
        self.stopping.set()
        if self.process.is_alive():
            self.commands.put(("stop",))
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
        self.reader.join(timeout)
        self._end_all("abort")

    # -- what the HTTP layer reads --------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.info["tokenizer"]

    @property
    def max_len(self) -> int:
        return self.info["max_len"]

    @property
    def vocab_size(self) -> int:
        return self.info["vocab_size"]

    def adapters(self) -> dict[str, str]:
        return self._adapters

    def waiting(self) -> int:
        return sum(1 for s in self.streams.values() if s.request.first_token_time is None)

    @property
    def pending(self) -> int:
        return self.waiting()

    def snapshot(self) -> dict:
        snap = dict(self._snapshot) or {"running": 0, "pages": {}, "resident": 0, "registered": len(self._adapters),
                                        "loads": 0, "hits": 0, "memory": {}, "steps": 0, "forward_seconds": 0.0}
        snap["waiting"] = self.waiting()
        return snap

    # -- requests and adapters ----------------------------------------------------------------------
    async def submit(self, prompt_ids: list[int], adapter: str | None, params) -> Stream:
        if not self.alive():
            raise Stopped("the server is shutting down")
        if self.waiting() >= self.max_queue:
            raise QueueFull(f"{self.waiting()} requests are waiting (the server's limit is {self.max_queue})")
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        view = RequestView(rid, time.perf_counter())
        stream = Stream(view, asyncio.Queue(), loop)
        self.streams[rid] = stream
        try:
            await self._ask(("add", rid), ("add", rid, list(prompt_ids), adapter, params, view.arrival))
        except BaseException:
            self.streams.pop(rid, None)
            if self.alive():
                self.commands.put(("abort", rid))  # in case it was added after all (a cancelled handler)
            raise
        return stream

    async def abort(self, stream: Stream) -> None:
        if stream.done or not self.alive():
            return
        self.commands.put(("abort", stream.request.id))
        self._end(stream, "abort")

    async def load_adapter(self, name: str, path: str) -> None:
        token = ("adapter", next(self._ids))
        self._adapters = await self._ask(token, ("load", token, name, path))

    async def unload_adapter(self, name: str) -> None:
        token = ("adapter", next(self._ids))
        self._adapters = await self._ask(token, ("unload", token, name))

    async def _ask(self, token, cmd: tuple):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.replies[token] = (loop, fut)
        self.commands.put(cmd)
        try:
            return await fut
        finally:
            self.replies.pop(token, None)

    # -- the reader thread ----------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                msg = self.results.get(timeout=0.5)
            except queue.Empty:
                if not self.process.is_alive():
                    break
                continue
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind in ("stopped", "crashed"):
                if kind == "crashed":
                    log.error("the engine process failed:\n%s", msg[1])
                break
            try:
                if kind == "events":
                    self._deliver(msg[1])
                    if msg[2] is not None:
                        self._snapshot = msg[2]
                elif kind == "reply":
                    self._reply(*msg[1:])
            except Exception:  # a bug here must not leave every later stream waiting
                log.exception("engine process reader: bad message %r", kind)
        self.stopping.set()
        self._end_all("abort")
        for token in list(self.replies):
            self._reply(token, "Stopped", "the server is shutting down", None)

    def _reply(self, token, error_kind, message, value) -> None:
        entry = self.replies.get(token)
        if entry is None:
            return
        loop, fut = entry
        if error_kind is None:
            result, error = (value, None)
        elif error_kind == "Stopped":
            result, error = None, Stopped(message)
        else:
            result, error = None, _rebuild_error(error_kind, message)
        loop.call_soon_threadsafe(_settle, fut, result, error)

    def _deliver(self, events: list) -> None:
        now = time.perf_counter()
        batches: dict = {}
        for rid, text, token_ids, finished, reason, first in events:
            stream = self.streams.get(rid)
            if stream is None:
                continue
            req = stream.request
            req.output_ids.extend(token_ids)
            req.first_token_time = req.first_token_time or first
            if stream.last_token_time is not None:
                stream.token_gaps.append(now - stream.last_token_time)
            stream.last_token_time = now
            stream.tokens += len(token_ids)
            batches.setdefault(stream.loop, []).append((stream.events, EventView(req, text, token_ids, finished)))
            if finished:
                req.finish_reason = reason
                stream.done = True
                self.streams.pop(rid, None)
                batches[stream.loop].append((stream.events, None))
                if self.on_finish is not None:
                    self.on_finish(stream)
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _end(self, stream: Stream, reason: str) -> None:
        if stream.done:
            return
        stream.done = True
        stream.request.finish_reason = stream.request.finish_reason or reason
        self.streams.pop(stream.request.id, None)
        stream.loop.call_soon_threadsafe(stream.events.put_nowait, None)

    def _end_all(self, reason: str) -> None:
        for stream in list(self.streams.values()):
            self._end(stream, reason)


def _rebuild_error(kind: str, message: str) -> Exception:
    """The child's exception as the parent's type, so the HTTP layer maps it to the same status."""
    from ..errors import ConfigError, MemtuneError, ModelError
    from .adapters import AdapterError

    types = {"AdapterError": AdapterError, "ConfigError": ConfigError, "ModelError": ModelError}
    return types.get(kind, MemtuneError)(message)


def _settle(fut: asyncio.Future, result, error) -> None:
    if fut.cancelled():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
