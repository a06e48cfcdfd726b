"""One page pool on the device for the KV cache and the resident adapters (S-LoRA's unified paging).

The pool is one tensor of P pages, each `page_elems` elements of the model's compute dtype:

    storage (P, page_elems)
    a KV page holds `page_tokens` tokens of every layer:   (L, 2, page_tokens, kv_heads, head_dim)
    an adapter takes ceil(numel / page_elems) pages:       its A and B factors, packed module by module

Why our own: transformers' paged cache has no room for adapters and packs requests without an
adapter field, and S-LoRA's cells are one head-width row per layer, which does not fit grouped-query
attention (KV rows narrower than adapter rows). A page here is a count of elements, so any KV width
and any adapter shape share one budget and one free list; with GQA a page simply holds more tokens'
worth of elements per layer than an MHA model's.

Layout rules that keep the kernels simple:
  - a KV page is any free page; sequences keep a page table (list of page indices);
  - an adapter is a *contiguous* run of pages, so its factors are plain views (no gather per step).
    When free pages exist but no run is long enough, KV pages inside the best window are moved to
    free pages outside it (a copy and a page-table update: sequences never see where pages are).
    KV pages are taken from the top of the pool and adapter runs from the bottom, which keeps
    such moves rare.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class PoolFull(Exception):
    """No free pages for the request; the scheduler frees some (evict, preempt) or waits."""


@dataclass
class PoolShape:
    layers: int
    kv_heads: int
    head_dim: int
    page_tokens: int

    @property
    def page_elems(self) -> int:
        return self.layers * 2 * self.page_tokens * self.kv_heads * self.head_dim


class PagePool:
    def __init__(self, shape: PoolShape, num_pages: int, dtype: torch.dtype, device: torch.device) -> None:
        if num_pages < 2:
            raise ValueError(f"a page pool needs at least 2 pages, got {num_pages}")
        self.shape, self.num_pages, self.dtype, self.device = shape, num_pages, dtype, device
        self.page_elems = shape.page_elems
        self.storage = torch.zeros(num_pages, self.page_elems, dtype=dtype, device=device)  # (P, page_elems)
        # (P, L, 2, page_tokens, kv_heads, head_dim): the same bytes seen as KV pages
        self.kv = self.storage.view(num_pages, shape.layers, 2, shape.page_tokens, shape.kv_heads, shape.head_dim)
        self.free = np.ones(num_pages, dtype=bool)
        self.kind = np.zeros(num_pages, dtype=np.int8)  # 0 free, 1 kv, 2 adapter
        self.tables: dict[int, list[int]] = {}  # sequence id -> its KV pages, in token order
        self.runs: dict[str, tuple[int, int]] = {}  # adapter name -> (first page, page count)
        self.moves = 0  # KV pages relocated to make room for adapter runs

    @property
    def page_bytes(self) -> int:
        return self.page_elems * self.storage.element_size()

    def num_free(self) -> int:
        return int(self.free.sum())

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Strided views (P, page_tokens, kv_heads, head_dim) of one layer's keys and values."""
        return self.kv[:, layer, 0], self.kv[:, layer, 1]

    # -- KV pages -------------------------------------------------------------------------------
    def kv_pages_for(self, tokens: int) -> int:
        return -(-tokens // self.shape.page_tokens)

    def grow(self, seq: int, tokens: int) -> None:
        """Make seq's table hold `tokens` tokens, taking pages from the top; all or nothing."""
        table = self.tables.setdefault(seq, [])
        need = self.kv_pages_for(tokens) - len(table)
        if need <= 0:
            return
        free = np.flatnonzero(self.free)
        if len(free) < need:
            raise PoolFull(f"{need} KV pages needed, {len(free)} free")
        pages = free[::-1][:need].tolist()
        self.free[pages] = False
        self.kind[pages] = 1
        table.extend(pages)

    def release(self, seq: int) -> None:
        pages = self.tables.pop(seq, [])
        self.free[pages] = True
        self.kind[pages] = 0

    # -- adapter runs ----------------------------------------------------------------------------
    def adapter_pages_for(self, numel: int) -> int:
        return -(-numel // self.page_elems)

    def place_adapter(self, name: str, numel: int) -> torch.Tensor:
        """A contiguous run for `numel` elements; returns the flat view the adapter is written into."""
        n = self.adapter_pages_for(numel)
        if self.num_free() < n:
            raise PoolFull(f"adapter '{name}' needs {n} pages, {self.num_free()} free")
        start = self._free_run(n)
        if start is None:
            start = self._make_run(n)
        self.free[start:start + n] = False
        self.kind[start:start + n] = 2
        self.runs[name] = (start, n)
        return self.storage[start:start + n].view(-1)[:numel]

    def remove_adapter(self, name: str) -> None:
        start, n = self.runs.pop(name)
        self.free[start:start + n] = True
        self.kind[start:start + n] = 0

    def _free_run(self, n: int) -> int | None:
        """Lowest start of n consecutive free pages."""
        free = self.free.astype(np.int32)
        window = np.convolve(free, np.ones(n, dtype=np.int32), mode="valid")  # free pages in [i, i+n)
        hits = np.flatnonzero(window == n)
        return int(hits[0]) if len(hits) else None

    def _make_run(self, n: int) -> int:
        """Free a window of n pages holding no adapter by moving its KV pages elsewhere."""
        is_kv, is_ad = (self.kind == 1).astype(np.int32), (self.kind == 2).astype(np.int32)
        ones = np.ones(n, dtype=np.int32)
        kv_in, ad_in = np.convolve(is_kv, ones, mode="valid"), np.convolve(is_ad, ones, mode="valid")
        kv_in = np.where(ad_in == 0, kv_in, np.iinfo(np.int32).max)
        start = int(np.argmin(kv_in))
        moving = int(kv_in[start])
        outside = self.num_free() - (n - moving - int(ad_in[start]))  # free pages outside the window
        if moving == np.iinfo(np.int32).max or outside < moving:
            raise PoolFull(f"no window of {n} pages free of adapters")
        targets = [p for p in np.flatnonzero(self.free)[::-1].tolist() if not start <= p < start + n][:moving]
        where = {p: (seq, i) for seq, table in self.tables.items() for i, p in enumerate(table)}
        for src in range(start, start + n):
            if self.kind[src] != 1:
                continue
            dst = targets.pop()
            self.storage[dst].copy_(self.storage[src])
            seq, i = where[src]
            self.tables[seq][i] = dst
            self.free[dst], self.kind[dst] = False, 1
            self.free[src], self.kind[src] = True, 0
            self.moves += 1
        return start

    # -- accounting ------------------------------------------------------------------------------
    def usage(self) -> dict[str, int]:
        """Bytes by category: KV pages in use, adapter pages, free pages, the whole pool."""
        pb = self.page_bytes
        return {"kv_pages": int((self.kind == 1).sum()) * pb, "adapter_pages": int((self.kind == 2).sum()) * pb,
                "free": self.num_free() * pb, "pool": self.num_pages * pb}
