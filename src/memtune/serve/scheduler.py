"""Iteration-level scheduling under one page budget (KV pages + adapter pages).

Between two forward steps:
  1. admit waiting requests in arrival order while the batch has room: at most `max_running`
     sequences, at most `max_prefill_tokens` prompt tokens per step (at least one request always),
     at most `max_adapters` distinct adapters. A request whose adapter would exceed that cap is passed
     over and keeps its place at the head of the line; the first request that does not fit in pages
     stops admission (FIFO, no starvation). Admitting pins the request's adapter (loading it into
     pool pages) and takes the KV pages for its prompt, keeping `watermark` pages free for the
     running sequences to grow into.
  2. give every running sequence the pages for this step's token. When the pool runs out:
     evict an unpinned adapter (LRU); if none, preempt the running request that arrived last
     (vLLM's recompute policy): its pages are freed, its adapter unpinned, and it goes back to the
     head of the queue with the tokens it generated so far appended to its prompt, so re-admission
     recomputes its cache in one prefill and decoding continues where it stopped (same tokens under
     greedy and under a seeded sampler, whose generator state is kept).
Requests that could never fit (prompt + max_tokens over the pool's or the model's length) are
refused when they are added.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .adapter_cache import AdapterCache, Factors
from .pool import PagePool, PoolFull
from .sampling import SamplingParams


@dataclass(eq=False)  # a request is itself, not its fields (lists, generators)
class Request:
    id: int
    prompt_ids: list[int]
    adapter: str | None
    params: SamplingParams
    arrival: float
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    cached: int = 0  # tokens of prompt + output whose K/V are in pages
    status: str = "waiting"  # waiting | running | finished
    finish_reason: str | None = None  # stop | length | abort
    text: str = ""  # decoded output so far (up to a stop string)
    decoded: str = ""  # incremental detokenization: text of output_ids[:read_offset]
    prefix_offset: int = 0
    read_offset: int = 0
    streamed: int = 0  # characters of text handed out
    first_token_time: float | None = None
    finish_time: float | None = None
    preemptions: int = 0
    factors: Factors | None = None  # the adapter's pool views while running

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def to_feed(self) -> list[int]:
        return self.all_ids[self.cached:]


@dataclass
class SchedulerConfig:
    max_running: int = 32
    max_prefill_tokens: int = 2048
    max_adapters: int = 32  # distinct adapters in one batch (S-LoRA's --batch-num-adapters)
    watermark: int = 1  # pages kept free at admission for running sequences to grow


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: PagePool, adapters: AdapterCache) -> None:
        self.config, self.pool, self.adapters = config, pool, adapters
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Request]:
        """The sequences of the next step, each with pages for its tokens."""
        self._admit()
        self._grow_running()
        return list(self.running)

    def finish(self, req: Request, reason: str) -> None:
        req.status, req.finish_reason, req.finish_time = "finished", reason, time.perf_counter()
        if req in self.running:
            self.running.remove(req)
            self._free(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    # -- admission ---------------------------------------------------------------------------------
    def _admit(self) -> None:
        c = self.config
        in_batch = {r.adapter for r in self.running if r.adapter is not None}
        budget = c.max_prefill_tokens
        admitted, passed_over = 0, []
        while self.waiting and len(self.running) < c.max_running:
            req = self.waiting[0]
            new_adapter = req.adapter is not None and req.adapter not in in_batch
            if new_adapter and len(in_batch) >= c.max_adapters:
                passed_over.append(self.waiting.popleft())  # keeps its place (put back below)
                continue
            tokens = len(req.all_ids)
            if admitted and tokens > budget:
                break
            if not self._take(req):
                break
            self.waiting.popleft()
            self.running.append(req)
            req.status = "running"
            budget -= tokens
            admitted += 1
            if req.adapter is not None:
                in_batch.add(req.adapter)
        self.waiting.extendleft(reversed(passed_over))

    def _take(self, req: Request) -> bool:
        """Pin the adapter and the prompt's pages, with the watermark left; all or nothing."""
        if req.adapter is not None:
            try:
                req.factors = self.adapters.acquire(req.adapter)
            except PoolFull:
                return False
        need = self.pool.kv_pages_for(len(req.all_ids)) + self.config.watermark * bool(self.running)
        while self.pool.num_free() < need and self.adapters.evict_one():
            pass
        if self.pool.num_free() < need:
            self._unpin(req)
            return False
        self.pool.grow(req.id, len(req.all_ids))
        return True

    # -- growth and preemption ---------------------------------------------------------------------
    def _grow_running(self) -> None:
        for req in sorted(self.running, key=lambda r: r.arrival):
            if req not in self.running:  # preempted below to make room for an earlier one
                continue
            while True:
                try:
                    self.pool.grow(req.id, len(req.all_ids))
                    break
                except PoolFull:
                    if self.adapters.evict_one():
                        continue
                    victim = max(self.running, key=lambda r: r.arrival)
                    self._preempt(victim)
                    if victim is req:
                        break

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._free(req)
        req.status, req.cached = "waiting", 0
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def _free(self, req: Request) -> None:
        self.pool.release(req.id)
        self._unpin(req)

    def _unpin(self, req: Request) -> None:
        if req.factors is not None:
            self.adapters.release(req.adapter)
            req.factors = None
