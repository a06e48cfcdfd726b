"""Backpropagation with AdamW: the standard update rule.

Gradient accumulation normalizes over all targets of the accumulated batch, not per micro-batch:

    loss = (sum over micro-batches m of sum_t l_{m,t}) / N,   N = total targets of all micro-batches

so a step over k micro-batches equals one step over their concatenation (a per-micro-batch mean
would over-weight short micro-batches; cf. huggingface/transformers#34191). Each micro-batch's
summed loss is divided by N before its backward, so only one micro-batch's activations live at once.
Weight decay skips biases and norm weights (tensors with fewer than 2 dimensions).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import ConfigError
from ..recipe import OptimizerConfig
from .base import OPTIMIZERS, StepStats, StepTotals, UpdateRule, schedule_factor

log = logging.getLogger(__name__)


def accumulate_gradients(model, task, micro_batches: list[dict], forward_ctx, adapter=None, parallel=None,
                         totals: StepTotals | None = None) -> tuple[float, int]:
    """Backward over all micro-batches with the loss normalized by N, the step's total targets.

    Returns (summed loss, N); p.grad then holds d(sum of losses / N + R)/dp, where R is the
    adapter's regularizer (added once per step: R / m to each of the m micro-batches).

    Over W data-parallel ranks (`parallel`, `totals`) N counts every rank's targets and each rank's
    loss sum is scaled by W, since DDP and FSDP average gradients over the ranks:
    (1/W) sum_r W l_r / N = sum_r l_r / N, the one-process gradient of the same global batch. The
    gradients are reduced once, in the last micro-batch's backward (`parallel.sync`), and the
    returned loss is summed over the ranks.
    """
    n = totals.targets if totals is not None else sum(task.count(b) for b in micro_batches)
    scale = parallel.loss_scale if parallel is not None else 1
    total = 0.0
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with parallel.sync(last) if parallel is not None else contextlib.nullcontext():
            with forward_ctx():
                loss_sum, _ = task.loss_sum(model, batch)
            loss = loss_sum * (scale / max(n, 1))
            reg = adapter.regularizer(model) if adapter is not None else None
            if reg is not None:
                loss = loss + reg / len(micro_batches)
            loss.backward()
        total += float(loss_sum.detach())
    if parallel is not None and parallel.world.distributed:
        total = parallel.world.all_sum([total])[0]
    return total, n


@dataclass
class AdamWConfig(OptimizerConfig):
    kind: str = "adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    paged: bool = False  # bitsandbytes' paged AdamW (CUDA only: state pages out to CPU under memory pressure)
    # torch's update loop: auto = torch's default for the device (for-loop on CPU, foreach on CUDA);
    # the three differ in the temporaries of optimizer.step(), so in the peak (memtune plan shows it)
    implementation: Literal["auto", "for-loop", "foreach", "fused"] = "auto"

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas: expected two numbers in [0, 1), got {self.betas}")


def _adamw(cfg: AdamWConfig, groups: list[dict], params: list) -> torch.optim.Optimizer:
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.paged:
        if params and params[0].is_cuda:
            try:
                import bitsandbytes as bnb
            except ImportError:
                raise ConfigError("optimizer.paged: needs the bitsandbytes package (pip install bitsandbytes)") from None
            return bnb.optim.PagedAdamW(groups, **kwargs)
        log.warning("optimizer.paged: paged optimizers page state between GPU and CPU memory; on %s there is "
                    "nothing to page, so the ordinary AdamW runs", params[0].device.type if params else "cpu")
    impl = cfg.implementation
    if impl != "auto":
        kwargs.update({"foreach": impl == "foreach", "fused": impl == "fused" or None})
    return torch.optim.AdamW(groups, **kwargs)


@OPTIMIZERS.register("adamw", AdamWConfig)
class Backprop(UpdateRule):
    config: AdamWConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        self._opt = _adamw(self.config, [g for g in groups if g["params"]], self.params)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self._opt, schedule_factor(self.train_cfg.schedule, self.train_cfg.warmup_steps, self.total_steps))

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._opt

    @property
    def lr(self) -> float:
        return self._opt.param_groups[0]["lr"]

    def step(self, micro_batches: list[dict], totals: StepTotals | None = None) -> StepStats:
        total, n = accumulate_gradients(self.model, self.task, micro_batches, self.forward_ctx, self.adapter,
                                        self.parallel, totals)
        max_norm = self.train_cfg.max_grad_norm
        # FSDP: the norm of sharded gradients is a DTensor; full_tensor() sums the ranks' squares
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm if max_norm > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self._opt.step()
        if self.adapter is not None:
            self.adapter.after_update(self.model, self.scheduler.last_epoch, self.total_steps)
        self.scheduler.step()
        self._opt.zero_grad(set_to_none=True)
        tokens = totals.tokens if totals is not None else sum(self.task.tokens(b) for b in micro_batches)
        return StepStats(loss=total / max(n, 1), targets=n, tokens=tokens, grad_norm=float(norm))

    def state_dict(self) -> dict:
        return {"optimizer": self._opt.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._opt.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
