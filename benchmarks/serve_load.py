"""`memtune serve` under S-LoRA's workload, over HTTP, with concurrent `openai` clients.

    python benchmarks/serve_load.py                   # CPU: llama-512x8 fp32, 100 adapters, 300 requests
    python benchmarks/serve_load.py --quick           # smoke: tiny model, 10 adapters, 40 requests
    python benchmarks/serve_load.py --n 100 --rate 20 --duration 15 --slo-ttft 2

The serving-throughput benchmark's trace (benchmarks/serve_throughput.py: power-law adapter popularity
alpha, gamma arrivals with cv, uniform input / output lengths, numpy seed 42) is replayed in real time
against three systems, one after another, on the same model and adapters:

  in-process engine    memtune.serve.Engine driven directly (serve_throughput's replay), detokenizing
                       with the same tokenizer the server uses
  memtune serve        `python -m memtune serve --model DIR --adapters ...` in its own process (its
                       engine in a child process of that, the default); every
                       request is an `openai.AsyncOpenAI().completions.create(..., stream=True)` sent at
                       its arrival time (prompt as token ids, temperature 0, ignore_eos, usage in the last
                       chunk), the client in this process
  merge-swap server    the same HTTP layer (memtune.serve.server.create_app) over a PEFT-style merge-swap
                       engine (this file, `MergeSwapEngine`): the oldest waiting request's adapter is merged
                       into the base (restored from a pristine copy first), up to --max-running of its
                       waiting requests run as one left-padded HF `generate`, then the next. It answers
                       when the batch ends (no per-token streaming), so its TTFT is its batch's end.

Reported as `vllm bench serve` reports: completed requests, request and output-token throughput,
TTFT / TPOT / ITL p50, p90, p99 (ms), end-to-end latency, goodput (requests with TTFT <= --slo-ttft, per
second), and the server's memory by category (GET /metrics `memtune_memory_bytes`, KV pages at their
peak over samples every 0.25 s). Writes benchmarks/results/serve_load[-quick].json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import mib, save, table  # noqa: E402
from serve_throughput import (  # noqa: E402
    MODELS, TraceRequest, build_model, merge_into, read_lora, run_engine, s_lora_trace, static_generate, target_shapes,
    write_adapters)

from memtune.serve import EngineConfig, SamplingParams  # noqa: E402
from memtune.serve.engine import StepEvent  # noqa: E402
from memtune.serve.scheduler import Request  # noqa: E402

DEFAULTS = {"model": "llama-512x8", "n": 100, "rate": 20.0, "duration": 15.0, "input_len": "8,64",
            "output_len": "8,64", "pool_mib": 512.0}
QUICK = {"model": "llama-tiny", "n": 10, "rate": 40.0, "duration": 1.0, "input_len": "8,32", "output_len": "8,16",
         "pool_mib": 64.0}
IN_PROCESS, HTTP, MERGE_SWAP_HTTP = "in-process engine", "memtune serve (HTTP)", "merge-swap server (HTTP)"


# -- model folder -----------------------------------------------------------------------------------------
def word_tokenizer(vocab: int):
    """A word-level tokenizer of `vocab` tokens "t0".."t{vocab-1}" (decodes every id to a word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t2", pad_token="t0", bos_token="t1")


def save_model(base, root: Path) -> Path:
    """The random-init model as an HF folder `memtune serve --model DIR` loads (weights + tokenizer)."""
    out = root / "model"
    if not (out / "tokenizer.json").is_file():
        base.save_pretrained(out)
        word_tokenizer(base.config.vocab_size).save_pretrained(out)
    return out


# -- the merge-swap engine (the baseline behind the same HTTP layer) ---------------------------------------
class MergeSwapEngine:
    """What EngineThread and create_app need of an engine, served PEFT-style: one adapter at a time."""

    def __init__(self, model, tokenizer, dirs: dict[str, Path], batch: int) -> None:
        self.model, self.tokenizer, self.batch = model.eval(), tokenizer, batch
        self.device = next(model.parameters()).device
        self.max_len = model.config.max_position_embeddings
        self.weights = {n: m.weight for n, m in model.named_modules() if n in target_shapes(model)}
        self.pristine = {n: w.detach().clone() for n, w in self.weights.items()}
        self.dirs, self.current, self.swaps = dirs, None, 0
        self.adapters = SimpleNamespace(host={k: SimpleNamespace(path=str(v)) for k, v in dirs.items()},
                                        resident={}, loads=0, hits=0)
        self.scheduler = SimpleNamespace(waiting=deque(), running=[])
        self.pool = SimpleNamespace(kind=np.zeros(1, dtype=np.int8))
        self._ids = 0

    def add_request(self, prompt, adapter, params: SamplingParams) -> Request:
        self._ids += 1
        req = Request(self._ids, list(prompt), adapter, params, time.perf_counter())
        self.scheduler.waiting.append(req)
        return req

    def has_work(self) -> bool:
        return bool(self.scheduler.waiting)

    def abort(self, req: Request) -> None:
        if req in self.scheduler.waiting:
            self.scheduler.waiting.remove(req)
        req.status, req.finish_reason = "finished", "abort"

    def memory(self) -> dict:
        weights = sum(p.nbytes for p in self.model.parameters()) + sum(p.nbytes for p in self.pristine.values())
        return {"weights": weights, "kv_pages": 0, "adapter_pages": 0, "free": 0, "pool": 0, "host_adapters": 0}

    def step(self) -> list[StepEvent]:
        waiting = self.scheduler.waiting
        adapter = waiting[0].adapter
        group = [r for r in waiting if r.adapter == adapter][: self.batch]
        for r in group:
            waiting.remove(r)
        if adapter != self.current:
            with torch.no_grad():
                for n, w in self.weights.items():
                    w.copy_(self.pristine[n])
                if adapter is not None:
                    merge_into(self.weights, read_lora(self.dirs[adapter], self.device))
            self.current, self.swaps = adapter, self.swaps + 1
        trace = [TraceRequest(r.id, 0, 0.0, r.prompt_ids, r.params.max_tokens) for r in group]
        times = static_generate(self.model, trace, self.device)
        events = []
        for r, (first, finish) in zip(group, times, strict=True):
            r.output_ids = [0] * r.params.max_tokens  # only counts matter to the HTTP layer
            r.first_token_time, r.finish_time = first, finish
            r.status, r.finish_reason = "finished", "length"
            text = " ".join(["t0"] * len(r.output_ids))
            events.append(StepEvent(r, text, list(r.output_ids), True))
        return events


def serve_merge_swap(args) -> None:
    """The baseline server process (this script, re-invoked with --serve-merge-swap)."""
    import uvicorn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memtune.serve.engine_thread import EngineThread
    from memtune.serve.launch import bind
    from memtune.serve.server import ServerOptions, create_app

    if args.threads:
        torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    dirs = {Path(d).name: Path(d) for d in args.adapter_dirs}
    engine = MergeSwapEngine(model, AutoTokenizer.from_pretrained(args.model_dir), dirs, args.max_running)
    thread = EngineThread(engine, max_queue=100_000)
    app = create_app(thread, ServerOptions("base", args.model_dir))
    sock = bind("127.0.0.1", args.port)
    print("listening", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on")).run(sockets=[sock])


# -- the load generator ------------------------------------------------------------------------------------
def start_server(cmd: list[str], env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 600
    while True:
        line = proc.stdout.readline()
        if "listening" in line:
            return proc
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"server did not start: {line}{proc.stdout.read()}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def scrape(url: str) -> dict[str, float]:
    """memtune_memory_bytes{category=...}, engine steps and forward seconds from /metrics."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("memtune_memory_bytes{"):
            key = line.split('category="', 1)[1].split('"', 1)[0]
            out[key] = float(line.rsplit(" ", 1)[1])
        elif line.startswith(("memtune_engine_steps ", "memtune_engine_forward_seconds ")):
            out[line.split()[0][len("memtune_engine_"):]] = float(line.split()[1])
    return out


async def replay_http(url: str, trace: list[TraceRequest], names: list[str]) -> tuple[list[dict], float, dict]:
    """Each trace request sent at its arrival time; per request: arrival, chunk times, output tokens."""
    from openai import AsyncOpenAI

    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600,
                         http_client=httpx.AsyncClient(limits=limits, timeout=3600))
    peak: dict[str, float] = {}
    done = asyncio.Event()

    async def sample_memory() -> None:
        async with httpx.AsyncClient(timeout=10) as h:
            while not done.is_set():
                text = (await h.get(url + "/metrics")).text
                for line in text.splitlines():
                    if line.startswith("memtune_memory_bytes{"):
                        key = line.split('category="', 1)[1].split('"', 1)[0]
                        peak[key] = max(peak.get(key, 0.0), float(line.rsplit(" ", 1)[1]))
                await asyncio.sleep(0.25)

    async def one(tr: TraceRequest, t0: float) -> dict:
        await asyncio.sleep(max(0.0, t0 + tr.arrival - time.perf_counter()))
        sent = time.perf_counter()
        times, tokens = [], None
        stream = await client.completions.create(
            model=names[tr.adapter], prompt=tr.prompt, max_tokens=tr.output_len, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        async for ch in stream:
            if ch.choices and ch.choices[0].text:
                times.append(time.perf_counter())
            if ch.usage:
                tokens = ch.usage.completion_tokens
        return {"arrival": sent, "chunks": times, "tokens": tokens}

    sampler = asyncio.ensure_future(sample_memory())
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(tr, t0) for tr in trace))
    done.set()
    await sampler
    await client.close()
    return results, t0, peak


def summarize(records: list[dict], t0: float, slo_ttft: float) -> dict:
    """vllm bench serve's figures from per-request chunk times."""
    end = max(r["chunks"][-1] for r in records)
    span = end - t0
    ttft = np.array([r["chunks"][0] - r["arrival"] for r in records])
    # a request answered in one chunk (the merge-swap server) has no per-token times; the in-process
    # records carry first and last token only, so no inter-token latencies
    tpot = [(r["chunks"][-1] - r["chunks"][0]) / (r["tokens"] - 1) for r in records
            if r["tokens"] > 1 and len(r["chunks"]) > 1]
    itl = np.concatenate([np.diff(r["chunks"]) for r in records if len(r["chunks"]) > 1 and not r.get("ends_only")]
                         or [np.zeros(0)])
    e2e = np.array([r["chunks"][-1] - r["arrival"] for r in records])
    tokens = sum(r["tokens"] for r in records)

    def pct(xs) -> dict:
        xs = np.asarray(xs)
        return {f"p{p}": float(np.percentile(xs, p)) * 1000 if len(xs) else None for p in (50, 90, 99)}

    return {"completed": len(records), "seconds": span, "req_per_s": len(records) / span,
            "output_tokens": tokens, "output_tok_per_s": tokens / span, "ttft_ms": pct(ttft), "tpot_ms": pct(tpot),
            "itl_ms": pct(itl), "e2e_mean_s": float(e2e.mean()),
            "goodput_req_per_s": float((ttft <= slo_ttft).sum()) / span}


def engine_records(run) -> list[dict]:
    """The in-process run's records in the HTTP form: first token, last token (ITL: none measured)."""
    return [{"arrival": r.arrival, "chunks": [r.first_token, r.finish], "tokens": r.output_tokens, "ends_only": True}
            for r in run.records]


# -- main --------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", choices=list(MODELS), default=None)
    ap.add_argument("--n", type=int, default=None, help="adapters (default 100)")
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--rate", type=float, default=None)
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--cv", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--input-len", default=None)
    ap.add_argument("--output-len", default=None)
    ap.add_argument("--max-running", type=int, default=32)
    ap.add_argument("--pool-mib", type=float, default=None)
    ap.add_argument("--slo-ttft", type=float, default=2.0, help="goodput: requests with TTFT at most this (s)")
    ap.add_argument("--systems", default="engine,http,merge-swap")
    ap.add_argument("--repeat", type=int, default=1, help="engine and http runs each, in turn (merge-swap once); "
                    "the table shows each system's median run")
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the server processes (0: default)")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--work-dir", default=None, help="model folder and adapters (default: a temp folder)")
    # the baseline server process
    ap.add_argument("--serve-merge-swap", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--adapter-dirs", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for k, v in (QUICK if args.quick else {}).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def steps_cells(engine: dict) -> list[str]:
    steps, fwd = engine.get("steps"), engine.get("forward_seconds")
    return ["-", "-"] if not steps else [f"{steps:.0f}", f"{1000 * fwd / steps:.1f}"]


def cpu_seconds(p: psutil.Process) -> float:
    """User + system CPU seconds of a process and its live children (the server's engine process)."""
    total = 0.0
    for q in [p, *p.children(recursive=True)]:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def group_by_system(rows: list[dict]) -> list[list[dict]]:
    """Rows of the same system together, in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["system"], []).append(r)
    return list(groups.values())


def free_port() -> int:
    from memtune.serve.launch import bind

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    return port


def main() -> None:
    args = parse_args()
    if args.serve_merge_swap:
        return serve_merge_swap(args)
    systems = set(args.systems.split(","))
    ranks = [int(x) for x in args.ranks.split(",")]
    inp = tuple(int(x) for x in args.input_len.split(","))
    outp = tuple(int(x) for x in args.output_len.split(","))
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir()) / "memtune_serve_load" / args.model
    base = build_model(args.model, torch.float32, torch.device("cpu"))
    model_dir = save_model(base, work)
    dirs = write_adapters(Path(tempfile.gettempdir()) / "memtune_serve_adapters" / f"{args.model}-fp32-r"
                          f"{'-'.join(map(str, ranks))}", args.n, ranks, target_shapes(base), torch.float32,
                          f"random-init {args.model}")
    names = [d.name for d in dirs]
    trace = s_lora_trace(args.n, args.alpha, args.rate, args.cv, args.duration, inp, outp, base.config.vocab_size)
    print(f"{args.model}, {args.n} adapters (ranks {ranks}), {len(trace)} requests at {args.rate}/s (cv {args.cv}, "
          f"alpha {args.alpha}), input {inp}, output {outp}", flush=True)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    rows = []

    servers = {
        "http": (HTTP, [sys.executable, "-m", "memtune", "serve", "--model", str(model_dir), "--pool-mib",
                        str(args.pool_mib), "--max-running", str(args.max_running), "--max-adapters-per-batch",
                        str(args.max_running), "--max-queue", "100000", "--adapters",
                        *(f"{n}={d}" for n, d in zip(names, dirs))]),
        "merge-swap": (MERGE_SWAP_HTTP, [sys.executable, __file__, "--serve-merge-swap", "--model-dir", str(model_dir),
                                         "--max-running", str(args.max_running), "--threads", str(args.threads),
                                         "--adapter-dirs", *map(str, dirs)]),
    }
    for rep in range(args.repeat):  # the systems again, in turn: machine drift hits each alike
        if "engine" in systems:
            config = EngineConfig(pool_mib=args.pool_mib, max_running=args.max_running, max_adapters=args.max_running)
            run = run_engine(base, trace, dirs, config, torch.device("cpu"),
                             tokenizer=word_tokenizer(base.config.vocab_size))
            rows.append({"system": IN_PROCESS, "rep": rep, **summarize(engine_records(run), run.t0, args.slo_ttft),
                         "memory": {k: v for k, v in run.memory.items() if v is not None},
                         "engine": {"steps": run.stats["steps"], "forward_seconds": run.stats["forward_seconds"]}})
            print(f"  {IN_PROCESS}: {rows[-1]['req_per_s']:.2f} req/s", flush=True)
        for key, (label, cmd) in servers.items():
            if key not in systems or (key == "merge-swap" and rep):  # the baseline once
                continue
            port = args.port or free_port()
            proc = start_server([*cmd, "--port", str(port)], env)
            url = f"http://127.0.0.1:{port}"
            try:
                warm = TraceRequest(-1, 0, 0.0, trace[0].prompt, 4)
                asyncio.run(replay_http(url, [warm], names))  # connections, allocator, the first adapter
                server_cpu = cpu_seconds(psutil.Process(proc.pid))
                client_cpu = cpu_seconds(psutil.Process()) - server_cpu  # the server is this process's child
                records, t0, peak = asyncio.run(replay_http(url, trace, names))
                server_now = cpu_seconds(psutil.Process(proc.pid))
                cpu = {"server_cpu_s": server_now - server_cpu,
                       "client_cpu_s": cpu_seconds(psutil.Process()) - server_now - client_cpu}
                before = scrape(url)
                memory = {k: v for k, v in before.items() if k not in ("steps", "forward_seconds")}
                memory.update({f"peak_{k}": v for k, v in peak.items() if k in ("kv_pages", "adapter_pages")})
                engine = {k: before.get(k) for k in ("steps", "forward_seconds")}
            finally:
                stop_server(proc)
            rows.append({"system": label, "rep": rep, **summarize(records, t0, args.slo_ttft), "memory": memory,
                         **cpu, "engine": engine})
            print(f"  {label}: {rows[-1]['req_per_s']:.2f} req/s", flush=True)
    every = rows
    rows = [sorted(g, key=lambda r: r["req_per_s"])[(len(g) - 1) // 2] for g in group_by_system(every)]

    def ms(d: dict, key: str) -> str:
        return "-" if d[key]["p50"] is None else "/".join(f"{d[key][p]:.0f}" for p in ("p50", "p90", "p99"))

    head = ["system", "req/s", "out tok/s", "goodput req/s", "TTFT ms p50/90/99", "TPOT ms p50/90/99",
            "ITL ms p50/90/99", "e2e s", "weights MiB", "KV MiB (peak)", "adapter MiB", "host adapter MiB",
            "CPU s server/client", "steps", "forward ms/step"]
    cells = []
    for r in rows:
        m = r["memory"]
        kv = m.get("peak_kv_pages", m.get("kv_pages"))
        cells.append([r["system"], f"{r['req_per_s']:.2f}", f"{r['output_tok_per_s']:.1f}",
                      f"{r['goodput_req_per_s']:.2f}", ms(r, "ttft_ms"), ms(r, "tpot_ms"), ms(r, "itl_ms"),
                      f"{r['e2e_mean_s']:.2f}", mib(m.get("weights")), mib(kv),
                      mib(m.get("peak_adapter_pages", m.get("adapter_pages"))), mib(m.get("host_adapters")),
                      f"{r['server_cpu_s']:.0f}/{r['client_cpu_s']:.0f}" if "server_cpu_s" in r else "-",
                      *steps_cells(r.get("engine") or {})])
    print(f"\n{args.model}, {args.n} adapters, {len(trace)} requests; goodput: TTFT <= {args.slo_ttft} s\n")
    print(table(head, cells))
    by = {r["system"]: r["req_per_s"] for r in rows}
    goals = []
    if IN_PROCESS in by and HTTP in by:
        goals.append({"target": "HTTP / in-process engine", "value": by[HTTP] / by[IN_PROCESS], "goal": ">= 0.9"})
        paired = {}
        for r in every:
            paired.setdefault(r["rep"], {})[r["system"]] = r["req_per_s"]
        each = sorted(p[HTTP] / p[IN_PROCESS] for p in paired.values() if HTTP in p and IN_PROCESS in p)
        if len(each) > 1:
            goals.append({"target": f"HTTP / in-process engine, median of {len(each)} paired repetitions "
                                    f"({', '.join(f'{x:.2f}' for x in each)})", "value": float(np.median(each)),
                          "goal": ">= 0.9"})
    if HTTP in by and MERGE_SWAP_HTTP in by:
        goals.append({"target": f"memtune serve / merge-swap server at n={args.n}",
                      "value": by[HTTP] / by[MERGE_SWAP_HTTP], "goal": ">= 4"})
    for g in goals:
        g["holds"] = g["value"] >= float(g["goal"].split()[-1])
        print(f"  {g['target']}: {g['value']:.2f} (goal {g['goal']}): {'holds' if g['holds'] else 'MISSED'}")
    path = save("serve_load" + ("-quick" if args.quick else ""),
                {"args": {k: v for k, v in vars(args).items() if k not in ("adapter_dirs",)}, "requests": len(trace),
                 "rows": rows, "every_run": [{"system": r["system"], "rep": r["rep"], "req_per_s": r["req_per_s"]}
                                             for r in every], "targets": goals})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
