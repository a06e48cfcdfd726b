"""`memtune plan`: a recipe's memory by category, predicted to the byte before it runs, at any size.

No formulas: the plan is the recipe's own training step (the same model class built from its config,
base storage, adapter, update rule, batch shape and attention kernel) run by the trainer's own code
(`Trainer.assemble` and `Trainer.update`) inside `memory.planning.planning()`, where tensors carry
shapes and no data, under the same `MemoryTracker` a real run is measured with. Nothing is allocated,
so a 70B model runs at full depth in seconds on a laptop, and the figures are the ones
`memtune train` writes to summary.json's `memory_bytes` (tests compare every category on CPU).

Batches: with `seq_len` (or no data.train) every micro-batch is `batch_size` examples of exactly
`seq_len` tokens, every token a target (the most a causal LM's loss holds; padding and prompt masking
only lower it); otherwise the recipe's own first micro-batches, read and tokenized from data.train.
The steps planned are the ones the trainer measures (train.measure_memory_steps, 3 by default): the
peak is reached once gradients and optimizer state exist, in the second step.

A plan for CUDA (`device="cuda"`, implied by a GPU budget) runs the same step on CPU fake tensors
(fake CUDA tensors on a CPU-only torch abort in autograd), rounds every storage up to the caching
allocator's 512-byte blocks, and adds the overheads no tensor shows (cuda_overhead.py). What differs
from a real CUDA run and is not modelled: the attention kernel's saved statistics (the CPU flash
kernel's logsumexp is (B, H, S) fp32, CUDA's memory-efficient kernel pads S to a multiple of 32) and
kernel scratch memory.
"""

from __future__ import annotations

import contextlib
import copy
import re
import time
from dataclasses import dataclass, field

from ..data import TokenizedData
from ..distributed.world import World
from ..errors import ConfigError
from ..models import CLASSIFICATION
from ..recipe import Recipe
from .cuda_overhead import ALLOCATOR_BLOCK, FRAGMENTATION_HEADROOM, GPUS, Overhead, overheads
from .planning import planning

__all__ = ["PlanReport", "plan", "parse_memory", "largest_fitting", "format_report"]

GIB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 10 ** 3, "m": 1 << 20, "mib": 1 << 20,
          "mb": 10 ** 6, "g": GIB, "gib": GIB, "gb": 10 ** 9, "t": 1 << 40, "tib": 1 << 40, "tb": 10 ** 12}


def parse_memory(text: str) -> tuple[int, str | None]:
    """'24GiB', '48GB' (10^9), '24G' (= GiB), a byte count, or a GPU name ('a100-80gb', 'h100', ...).
    Returns (bytes, GPU name or None)."""
    key = text.strip().lower()
    if key in GPUS:
        return GPUS[key][0], key
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", key)
    if m is None or m.group(2) not in _UNITS:
        raise ConfigError(f"--gpu-memory: '{text}' is neither a size (24GiB, 48GB, 80G, bytes) nor a GPU name "
                          f"({', '.join(sorted(GPUS))})")
    return int(float(m.group(1)) * _UNITS[m.group(2)]), None


@dataclass
class PlanReport:
    model: str
    device: str  # the planned target: cpu or cuda
    batch_size: int
    seq_len: int | None  # None: the recipe's own batches from data.train
    grad_accum: int
    memory_bytes: dict  # summary.json's memory_bytes keys
    params: dict
    peak_at: dict | None
    overheads: list[Overhead] = field(default_factory=list)
    budget: int | None = None
    gpu: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    ranks: int = 1  # > 1: the figures are rank 0's of that many processes
    communication: dict | None = None  # ranks > 1: bytes per step by collective (summary.json's)

    @property
    def total(self) -> int:
        """The tracker's peak plus every overhead line."""
        return self.memory_bytes["peak"] + sum(o.bytes for o in self.overheads)

    @property
    def fits(self) -> bool | None:
        return None if self.budget is None else self.total <= self.budget

    @property
    def margin(self) -> int | None:
        return None if self.budget is None else self.budget - self.total

    def to_dict(self) -> dict:
        return {"model": self.model, "device": self.device, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "grad_accum": self.grad_accum, "memory_bytes": self.memory_bytes, "params": self.params,
                "peak_at": self.peak_at, "overheads": [o.to_dict() for o in self.overheads], "total": self.total,
                "budget": self.budget, "gpu": self.gpu, "fits": self.fits, "margin": self.margin,
                "seconds": round(self.seconds, 3), "ranks": self.ranks,
                "communication_per_step": self.communication, "notes": self.notes}


def _synthetic(run, n: int, seq_len: int) -> TokenizedData:
    """n examples of exactly seq_len tokens, every position a target (classification: label 0)."""
    config = run.model.config
    vocab = getattr(config, "vocab_size", None) or len(run.tokenizer)
    pad = run.tokenizer.pad_token_id
    token = next(t for t in (5, 6, 7) if t != pad and t < vocab)
    ids = [token] * seq_len
    types = "token_type_ids" in getattr(run.tokenizer, "model_input_names", ()) and \
        getattr(config, "type_vocab_size", 0)
    ex = {"input_ids": ids, **({"token_type_ids": [0] * seq_len} if types else {})}
    ex.update({"label": 0} if run.recipe.task == CLASSIFICATION else {"labels": ids})
    return TokenizedData([dict(ex) for _ in range(n)], "planned", f"{n} x {seq_len} tokens")


def plan(recipe: Recipe, *, batch_size: int | None = None, seq_len: int | None = None, device: str = "cpu",
         budget: int | None = None, gpu: str | None = None, ranks: int = 1) -> PlanReport:
    """Predict what `memtune train` would measure for `recipe` (module docstring); with `ranks` > 1,
    what rank 0 of a launch of that many processes would measure (its summary.json
    `distributed.memory_bytes_per_rank[0]`), under the recipe's distributed.strategy."""
    from ..pipeline import read_train_records
    from ..train import Trainer

    if device not in ("cpu", "cuda"):
        raise ConfigError(f"plan: device '{device}': expected cpu or cuda")
    if ranks < 1:
        raise ConfigError(f"plan: {ranks} ranks: must be at least 1")
    r, notes = copy.deepcopy(recipe), []
    r.train.device = "cpu"  # the step runs on fake CPU tensors whatever the target
    r.train.progress = False
    if ranks == 1:
        r.distributed = None
    if device == "cuda" and getattr(r.optimizer, "implementation", None) == "auto":
        r.optimizer.implementation = "foreach"  # torch's default for CUDA parameters (for-loop on CPU)
        notes.append("AdamW planned as torch runs it on CUDA by default: foreach")
    if device == "cuda" and getattr(r.optimizer, "paged", False):
        notes.append("optimizer.paged: the state is counted as device memory; bitsandbytes may page it out")
    if batch_size is not None:
        if batch_size < 1:
            raise ConfigError(f"plan: batch size {batch_size}: must be at least 1")
        r.train.batch_size = batch_size
    synthetic = seq_len is not None or not r.data.train
    if synthetic:
        seq_len = seq_len or r.data.max_length
        if seq_len < 2:
            raise ConfigError(f"plan: sequence length {seq_len}: must be at least 2")
        if r.prompt is not None:
            raise ConfigError("plan: a prompt recipe (prompt.template) renders its own inputs; plan it on its data "
                              "(set data.train and leave out --seq)")
        if r.task == CLASSIFICATION and not r.data.labels:
            r.data.labels = ["0", "1"]
            notes.append("classification without data.labels: planned with 2 classes")
        r.data.train = r.data.eval = None
        r.classifier_init = None  # (it needs real examples; it runs before training, outside the tracker)
    measured = max(r.train.measure_memory_steps, 1)
    trainer = Trainer(r)
    trainer.world = World(rank=0, size=ranks)
    t0 = time.perf_counter()
    with fake_process_group(ranks), planning():
        records = None if synthetic else read_train_records(r)
        data = (lambda run: _synthetic(run, r.train.batch_size * r.train.grad_accum * measured * ranks, seq_len)) \
            if synthetic else None
        trainer.assemble(records, train_data=data, block=ALLOCATOR_BLOCK if device == "cuda" else 1,
                         attribute=True)
        if trainer.parallel.name == "ddp":
            trainer.parallel.root.register_comm_hook(None, _local_bucket)
        steps = min(measured, trainer.total_steps)
        for _ in range(steps):
            batches, totals = trainer._next_micro_batches()
            trainer.update(batches, totals, measure=True)
            trainer.state.step += 1
    seconds = time.perf_counter() - t0
    if ranks > 1:
        notes.append(f"rank 0 of {ranks} ({trainer.parallel.name}); collectives not run (a fake process group)")
    mem = trainer.tracker.report().to_dict()
    mem["cuda_max_allocated"] = None
    mem["measured_steps"] = steps
    if device == "cuda":
        notes.append(f"every storage rounded up to {ALLOCATOR_BLOCK} B (the CUDA caching allocator's blocks)")
    return PlanReport(model=r.model, device=device, batch_size=r.train.batch_size, seq_len=seq_len if synthetic
                      else None, grad_accum=r.train.grad_accum, memory_bytes=mem,
                      params=trainer.run.param_counts(), peak_at=trainer.tracker.peak_at,
                      overheads=overheads(gpu) if device == "cuda" else [], budget=budget, gpu=gpu,
                      seconds=seconds, notes=notes, ranks=ranks,
                      communication=trainer.comm.per_step(steps) if ranks > 1 else None)


@contextlib.contextmanager
def fake_process_group(ranks: int):
    """A process group of `ranks` members in which this process is rank 0 and collectives return at
    once (torch's testing `fake` backend, the one torchtitan's memory estimator uses): DDP and FSDP2
    build and step exactly as on rank 0 of a real launch, on fake tensors. One rank: nothing."""
    if ranks == 1:
        yield
        return
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise ConfigError("plan: --ranks inside a process that already has a process group (plan outside the launch)")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _local_bucket(state, bucket):
    """DDP comm hook for plans: DDP's own mean all-reduce, in place on the bucket, issued to the fake
    group synchronously (counted in the communication figures; the fake group's asynchronous future
    does not carry the tensor DDP expects back)."""
    import torch
    import torch.distributed as dist

    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size())
    dist.all_reduce(buffer)
    fut = torch.futures.Future()
    fut.set_result(buffer)
    return fut


def largest_fitting(recipe: Recipe, axis: str, budget: int, *, batch_size: int | None = None,
                    seq_len: int | None = None, device: str = "cpu", gpu: str | None = None,
                    ranks: int = 1, limit: int = 1 << 20) -> tuple[int, PlanReport | None]:
    """The largest batch size (`axis="batch"`) or sequence length (`"seq"`) whose plan fits `budget`,
    by doubling then bisecting (memory grows monotonically with both). (0, None) if even 1 (batch) or
    2 (seq) tokens do not fit."""
    if axis not in ("batch", "seq"):
        raise ConfigError(f"plan: cannot search '{axis}' (batch or seq)")
    seq_len = seq_len or recipe.data.max_length

    def at(n: int) -> PlanReport:
        b, s = (n, seq_len) if axis == "batch" else (batch_size, n)
        return plan(recipe, batch_size=b, seq_len=s, device=device, budget=budget, gpu=gpu, ranks=ranks)

    lo = 1 if axis == "batch" else 2
    best = at(lo)
    if not best.fits:
        return 0, None
    hi = lo * 2
    while hi <= limit:
        rep = at(hi)
        if not rep.fits:
            break
        lo, best, hi = hi, rep, hi * 2
    else:
        return lo, best
    while hi - lo > 1:  # lo fits, hi does not
        mid = (lo + hi) // 2
        rep = at(mid)
        if rep.fits:
            lo, best = mid, rep
        else:
            hi = mid
    return lo, best


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f} GiB"


def format_report(rep: PlanReport) -> str:
    m = rep.memory_bytes
    shape = (f"batch {rep.batch_size} x {rep.seq_len} tokens" if rep.seq_len is not None
             else f"batch {rep.batch_size}, the recipe's data")
    lines = [f"plan: {rep.model} on {rep.device}, {shape}" + (f", grad_accum {rep.grad_accum}"
                                                              if rep.grad_accum > 1 else "")
             + (f", per rank of {rep.ranks}" if rep.ranks > 1 else ""),
             f"params: {rep.params['total']:,} total, {rep.params['trainable']:,} trainable", ""]
    rows = [("parameters (trainable)", m["parameters_trainable"]), ("parameters (frozen)", m["parameters_frozen"]),
            ("buffers", m["buffers"]), ("gradients", m["gradients"]), ("optimizer state", m["optimizer"]),
            ("activations (saved for backward)", m["activations"]), ("peak (all live tensors)", m["peak"])]
    for name, n in rows:
        lines.append(f"  {name:<34} {n:>20,} B  {_gib(n):>14}")
    if rep.peak_at:
        lines.append(f"  peak at: {rep.peak_at['op']} in {rep.peak_at['phase']} of {rep.peak_at['module']}")
    for o in rep.overheads:
        margin = f" (+-{o.margin / (1 << 20):.0f} MiB)" if o.margin else ""
        lines.append(f"  + {o.name:<32} {o.bytes:>20,} B  {_gib(o.bytes):>14}{margin}  [{o.source}]")
    if rep.overheads:
        lines.append(f"  {'total':<34} {rep.total:>20,} B  {_gib(rep.total):>14}")
    for note in rep.notes:
        lines.append(f"  note: {note}")
    if rep.budget is not None:
        where = rep.gpu or _gib(rep.budget)
        if rep.fits:
            lines.append(f"fits on {where}: yes (margin {_gib(rep.margin)})")
            if rep.device == "cuda" and rep.margin < FRAGMENTATION_HEADROOM * m["peak"]:
                lines.append(f"  warning: the margin is under {FRAGMENTATION_HEADROOM:.0%} of the peak, which the "
                             f"allocator's fragmentation can take; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
        else:
            lines.append(f"fits on {where}: no (short by {_gib(-rep.margin)})")
    lines.append(f"planned in {rep.seconds:.1f} s")
    return "\n".join(lines)
