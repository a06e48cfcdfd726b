"""Multi-adapter serving throughput on S-LoRA's synthetic workload: memtune.serve against PEFT baselines.

    python benchmarks/serve_throughput.py --quick                 # smoke: tiny model, n=2,10, under a minute
    python benchmarks/serve_throughput.py                         # CPU: llama-512x8 fp32, n=2,10,100,1000, 300 req
    python benchmarks/serve_throughput.py --device cuda           # GPU: tinyllama-1.1b bf16, 200 requests
    python benchmarks/serve_throughput.py --n 100 --baselines a,b --rate 40 --duration 5   # one n, no base-only

Unset options take per-device defaults (see --help); on a CPU shared with other jobs, --threads 1
avoids two-thread barrier stalls that cost every small op ~10 ms.

Workload (S-LoRA's benchmarks/trace.py, numpy seed 42): floor(rate * duration) requests; request i
uses adapter floor(u_i * n), u_i ~ numpy power(alpha) (alpha=1 is uniform, smaller alpha skews to the
first adapters); inter-arrival gaps ~ Gamma(shape 1/cv^2, scale cv^2/rate) (cv=1: Poisson); input and
output lengths uniform integers in [lo, hi). Prompts are random token ids (seed 43); every request
generates exactly its output length (EOS ignored). The same trace (same arrival times) is replayed in
real time against every system: a request is handed to a system only once its arrival time has
passed, and whatever arrives while a system is busy waits in its queue.

Model: a seeded random-init LlamaForCausalLM (vocab 32000): `llama-512x8` (hidden 512, 8 layers,
8 heads, MHA, ~58M) for CPU, `tinyllama-1.1b` (TinyLlama-1.1B's shape: hidden 2048, 22 layers, 32
heads, 4 KV heads) for a GPU, `llama-tiny` for --quick. Adapters: n PEFT LoRA directories written
straight in PEFT's layout (adapter_config.json + adapter_model.safetensors, checked once per run
against PEFT's own loader and merge), rank ranks[i % len(ranks)] on q/k/v/o_proj, lora_alpha = 2r,
seeded random factors; written once under --adapter-dir (default: a temp folder per model, dtype and
ranks) and reused, n=1000 being the superset of the smaller n.

Systems, each on its own copy of the model, warmed up before the trace starts:
  memtune engine    memtune.serve.Engine with all n adapters registered (host memory), iteration-level
                    batching of up to --max-running sequences over adapters (S-LoRA)
  PEFT merge-swap   baseline (a): queued requests grouped by adapter (the oldest request's adapter, up to
                    --max-running of its requests per batch); when the adapter changes, the base's
                    q/k/v/o weights are restored from a pristine copy (a copy, not an unmerge, which
                    drifts) and the new adapter is read from its directory and merged (W += s * B @ A,
                    done here from the safetensors file: the same arithmetic as PEFT's merge_and_unload,
                    checked at start-up, without PEFT's per-swap module injection); then one HF
                    `generate` over the left-padded static batch
  PEFT mixed batch  baseline (b): one PeftModel with all n adapters loaded (load_adapter, adapter dtype
                    kept), static batches of up to --max-running arrived requests in arrival order,
                    `generate(adapter_names=[...])`
  engine base-only  baseline (c): the engine with no adapters, every request on the base model
Baselines (a) and (b) run for n <= --baseline-max-n only (PEFT takes ~0.2 s per load_adapter).

Static batches run greedy `generate` for the batch's longest output; a request counts as finished
at the decoding step that produced its own last token (timed by a streamer), its first token at the
step after prefill, but the next batch starts only when the whole `generate` returns. No system
detokenizes (the engine gets a tokenizer stub whose decode returns ''), so none pays for text.

Metrics per (system, n): completed requests / (last finish - trace start) = req/s, output tokens/s
the same way, TTFT = first token - arrival (p50, p90), TPOT = (finish - first token) / (output - 1)
(mean), latency mean. Memory: the engine's pool at its peak over steps (KV pages, adapter pages),
host bytes of the registered adapters, weights; for static batches the largest batch's KV cache
(batch x (prompt + output) tokens) and the adapters' bytes; process RSS after each system (peak
RSS for the whole run at the end; on a CPU the engine's pool is host memory, so its RSS includes
--pool-mib), and torch.cuda.max_memory_allocated on a GPU. Writes
benchmarks/results/serve_throughput[-cuda][-quick].json.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import psutil
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from common import mib, pick_device, save, table  # noqa: E402

from memtune.serve import Engine, EngineConfig, SamplingParams, native_lora  # noqa: E402

MODELS = {  # random-init Llama shapes (vocab 32000, context 2048)
    "llama-tiny": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 4},  # --quick only
    "llama-512x8": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8,
                    "num_attention_heads": 8, "num_key_value_heads": 8},  # ~58M, CPU
    "tinyllama-1.1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4},  # TinyLlama-1.1B's shape, GPU
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULTS = {  # per device, for options left unset
    "cpu": {"model": "llama-512x8", "dtype": "fp32", "rate": 20.0, "duration": 15.0, "input_len": "8,64",
            "output_len": "8,64", "pool_mib": 512.0},
    "cuda": {"model": "tinyllama-1.1b", "dtype": "bf16", "rate": 10.0, "duration": 20.0, "input_len": "8,256",
             "output_len": "8,128", "pool_mib": 8192.0},
}
QUICK = {"model": "llama-tiny", "n": "2,10", "rate": 100.0, "duration": 0.4, "input_len": "8,32", "output_len": "8,16",
         "pool_mib": 64.0}
ENGINE, MERGE_SWAP, MIXED, BASE_ONLY = "memtune engine", "PEFT merge-swap", "PEFT mixed batch", "engine base-only"


# -- workload ------------------------------------------------------------------------------------------
@dataclass
class TraceRequest:
    id: int
    adapter: int  # index into the adapters (ignored by the base-only run)
    arrival: float  # seconds after the trace starts
    prompt: list[int]
    output_len: int


def s_lora_trace(n: int, alpha: float, rate: float, cv: float, duration: float, input_range: tuple[int, int],
                 output_range: tuple[int, int], vocab: int, seed: int = 42) -> list[TraceRequest]:
    """S-LoRA's generate_requests: the same draws in the same order from numpy's global-seed generator."""
    rs = np.random.RandomState(seed)
    total = int(rate * duration)
    adapters = (rs.power(alpha, total) * n).astype(int)
    input_lens = rs.randint(input_range[0], input_range[1], total)
    output_lens = rs.randint(output_range[0], output_range[1], total)
    gaps = rs.gamma(1 / (cv * cv), cv * cv / rate, total)
    ids = np.random.RandomState(seed + 1)
    arrivals = np.cumsum(gaps)
    return [TraceRequest(i, int(adapters[i]), float(arrivals[i]), ids.randint(5, vocab, int(input_lens[i])).tolist(),
                         int(output_lens[i])) for i in range(total)]


# -- model and adapters --------------------------------------------------------------------------------
def build_model(name: str, dtype: torch.dtype, device: torch.device):
    """Seeded random-init Llama; no EOS, so HF generate runs every request to its length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
                      eos_token_id=None, tie_word_embeddings=False, **MODELS[name])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = None
    return model.to(device=device, dtype=dtype).eval()


def target_shapes(model) -> dict[str, tuple[int, int]]:
    """Module path -> (d_in, d_out) of every linear layer the adapters adapt."""
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS}


def write_adapters(root: Path, n: int, ranks: list[int], shapes: dict[str, tuple[int, int]], dtype: torch.dtype,
                   base_name: str) -> list[Path]:
    """Adapter i (rank ranks[i % len]) in PEFT's on-disk layout; directories already complete are reused."""
    dirs = [root / f"adapter-{i:04d}" for i in range(n)]
    made = 0
    for i, d in enumerate(dirs):
        if (d / "adapter_config.json").is_file():  # written last: marks a complete directory
            continue
        r = ranks[i % len(ranks)]
        g = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for module, (d_in, d_out) in shapes.items():
            key = f"base_model.model.{module}"
            # x @ A.T ~ N(0, |x|^2 / d_in); B small so s * B @ A is a small change of every layer (finite outputs)
            tensors[f"{key}.lora_A.weight"] = (torch.randn(r, d_in, generator=g) / math.sqrt(d_in)).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, r, generator=g) * (0.01 / math.sqrt(r))).to(dtype)
        d.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(d / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
                  "target_modules": list(TARGETS), "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
                  "use_dora": False, "fan_in_fan_out": False, "inference_mode": True,
                  "base_model_name_or_path": base_name}
        (d / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        made += 1
    if made:
        print(f"wrote {made} adapters under {root}", flush=True)
    return dirs


def read_lora(path: Path, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module path -> (A, B, s) from one adapter directory (what the merge-swap baseline reads per swap)."""
    cfg = json.loads((path / "adapter_config.json").read_text())
    raw = load_file(str(path / "adapter_model.safetensors"), device=str(device))
    scale = cfg["lora_alpha"] / cfg["r"]
    modules = {k[len("base_model.model."):-len(".lora_A.weight")] for k in raw if k.endswith(".lora_A.weight")}
    return {m: (raw[f"base_model.model.{m}.lora_A.weight"], raw[f"base_model.model.{m}.lora_B.weight"], scale)
            for m in modules}


@torch.no_grad()
def merge_into(weights: dict[str, torch.Tensor], lora: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """W += s * B @ A with the product in fp32 and one rounding into W's dtype (as PEFT's merge)."""
    for module, (a, b, s) in lora.items():
        weights[module].add_((b.float() @ a.float()).mul_(s))


@torch.no_grad()
def check_adapter_format(base, path: Path) -> float:
    """PEFT loads a written directory, and its merge_and_unload equals merge_into's: max |difference|."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).merge_and_unload()
    ours = copy.deepcopy(base)
    weights = {n: m.weight for n, m in ours.named_modules() if n in target_shapes(ours)}
    merge_into(weights, read_lora(path, weights[next(iter(weights))].device))
    theirs = dict(merged.named_modules())
    err = max(float((theirs[n].weight.float() - w.float()).abs().max()) for n, w in weights.items())
    delta = max(float((theirs[n].weight.float() - m.weight.float()).abs().max())
                for n, m in base.named_modules() if n in weights)
    w = next(iter(weights.values()))
    ulp = torch.finfo(w.dtype).eps * max(float(v.abs().max()) for v in weights.values())  # rounding order
    if delta == 0 or err > 1e-2 * delta + 2 * ulp:
        raise RuntimeError(f"adapter {path}: PEFT's merge differs from ours by {err:.3g} (its delta {delta:.3g})")
    del merged, ours
    return err


# -- measurements --------------------------------------------------------------------------------------
@dataclass
class Record:
    arrival: float  # perf_counter clock
    first_token: float
    finish: float
    output_tokens: int


@dataclass
class Run:
    system: str
    n: int | None
    records: list[Record]
    t0: float
    memory: dict = field(default_factory=dict)  # bytes by category
    stats: dict = field(default_factory=dict)
    setup_seconds: float = 0.0
    rep: int = 0  # which repetition (--repeat) it belongs to

    def summary(self) -> dict:
        rec = self.records
        span = max(r.finish for r in rec) - self.t0
        ttft = np.array([r.first_token - r.arrival for r in rec])
        tpot = [(r.finish - r.first_token) / (r.output_tokens - 1) for r in rec if r.output_tokens > 1]
        tokens = sum(r.output_tokens for r in rec)
        return {"completed": len(rec), "seconds": span, "req_per_s": len(rec) / span, "output_tokens": tokens,
                "output_tok_per_s": tokens / span, "ttft_p50": float(np.percentile(ttft, 50)),
                "ttft_p90": float(np.percentile(ttft, 90)), "tpot_mean": float(np.mean(tpot)) if tpot else None,
                "latency_mean": float(np.mean([r.finish - r.arrival for r in rec]))}


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc), where that is possible."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss() -> int:
    return psutil.Process().memory_info().rss


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_device_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def device_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _arrive(trace: list[TraceRequest], i: int, t0: float, into: Callable[[TraceRequest], None]) -> int:
    """Hand every request whose arrival time has passed to `into`; returns the next index."""
    now = time.perf_counter() - t0
    while i < len(trace) and trace[i].arrival <= now:
        into(trace[i])
        i += 1
    return i


def _wait(trace: list[TraceRequest], i: int, t0: float) -> None:
    time.sleep(max(0.0, trace[i].arrival - (time.perf_counter() - t0)))


# -- the engine ----------------------------------------------------------------------------------------
class IdTokenizer:
    """Prompts are token ids and nothing is detokenized (no baseline detokenizes either)."""

    eos_token_id = None

    def __call__(self, text, add_special_tokens: bool = True):
        raise TypeError("this benchmark passes token ids")

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


SHOWN = ("steps", "preemptions", "loads", "evictions", "load_seconds", "swaps", "swap_seconds")
STAT_COUNTERS = ("steps", "forward_seconds", "preemptions", "page_moves", "loads", "hits", "evictions", "load_seconds")


def run_engine(base, trace: list[TraceRequest], dirs: list[Path] | None, config: EngineConfig,
               device: torch.device, tokenizer=None, system: str = ENGINE) -> Run:
    """Real-time replay: arrived requests join between steps; `dirs` None serves the base model alone.
    `tokenizer`: what the engine detokenizes with (default: nothing, IdTokenizer); `system`: the row's name."""
    reset_device_peak(device)
    eng = Engine(copy.deepcopy(base), tokenizer or IdTokenizer(), copy.deepcopy(config))
    t = time.perf_counter()
    names = []
    for i, d in enumerate(dirs or []):
        eng.add_adapter(f"a{i}", d)
        names.append(f"a{i}")
    setup = time.perf_counter() - t
    eng.generate([trace[0].prompt] * 2, params=SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up, base only
    before = eng.stats()
    reqs = []
    peak_kv = peak_adapters = 0

    def add(tr: TraceRequest) -> None:
        reqs.append(eng.add_request(tr.prompt, adapter=names[tr.adapter] if names else None, arrival=t0 + tr.arrival,
                                    params=SamplingParams(max_tokens=tr.output_len, ignore_eos=True)))

    i, t0 = 0, time.perf_counter()
    while i < len(trace) or eng.has_work():
        i = _arrive(trace, i, t0, add)
        if not eng.has_work():
            _wait(trace, i, t0)
            continue
        eng.step()
        usage = eng.pool.usage()  # cheap; eng.memory() also sums the host adapters
        peak_kv, peak_adapters = max(peak_kv, usage["kv_pages"]), max(peak_adapters, usage["adapter_pages"])
    records = [Record(r.arrival, r.first_token_time, r.finish_time, len(r.output_ids)) for r in reqs]
    after = eng.stats()
    stats = {**after, **{k: after[k] - before[k] for k in STAT_COUNTERS}}
    memory = {**eng.memory(), "kv_pages": peak_kv, "adapter_pages": peak_adapters, "rss": rss(),
              "device_peak": device_peak(device)}
    return Run(system if dirs is not None else BASE_ONLY, len(dirs) if dirs is not None else None, records, t0,
               memory, stats, setup)


# -- static-batch baselines ----------------------------------------------------------------------------
class StepClock:
    """A generate() streamer: the time each decoding step's tokens are out (its first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt = True

    def put(self, value) -> None:
        if self._prompt:
            self._prompt = False
        else:
            self.times.append(time.perf_counter())  # value arrives on the host: the step is done

    def end(self) -> None:
        pass


@torch.inference_mode()
def static_generate(model, group: list[TraceRequest], device: torch.device, **kwargs) -> list[tuple[float, float]]:
    """One left-padded greedy generate over the group: (first token, own last token) time per request."""
    width = max(len(r.prompt) for r in group)
    ids = torch.zeros(len(group), width, dtype=torch.long)
    mask = torch.zeros(len(group), width, dtype=torch.long)
    for j, r in enumerate(group):
        ids[j, width - len(r.prompt):] = torch.tensor(r.prompt)
        mask[j, width - len(r.prompt):] = 1
    new = max(r.output_len for r in group)
    clock = StepClock()
    model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new, do_sample=False,
                   pad_token_id=0, streamer=clock, **kwargs)
    if len(clock.times) != new:
        raise RuntimeError(f"generate ran {len(clock.times)} steps, expected {new}")
    return [(clock.times[0], clock.times[r.output_len - 1]) for r in group]


def kv_bytes(model, group: list[TraceRequest]) -> int:
    """The static batch's KV cache at its end: batch x (padded prompt + output - 1) tokens, every layer."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tokens = max(len(r.prompt) for r in group) + max(r.output_len for r in group) - 1
    elem = next(model.parameters()).element_size()
    return len(group) * tokens * cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * elem


def replay_static(trace: list[TraceRequest], form: Callable[[list[TraceRequest]], list[TraceRequest]],
                  serve: Callable[[list[TraceRequest]], list[tuple[float, float]]]) -> tuple[list[Record], float]:
    """Real-time replay for a static batcher: `form` takes a batch out of the queue, `serve` runs it."""
    queue: list[TraceRequest] = []
    records: list[Record] = []
    i, t0 = 0, time.perf_counter()
    while i < len(trace) or queue:
        i = _arrive(trace, i, t0, queue.append)
        if not queue:
            _wait(trace, i, t0)
            continue
        group = form(queue)
        for r, (first, finish) in zip(group, serve(group), strict=True):
            records.append(Record(t0 + r.arrival, first, finish, r.output_len))
    return records, t0


def run_merge_swap(base, trace: list[TraceRequest], dirs: list[Path], batch: int, device: torch.device) -> Run:
    """Baseline (a): one adapter at a time merged into the base, requests grouped by adapter."""
    reset_device_peak(device)
    model = copy.deepcopy(base)
    weights = {n: m.weight for n, m in model.named_modules() if n in target_shapes(model)}
    pristine = {n: w.detach().clone() for n, w in weights.items()}
    static_generate(model, [trace[0]], device)  # warm-up
    state = {"current": None, "swaps": 0, "swap_seconds": 0.0, "kv": 0, "adapter": 0}

    def form(queue: list[TraceRequest]) -> list[TraceRequest]:
        adapter = queue[0].adapter  # the oldest request's
        group = [r for r in queue if r.adapter == adapter][:batch]
        for r in group:
            queue.remove(r)
        return group

    def serve(group: list[TraceRequest]) -> list[tuple[float, float]]:
        adapter = group[0].adapter
        if adapter != state["current"]:
            t = time.perf_counter()
            with torch.no_grad():
                for n, w in weights.items():
                    w.copy_(pristine[n])
            lora = read_lora(dirs[adapter], device)
            merge_into(weights, lora)
            sync(device)
            state["adapter"] = max(state["adapter"], sum(a.nbytes + b.nbytes for a, b, _ in lora.values()))
            state["current"], state["swaps"] = adapter, state["swaps"] + 1
            state["swap_seconds"] += time.perf_counter() - t
        state["kv"] = max(state["kv"], kv_bytes(model, group))
        return static_generate(model, group, device)

    records, t0 = replay_static(trace, form, serve)
    memory = {"weights": sum(p.nbytes for p in model.parameters()) + sum(p.nbytes for p in pristine.values()),
              "kv_pages": state["kv"], "adapter_pages": state["adapter"], "host_adapters": 0, "rss": rss(),
              "device_peak": device_peak(device)}
    stats = {"swaps": state["swaps"], "swap_seconds": round(state["swap_seconds"], 6)}
    return Run(MERGE_SWAP, len(dirs), records, t0, memory, stats)


def run_mixed_batch(base, trace: list[TraceRequest], dirs: list[Path], batch: int, device: torch.device) -> Run:
    """Baseline (b): every adapter loaded in one PeftModel, static batches with per-row adapter names."""
    from peft import PeftModel

    reset_device_peak(device)
    t = time.perf_counter()
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(dirs[0]), adapter_name="a0",
                                      autocast_adapter_dtype=False)
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(str(d), adapter_name=f"a{i}", autocast_adapter_dtype=False)
    model.eval()
    setup = time.perf_counter() - t
    static_generate(model, [trace[0]], device, adapter_names=["a0"])  # warm-up
    kv = 0

    def form(queue: list[TraceRequest]) -> list[TraceRequest]:
        group = queue[:batch]
        del queue[:batch]
        return group

    def serve(group: list[TraceRequest]) -> list[tuple[float, float]]:
        nonlocal kv
        kv = max(kv, kv_bytes(model, group))
        return static_generate(model, group, device, adapter_names=[f"a{r.adapter}" for r in group])

    records, t0 = replay_static(trace, form, serve)
    lora = sum(p.nbytes for n, p in model.named_parameters() if "lora_" in n)
    memory = {"weights": sum(p.nbytes for n, p in model.named_parameters() if "lora_" not in n), "kv_pages": kv,
              "adapter_pages": lora, "host_adapters": lora if device.type == "cpu" else 0, "rss": rss(),
              "device_peak": device_peak(device)}
    return Run(MIXED, len(dirs), records, t0, memory, {"loaded": len(dirs)}, setup)


# -- report --------------------------------------------------------------------------------------------
def median_runs(runs: list[Run]) -> list[Run]:
    """One run per (system, n), in first-seen order: the median by req/s (the lower middle of an even count)."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault((r.system, r.n), []).append(r)
    return [sorted(g, key=lambda r: r.summary()["req_per_s"])[(len(g) - 1) // 2] for g in groups.values()]


def row_cells(run: Run) -> list:
    s, m = run.summary(), run.memory
    loads = run.stats.get("loads", run.stats.get("swaps", "-"))
    return [run.system, "-" if run.n is None else run.n, f"{s['req_per_s']:.2f}", f"{s['output_tok_per_s']:.1f}",
            f"{s['ttft_p50']:.2f}", f"{s['ttft_p90']:.2f}",
            "-" if s["tpot_mean"] is None else f"{1000 * s['tpot_mean']:.1f}", mib(m.get("kv_pages")),
            mib(m.get("adapter_pages")), mib(m.get("host_adapters")), mib(m.get("rss")), loads]


HEAD = ["system", "n", "req/s", "out tok/s", "TTFT p50 s", "TTFT p90 s", "TPOT ms", "peak KV MiB", "adapter MiB",
        "host adapter MiB", "RSS MiB", "loads"]


def targets(runs: list[Run], ns: list[int], every: list[Run] | None = None) -> list[dict]:
    """The issue's targets, each at the adapter count it names (or the nearest this run has). With
    repetitions, n = max against n = 10 is also the median of the ratios within each repetition (runs
    a minute apart, so slow drift of the machine cancels)."""
    rate = {(r.system, r.n): r.summary()["req_per_s"] for r in runs}
    out = []

    def ratio(name: str, num: tuple, den: tuple, goal: float, strict: bool = False) -> None:
        a, b = rate.get(num), rate.get(den)
        value = a / b if a is not None and b is not None else None
        holds = None if value is None else (value > goal if strict else value >= goal)
        out.append({"target": name, "value": value, "goal": f"{'>' if strict else '>='} {goal}", "holds": holds})

    both = [n for n in ns if (MERGE_SWAP, n) in rate or (MIXED, n) in rate]
    at = 100 if 100 in both else (max(both) if both else max(ns))
    ratio(f"engine / (a) merge-swap at n={at}", (ENGINE, at), (MERGE_SWAP, at), 4.0)
    ratio(f"engine / (b) mixed batch at n={at}", (ENGINE, at), (MIXED, at), 1.0, strict=True)
    small = 10 if 10 in ns else min(ns)
    ratio(f"engine n={small} / (c) base-only", (ENGINE, small), (BASE_ONLY, None), 0.8)
    big = max(ns)
    if big != small:
        ratio(f"engine n={big} / engine n={small}", (ENGINE, big), (ENGINE, small), 0.9)
        pairs = {}
        for r in every or []:
            if r.system == ENGINE and r.n in (big, small):
                pairs.setdefault(r.rep, {})[r.n] = r.summary()["req_per_s"]
        each = sorted(p[big] / p[small] for p in pairs.values() if len(p) == 2)
        if len(each) > 1:
            value = float(np.median(each))
            out.append({"target": f"engine n={big} / engine n={small}, median of {len(each)} paired repetitions "
                                  f"({', '.join(f'{x:.2f}' for x in each)})", "value": value, "goal": ">= 0.9",
                        "holds": value >= 0.9})
    biggest = next((r for r in runs if r.system == ENGINE and r.n == big), None)
    if biggest is not None:
        total = psutil.virtual_memory().total
        host, used = biggest.memory["host_adapters"], biggest.memory["rss"]
        out.append({"target": f"{big} adapters in host memory ({mib(host)} MiB; RSS {mib(used)} of "
                              f"{mib(total)} MiB RAM)", "value": biggest.stats["registered"], "goal": f"== {big}",
                    "holds": biggest.stats["registered"] == big and used < total})
    return out


# -- main ----------------------------------------------------------------------------------------------
def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="unset options default per device: "
                                 + "; ".join(f"{d}: {v}" for d, v in DEFAULTS.items()))
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    ap.add_argument("--model", choices=list(MODELS), default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None)
    ap.add_argument("--n", default=None, help="adapter counts (default 2,10,100,1000)")
    ap.add_argument("--ranks", default="8,16,32,64")
    ap.add_argument("--rate", type=float, default=None, help="requests/s")
    ap.add_argument("--duration", type=float, default=None, help="seconds of arrivals: rate x duration requests")
    ap.add_argument("--cv", type=float, default=1.0)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--input-len", default=None, help="lo,hi (hi excluded)")
    ap.add_argument("--output-len", default=None, help="lo,hi (hi excluded)")
    ap.add_argument("--baselines", default="a,b,c", help="a merge-swap, b mixed batch, c base-only")
    ap.add_argument("--baseline-max-n", type=int, default=100, help="(a) and (b) only for n up to this")
    ap.add_argument("--max-running", type=int, default=32, help="engine batch and static batch size")
    ap.add_argument("--max-adapters", type=int, default=32, help="distinct adapters in one engine batch")
    ap.add_argument("--pool-mib", type=float, default=None, help="engine page pool (KV + resident adapters)")
    ap.add_argument("--page-tokens", type=int, default=16)
    ap.add_argument("--adapter-dir", default=None, help="where adapters are written and reused")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=1, help="engine runs per row, interleaved; the table shows "
                    "each row's median run by req/s")
    ap.add_argument("--lora-kernel", default="auto", help="engine kernels, comma-separated (segment, gather, native, "
                    "auto); the first gives the '" + ENGINE + "' rows and the targets, the others extra rows")
    args = ap.parse_args()
    if args.quick:
        for k, v in QUICK.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    defaults = {"n": "2,10,100,1000", **DEFAULTS["cuda" if pick_device(args.device).type == "cuda" else "cpu"]}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = pick_device(args.device), DTYPES[args.dtype]
    ns, ranks, baselines = sorted(int_list(args.n)), int_list(args.ranks), set(args.baselines.split(",")) - {""}
    inp, outp = tuple(int_list(args.input_len)), tuple(int_list(args.output_len))
    base = build_model(args.model, dtype, device)
    root = Path(args.adapter_dir) if args.adapter_dir else Path(tempfile.gettempdir()) / "memtune_serve_adapters" / (
        f"{args.model}-{args.dtype}-r{'-'.join(map(str, ranks))}")
    dirs = write_adapters(root, max(ns), ranks, target_shapes(base), dtype, f"random-init {args.model}")
    peft_err = check_adapter_format(base, dirs[min(3, len(dirs) - 1)])
    config = EngineConfig(pool_mib=args.pool_mib, page_tokens=args.page_tokens, max_running=args.max_running,
                          max_adapters=args.max_adapters, max_prefill_tokens=2048,
                          lora_kernel=args.lora_kernel.split(",")[0])
    traces = {n: s_lora_trace(n, args.alpha, args.rate, args.cv, args.duration, inp, outp, base.config.vocab_size)
              for n in ns}
    first = traces[ns[0]]
    print(f"{args.model} ({sum(p.numel() for p in base.parameters()) / 1e6:.0f}M params, {args.dtype}) on {device}; "
          f"{len(first)} requests (rate {args.rate}/s for {args.duration} s, cv {args.cv}, alpha {args.alpha}), "
          f"input {inp}, output {outp}; ranks {ranks}; PEFT-loaded adapter matches our merge (max err "
          f"{peft_err:.2g})", flush=True)
    runs: list[Run] = []

    rep = 0

    def done(run: Run) -> None:
        run.rep = rep
        runs.append(run)
        release_memory()  # so the next run's RSS is its own, not this one's freed heap
        s = run.summary()
        parts = [f"{s['req_per_s']:.2f} req/s", f"{s['output_tok_per_s']:.1f} tok/s", f"TTFT p50 {s['ttft_p50']:.2f} s",
                 f"setup {run.setup_seconds:.1f} s", *(f"{k} {v}" for k, v in run.stats.items() if k in SHOWN)]
        print(f"  {run.system:17s} n={run.n}: " + ", ".join(parts), flush=True)

    kernels = args.lora_kernel.split(",")
    for rep in range(args.repeat):  # engine rows again, interleaved: machine drift hits each alike
        if "c" in baselines:
            done(run_engine(base, first, None, config, device))  # the base-only trace ignores adapter indices
        for n in ns:
            trace = traces[n]
            for k in kernels:
                done(run_engine(base, trace, dirs[:n], replace(config, lora_kernel=k), device,
                                system=ENGINE if k == kernels[0] else f"{ENGINE} ({k})"))
            if n <= args.baseline_max_n and rep == 0:
                if "a" in baselines:
                    done(run_merge_swap(base, trace, dirs[:n], args.max_running, device))
                if "b" in baselines:
                    done(run_mixed_batch(base, trace, dirs[:n], args.max_running, device))
            gc.collect()
    every = runs[:]
    runs[:] = median_runs(every)
    print(f"\n{args.model}, {args.dtype}, {device}; {len(first)} requests per run; times in s unless marked; memory "
          f"in MiB (engine: pool at peak; static batches: largest batch's KV cache); peak RSS {mib(peak_rss())} MiB\n")
    print(table(HEAD, [row_cells(r) for r in runs]))
    if args.repeat > 1:
        print("\nreq/s of every run (the table shows the median):")
        for r in runs:
            got = [f"{x.summary()['req_per_s']:.2f}" for x in every if (x.system, x.n) == (r.system, r.n)]
            print(f"  {r.system} n={r.n}: {', '.join(got)}")
    goals = targets(runs, ns, every)
    print("\ntargets (req/s ratios on the same trace):")
    for g in goals:
        value = "-" if g["value"] is None else (f"{g['value']:.2f}" if isinstance(g["value"], float) else g["value"])
        verdict = "n/a" if g["holds"] is None else ("holds" if g["holds"] else "MISSED")
        print(f"  {g['target']}: {value} (goal {g['goal']}): {verdict}")
    name = "serve_throughput" + ("-cuda" if device.type == "cuda" else "") + ("-quick" if args.quick else "")
    payload = {"args": vars(args), "model_config": base.config.to_diff_dict(), "engine_config": asdict(config),
               "requests": len(first), "adapter_dir": str(root), "peft_merge_max_err": peft_err,
               "peak_rss": peak_rss(), "native_kernel_built": native_lora.load() is not None,
               "req_per_s_runs": [{"system": r.system, "n": r.n, "req_per_s": r.summary()["req_per_s"]} for r in every],
               "rows": [{"system": r.system, "n": r.n, **r.summary(), "memory": r.memory, "stats": r.stats,
                         "setup_seconds": r.setup_seconds} for r in runs], "targets": goals}
    print(f"wrote {save(name, payload)}")


if __name__ == "__main__":
    main()
