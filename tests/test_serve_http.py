"""`memtune serve`: a real server on 127.0.0.1, talked to with the `openai` client and httpx."""

import asyncio
import copy
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
import uvicorn
from openai import OpenAI

from memtune.models import byte_tokenizer
from memtune.serve import Engine, EngineConfig, SamplingParams
from memtune.serve.engine_thread import EngineThread
from memtune.serve.launch import bind
from memtune.serve.server import ServerOptions, create_app
from test_serve_engine import tiny_llama, write_peft_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = [f"ad{i}" for i in range(12)]


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def adapter_root(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    for i, name in enumerate(NAMES):
        write_peft_adapter(base, root / name, [2, 4, 8][i % 3], ["q_proj", "v_proj", "down_proj"], {}, 100 + i)
    return root


def new_engine(base, root, **cfg):
    eng = Engine(copy.deepcopy(base), byte_tokenizer(),
                 EngineConfig(**{"pool_mib": 4, "page_tokens": 4, "max_running": 16, **cfg}))
    for name in NAMES:
        eng.add_adapter(name, root / name)
    return eng


class Served:
    def __init__(self, app, thread):
        self.thread, self.engine = thread, getattr(thread, "engine", None)  # (none when it runs in a process)
        sock = bind("127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.runner = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.runner.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.runner.join(30)
        assert not self.runner.is_alive()
        assert not self.thread.alive()


def start(base, root, max_queue=256, allow_loading=True, **cfg) -> Served:
    thread = EngineThread(new_engine(base, root, **cfg), max_queue=max_queue)
    return Served(create_app(thread, ServerOptions("tiny", "tiny-llama", allow_loading, [str(root)])), thread)


@pytest.fixture(scope="module")
def served(base, adapter_root):
    s = start(base, adapter_root)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(base, adapter_root):
    return new_engine(base, adapter_root)


def expected_text(ref: Engine, prompt_ids, adapter, max_tokens, stop_ids=()):
    req = ref.generate([prompt_ids], [adapter], SamplingParams(max_tokens=max_tokens, stop_token_ids=list(stop_ids)))[0]
    return req.text


def client(served):
    return OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_openai_client_completions_equal_the_engine(served, reference):
    tok = byte_tokenizer()
    c = client(served)
    for model, adapter in [("ad3", "ad3"), ("tiny", None), ("ad7", "ad7")]:
        prompt = f"The {model} says"
        want = expected_text(reference, tok(prompt)["input_ids"], adapter, 12)
        out = c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        assert out.choices[0].text == want
        assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens == len(tok(prompt)["input_ids"])
        parts, usage = [], None
        for ch in c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}):
            if ch.choices:
                parts.append(ch.choices[0].text)
            if ch.usage:
                usage = ch.usage
        assert "".join(parts) == want and usage.completion_tokens == 12


def test_openai_client_chat_equals_the_engine(served, reference):
    tok = byte_tokenizer()
    c = client(served)
    messages = [{"role": "user", "content": "hello there"}]
    ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
              add_special_tokens=False)["input_ids"]
    want = expected_text(reference, ids, "ad5", 16, [tok.convert_tokens_to_ids("<|im_end|>")])
    out = c.chat.completions.create(model="ad5", messages=messages, max_tokens=16, temperature=0)
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="ad5", messages=messages, max_tokens=16, temperature=0, stream=True) if ch.choices)
    assert streamed == want


def test_models_health_and_metrics(served):
    with httpx.Client(base_url=served.url) as h:
        models = h.get("/v1/models").json()["data"]
        assert models[0]["id"] == "tiny" and models[0]["parent"] is None
        by_id = {m["id"]: m for m in models}
        assert by_id["ad1"]["parent"] == "tiny" and by_id["ad1"]["root"].endswith("ad1")
        assert h.get("/health").json() == {"status": "ok"}
        h.post("/v1/completions", json={"model": "ad1", "prompt": "x", "max_tokens": 3})
        text = h.get("/metrics").text
    for name in ("memtune_queue_depth", "memtune_running_requests", 'memtune_pool_pages{use="kv"}',
                 "memtune_adapter_loads", "memtune_adapter_hit_rate", "memtune_time_to_first_token_seconds_bucket",
                 "memtune_time_per_output_token_seconds_bucket", 'memtune_requests_total{finish_reason="length"}',
                 'memtune_memory_bytes{category="weights"}', 'memtune_memory_bytes{category="adapter_pages"}'):
        assert name in text, name


BAD = [  # body (or raw bytes), status, param, words in the message
    (b"{not json", 400, None, "not valid JSON"),
    ([1, 2], 400, None, "JSON object"),
    ({"model": "nope", "prompt": "x"}, 404, "model", "does not exist"),
    ({"prompt": "x"}, 400, "model", "required"),
    ({"model": "ad1", "prompt": 5}, 400, "prompt", "string"),
    ({"model": "ad1", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "integer"),
    ({"model": "ad1", "prompt": "x", "max_tokens": -3}, 400, "max_tokens", "expected 1..512"),
    ({"model": "ad1", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens", "expected 1..512"),
    ({"model": "ad1", "prompt": "x" * 500, "max_tokens": 100}, 400, "max_tokens", "over the model's context"),
    ({"model": "ad1", "prompt": "x", "temperature": "hot"}, 400, "temperature", "number"),
    ({"model": "ad1", "prompt": "x", "top_p": 0}, 400, "top_p", "0 < top_p"),
    ({"model": "ad1", "prompt": "x", "n": 2}, 400, "n", "not supported"),
    ({"model": "ad1", "prompt": "x", "logprobs": 3}, 400, "logprobs", "not supported"),
    ({"model": "ad1", "prompt": "x", "stop": [1]}, 400, "stop", "strings"),
    ({"model": "ad1", "prompt": [1, 99999]}, 400, "prompt", "outside the vocabulary"),
    ({"model": "ad1", "prompt": "x", "stream": "yes"}, 400, "stream", "true or false"),
]


@pytest.mark.parametrize("body,status,param,words", BAD)
def test_bad_input_gets_an_openai_error(served, body, status, param, words):
    with httpx.Client(base_url=served.url) as h:
        if isinstance(body, bytes):
            r = h.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        else:
            r = h.post("/v1/completions", json=body)
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"] and err["code"] == status and err["type"]
        ok = h.post("/v1/completions", json={"model": "ad1", "prompt": "x", "max_tokens": 2, "temperature": 0})
        assert ok.status_code == 200  # still serving


def test_chat_specific_errors_and_ignored_extras(served):
    with httpx.Client(base_url=served.url) as h:
        r = h.post("/v1/chat/completions", json={"model": "ad1", "messages": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = h.post("/v1/chat/completions", json={"model": "ad1", "messages": [{"role": "user", "content": "x"}],
                                                  "tools": [{"type": "function"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
        r = h.post("/v1/chat/completions", json={"model": "ad1", "messages": [{"role": "user", "content": "x"}],
                                                  "max_tokens": 3, "some_future_field": {"a": 1}, "user": "u"})
        assert r.status_code == 200  # fields the API does not define are ignored


def test_full_queue_is_429_with_retry_after(base, adapter_root):
    s = start(base, adapter_root, max_queue=0)
    try:
        with httpx.Client(base_url=s.url) as h:
            r = h.post("/v1/completions", json={"model": "ad1", "prompt": "x"})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    finally:
        s.stop()


def test_adapter_loading_is_confined_and_checked(served, adapter_root, base, tmp_path):
    with httpx.Client(base_url=served.url) as h:
        outside = write_peft_adapter(base, tmp_path / "outside", 2, ["q_proj"], {}, 5)
        link = adapter_root / "link-out"
        link.symlink_to(outside)
        for body, param, words in [
            ({"lora_name": "x1", "lora_path": str(outside)}, "lora_path", "outside the adapter roots"),
            ({"lora_name": "x2", "lora_path": str(link)}, "lora_path", "outside the adapter roots"),
            ({"lora_name": "../x", "lora_path": str(adapter_root / "ad1")}, "lora_path", "expected 1-64"),
            ({"lora_name": "ad1", "lora_path": str(adapter_root / "ad2")}, "lora_path", "already registered"),
            ({"lora_name": "x3", "lora_path": str(adapter_root / "missing")}, "lora_path", "no such directory"),
        ]:
            r = h.post("/v1/load_lora_adapter", json=body)
            assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
            assert r.json()["error"]["param"] == param
        pickled = adapter_root / "pickled"
        pickled.mkdir()
        (pickled / "adapter_config.json").write_text((adapter_root / "ad1" / "adapter_config.json").read_text())
        (pickled / "adapter_model.bin").write_bytes(b"\x80\x04not really")
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "pk", "lora_path": str(pickled)})
        assert r.status_code == 400 and "pickle" in r.json()["error"]["message"]
        copy_dir = adapter_root / "fresh"
        write_peft_adapter(base, copy_dir, 4, ["o_proj"], {}, 9)
        r = h.post("/v1/load_lora_adapter", json={"lora_name": "fresh", "lora_path": str(copy_dir)})
        assert r.status_code == 200 and "Success" in r.text
        assert h.post("/v1/completions", json={"model": "fresh", "prompt": "x", "max_tokens": 2}).status_code == 200
        assert h.post("/v1/unload_lora_adapter", json={"lora_name": "fresh"}).status_code == 200
        assert h.post("/v1/completions", json={"model": "fresh", "prompt": "x"}).status_code == 404


def test_adapter_loading_is_off_without_the_flag(base, adapter_root):
    s = start(base, adapter_root, allow_loading=False)
    try:
        with httpx.Client(base_url=s.url) as h:
            r = h.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": str(adapter_root / "ad1")})
        assert r.status_code == 404 and "--enable-adapter-loading" in r.json()["error"]["message"]
    finally:
        s.stop()


def wait_idle(engine, seconds=30):
    deadline = time.time() + seconds
    while engine.has_work() or engine.scheduler.running:
        assert time.time() < deadline, "engine still busy"
        time.sleep(0.05)


def test_load_with_disconnects_frees_every_page(served):
    """A few hundred concurrent requests over 12 adapters and the base; a third of the clients
    disconnect mid-stream or mid-request. Afterwards no page is held and memory is back."""
    proc = psutil.Process()

    async def one(h, i):
        body = {"model": NAMES[i % len(NAMES)] if i % 13 else "tiny", "prompt": f"request {i}",
                "max_tokens": 8 + i % 24, "temperature": 0.7, "seed": i}
        if i % 3 == 0:  # streamed, and this client hangs up after the first chunk
            async with h.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                async for _ in r.aiter_lines():
                    break
            return "gone"
        if i % 3 == 1:  # non-streamed, gives up almost at once
            try:
                await h.post("/v1/completions", json={**body, "max_tokens": 64}, timeout=0.05)
            except httpx.TimeoutException:
                return "gone"
            return "done"
        r = await h.post("/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["finish_reason"]

    async def load(n):
        limits = httpx.Limits(max_connections=400, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=served.url, limits=limits) as h:
            return await asyncio.gather(*(one(h, i) for i in range(n)))

    asyncio.run(load(30))  # warm-up: allocator pools, adapters on the device
    wait_idle(served.engine)
    before = proc.memory_info().rss
    results = asyncio.run(load(300))
    wait_idle(served.engine)
    eng = served.engine
    assert results.count("length") + results.count("stop") + results.count("done") + results.count("gone") == 300
    assert results.count("length") + results.count("stop") == 100 and results.count("gone") >= 100
    assert eng.memory()["kv_pages"] == 0 and not eng.pool.tables and not eng.adapters.pins
    assert not served.thread.streams and served.thread.pending == 0
    assert eng.pool.num_free() + sum(n for _, n in eng.pool.runs.values()) == eng.pool.num_pages
    assert proc.memory_info().rss - before < 64 * 2**20
    with httpx.Client(base_url=served.url) as h:  # and it still answers
        assert h.post("/v1/completions", json={"model": "ad1", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_memtune_serve_command_starts_answers_and_stops_on_sigterm(tmp_path):
    from memtune.models import build_preset

    base = build_preset("tiny-llama", "causal-lm").model
    write_peft_adapter(base, tmp_path / "ads" / "sql", 4, ["q_proj", "v_proj"], {}, 1)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "memtune", "serve", "--model", "tiny-llama", "--adapter-dir", str(tmp_path / "ads"),
           "--port", str(port), "--pool-mib", "8", "--shutdown-timeout", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        lines = []
        deadline = time.time() + 120
        while not any("listening on" in ln for ln in lines):
            assert time.time() < deadline and proc.poll() is None, (lines, proc.stderr.read() if proc.poll() else "")
            lines.append(proc.stdout.readline())
        assert "1 adapter(s): sql" in "".join(lines)
        c = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list()] == ["tiny-llama", "sql"]
        stream = c.completions.create(model="sql", prompt="hi", max_tokens=200, temperature=0, stream=True)
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)  # mid-stream: the in-flight request finishes, then the server exits
        rest = [ch.choices[0].finish_reason for ch in stream if ch.choices]
        assert first.choices and rest[-1] == "length"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopped" in proc.stderr.read()


def test_serve_a_run_directory_names_its_adapter_after_the_run(tmp_path):
    from conftest import ROOT, base_overrides
    from memtune.cli import main
    from memtune.serve.launch import build_engine, parse_adapters

    run = tmp_path / "sql-lora"
    assert main(["train", "model=tiny-llama", f"data.train={ROOT / 'examples' / 'data' / 'alpaca.jsonl'}",
                 "adapter.kind=lora", "adapter.r=4", "train.max_steps=2", *base_overrides(run)]) == 0
    engine, base_name, root, registered = build_engine(str(run), None, [], EngineConfig(pool_mib=4))
    assert base_name == "tiny-llama" and list(registered) == ["sql-lora"]
    assert list(engine.adapters.host) == ["sql-lora"]
    with pytest.raises(Exception, match="NAME=DIR"):
        parse_adapters(["nodir"])


@pytest.fixture(scope="module")
def preset_adapters(tmp_path_factory):
    from memtune.models import build_preset

    base = build_preset("tiny-llama", "causal-lm").model
    root = tmp_path_factory.mktemp("preset-adapters")
    for i, name in enumerate(["p0", "p1"]):
        write_peft_adapter(base, root / name, [2, 8][i], ["q_proj", "v_proj"], {}, 200 + i)
    return base, root


def test_engine_in_its_own_process_serves_the_same_text_and_frees_pages(preset_adapters):
    """`memtune serve`'s default: the engine built and run in a child process behind the same app."""
    import functools

    from memtune.serve.engine_process import EngineProcess
    from memtune.serve.launch import serving_engine

    base, root = preset_adapters
    config = EngineConfig(pool_mib=4, page_tokens=4, max_running=8)
    factory = functools.partial(serving_engine, None, "tiny-llama", [], config,
                                {"p0": str(root / "p0"), "p1": str(root / "p1")}, None)
    proc = EngineProcess(factory, max_queue=64)
    proc.start()
    app = create_app(proc, ServerOptions("tiny-llama", "tiny-llama", True, [str(root)]))
    s = Served(app, proc)
    try:
        ref = Engine(copy.deepcopy(base), byte_tokenizer(), config)
        ref.add_adapter("p1", root / "p1")
        tok = byte_tokenizer()
        want = ref.generate([tok("hello")["input_ids"]], ["p1"], SamplingParams(max_tokens=10))[0].text
        c = client(s)
        assert c.completions.create(model="p1", prompt="hello", max_tokens=10, temperature=0).choices[0].text == want
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model="p1", prompt="hello", max_tokens=10, temperature=0, stream=True) if ch.choices)
        assert streamed == want
        with httpx.Client(base_url=s.url) as h:
            with h.stream("POST", "/v1/completions", json={"model": "p0", "prompt": "x", "max_tokens": 200,
                                                           "stream": True, "ignore_eos": True}) as r:
                next(r.iter_lines())  # then hang up mid-stream
            r = h.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": str(root / "nope")})
            assert r.status_code == 400 and "no such directory" in r.json()["error"]["message"]
            r = h.post("/v1/load_lora_adapter", json={"lora_name": "again", "lora_path": str(root / "p1")})
            assert r.status_code == 200 and "again" in [m["id"] for m in h.get("/v1/models").json()["data"]]
            out = h.post("/v1/completions", json={"model": "again", "prompt": "hello", "max_tokens": 10,
                                                  "temperature": 0}).json()
            assert out["choices"][0]["text"] == want  # the same file under another name
            assert h.post("/v1/unload_lora_adapter", json={"lora_name": "again"}).status_code == 200
            assert h.post("/v1/completions", json={"model": "again", "prompt": "x"}).status_code == 404
            assert h.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
            deadline = time.time() + 30
            while True:  # the child's snapshot (every 0.25 s) shows the aborted request's pages freed
                snap = proc.snapshot()
                if snap["pages"].get("kv", 1) == 0 and snap["running"] == 0:
                    break
                assert time.time() < deadline, snap
                time.sleep(0.1)
            assert "memtune_memory_bytes" in h.get("/metrics").text
    finally:
        s.stop()
    assert not proc.process.is_alive()
