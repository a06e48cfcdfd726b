"""The serving engine: one base model, many LoRA adapters, one packed batch per step (S-LoRA).

    engine = Engine(model, tokenizer, EngineConfig(pool_mib=256))
    engine.add_adapter("sql", "runs/sql/adapter")
    req = engine.add_request("SELECT", adapter="sql", params=SamplingParams(max_tokens=32))
    while engine.has_work():
        for event in engine.step(): ...          # new text per request, finished flags

Each `step()` is one forward of the HF model over every running sequence's new tokens, packed as
(1, T) with true positions: prompts of requests admitted this step (prefill) and the last token of
the others (decode). Linear layers are wrapped once (`BatchedLoraLinear`): the base matmul runs for
all T tokens, and each token's adapter term is added at its adapter's rank from pool pages (the
step's tokens are ordered by adapter, so each adapter is one segment). Attention reads and writes
the page pool through the registered "memtune_paged" function. Only the logits of each sequence's
last token are computed (`logits_to_keep` with their indices). Then every sequence samples with its
own parameters, stop conditions are checked, and finished requests free their pages.

Model families: decoder-only models whose attention goes through transformers' attention-function
registry and takes packed position_ids (Llama, Mistral and Qwen2 without a sliding window). Others
(GPT-2, OPT, BERT) are generated through the plain path of `memtune.serve.run_model`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from . import native_lora
from .adapter_cache import AdapterCache
from .adapters import AdapterError, linear_shapes
from .batched_lora import LoraContext, wrap_linears
from .lora_kernels import Segment, StepLora
from .paged_attention import PagedStep, register
from .pool import PagePool, PoolShape
from .sampling import SamplingParams, held_back, sample, stop_at
from .scheduler import Request, Scheduler, SchedulerConfig

FAMILIES = ("llama", "mistral", "qwen2")


@dataclass
class EngineConfig:
    pool_mib: float = 256.0  # device memory for KV pages + resident adapters
    page_tokens: int = 16  # tokens per KV page
    max_running: int = 32  # sequences in one batch
    max_prefill_tokens: int = 2048  # prompt tokens admitted per step (one long prompt always fits)
    max_adapters: int = 32  # distinct adapters per batch
    max_resident_adapters: int = 0  # adapters kept on the device at once (0: as many as the pool holds)
    # segment | gather | native (C++, CPU) | auto: native on CPU when it builds (else segment), on CUDA
    # gather for decode-only steps and segment otherwise
    lora_kernel: str = "auto"
    seed: int = 0  # generator for requests without a seed of their own

    def check(self) -> None:
        for name in ("page_tokens", "max_running", "max_prefill_tokens", "max_adapters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serve.{name}: expected >= 1, got {getattr(self, name)}")
        if self.lora_kernel not in ("segment", "gather", "native", "auto"):
            raise ConfigError(f"serve.lora_kernel: expected segment, gather, native or auto, got {self.lora_kernel!r}")
        if 0 < self.max_resident_adapters < self.max_adapters:
            raise ConfigError(f"serve.max_resident_adapters ({self.max_resident_adapters}) must be >= max_adapters "
                              f"({self.max_adapters}): every adapter of a batch is on the device")
        if self.pool_mib <= 0:
            raise ConfigError(f"serve.pool_mib: expected > 0, got {self.pool_mib}")


@dataclass
class StepEvent:
    request: Request
    text: str  # new text since the last event (held back while it could begin a stop string)
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False


def check_servable(model: nn.Module) -> None:
    cfg = model.config
    if cfg.model_type not in FAMILIES:
        raise ModelError(f"the serving engine runs {', '.join(FAMILIES)} models; {cfg.model_type} generates through "
                         f"the plain path")
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < cfg.max_position_embeddings:
        raise ModelError(f"{cfg.model_type} with sliding_window={window}: the paged attention is full attention")


class Engine:
    def __init__(self, model: nn.Module, tokenizer, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        config.check()
        check_servable(model)
        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.config
        self.device = model.get_input_embeddings().weight.device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.native = self._native_kernel(config.lora_kernel)  # before the model is touched: it may refuse
        self.max_len = int(cfg.max_position_embeddings)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        shape = PoolShape(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim, config.page_tokens)
        page_bytes = shape.page_elems * torch.tensor([], dtype=self.dtype).element_size()
        self.pool = PagePool(shape, max(2, int(config.pool_mib * 2**20) // page_bytes), self.dtype, self.device)
        self.weight_bytes = _tensor_bytes(model)
        # every linear layer below the output head may carry adapter terms
        backbone = model.get_decoder() if hasattr(model, "get_decoder") else model
        prefix = next(n for n, m in model.named_modules() if m is backbone)
        names = [f"{prefix}.{n}" if prefix else n for n in linear_shapes(backbone)]
        self.lora = LoraContext()
        wrap_linears(model, names, self.lora)
        self.shapes = {n: s for n, s in linear_shapes(model).items() if n in set(names)}
        self.adapters = AdapterCache(self.pool, self.shapes, config.max_resident_adapters)
        self.scheduler = Scheduler(SchedulerConfig(config.max_running, config.max_prefill_tokens,
                                                   config.max_adapters), self.pool, self.adapters)
        model.set_attn_implementation(register())
        self.eos = _eos_ids(model, tokenizer)
        self._ids = itertools.count()
        self._gen = torch.Generator().manual_seed(config.seed)
        self.steps = 0
        self.forward_seconds = 0.0
        self.last_logits: dict[int, torch.Tensor] = {}

    def _native_kernel(self, kernel: str) -> bool:
        """Whether this engine's steps use the native kernel (auto on CPU when it builds, or asked for)."""
        if kernel not in ("native", "auto") or (kernel == "auto" and self.device.type != "cpu"):
            return False
        if self.device.type != "cpu":
            raise ConfigError(f"serve.lora_kernel=native runs on the CPU; the model is on {self.device}")
        if native_lora.load() is None:
            if kernel == "native":
                raise ConfigError("serve.lora_kernel=native: the C++ kernel did not build "
                                  f"({native_lora.build_error()}); use segment")
            return False
        return True

    def step_lora(self, segments: list[Segment], adapters: list, kernel: str) -> StepLora:
        """One step's LoRA metadata for `kernel` (what every wrapped layer reads during the forward)."""
        return StepLora(segments, adapters, kernel, self.pool.storage.view(-1), self.adapters.rows)

    # -- adapters ------------------------------------------------------------------------------------
    def add_adapter(self, name: str, path, rank: int | None = None) -> None:
        self.adapters.register(name, path, rank=rank)

    def remove_adapter(self, name: str) -> None:
        waiting = sum(r.adapter == name for r in self.scheduler.waiting)
        if waiting:
            raise AdapterError(f"adapter '{name}' is in use by {waiting} waiting request(s)")
        if name not in self.adapters.host:
            raise AdapterError(f"adapter '{name}' is not registered")
        self.adapters.unregister(name)

    # -- requests ------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], adapter: str | None = None,
                    params: SamplingParams | None = None, arrival: float | None = None) -> Request:
        params = params or SamplingParams()
        params.check()
        if adapter is not None and adapter not in self.adapters.host:
            raise ModelError(f"adapter '{adapter}' is not registered")
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"] if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ConfigError("prompt: empty")
        total = len(ids) + params.max_tokens
        if total > self.max_len:
            raise ConfigError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} is over the "
                              f"model's context of {self.max_len}")
        pages = self.pool.kv_pages_for(total) + (
            self.pool.adapter_pages_for(self.adapters.host[adapter].numel) if adapter else 0)
        if pages > self.pool.num_pages:
            raise ConfigError(f"prompt + max_tokens need {pages} pool pages, the pool has {self.pool.num_pages}")
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, (1,), generator=self._gen))
        gen = torch.Generator(device="cpu").manual_seed(seed) if params.temperature > 0 else None
        req = Request(next(self._ids), ids, adapter, params, arrival if arrival is not None else time.perf_counter(),
                      generator=gen)
        self.scheduler.add(req)
        return req

    def abort(self, req: Request) -> None:
        if req.status != "finished":
            self.scheduler.finish(req, "abort")

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # -- one iteration ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[StepEvent]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        slots: dict[str, int] = {}
        for r in batch:
            if r.adapter is not None:
                slots.setdefault(r.adapter, len(slots))
        batch.sort(key=lambda r: slots.get(r.adapter, -1))  # base-only first, then one segment per adapter
        paged, lora, ids, pos, last = self._pack(batch, slots)
        self.lora.step = lora
        t0 = time.perf_counter()
        try:
            out = self.model(input_ids=ids, position_ids=pos, use_cache=False, memtune_step=paged,
                             logits_to_keep=last)
        finally:
            self.lora.step = None
        logits = out.logits[0].float()  # (B, V)
        self.last_logits = {r.id: logits[i] for i, r in enumerate(batch)}  # for logprobs and checks
        self.forward_seconds += time.perf_counter() - t0
        self.steps += 1
        now = time.perf_counter()
        events = []
        for i, r in enumerate(batch):
            r.cached = len(r.all_ids)
            token = sample(logits[i], r.params, r.generator)
            r.output_ids.append(token)
            if r.first_token_time is None:
                r.first_token_time = now
            events.append(self._advance(r, token))
        return events

    def _pack(self, batch: list[Request], slots: dict[str, int]):
        pt = self.pool.shape.page_tokens
        ids, pos, wp, ws, last, prefills = [], [], [], [], [], []
        decode = []  # (row, length, table)
        segments: list[Segment] = []
        adapters = [None] * len(slots)
        for r in batch:
            feed, start, table = r.to_feed, len(ids), self.pool.tables[r.id]
            p = list(range(r.cached, r.cached + len(feed)))
            ids += feed
            pos += p
            wp += [table[q // pt] for q in p]
            ws += [q % pt for q in p]
            last.append(len(ids) - 1)
            length = r.cached + len(feed)
            if len(feed) == 1:
                decode.append((start, length, table))
            else:
                prefills.append((start, len(ids), torch.tensor(table[:self.pool.kv_pages_for(length)]), length))
            if r.adapter is not None:
                slot = slots[r.adapter]
                adapters[slot] = r.factors
                if segments and segments[-1].slot == slot:
                    segments[-1].end = len(ids)
                else:
                    segments.append(Segment(start, len(ids), slot))
        dev = self.device
        d_rows = d_pages = d_mask = None
        if decode:
            n_pages = max(self.pool.kv_pages_for(n) for _, n, _ in decode)
            d_pages = torch.zeros(len(decode), n_pages, dtype=torch.long)
            d_mask = torch.zeros(len(decode), 1, 1, n_pages * pt, dtype=torch.bool)
            for b, (_, n, table) in enumerate(decode):
                used = self.pool.kv_pages_for(n)
                d_pages[b, :used] = torch.tensor(table[:used])
                d_mask[b, ..., :n] = True
            d_rows = torch.tensor([row for row, _, _ in decode]).to(dev)
            d_pages, d_mask = d_pages.to(dev), d_mask.to(dev)
        paged = PagedStep(self.pool, torch.tensor(wp, device=dev), torch.tensor(ws, device=dev),
                          [(s, e, pg.to(dev), n) for s, e, pg, n in prefills], d_rows, d_pages, d_mask)
        kernel = self.config.lora_kernel
        if kernel == "auto":
            kernel = "native" if self.native else "gather" if dev.type == "cuda" and not prefills else "segment"
        lora = self.step_lora(segments, adapters, kernel)
        as_tensor = lambda v: torch.tensor([v], dtype=torch.long, device=dev)  # noqa: E731
        return paged, lora, as_tensor(ids), as_tensor(pos), torch.tensor(last, device=dev)

    def _advance(self, r: Request, token: int) -> StepEvent:
        """Append-side bookkeeping after a sampled token: stop conditions, streamed text."""
        p = r.params
        reason = None
        if (token in self.eos or token in p.stop_token_ids) and not p.ignore_eos:
            reason = "stop"
        upto = len(r.output_ids) - (reason is not None)  # an ending token is not text
        if reason is None and upto >= p.max_tokens:
            reason = "length"
        # finished: one full decode, so the final text is exactly the tokenizer's; else incremental
        text = self._decode(r.output_ids[:upto]) if reason else self._detokenize(r, upto)
        if p.stop:
            cut = stop_at(text, p.stop)
            if cut is not None:
                text, reason = text[:cut], "stop"
        r.text = text
        if reason is None:
            visible = len(text) - held_back(text, p.stop)
        else:
            visible = len(text)
            self.scheduler.finish(r, reason)
        delta = text[r.streamed:visible] if visible > r.streamed else ""
        r.streamed = max(r.streamed, visible)
        return StepEvent(r, delta, [token], reason is not None)

    def _detokenize(self, r: Request, upto: int) -> str:
        """The text of output_ids[:upto], extended incrementally (vLLM's prefix / read offsets): only a
        window of the last tokens is decoded per step, and the text grows when the window's decode is
        longer than its prefix's and ends in a complete character."""
        prefix = self._decode(r.output_ids[r.prefix_offset:r.read_offset])
        window = self._decode(r.output_ids[r.prefix_offset:upto])
        if len(window) > len(prefix) and not window.endswith("\ufffd"):
            r.decoded += window[len(prefix):]
            r.prefix_offset, r.read_offset = r.read_offset, upto
        return r.decoded

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    # -- conveniences ------------------------------------------------------------------------------------
    def run(self) -> None:
        while self.has_work():
            self.step()

    def generate(self, prompts: list, adapters: list[str | None] | None = None,
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Request]:
        """Add every prompt, run to completion, return the finished requests in order."""
        adapters = adapters or [None] * len(prompts)
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.add_request(p, a, sp) for p, a, sp in zip(prompts, adapters, plist)]
        self.run()
        return reqs

    def memory(self) -> dict[str, int]:
        """Device bytes by category: base weights, KV pages in use, adapter pages, free pool pages;
        and the host bytes of the registered adapters."""
        return {"weights": self.weight_bytes, **self.pool.usage(), "host_adapters": self.adapters.host_bytes()}

    def stats(self) -> dict:
        return {"steps": self.steps, "forward_seconds": round(self.forward_seconds, 6),
                "preemptions": self.scheduler.preemptions, "page_moves": self.pool.moves,
                "pages": self.pool.num_pages, "page_bytes": self.pool.page_bytes, **self.adapters.stats()}


def _tensor_bytes(model: nn.Module) -> int:
    """Parameters and buffers as stored (4-bit codes count as their packed bytes, plus absmax)."""
    seen, total = set(), 0
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
        state = getattr(t, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if getattr(state, "nested", False):
                total += state.state2.absmax.numel() * state.state2.absmax.element_size() + state.offset.numel() * 4
    return total


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is not None:
            ids |= set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
    return ids
