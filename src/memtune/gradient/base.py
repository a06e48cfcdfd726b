"""The *gradient* axis: how an update is computed from a batch and applied.

The trainer hands an `UpdateRule` the micro-batches of one optimizer step and gets back statistics;
everything between (backward passes, clipping, optimizer, schedule, or forward-only estimates) is
the rule's business. A rule is registered in `OPTIMIZERS` under the recipe's `optimizer.kind`.
"""

from __future__ import annotations

import math
from pathlib import Path
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from torch import nn

from ..recipe import OptimizerConfig, TrainConfig
from ..registry import Registry
from ..tasks import Task


@dataclass
class StepStats:
    loss: float  # mean loss over the step's targets
    targets: int  # loss targets in the step (tokens for causal-lm, examples for classification)
    tokens: int  # non-padding input tokens
    grad_norm: float | None = None
    projected_grad: float | None = None  # zeroth-order rules: mean (l+ - l-) / (2 eps) of the step


@dataclass
class StepTotals:
    """The whole step over every rank, when the micro-batches a rule gets are one rank's part
    (memtune.distributed): losses are normalized by `targets`, throughput counts `tokens`."""

    targets: int
    tokens: int


class UpdateRule(ABC):
    uses_backprop = True  # False for forward-only (zeroth-order) rules
    optimizer_key = "optimizer"  # the key of state_dict() that holds `optimizer.state_dict()`

    def __init__(self, config: OptimizerConfig, model: nn.Module, task: Task, train: TrainConfig,
                 total_steps: int, forward_ctx: Callable[[], ContextManager], adapter=None, parallel=None) -> None:
        from ..distributed.parallel import single_process

        # how the model is spread over ranks (memtune.distributed.parallel); one process by default
        self.parallel = parallel if parallel is not None else single_process()
        self.config = config
        # the run's AdapterMethod: backprop rules add its regularizer(); every rule calls after_update()
        self.adapter = adapter
        if adapter is not None:
            adapter.rule_uses_backprop = self.uses_backprop
        self.model = model
        self.task = task
        self.train_cfg = train
        self.total_steps = total_steps
        self.forward_ctx = forward_ctx

    @property
    def world(self):
        return self.parallel.world

    @abstractmethod
    def step(self, micro_batches: list[dict], totals: StepTotals | None = None) -> StepStats:
        """One optimizer step over the given micro-batches (`totals`: the step over every rank;
        None: the micro-batches are the whole step)."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The torch optimizer holding state, if any (the memory tracker counts its tensors)."""
        return None

    @property
    @abstractmethod
    def lr(self) -> float: ...

    def describe(self) -> dict:
        """Settings worth reporting in summary.json's `gradient` section."""
        return {}

    def save_artifacts(self, out: Path) -> dict:
        """Write rule-specific files into the run directory; returns summary fields naming them."""
        return {}


OPTIMIZERS: Registry[type[UpdateRule]] = Registry("optimizer")


def schedule_factor(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier at step s: linear warmup over `warmup` steps, then constant, linear or cosine to 0."""

    def f(s: int) -> float:
        if warmup and s < warmup:
            return (s + 1) / warmup
        if kind == "constant":
            return 1.0
        span = max(total - warmup, 1)
        progress = min(max(s - warmup, 0) / span, 1.0)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return f
