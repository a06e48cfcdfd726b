"""`memtune serve`: the engine behind an OpenAI-compatible HTTP API (FastAPI on uvicorn).

    POST /v1/completions, /v1/chat/completions   `model` = an adapter name, or the base's name
                                                 stream: true -> server-sent events ("data: {...}")
    GET  /v1/models                              the base and every adapter (parent, root)
    GET  /health                                 200 while serving, 503 while shutting down
    GET  /metrics                                Prometheus text: queue, pages, adapter cache, latency
    POST /v1/load_lora_adapter, /v1/unload_lora_adapter   only with --enable-adapter-loading

The HTTP layer holds no model state: it validates (openai_api.py), tokenizes, submits to the engine
(an EngineProcess, `memtune serve`'s default, or an EngineThread: the same interface) with a bounded
queue (429 + Retry-After when full) and streams what comes back. A client that
disconnects, streamed or not, has its request aborted and its pages freed. Errors use OpenAI's body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..errors import MemtuneError
from .adapters import AdapterError
from .engine_thread import EngineThread, QueueFull, Stopped, Stream
from .openai_api import APIError, bad, chunk, completion, new_id, parse, usage
from .sampling import chat_template_prompt


@dataclass
class ServerOptions:
    base_name: str  # what `model` names for no adapter
    base_root: str = ""  # the base's path or hub id (GET /v1/models `root`)
    allow_loading: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter
    adapter_roots: list[str] = field(default_factory=list)  # run-time adapter paths must resolve inside one


class Metrics:
    def __init__(self, thread: EngineThread) -> None:
        self.thread = thread
        r = self.registry = CollectorRegistry()
        self.queue = Gauge("memtune_queue_depth", "requests waiting for admission", registry=r)
        self.running = Gauge("memtune_running_requests", "requests in the running batch", registry=r)
        self.pages = Gauge("memtune_pool_pages", "page pool pages by use", ["use"], registry=r)
        self.resident = Gauge("memtune_adapters_resident", "adapters on the device", registry=r)
        self.registered = Gauge("memtune_adapters_registered", "adapters in host memory", registry=r)
        self.loads = Gauge("memtune_adapter_loads", "adapter loads onto the device so far", registry=r)
        self.hit_rate = Gauge("memtune_adapter_hit_rate", "share of adapter uses already on the device", registry=r)
        self.memory = Gauge("memtune_memory_bytes", "device bytes by category (engine.memory())", ["category"],
                            registry=r)
        self.steps = Gauge("memtune_engine_steps", "engine steps so far", registry=r)
        self.forward = Gauge("memtune_engine_forward_seconds", "seconds in the model's forward so far", registry=r)
        self.requests = Counter("memtune_requests", "finished requests", ["finish_reason"], registry=r)
        self.tokens = Counter("memtune_generated_tokens", "generated tokens", registry=r)
        self.ttft = Histogram("memtune_time_to_first_token_seconds", "arrival to first token", registry=r,
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.tpot = Histogram("memtune_time_per_output_token_seconds", "gap between tokens of a request",
                              registry=r, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))

    def finished(self, stream: Stream) -> None:  # on the engine thread (prometheus_client is thread-safe)
        req = stream.request
        self.requests.labels(req.finish_reason or "abort").inc()
        self.tokens.inc(len(req.output_ids))
        if req.first_token_time is not None:
            self.ttft.observe(req.first_token_time - req.arrival)
        for gap in stream.token_gaps:
            self.tpot.observe(gap)

    def render(self) -> bytes:
        snap = self.thread.snapshot()
        self.queue.set(snap["waiting"])
        self.running.set(snap["running"])
        for use, n in snap["pages"].items():
            self.pages.labels(use).set(n)
        self.resident.set(snap["resident"])
        self.registered.set(snap["registered"])
        self.loads.set(snap["loads"])
        uses = snap["loads"] + snap["hits"]
        self.hit_rate.set(snap["hits"] / uses if uses else 0.0)
        self.steps.set(snap["steps"])
        self.forward.set(snap["forward_seconds"])
        for category, n in snap["memory"].items():
            self.memory.labels(category).set(n)
        return generate_latest(self.registry)


def error_response(e: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


def create_app(thread: EngineThread, opts: ServerOptions) -> FastAPI:
    tokenizer = thread.tokenizer
    metrics = Metrics(thread)
    thread.on_finish = metrics.finished
    state = {"draining": False}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if not thread.alive():
            thread.start()
        yield
        state["draining"] = True
        await asyncio.to_thread(thread.stop)

    app = FastAPI(title="memtune", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    def adapter_for(model: str) -> str | None:
        if model == opts.base_name:
            return None
        if model in thread.adapters():
            return model
        raise APIError(404, f"The model `{model}` does not exist.", "model")

    def token_ids(parsed) -> tuple[list[int], list[int]]:
        """(prompt ids, extra stop token ids): the chat template for chat, the text or ids otherwise."""
        if parsed.messages is not None:
            if not getattr(tokenizer, "chat_template", None):
                raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
            text, ends = chat_template_prompt(tokenizer, parsed.messages)
            return tokenizer(text, add_special_tokens=False)["input_ids"], ends
        if isinstance(parsed.prompt, str):
            return tokenizer(parsed.prompt)["input_ids"], []
        vocab = thread.vocab_size
        if max(parsed.prompt) >= vocab:
            raise bad("prompt", f"token id {max(parsed.prompt)} is outside the vocabulary (size {vocab})")
        return list(parsed.prompt), []

    async def read_json(request: Request):
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            msg = f"line {e.lineno} column {e.colno}: {e.msg}" if isinstance(e, json.JSONDecodeError) else str(e)
            raise APIError(400, f"the request body is not valid JSON ({msg})") from None

    async def create(request: Request, chat: bool):
        if state["draining"]:
            raise APIError(503, "the server is shutting down")
        parsed = parse(await read_json(request), chat, thread.max_len)
        adapter = adapter_for(parsed.model)
        ids, ends = token_ids(parsed)
        total = len(ids) + parsed.params.max_tokens
        if total > thread.max_len:
            raise bad("max_tokens", f"the prompt ({len(ids)} tokens) + max_tokens ({parsed.params.max_tokens}) = "
                                    f"{total} is over the model's context of {thread.max_len}")
        parsed.params.stop_token_ids = ends
        try:
            stream = await thread.submit(ids, adapter, parsed.params)
        except QueueFull as e:
            raise APIError(429, str(e)) from None
        except Stopped as e:
            raise APIError(503, str(e)) from None
        except MemtuneError as e:  # the engine's own checks (e.g. the pool cannot hold the request)
            raise APIError(400, str(e)) from None
        rid = new_id(chat)
        if parsed.stream:
            return StreamingResponse(sse(stream, rid, parsed, chat, len(ids)), media_type="text/event-stream")
        return await whole(request, stream, rid, parsed, chat, len(ids))

    async def whole(request: Request, stream: Stream, rid, parsed, chat, n_prompt):
        async def collect() -> str:
            parts = []
            while (ev := await stream.events.get()) is not None:
                parts.append(ev.text)
            return "".join(parts)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        task, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
                await thread.abort(stream)
            gone.cancel()
        if not task.done() or task.cancelled():
            return Response(status_code=499)  # the client is gone; nobody reads this
        req = stream.request
        if req.finish_reason == "abort":
            raise APIError(503, "the request was aborted (server shutting down)")
        return completion(rid, parsed.model, chat, task.result(), req.finish_reason,
                          usage(n_prompt, len(req.output_ids)))

    async def sse(stream: Stream, rid, parsed, chat, n_prompt):
        def event(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        # a token's chunk is the same JSON every time but for its text: the text is the only field
        # serialized per token (with an EngineThread the HTTP thread shares the GIL with the engine's step)
        head, tail = json.dumps(chunk(rid, parsed.model, chat, "\0", None)).split('"\\u0000"')
        queue = stream.events
        try:
            if chat:
                yield event(chunk(rid, parsed.model, chat, "", None, first=True))
            ended = False
            while not ended:
                events = [await queue.get()]
                while not queue.empty():  # whatever else is ready goes out in the same write
                    events.append(queue.get_nowait())
                out = []
                for ev in events:
                    if ev is None:
                        ended = True
                        break
                    if ev.finished:
                        out.append(event(chunk(rid, parsed.model, chat, ev.text, ev.request.finish_reason)))
                    elif ev.text:
                        out.append(f"data: {head}{json.dumps(ev.text)}{tail}\n\n")
                if out:
                    yield "".join(out)
            req = stream.request
            if req.finish_reason == "abort":
                yield event(APIError(503, "the request was aborted (server shutting down)").body())
            if parsed.include_usage:
                yield event(chunk(rid, parsed.model, chat, None, None, use=usage(n_prompt, len(req.output_ids))))
            yield "data: [DONE]\n\n"
        finally:
            if not stream.done:  # the client went away mid-stream: cancel and free its pages
                await thread.abort(stream)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await create(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await create(request, chat=True)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": opts.base_name, "object": "model", "created": created, "owned_by": "memtune",
                 "root": opts.base_root or opts.base_name, "parent": None}]
        for name, path in sorted(thread.adapters().items()):
            data.append({"id": name, "object": "model", "created": created, "owned_by": "memtune",
                         "root": path, "parent": opts.base_name})
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        if state["draining"] or not thread.alive():
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        body = await admin_body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name:
            raise bad("lora_name", "expected a string")
        if name == opts.base_name:
            raise bad("lora_name", f"'{name}' is the base model's name")
        if not isinstance(path, str) or not path:
            raise bad("lora_path", "expected a string")
        real = os.path.realpath(path)
        roots = [os.path.realpath(r) for r in opts.adapter_roots]
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots):
            raise bad("lora_path", f"{path} is outside the adapter roots allowed at start-up "
                                   f"({', '.join(opts.adapter_roots) or 'none'})")
        try:
            await thread.load_adapter(name, real)
        except AdapterError as e:
            raise APIError(400, str(e), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        body = await admin_body(request)
        name = body.get("lora_name")
        if not isinstance(name, str) or name not in thread.adapters():
            raise APIError(404, f"The model `{name}` does not exist.", "lora_name")
        try:
            await thread.unload_adapter(name)
        except AdapterError as e:
            raise APIError(400, str(e), "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def admin_body(request: Request) -> dict:
        if not opts.allow_loading:
            raise APIError(404, "adapter loading at run time is off; start the server with --enable-adapter-loading")
        body = await read_json(request)
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    app.state.thread, app.state.options = thread, opts
    return app


def resolve_roots(roots: list[str]) -> list[str]:
    out = []
    for r in roots:
        if not Path(r).is_dir():
            raise MemtuneError(f"--adapter-root {r}: not a directory")
        out.append(str(Path(r).resolve()))
    return out
