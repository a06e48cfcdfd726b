"""How the model is held across ranks: one class per strategy, all behind the interface the trainer
and the update rules use.

    parallel.wrap(run)             wrap the assembled model (DDP, FSDP2 units); before any optimizer
    parallel.task(task)            the task as update rules see it: every forward through the root
    parallel.sync(last)            context per micro-batch: gradients are reduced only on the last one
    parallel.full_parameters(m)    context: trainable parameters whole and plain (saving artifacts)
    parallel.loss_scale            W: DDP and FSDP average gradients over ranks, and the loss is
                                   sum_r(loss_sum_r) / N_global, so each rank's loss is scaled by W

Every training and evaluation forward runs as `root(fn, *args)` = fn(model, *args), where the root
is the module DDP or FSDP2 wraps (`LossRoot`). The loss itself is then inside the wrapped forward,
so its pieces that do not go through `model.forward` (the chunked cross-entropy reads the body's
hidden states and the head's weight directly; MeZO's scores) see gathered parameters and hook into
DDP's and FSDP's backward like the rest.

Strategies:

    Single        one process: no wrapper, no collectives
    Replicated    zeroth-order rules under ddp: the whole model on every rank, no gradients and so no
                  DDP wrapper; the rule sums its two losses over the ranks (8 bytes a step)
    DataParallel  torch DDP (gradient_as_bucket_view: the gradients are views of DDP's buckets, no
                  second copy; buffers are not re-broadcast, they are deterministic)
    FullyShard    FSDP2 `fully_shard` on every layer of `distributed.wrap` and on the root. Forwards
                  without gradient (evaluation, MeZO) reshard the root afterwards: with no backward to
                  do it, the next forward would reuse parameters gathered before an in-place update
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import ContextManager

import torch
from torch import nn

from ..errors import ConfigError
from ..tasks import Task, model_inputs
from .config import DistributedConfig
from .world import World

log = logging.getLogger(__name__)


class LossRoot(nn.Module):
    """The module DDP / FSDP2 wrap: forward(fn, *args) = fn(model, *args)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn, *args):
        return fn(self.model, *args)


def _scores(task: Task):
    def scores(model: nn.Module, batch: dict) -> torch.Tensor:
        if hasattr(task, "scores"):
            return task.scores(model, batch)
        return model(**model_inputs(batch)).logits
    return scores


class RootTask(Task):
    """`task` with every forward run through the parallel root; evaluation sums over the ranks."""

    def __init__(self, task: Task, parallel: "Parallel") -> None:
        self.inner, self.parallel = task, parallel
        self.name = task.name
        self.eval_stats = task.eval_stats

    def count(self, batch: dict) -> int:
        return self.inner.count(batch)

    def tokens(self, batch: dict) -> int:
        return self.inner.tokens(batch)

    def _call(self, fn, batch: dict):
        out = self.parallel.root(fn, batch)
        if not torch.is_grad_enabled():
            self.parallel.after_forward_without_grad()
        return out

    def loss_sum(self, model: nn.Module, batch: dict):
        return self._call(self.inner.loss_sum, batch)

    def scores(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return self._call(_scores(self.inner), batch)

    def eval_sums(self, model: nn.Module, batches, forward_ctx) -> tuple[float, int, dict]:
        """This rank's sums, then their sums over the ranks. Every rank runs the same number of forwards
        (FSDP gathers in each); uncounted ones only keep the ranks in step."""
        total, count, stats = super().eval_sums(model, batches, forward_ctx)
        keys = sorted(stats)
        sums = self.parallel.world.all_sum([total, count, *(stats[k] for k in keys)])
        return sums[0], int(round(sums[1])), dict(zip(keys, sums[2:]))

    def finish_eval(self, total: float, count: int, stats: dict) -> dict:
        return self.inner.finish_eval(total, count, stats)


class Parallel:
    """One process (and the interface every strategy implements)."""

    name = "none"
    sharded = False  # parameters are DTensor shards (FSDP)
    wraps_gradients = False  # a wrapper reduces gradients (DDP, FSDP)

    def __init__(self, world: World, config: DistributedConfig) -> None:
        self.world, self.config = world, config
        self.root: nn.Module | None = None

    @property
    def loss_scale(self) -> int:
        return self.world.size if self.wraps_gradients else 1

    def wrap(self, run) -> None:
        """Wrap the run's assembled model. The run keeps the model itself (`run.model`), unwrapped."""

    def task(self, task: Task) -> Task:
        return task

    def sync(self, last: bool) -> ContextManager:
        return contextlib.nullcontext()

    def full_parameters(self, model: nn.Module) -> ContextManager:
        return contextlib.nullcontext()

    def after_forward_without_grad(self) -> None:
        pass

    def describe(self) -> dict:
        return {"strategy": self.name, "world_size": self.world.size}


class Replicated(Parallel):
    """The whole model on every rank and nothing reduced but what the update rule sums itself."""

    name = "replicated"

    def wrap(self, run) -> None:
        self.root = LossRoot(run.model)

    def task(self, task: Task) -> Task:
        return RootTask(task, self)


def _uses_find_unused(config: DistributedConfig, run) -> bool:
    if config.find_unused_parameters is not None:
        return config.find_unused_parameters
    return bool(getattr(run.method, "may_leave_parameters_unused", False))


class DataParallel(Replicated):
    name = "ddp"
    wraps_gradients = True

    def wrap(self, run) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        cuda = run.device.type == "cuda"
        # buffers are deterministic (rotary tables, position ids): synced once at init, not every forward
        buffers = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})
        self.root = DDP(LossRoot(run.model), device_ids=[run.device.index or 0] if cuda else None,
                        find_unused_parameters=_uses_find_unused(self.config, run), gradient_as_bucket_view=True,
                        **buffers)

    def sync(self, last: bool) -> ContextManager:
        return contextlib.nullcontext() if last else self.root.no_sync()

    def describe(self) -> dict:
        return {**super().describe(), "find_unused_parameters": self.root.find_unused_parameters}


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


class FullyShard(Replicated):
    name = "fsdp"
    sharded = True
    wraps_gradients = True

    def __init__(self, world: World, config: DistributedConfig, forward_only: bool = False) -> None:
        super().__init__(world, config)
        self.forward_only = forward_only
        self.units: list[str] = []

    def wrap(self, run) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        c, model = self.config, run.model
        classes = c.wrap or list(getattr(model, "_no_split_modules", None) or [])
        if not classes:
            raise ConfigError(f"distributed.wrap: {type(model).__name__} names no layer class to shard by; set "
                              f"distributed.wrap=[LayerClassName]")
        self.units = [n for n, m in model.named_modules() if type(m).__name__ in classes]
        if not self.units:
            present = sorted({type(m).__name__ for m in model.modules()})
            raise ConfigError(f"distributed.wrap: no module of {type(model).__name__} is a {', '.join(classes)} "
                              f"(its classes: {', '.join(present[:12])}{', ...' if len(present) > 12 else ''})")
        mesh = init_device_mesh(run.device.type, (self.world.size,))
        kwargs = {"mesh": mesh, "mp_policy": MixedPrecisionPolicy(param_dtype=_DTYPES[c.mixed_precision.param],
                                                                  reduce_dtype=_DTYPES[c.mixed_precision.reduce])}
        if c.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=run.device.type == "cuda")
        # forward-only rules (MeZO) have no backward to reshard in: every unit frees after its forward
        reshard = c.reshard_after_forward or self.forward_only
        for name in self.units:
            fully_shard(model.get_submodule(name), reshard_after_forward=reshard, **kwargs)
        self.root = LossRoot(model)
        fully_shard(self.root, reshard_after_forward=reshard, **kwargs)

    def sync(self, last: bool) -> ContextManager:
        @contextlib.contextmanager
        def ctx():
            self.root.set_requires_gradient_sync(last)
            try:
                yield
            finally:
                self.root.set_requires_gradient_sync(True)
        return ctx()

    def after_forward_without_grad(self) -> None:
        self.root.reshard()

    @contextlib.contextmanager
    def full_parameters(self, model: nn.Module):
        """Trainable parameters replaced by whole, plain tensors while inside (every rank gathers; each
        tensor is gathered once, tied ones too), then the shards put back."""
        from torch.distributed.tensor import DTensor

        swapped, full = [], {}
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if isinstance(p, DTensor) and p.requires_grad:
                    if id(p) not in full:
                        full[id(p)] = nn.Parameter(p.full_tensor(), requires_grad=True)
                    swapped.append((module, name, p))
                    module._parameters[name] = full[id(p)]
        try:
            yield
        finally:
            for module, name, p in swapped:
                module._parameters[name] = p

    def describe(self) -> dict:
        c = self.config
        return {**super().describe(), "units": len(self.units), "reshard_after_forward":
                c.reshard_after_forward or self.forward_only, "cpu_offload": c.cpu_offload,
                "mixed_precision": {"param": c.mixed_precision.param, "reduce": c.mixed_precision.reduce}}


def single_process() -> Parallel:
    return Parallel(World(), DistributedConfig())


def make_parallel(config: DistributedConfig | None, world: World, uses_backprop: bool) -> Parallel:
    """The strategy for this run: `config.strategy` (auto: ddp for more than one process, or what
    `accelerate launch --use_fsdp` asked for) and the update rule's kind."""
    config = config or DistributedConfig()
    strategy = resolve_strategy(config, world)
    if strategy == "none":
        return Parallel(world, config)
    if strategy == "fsdp":
        return FullyShard(world, config, forward_only=not uses_backprop)
    return DataParallel(world, config) if uses_backprop else Replicated(world, config)


def resolve_strategy(config: DistributedConfig, world: World, env=None) -> str:
    import os

    env = os.environ if env is None else env
    accel_fsdp = str(env.get("ACCELERATE_USE_FSDP", "")).lower() in ("1", "true", "yes")
    if config.strategy == "auto":
        if not world.distributed:
            return "none"
        return "fsdp" if accel_fsdp else "ddp"
    if config.strategy == "none" and world.distributed:
        raise ConfigError(f"distributed.strategy=none, but the launcher started {world.size} processes; use "
                          f"ddp or fsdp (or start one process)")
    if accel_fsdp and config.strategy == "ddp":
        raise ConfigError("distributed.strategy=ddp, but accelerate launch was given --use_fsdp; use one of them")
    if not world.distributed and config.strategy != "none":
        log.info("distributed.strategy=%s with one process: nothing to distribute", config.strategy)
        return "none"
    return config.strategy
