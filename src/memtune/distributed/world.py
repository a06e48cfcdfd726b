"""Which process this is, from the launcher's environment, and the few collectives memtune itself calls.

There is no launcher of memtune's own. `torchrun` (and `accelerate launch --multi_gpu`, which runs
torchrun's elastic agent) set, per process:

    WORLD_SIZE  processes in the job        RANK        this process's index in the job
    LOCAL_WORLD_SIZE  processes on its node LOCAL_RANK  its index on the node (its GPU)
    MASTER_ADDR, MASTER_PORT                where the ranks meet (init_process_group's env:// method)

A job is distributed exactly when WORLD_SIZE > 1. Launchers that start several copies of a
command *without* those variables (`mpirun`, `srun` directly, ...) would make each copy train the
whole run alone; that is detected from their own variables and stopped with the fix, before any
model is loaded. `accelerate launch --cpu --num_processes N` starts a single process (accelerate's
multi-CPU mode needs an MPI hostfile), which is an ordinary one-process run.

memtune's own collectives are tiny: sums of a few scalars (losses, eval totals) and per-rank memory
figures. They run over CPU tensors (gloo, present in every torch build); memtune.distributed.comm
counts their bytes with everyone else's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from ..errors import ConfigError, MemtuneError

# launchers that start N copies of a command, with the variable that holds N
FOREIGN_LAUNCHERS = (("OMPI_COMM_WORLD_SIZE", "mpirun (Open MPI)"), ("PMI_SIZE", "an MPI/PMI launcher"),
                     ("PMIX_SIZE", "a PMIx launcher"), ("MV2_COMM_WORLD_SIZE", "mpirun (MVAPICH)"))
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class World:
    """This process's place in the job. The default is a one-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    initialized: bool = False  # whether this object started the process group (and must end it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, items):
        """This rank's contiguous part of `items` (the parts of W ranks differ in length by at most 1)."""
        n = len(items)
        return items[n * self.rank // self.size:n * (self.rank + 1) // self.size]

    # -- collectives ---------------------------------------------------------------------------
    def all_sum(self, values: list[float], dtype: torch.dtype = torch.float64) -> list[float]:
        """Element-wise sum of `values` over the ranks (identity in one process)."""
        if not self.distributed:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor(values, dtype=dtype)
        dist.all_reduce(t)
        return [float(v) for v in t]

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's `values` (same length on each rank), in rank order."""
        if not self.distributed:
            return [list(values)]
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.int64)
        out = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(out, t)
        return [[int(v) for v in o] for o in out]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.initialized = False


def _int_env(env, name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise MemtuneError(f"environment variable {name}={value!r}: expected an integer (set by the "
                           f"launcher, e.g. torchrun)") from None


def launcher_world(env=None) -> World:
    """The World the launcher's environment describes, without starting anything; raises a clear error
    for a launch that would make N processes each train alone."""
    env = os.environ if env is None else env
    size = _int_env(env, "WORLD_SIZE")
    if size is None or size == 1:
        for var, who in FOREIGN_LAUNCHERS:
            n = _int_env(env, var)
            if n is not None and n > 1:
                raise MemtuneError(f"this process is one of {n} started by {who} ({var}={n}), but the torchrun "
                                   f"variables (WORLD_SIZE, RANK, MASTER_ADDR, ...) are not set, so each process "
                                   f"would train the whole run alone. Start memtune with torchrun on each node "
                                   f"(torchrun --nnodes ... --nproc_per_node ... -m memtune train RECIPE), or "
                                   f"with accelerate launch --multi_gpu")
        local = _int_env(env, "LOCAL_WORLD_SIZE")
        if local is not None and local > 1:
            raise MemtuneError(f"LOCAL_WORLD_SIZE={local} but WORLD_SIZE={env.get('WORLD_SIZE')}: the launcher "
                               f"started {local} processes on this node that do not know of each other")
        return World()
    if size < 1:
        raise MemtuneError(f"environment variable WORLD_SIZE={size}: expected a positive integer")
    missing = [v for v in TORCHRUN_VARS if env.get(v) in (None, "")]
    if missing:
        raise MemtuneError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start memtune with torchrun "
                           f"(or accelerate launch), which sets all of them")
    rank, local_rank = _int_env(env, "RANK"), _int_env(env, "LOCAL_RANK")
    if not 0 <= rank < size:
        raise MemtuneError(f"RANK={rank} is outside WORLD_SIZE={size}")
    return World(rank=rank, size=size, local_rank=local_rank, local_size=_int_env(env, "LOCAL_WORLD_SIZE") or 1)


def backend_for(spec: str, cuda: bool) -> str:
    """The process-group backend: gloo for CPU tensors always (memtune's scalars, CPU training), plus
    nccl for CUDA tensors on GPU runs."""
    if spec == "gloo" or (spec == "auto" and not cuda):
        return "gloo"
    if not cuda:
        raise ConfigError("distributed.backend=nccl: needs CUDA, which this process does not have")
    return "cpu:gloo,cuda:nccl"


def start(world: World, backend: str, timeout_s: int, cuda: bool) -> World:
    """Join the process group the launcher described (env:// rendezvous); checks that the group really
    has WORLD_SIZE members."""
    if not world.distributed:
        return world
    import torch.distributed as dist

    if cuda:
        if torch.cuda.device_count() <= world.local_rank:
            raise MemtuneError(f"LOCAL_RANK={world.local_rank} but this node has {torch.cuda.device_count()} "
                               f"GPUs: start at most one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend_for(backend, cuda), timeout=timedelta(seconds=timeout_s))
        world.initialized = True
    if dist.get_world_size() != world.size or dist.get_rank() != world.rank:
        raise MemtuneError(f"the process group has {dist.get_world_size()} members (this is rank "
                           f"{dist.get_rank()}), but the launcher set WORLD_SIZE={world.size}, RANK={world.rank}")
    return world
