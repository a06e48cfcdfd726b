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


class UpdateRule(ABC):
    uses_backprop = True  # False for forward-only (zeroth-order) rules

    def __init__(self, config: OptimizerConfig, model: nn.Module, task: Task, train: TrainConfig,
                 total_steps: int, forward_ctx: Callable[[], ContextManager], adapter=None) -> None:
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

    @abstractmethod
    def step(self, micro_batches: list[dict]) -> StepStats:
        """One optimizer step over the given micro-batches."""

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
