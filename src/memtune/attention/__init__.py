"""The *attention* axis: which attention pattern a training forward uses.

    attention:
      kind: dense | eager | s2   # dense: the model's own attention (SDPA); eager: transformers' eager
                                 # path; s2: LongLoRA's shifted sparse attention
      group_ratio: 0.25          # s2: group size g = floor(N * group_ratio)

The section is optional (absent = dense) and works with any adapter (full fine-tuning, LoRA, ...).
S2 changes training forwards only; evaluation and generation attend densely (see memtune.attention.s2).
`adapter.kind=longlora` switches S2 on by itself (its own `attention` / `group_ratio` fields), with this
same code. `apply_attention(model, config)` runs after the adapter is attached.

`eager` is the same dense pattern through transformers' eager kernel: the scores softmax(Q K^T / sqrt(d))
are materialized, (B, H, T, T) per layer, and autograd keeps them (fp32 probabilities and their cast to
the compute dtype) for backward, where SDPA keeps O and a (B, H, T) log-sum-exp. It is the attention of
the reference implementations papers measured (the QST code's side network among them), so `memtune
plan` can price it: 70B QST at batch 16 x 384 with the reference code's side network (eager, 64 heads of 8)
keeps 73 GB more than memtune's (SDPA, heads of 16; BENCHMARKS.md). It is set with
`set_kernel` before the adapter attaches, so layers an adapter builds from the model's config (QST's side
network) use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..errors import ConfigError
from .s2 import disable_s2, enable_s2, s2_attention, s2_enabled

__all__ = ["AttentionConfig", "apply_attention", "set_kernel", "enable_s2", "disable_s2", "s2_attention", "s2_enabled"]


@dataclass
class AttentionConfig:
    kind: Literal["dense", "eager", "s2"] = "dense"
    group_ratio: float = 0.25  # S2 group size as a fraction of the sequence (LongLoRA §3.2: 1/4)

    def check(self, prefix: str) -> None:
        if not 0.0 < self.group_ratio < 1.0:
            raise ConfigError(f"{prefix}.group_ratio: expected a fraction in (0, 1), got {self.group_ratio}")


EAGER = "eager"  # transformers' name for its eager attention functions


def set_kernel(model: nn.Module, config: AttentionConfig | None) -> None:
    """Before the adapter attaches: `eager` switches the model (and so the configs adapters copy) to
    transformers' eager attention; other kinds leave the kernel to `apply_attention`."""
    if config is not None and config.kind == EAGER:
        model.set_attn_implementation(EAGER)


def apply_attention(model: nn.Module, config: AttentionConfig | None, field: str = "attention.kind") -> None:
    """Switch `model` to the configured pattern (None: leave the model as it is; dense: S2 off; eager:
    set by `set_kernel`, nothing more)."""
    if config is None or config.kind == EAGER:
        return
    if config.kind == "dense":
        disable_s2(model)
    else:
        enable_s2(model, config.group_ratio, field)
