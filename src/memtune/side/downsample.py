"""QST's downsamplers: a backbone hidden state h (..., d) -> the side network's width (..., d/r).

QST paper, Table 6 (LLaMA-2-7B MMLU: Adapter 45.1, Linear 44.9, LoRA 44.7, MaxPool 43.7, AvgPool 42.5):

    adapter   LayerNorm(W2 swish(W1 h))   W1 (k, d), W2 (d/r, k), no biases   the paper's default, k = 16
    lora      W2 W1 h                     the same factorization without the non-linearity and norm
    linear    W h + b                     W (d/r, d): LST's downsampler, 56% of QST's trainable weights
    maxpool   max over each group of r consecutive channels (no weights)
    avgpool   mean over each group of r consecutive channels (no weights)

Linear weights keep nn.Linear's Kaiming-uniform init, as the reference code does. `rank` is k.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

KINDS = ("adapter", "lora", "linear", "maxpool", "avgpool")


class Pool(nn.Module):
    """(..., d) -> (..., d/r): max or mean over channel groups [j r, (j+1) r)."""

    def __init__(self, r: int, how: str) -> None:
        super().__init__()
        self.r, self.how = r, how

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        g = h.unflatten(-1, (h.shape[-1] // self.r, self.r))  # (..., d/r, r)
        return g.amax(-1) if self.how == "max" else g.mean(-1)

    def extra_repr(self) -> str:
        return f"r={self.r}, {self.how}"


class LowRank(nn.Module):
    """W2 act(W1 h), optionally normalized: the `adapter` (swish + LayerNorm) and `lora` downsamplers."""

    def __init__(self, d: int, d_side: int, rank: int, adapter: bool) -> None:
        super().__init__()
        self.down = nn.Linear(d, rank, bias=False)  # W1 (k, d)
        self.up = nn.Linear(rank, d_side, bias=False)  # W2 (d/r, k)
        self.adapter = adapter
        self.norm = nn.LayerNorm(d_side) if adapter else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.down(h)  # (..., k)
        return self.norm(self.up(F.silu(z) if self.adapter else z))  # (..., d/r)


def downsampler(kind: str, d: int, d_side: int, rank: int) -> nn.Module:
    if kind in ("adapter", "lora"):
        return LowRank(d, d_side, rank, adapter=kind == "adapter")
    if kind == "linear":
        return nn.Linear(d, d_side)
    if kind in ("maxpool", "avgpool"):
        return Pool(d // d_side, kind[:3])
    raise ValueError(kind)
