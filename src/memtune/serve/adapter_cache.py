"""Which adapters are on the device: an LRU over the pool's adapter pages, pinned while in use.

All registered adapters sit in host memory (`HostAdapter`, pinned memory when the device is a GPU,
so copies can overlap). The ones used by running requests are copied into pool pages on first use
and stay *pinned* until their last request ends; unpinned resident adapters stay cached and are
evicted least-recently-used first whenever the pool needs pages (for KV or another adapter), before
any request is preempted. Loads and their time are counted.
"""

from __future__ import annotations

import re
import time
from collections import Counter, OrderedDict
from pathlib import Path

import torch

from .adapters import AdapterError, HostAdapter, read_lora_dir
from .lora_kernels import AdapterViews, Factor
from .pool import PagePool, PoolFull

NAME_RE = re.compile(r"^[\w.\-]{1,64}$")
Factors = AdapterViews  # one resident adapter: its pool views by module, and their offset table


class AdapterCache:
    def __init__(self, pool: PagePool, shapes: dict[str, tuple[int, int]], max_resident: int = 0) -> None:
        self.pool, self.shapes, self.max_resident = pool, shapes, max_resident  # 0: as many as pages allow
        self.rows = {module: i for i, module in enumerate(shapes)}  # module -> its row in every adapter's table
        self.host: dict[str, HostAdapter] = {}
        self.resident: OrderedDict[str, Factors] = OrderedDict()  # LRU order: oldest first
        self.pins: Counter[str] = Counter()
        self.loads = 0
        self.evictions = 0
        self.load_seconds = 0.0
        self.hits = 0

    # -- host store ------------------------------------------------------------------------------
    def register(self, name: str, path: str | Path, rank: int | None = None) -> HostAdapter:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise AdapterError(f"adapter name {name!r}: expected 1-64 letters, digits, '_', '.' or '-'")
        if name in self.host:
            raise AdapterError(f"adapter '{name}' is already registered (from {self.host[name].path})")
        adapter = read_lora_dir(name, path, self.shapes, self.pool.dtype, rank=rank)
        needed = self.pool.adapter_pages_for(adapter.numel)
        if needed > self.pool.num_pages - 1:
            raise AdapterError(f"adapter '{name}' ({path}): needs {needed} pool pages, the pool has "
                               f"{self.pool.num_pages}; raise the pool size")
        if self.pool.device.type == "cuda":
            adapter.modules = {k: type(m)(m.a.pin_memory(), m.b.t().pin_memory().t(), m.scale)
                               for k, m in adapter.modules.items()}
        self.host[name] = adapter
        return adapter

    def unregister(self, name: str) -> None:
        if self.pins[name]:
            raise AdapterError(f"adapter '{name}' is in use by {self.pins[name]} running request(s)")
        if name in self.resident:
            self._evict(name)
        del self.host[name]

    def host_bytes(self) -> int:
        return sum(a.nbytes for a in self.host.values())

    # -- device residency --------------------------------------------------------------------------
    def acquire(self, name: str) -> Factors:
        """Pin `name` on the device, loading it (and evicting unpinned ones) if needed. PoolFull when
        even after evicting every unpinned adapter there is no room."""
        if name in self.resident:
            self.resident.move_to_end(name)
            self.hits += 1
        else:
            while self.max_resident and len(self.resident) >= self.max_resident:
                if not self.evict_one():
                    raise PoolFull(f"{len(self.resident)} adapters resident and pinned (max_resident_adapters)")
            self.resident[name] = self._load(name)
        self.pins[name] += 1
        return self.resident[name]

    def release(self, name: str) -> None:
        self.pins[name] -= 1
        if self.pins[name] <= 0:
            del self.pins[name]

    def evict_one(self) -> bool:
        """Evict the least recently used unpinned adapter; False when none can go."""
        for name in self.resident:
            if not self.pins[name]:
                self._evict(name)
                return True
        return False

    def _evict(self, name: str) -> None:
        del self.resident[name]
        self.pool.remove_adapter(name)
        self.evictions += 1

    def _load(self, name: str) -> Factors:
        adapter = self.host[name]
        while True:
            try:
                flat = self.pool.place_adapter(name, adapter.numel)
                break
            except PoolFull:
                if not self.evict_one():
                    raise
        t0 = time.perf_counter()
        factors, offset = {}, 0
        table = torch.zeros(len(self.rows), 3, dtype=torch.long)  # (M, 3): A offset, Bt offset, rank
        scales = torch.zeros(len(self.rows), dtype=torch.float32)
        for module, m in adapter.modules.items():  # packed A (r, d_in) then B^T (r, d_out), module by module
            a = flat[offset:offset + m.a.numel()].view(m.a.shape)
            offset += m.a.numel()
            bt = flat[offset:offset + m.b.numel()].view(m.b.shape[::-1])
            offset += m.b.numel()
            a.copy_(m.a, non_blocking=True)
            bt.copy_(m.b.t(), non_blocking=True)
            factors[module] = Factor(a, bt.t(), m.scale, a.t(), bt)
            table[self.rows[module]] = torch.tensor([a.storage_offset(), bt.storage_offset(), m.a.shape[0]])
            scales[self.rows[module]] = m.scale
        if flat.device.type == "cuda":
            torch.cuda.current_stream().synchronize()
        self.load_seconds += time.perf_counter() - t0
        self.loads += 1
        return AdapterViews(factors, table, scales)

    def stats(self) -> dict:
        return {"registered": len(self.host), "resident": len(self.resident), "pinned": len(self.pins),
                "loads": self.loads, "hits": self.hits, "evictions": self.evictions,
                "load_seconds": round(self.load_seconds, 6), "host_bytes": self.host_bytes()}
