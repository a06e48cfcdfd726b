"""Heterogeneous-rank LoRA over a packed batch: each token's low-rank term from its own adapter.

    y (T, d_out) += s_t * (x_t @ A_t.T) @ B_t.T      A_t (r_t, d_in), B_t (d_out, r_t): token t's adapter

after one base matmul for the whole batch (the caller's). Ranks stay exact: no adapter is padded to
the largest rank in the batch. Three forms, equal up to float summation order:

  segment  tokens are sorted by adapter, so each adapter is one contiguous segment [s, e):
           y[s:e] += s * (x[s:e] @ A.T) @ B.T. Two GEMMs per adapter; no copies. Punica's SGMV,
           the default on CPU and for prefill.
  gather   per rank bucket r, the bucket's factors are stacked (n_r, r, d_in) and gathered per
           token (BGMV): one batched product for every token of that rank whatever its adapter.
           Built for decode (one token per sequence, many adapters); it materializes T x r x d
           per bucket, which is why prefill does not use it.
  native   the segment loop in C++ (`native_lora`, CPU only): one call per layer per step, reading
           each adapter's factors in place from the pool through its offset table; decode
           segments as GEMVs, prefill segments as the same GEMMs as `segment`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from . import native_lora


class Factor(NamedTuple):
    """One module of one resident adapter: views into its pool pages (and their transposes, made once)."""

    a: torch.Tensor  # (r, d_in)
    b: torch.Tensor  # (d_out, r)
    scale: float
    at: torch.Tensor  # (d_in, r) view
    bt: torch.Tensor  # (r, d_out), contiguous in the pool (b is its transposed view)


@dataclass
class AdapterViews:
    """One adapter resident in the pool: its factors by module, and the same as the native kernel's
    table over the engine's module order (rows of modules the adapter does not adapt have rank 0)."""

    modules: dict[str, Factor]
    table: torch.Tensor  # (M, 3) int64: A's and Bt's element offsets in the pool storage, rank
    scales: torch.Tensor  # (M,) float32

    def get(self, module: str) -> Factor | None:
        return self.modules.get(module)


@dataclass
class Segment:
    start: int
    end: int
    slot: int  # index into the step's adapter list


@dataclass
class Bucket:
    """Tokens of one rank (for one module): their rows in y, and the per-token index into the stack."""

    rows: torch.Tensor  # (T_r,) long
    which: torch.Tensor  # (T_r,) long, into a / b / scale
    a: torch.Tensor  # (n_r, r, d_in)
    b: torch.Tensor  # (n_r, d_out, r)
    scale: torch.Tensor  # (n_r,)


def segment_lora(y: torch.Tensor, x: torch.Tensor, lengths: list[int], pieces: list[tuple[int, Factor]]
                 ) -> torch.Tensor:
    """y (T, d_out), x (T, d_in) cut into consecutive pieces of `lengths`; each (piece, factor) in
    `pieces` adds its adapter's term to that piece. In place on y."""
    xs, ys = x.split(lengths), y.split(lengths)  # views, made in one call each
    for i, f in pieces:
        # (n, d_in) @ (d_in, r) -> (n, r), then y += s * h @ B.T in one fused addmm: two ops per segment
        # (on CPU their dispatch, not their FLOPs, is what a decode step over many adapters costs)
        ys[i].addmm_(xs[i] @ f.at, f.bt, alpha=f.scale)
    return y


def gather_lora(y: torch.Tensor, x: torch.Tensor, buckets: list[Bucket]) -> torch.Tensor:
    """y (T, d_out), x (T, d_in); each bucket's tokens get their own adapter's term. In place on y."""
    for bk in buckets:
        a_t, b_t = bk.a[bk.which], bk.b[bk.which]  # (T_r, r, d_in), (T_r, d_out, r)
        h = torch.bmm(a_t, x[bk.rows].unsqueeze(-1))  # (T_r, r, 1)
        out = torch.bmm(b_t, h).squeeze(-1) * bk.scale[bk.which].unsqueeze(-1)  # (T_r, d_out)
        y.index_add_(0, bk.rows, out)
    return y


@dataclass
class StepLora:
    """The LoRA metadata of one engine step, built once and read by every adapted layer.

    `segments` are token ranges per adapter slot (sorted by slot); `adapters[slot]` maps module name
    -> its Factor (views into the pool). The gather form's buckets are built per module on its first
    call of the step (factors differ per module; token rows do not)."""

    segments: list[Segment]
    adapters: list[AdapterViews]
    kernel: str  # "segment" | "gather" | "native"
    pool: torch.Tensor | None = None  # native: the pool's storage, flat (the tables' offsets index it)
    modules: dict[str, int] | None = None  # native: module name -> its row in the tables
    _buckets: dict[str, list[Bucket]] = field(default_factory=dict)
    _cuts: tuple[list[int], list[tuple[int, int]]] | None = None  # piece lengths; (piece, slot) per segment
    _native: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # seg (S, 2), meta (S, M, 3), scale

    def apply(self, module: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x (T, d_in), y (T, d_out) after the base layer; returns y with every token's term added."""
        if self.kernel == "native":
            seg, meta, scale = self._native or self._tables()
            return native_lora.load().sgmv_(y, x.contiguous(), self.pool, seg, meta, scale, self.modules[module])
        if self.kernel == "gather":
            if module not in self._buckets:
                self._buckets[module] = self._bucketize(module, y.device)
            return gather_lora(y, x, self._buckets[module])
        lengths, slots = self._cuts or self._cut(x.shape[0])
        pieces = [(i, f) for i, slot in slots if (f := self.adapters[slot].get(module)) is not None]
        return segment_lora(y, x, lengths, pieces)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The native kernel's step tables, once per step: segment bounds and each segment's adapter row."""
        seg = torch.tensor([[sg.start, sg.end] for sg in self.segments], dtype=torch.long)  # (S, 2)
        meta = torch.stack([self.adapters[sg.slot].table for sg in self.segments])  # (S, M, 3)
        scale = torch.stack([self.adapters[sg.slot].scales for sg in self.segments])  # (S, M)
        self._native = seg, meta, scale
        return self._native

    def _cut(self, total: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Piece lengths covering [0, T): the segments and the base-only gaps between them."""
        lengths, slots, at = [], [], 0
        for sg in self.segments:
            if sg.start > at:
                lengths.append(sg.start - at)
            slots.append((len(lengths), sg.slot))
            lengths.append(sg.end - sg.start)
            at = sg.end
        if total > at:
            lengths.append(total - at)
        self._cuts = lengths, slots
        return self._cuts

    def _bucketize(self, module: str, device: torch.device) -> list[Bucket]:
        by_rank: dict[int, list[tuple[Segment, tuple]]] = {}
        for sg in self.segments:
            f = self.adapters[sg.slot].get(module)
            if f is not None:
                by_rank.setdefault(f.a.shape[0], []).append((sg, f))
        buckets = []
        for _, group in sorted(by_rank.items()):
            rows = torch.cat([torch.arange(sg.start, sg.end) for sg, _ in group]).to(device)
            which = torch.cat([torch.full((sg.end - sg.start,), i) for i, (sg, _) in enumerate(group)]).to(device)
            a = torch.stack([f.a for _, f in group])
            b = torch.stack([f.b for _, f in group])
            scale = torch.tensor([f.scale for _, f in group], dtype=a.dtype, device=device)
            buckets.append(Bucket(rows, which, a, b, scale))
        return buckets
