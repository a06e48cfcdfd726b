"""Bytes each rank moves through collectives, counted from the operators themselves.

Every collective of torch.distributed (DDP's bucket all-reduce, FSDP2's all-gathers and
reduce-scatters, memtune's own scalar sums) reaches the dispatcher as a `c10d.*` operator, so one
`TorchDispatchMode` sees them all, whatever the strategy. Per operator it records the size of the
whole collective, n bytes (all-reduce: the tensor; all-gather: the gathered output; reduce-scatter:
the full input), and the bytes a rank sends in the ring algorithm NCCL and gloo use:

    all-reduce       2 (W - 1) / W * n
    all-gather       (W - 1) / W * n
    reduce-scatter   (W - 1) / W * n
    broadcast        n (the root; counted on every rank)

Our own: torch's CommDebugMode counts operators, not bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_bytes(v) for v in x)
    return 0


@dataclass
class CommStats:
    """Totals over the windows a CommCounter was active in."""

    calls: dict[str, int] = field(default_factory=dict)  # per kind: number of collectives
    payload: dict[str, int] = field(default_factory=dict)  # per kind: summed n (bytes)
    sent: float = 0.0  # ring-algorithm bytes this rank sent

    def add(self, kind: str, n: int, world: int) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        self.payload[kind] = self.payload.get(kind, 0) + n
        factor = {"all_reduce": 2 * (world - 1) / world, "all_gather": (world - 1) / world,
                  "reduce_scatter": (world - 1) / world}.get(kind, 1.0)
        self.sent += factor * n

    def per_step(self, steps: int) -> dict:
        s = max(steps, 1)
        return {"payload_bytes": {k: v // s for k, v in sorted(self.payload.items())},
                "calls": {k: v / s for k, v in sorted(self.calls.items())},
                "sent_bytes": int(round(self.sent / s)), "steps": steps}


# c10d operator name -> (kind, which argument holds the whole collective's data)
_OPS = {"allreduce_": ("all_reduce", 0), "allreduce_coalesced_": ("all_reduce", 0),
        "_allgather_base_": ("all_gather", 0), "allgather_": ("all_gather", 0),
        "allgather_into_tensor_coalesced_": ("all_gather", 0),
        "_reduce_scatter_base_": ("reduce_scatter", 1), "reduce_scatter_": ("reduce_scatter", 1),
        "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
        "broadcast_": ("broadcast", 0), "alltoall_base_": ("all_to_all", 0)}


class CommCounter(TorchDispatchMode):
    """Context manager: adds every c10d collective run inside it to `stats`."""

    def __init__(self, stats: CommStats, world_size: int) -> None:
        super().__init__()
        self.stats, self.world = stats, world_size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ns = func.namespace if hasattr(func, "namespace") else ""
        if ns == "c10d":
            op = func._schema.name.split("::")[-1]
            kind, arg = _OPS.get(op, (op, 0))
            if len(args) > arg:
                self.stats.add(kind, _bytes(args[arg]), self.world)
        return func(*args, **(kwargs or {}))
