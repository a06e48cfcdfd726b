"""The one training loop, for every recipe.

Per optimizer step: take `grad_accum` micro-batches in the epoch's fixed order, hand them to the
recipe's update rule (backprop+AdamW, or any other registered rule), then log, evaluate and
checkpoint on schedule. The first `train.measure_memory_steps` steps run under the memory tracker
(steady state is reached once gradients and optimizer state exist, i.e. after step 1).

Outputs in `output_dir`: summary.json, metrics.jsonl, loss.png, recipe.yaml, adapter/ or model/,
checkpoints/ (when save_every > 0), and tensorboard/ (when enabled).

Under a launcher that started W processes (memtune.distributed) every rank runs this loop. A step's
micro-batch is the next W x train.batch_size examples of the epoch's order, each rank taking its
contiguous share (an epoch's last micro-batch is dropped when it has fewer examples than ranks), so
the examples of a step are those of one process with batch_size x W. Losses are normalized by the
whole step's target count, computed on every rank from the whole micro-batch (no communication).
Rank 0 alone writes logs, the artifact and summary.json; checkpoints are written by all ranks.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, write_atomic_text
from .data import collate, epoch_order
from .distributed import checkpoint as sharded
from .distributed.comm import CommCounter, CommStats
from .distributed.config import DistributedConfig
from .distributed.parallel import make_parallel
from .distributed.world import launcher_world, start
from .errors import ConfigError, MemtuneError
from .gradient import OPTIMIZERS, StepStats
from .gradient.base import StepTotals
from .gradient.tokentune import SAMPLE_SEED
from .memory.tracker import MemoryTracker
from .methods import check_strategy
from .pipeline import Run, build_run, pick_device, read_train_records, to_device
from .recipe import Recipe, recipe_to_yaml
from .seeds import mix


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    position: int = 0  # next micro-batch index within the epoch
    loss_first: float | None = None
    loss_last: float | None = None
    tokens: int = 0
    seconds: float = 0.0  # time spent in update steps (excludes eval and checkpoint I/O)
    micro_batch_examples: int = 0  # ranks x train.batch_size when written (0: not recorded)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class StepEvent:
    """What callbacks see after each optimizer step."""

    step: int
    total_steps: int
    stats: StepStats
    state: LoopState
    run: Run


@dataclass
class Trainer:
    recipe: Recipe
    resume: bool = False
    callbacks: list[Callable[[StepEvent], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out = Path(self.recipe.output_dir)

    # -- set-up --------------------------------------------------------------------------------
    def _prepare_output(self) -> Path | None:
        """Rank 0 checks and prepares output_dir; then every rank finds the checkpoint to resume."""
        if self.world.is_main:
            ckpt = latest_checkpoint(self.out)
            if self.resume and ckpt is None:
                raise MemtuneError(f"--resume: no checkpoint in {self.out / 'checkpoints'}")
            if not self.resume:
                if ckpt is not None and not (self.out / "summary.json").exists():
                    raise MemtuneError(f"{self.out}: holds checkpoints of an unfinished run; pass --resume to "
                                       f"continue it, or choose another output_dir")
                if (self.out / "checkpoints").exists():
                    shutil.rmtree(self.out / "checkpoints")
                self.out.mkdir(parents=True, exist_ok=True)
        self.world.barrier()
        return latest_checkpoint(self.out) if self.resume else None

    def setup(self) -> None:
        r = self.recipe
        dist_cfg = r.distributed or DistributedConfig()
        self.world = launcher_world()  # before anything loads: a launch of N lone copies stops here
        start(self.world, dist_cfg.backend, dist_cfg.timeout_s, pick_device(r.train.device).type == "cuda")
        ckpt = self._prepare_output()
        self.assemble(read_train_records(r))
        if ckpt is not None:
            self._load(ckpt)
        elif self.world.is_main:
            (self.out / "metrics.jsonl").write_text("")
        if self.world.is_main:
            (self.out / "recipe.yaml").write_text(recipe_to_yaml(r))
        self.writer = self._tensorboard() if r.train.tensorboard and self.world.is_main else None

    def assemble(self, records: list | None, train_data: Callable | None = None, block: int = 1,
                 attribute: bool = False) -> None:
        """Everything a step needs, in `self.world` (writes no file): the run, its data, the update
        rule and the memory tracker (`block`, `attribute`: see MemoryTracker). `train_data(run)`, when
        given, replaces the recipe's data.train (memtune.memory.plan's batches of a given shape)."""
        r, t, w = self.recipe, self.recipe.train, self.world
        dist_cfg = r.distributed or DistributedConfig()
        torch.manual_seed(t.seed)
        self.run = build_run(r, records, for_training=True)
        self.train_data = (train_data(self.run) if train_data is not None
                           else self.run.load_data(r.data.train, r.data.split, records))
        self.eval_data = self.run.load_data(r.data.eval, r.data.eval_split) if r.data.eval else None
        self.micro_examples = t.batch_size * w.size  # examples per micro-batch, over every rank
        n = len(self.train_data)
        # one process: ceil(n / batch); over W ranks a last micro-batch needs at least one example per rank
        micro_per_epoch = n // self.micro_examples + (1 if n % self.micro_examples >= w.size else 0)
        if micro_per_epoch == 0:
            raise ConfigError(f"data.train: {n} examples cannot be shared by {w.size} ranks")
        self.micro_per_epoch = micro_per_epoch
        steps_per_epoch = max(micro_per_epoch // t.grad_accum, 1)
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
        if not any(p.requires_grad for p in self.run.model.parameters()):
            raise ConfigError(f"adapter.kind={r.adapter.kind}: the recipe leaves no trainable parameter")
        rule_cls = OPTIMIZERS.get(r.optimizer.kind)
        self.parallel = make_parallel(dist_cfg, w, rule_cls.uses_backprop)
        check_strategy(r, self.parallel.name)
        if w.distributed and self.run.device.type == "cuda" and self.run.device.index != w.local_rank:
            raise ConfigError(f"train.device={t.device} with {w.size} ranks: rank {w.rank} would use "
                              f"{self.run.device}, not its own GPU cuda:{w.local_rank}; use train.device=auto or cuda")
        self.parallel.wrap(self.run)  # before the optimizer: FSDP replaces the parameters by shards
        self.run.parallel = self.parallel
        self.rule = rule_cls(r.optimizer, self.run.model, self.parallel.task(self.run.train_task), t,
                             self.total_steps, self.run.forward_ctx(), adapter=self.run.method,
                             parallel=self.parallel)
        self.state = LoopState(micro_batch_examples=self.micro_examples)
        self.tracker = MemoryTracker(self.run.model, self.rule.optimizer, block=block, attribute=attribute)
        self.comm = CommStats()

    def update(self, batches: list[dict], totals: StepTotals | None, measure: bool) -> StepStats:
        """One optimizer step on a step's micro-batches; `measure`: under the memory tracker."""
        self.run.method.before_step(self.run.model, self.state.step, self.total_steps)
        if not measure:
            return self.rule.step(batches, totals)
        comm = CommCounter(self.comm, self.world.size) if self.world.distributed else contextlib.nullcontext()
        with self.tracker.measure(*[v for b in batches for v in b.values()]), comm:
            return self.rule.step(batches, totals)

    def _load(self, ckpt: Path) -> None:
        if sharded.is_sharded(ckpt):
            rule_state, saved = sharded.load_sharded(ckpt, self.run.model, self.rule, self.world,
                                                     self.micro_examples)
        else:
            if self.parallel.sharded:
                raise MemtuneError(f"{ckpt}: a one-process checkpoint; resume it in one process or under "
                                   f"distributed.strategy=ddp (FSDP resumes from its own sharded checkpoints)")
            rule_state, saved = load_checkpoint(ckpt, self.run.model)
            written = saved.get("micro_batch_examples", 0)
            if written and written != self.micro_examples:
                raise MemtuneError(f"{ckpt}: written with {written} examples per micro-batch; this run has "
                                   f"{self.world.size} ranks x {self.recipe.train.batch_size}. Resume with "
                                   f"train.batch_size = {written} / ranks")
        self.run.method.load_state_dict(rule_state.pop("adapter_state", {}))
        self.rule.load_state_dict(rule_state)
        self.state = LoopState(**{**saved, "micro_batch_examples": self.micro_examples})
        if self.world.is_main:
            self._truncate_metrics(self.state.step)

    def _save(self) -> None:
        s, t = self.state, self.recipe.train
        extra = {"adapter_state": self.run.method.state_dict()}
        if self.world.distributed:
            sharded.save_sharded(self.out, s.step, self.run.model, self.rule, extra, s.to_dict(),
                                 t.keep_checkpoints, self.world, self.micro_examples)
        else:
            save_checkpoint(self.out, s.step, self.run.model, {**self.rule.state_dict(), **extra}, s.to_dict(),
                            t.keep_checkpoints)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.tensorboard: needs the tensorboard package (pip install 'memtune[tensorboard]')") from None
        return SummaryWriter(str(self.out / "tensorboard"))

    def _truncate_metrics(self, step: int) -> None:
        """Drop log lines past the checkpoint, so a resumed log reads as one uninterrupted run."""
        path = self.out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        keep = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        write_atomic_text(path, "".join(ln + "\n" for ln in keep))

    # -- data order ----------------------------------------------------------------------------
    def _next_micro_batches(self) -> tuple[list[dict], StepTotals | None]:
        """This rank's micro-batches of the next step, and (over several ranks) the whole step's totals."""
        t, s, w = self.recipe.train, self.state, self.world
        out, whole = [], []
        for _ in range(t.grad_accum):
            if s.position >= self.micro_per_epoch:
                s.epoch, s.position = s.epoch + 1, 0
            order = self._order(s.epoch)
            idx = order[s.position * self.micro_examples:(s.position + 1) * self.micro_examples]
            s.position += 1
            out.append(to_device(self._collate(w.share(idx), s.epoch), self.run.device))
            if w.distributed:
                whole.append(self._collate(idx, s.epoch))
        if not w.distributed:
            return out, None
        task = self.run.train_task
        return out, StepTotals(targets=sum(task.count(b) for b in whole), tokens=sum(task.tokens(b) for b in whole))

    def _collate(self, idx: list[int], epoch: int) -> dict:
        batch = collate([self.train_data.examples[i] for i in idx], self.run.tokenizer.pad_token_id)
        if self.run.tokentune is not None:  # per-example selection seeds: the same on every rank and batch
            seed = self.recipe.train.seed
            batch[SAMPLE_SEED] = torch.tensor([mix(seed, epoch, i) for i in idx], dtype=torch.int64)
        return batch

    def _order(self, epoch: int) -> list[int]:
        if getattr(self, "_order_epoch", None) != epoch:
            self._order_cache = epoch_order(len(self.train_data), self.recipe.train.seed, epoch)
            self._order_epoch = epoch
        return self._order_cache

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        done = False
        try:
            self.setup()
            summary = self._fit()
            done = True
            return summary
        finally:
            world = getattr(self, "world", None)
            if world is not None:
                if done:  # every rank reaches teardown together (a rank's gloo threads torn down while
                    world.barrier()  # the other still talks to it can abort that process at exit)
                world.close()

    def _fit(self) -> dict:
        t, s, main = self.recipe.train, self.state, self.world.is_main
        bar = self._progress() if main else None
        metrics = open(self.out / "metrics.jsonl", "a") if main else None
        measured = 0
        if t.eval_at_start and self.eval_data is not None and s.step == 0:
            self.eval_start = self.run.evaluate(self.eval_data)
            self._log_eval(metrics, self.eval_start)
        self.run.model.train()
        try:
            while s.step < self.total_steps:
                batches, totals = self._next_micro_batches()
                t0 = time.perf_counter()
                measure = measured < t.measure_memory_steps
                stats = self.update(batches, totals, measure)
                measured += measure
                if self.run.device.type == "cuda":
                    torch.cuda.synchronize()
                s.seconds += time.perf_counter() - t0
                s.step += 1
                s.tokens += stats.tokens
                s.loss_first = stats.loss if s.loss_first is None else s.loss_first
                s.loss_last = stats.loss
                if not math.isfinite(stats.loss):
                    raise MemtuneError(f"step {s.step}: loss is {stats.loss}; lower optimizer.lr or use "
                                       f"train.precision=fp32")
                if s.step % t.log_every == 0 or s.step == self.total_steps:
                    self._log(metrics, stats)
                if t.eval_every and self.eval_data is not None and s.step % t.eval_every == 0 \
                        and s.step < self.total_steps:
                    self._log_eval(metrics, self.run.evaluate(self.eval_data))
                if t.save_every and s.step % t.save_every == 0 and s.step < self.total_steps:
                    self._save()
                self._update_bar(bar, stats)
                for cb in self.callbacks:
                    cb(StepEvent(s.step, self.total_steps, stats, s, self.run))
        finally:
            if metrics is not None:
                metrics.close()
            if bar is not None:
                bar.close()
        self.measured = measured
        return self._finish()

    def _log(self, f, stats: StepStats) -> None:
        if f is None:  # ranks other than 0
            return
        s = self.state
        row = {"step": s.step, "epoch": round(s.epoch + s.position / self.micro_per_epoch, 4),
               "loss": stats.loss, "lr": self.rule.lr, "grad_norm": stats.grad_norm, "targets": stats.targets,
               **({"projected_grad": stats.projected_grad} if stats.projected_grad is not None else {}),
               "tokens": s.tokens, "tokens_per_second": s.tokens / max(s.seconds, 1e-9),
               "seconds": round(s.seconds, 4),
               ("cuda_allocated_bytes" if self.run.device.type == "cuda" else "rss_bytes"): self._memory_now()}
        f.write(json.dumps(row) + "\n")
        f.flush()
        if self.writer is not None:
            for k in ("loss", "lr", "grad_norm", "tokens_per_second"):
                if row[k] is not None:
                    self.writer.add_scalar(f"train/{k}", row[k], s.step)

    def _log_eval(self, f, result: dict) -> None:
        if f is None:
            return
        f.write(json.dumps({"step": self.state.step, **{f"eval_{k}": v for k, v in result.items()}}) + "\n")
        f.flush()
        if self.writer is not None:
            for k, v in result.items():
                self.writer.add_scalar(f"eval/{k}", v, self.state.step)

    def _memory_now(self) -> int:
        """Memory in use now: CUDA allocated bytes on GPU, process resident set size on CPU."""
        if self.run.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.run.device))
        import psutil

        return int(psutil.Process().memory_info().rss)

    def _progress(self):
        if not self.recipe.train.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=self.state.step, desc="train", unit="step", dynamic_ncols=True)

    def _update_bar(self, bar, stats: StepStats) -> None:
        if bar is None:
            return
        s = self.state
        bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{s.tokens / max(s.seconds, 1e-9):.0f}",
                        mem=_human(self._memory_now()), refresh=False)
        bar.update(1)

    # -- outputs -------------------------------------------------------------------------------
    def _finish(self) -> dict:
        from .plots import plot_loss

        r, s, w = self.recipe, self.state, self.world
        result = self.run.evaluate(self.eval_data) if self.eval_data is not None else None
        if result is not None and w.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                self._log_eval(f, result)
        if self.run.tokentune is not None:
            self.run.tokentune.remove()  # artifacts are plain models: no hooks, the usual attention
        artifact, rule_files = self.out / self.run.method.artifact, {}
        with self.parallel.full_parameters(self.run.model):  # FSDP: every rank gathers, rank 0 writes
            if w.is_main:
                artifact = self.run.method.save(self.run.model, self.out, r.model)
        if w.is_main:
            rule_files = self.rule.save_artifacts(self.out)
            self.run.tokenizer.save_pretrained(self.out / "tokenizer")
        mem = self.tracker.report()
        memory = {"parameters": mem.parameters, "parameters_trainable": mem.parameters_trainable,
                  "parameters_frozen": mem.parameters_frozen, "buffers": mem.buffers,
                  "gradients": mem.gradients, "optimizer": mem.optimizer,
                  "activations": mem.activations, "peak": mem.peak,
                  "cuda_max_allocated": mem.cuda_max_allocated,
                  "measured_steps": min(r.train.measure_memory_steps, s.step)}
        per_rank = self._memory_per_rank(memory) if w.distributed else None
        summary = {
            "recipe": r.to_dict(),
            "params": self.run.param_counts(),
            "memory_bytes": memory,
            "train": {"steps": s.step, "loss_first": s.loss_first, "loss_last": s.loss_last,
                      "tokens": s.tokens, "tokens_per_second": s.tokens / max(s.seconds, 1e-9),
                      "tokens_definition": "non-padding input tokens per second of update-step time",
                      "seconds": s.seconds, "examples": len(self.train_data),
                      "dropped_examples": self.train_data.dropped, "format": self.train_data.format},
            "eval": _eval_fields(result),
            "adapter": {"kind": r.adapter.kind, "artifact": str(artifact.relative_to(self.out)),
                        **self.run.method.describe()},
            "gradient": {"rule": r.optimizer.kind, **self.rule.describe(), **rule_files,
                         "tokentune": self.run.tokentune.describe() if self.run.tokentune is not None else None},
            "distributed": {**self.parallel.describe(), "micro_batch_examples": self.micro_examples,
                            **({"memory_bytes_per_rank": per_rank,
                                "communication_per_step": self.comm.per_step(getattr(self, "measured", 0))}
                               if w.distributed else {})},
            "device": _device_name(self.run.device),
        }
        if getattr(self, "eval_start", None) is not None:
            summary["eval_start"] = _eval_fields(self.eval_start)
        if w.is_main:
            write_atomic_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            plot_loss(self.out / "metrics.jsonl", self.out / "loss.png", title=f"{r.model} · {r.adapter.kind}")
        if self.writer is not None:
            self.writer.close()
        return summary

    def _memory_per_rank(self, memory: dict) -> list[dict]:
        """Every rank's tracker figures, in rank order (what each process holds)."""
        keys = [k for k in memory if k not in ("cuda_max_allocated", "measured_steps")]
        rows = self.world.all_gather_ints([memory[k] for k in keys] + [memory["cuda_max_allocated"] or -1])
        return [{**dict(zip(keys, row[:-1])), "cuda_max_allocated": row[-1] if row[-1] >= 0 else None,
                 "rank": i} for i, row in enumerate(rows)]


def _eval_fields(result: dict | None) -> dict:
    return {k: v for k, v in (result or {}).items() if k in ("loss", "accuracy", "perplexity")}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}TiB"


def train(recipe: Recipe, resume: bool = False, callbacks=()) -> dict:
    return Trainer(recipe, resume, list(callbacks)).fit()
