"""MeZO (Malladi et al., NeurIPS 2023): zeroth-order SGD in place, at inference memory.

One step (Algorithm 1), for each of n seeds s_j (n-SPSA; n = `samples`, default 1):

    theta <- theta + eps z        l+ = L(theta; batch)
    theta <- theta - 2 eps z      l- = L(theta; batch)
    theta <- theta + eps z        (restored)
    g_j = (l+ - l-) / (2 eps)     a scalar: the projected gradient along z_j

then, with z_j regenerated from s_j (never stored):

    sgd       theta <- theta - lr/n * (g_j z_j + wd theta)                       for each j in turn
    momentum  m_t = beta m_{t-1} + (1 - beta) ghat_t,   theta <- theta - lr (m_t + wd theta)
    adam      m_t, v_t as Adam over ghat_t (v on its elementwise square), bias-corrected,
              theta <- theta - lr (mhat / (sqrt(vhat) + eps_adam) + wd theta)

where ghat_t = (1/n) sum_j g_j z_j. Weight decay skips tensors with fewer than 2 dimensions (biases,
norm weights), as the AdamW rule does.

Fused restore and update (`fuse_update`, sgd): the last seed's restoring +eps z and its update share
z, so they run as one pass over theta, from the -eps point theta2 = theta - eps z:

    theta <- (theta2 + eps z)(1 - a) - (lr/n) g z = theta2 (1 - a) + (eps (1 - a) - (lr/n) g) z,   a = lr/n wd

Same arithmetic in exact math, three z draws a step instead of four. With n > 1 the fused seed's update
comes first, before the other seeds' updates; that reorders the updates only, so it is used with n = 1
or without weight decay (where order does not change the result). Replay repeats the fused sequence.

What is never materialized: z for all parameters. Each trainable tensor k draws its z from a private
`torch.Generator` seeded with mix(s, k), in the model's parameter order, in slices of at most
`chunk` elements; so perturbation, restore and update each need one slice of scratch memory, and a
step's memory is the inference forward's plus that slice. Forward passes run with the model in eval
mode (no dropout) under `torch.inference_mode()`; the logged training loss is l+ (mean of l+ over
the n seeds).

Momentum and Adam state (`state:`):

    recompute (default)  keep only the last `history` steps' (seed, g) pairs (2 scalars per seed) and
                         rebuild m (and v) one tensor at a time from them each step: no per-parameter
                         memory, but `history` extra z regenerations per tensor per step. Exact while
                         t <= history; after that the moments are sums over the last `history` steps,
                         bias-corrected with the truncated weight sums (a windowed moving average).
    dense                m (momentum) or m and v (adam) as buffers: 1x (momentum) or 2x (adam) the
                         trainable parameters' bytes, one z regeneration per step, exact Adam.

Seeds are not drawn from a stateful RNG: s_{t,j} = mix(seed, t, j), so a run is reproduced from the
master seed and the per-step g values alone. `trajectory: true` writes them to
`trajectory.safetensors` (4 bytes per seed per step, under 0.1 MB for 20k steps); `replay()` applies
a saved trajectory to the base model and reproduces the trained weights.

Objectives (`objective:`): `ce` (the task's cross-entropy), `accuracy` (minimizes -accuracy), `f1`
(minimizes -macro-F1), or `module:function` called as f(outputs, batch) -> scalar to minimize, with
outputs = model(**inputs) (classification tasks with a `scores` method pass those scores as
`outputs.logits`).

Our own rule, not a library's: no package implements in-place ZO-SGD over arbitrary trainable sets;
the reference code (princeton-nlp/MeZO) seeds the global RNG and is tied to the HF Trainer.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..recipe import OptimizerConfig
from ..tasks import model_inputs
from ..seeds import mix
from .base import OPTIMIZERS, StepStats, StepTotals, UpdateRule, schedule_factor

TRAJECTORY = "trajectory.safetensors"
@dataclass
class MezoConfig(OptimizerConfig):
    kind: str = "mezo"
    lr: float = 1e-6
    eps: float = 1e-3  # perturbation scale
    samples: int = 1  # n-SPSA: seeds per step, each applied with lr/n
    variant: Literal["sgd", "momentum", "adam"] = "sgd"
    beta1: float = 0.9  # momentum coefficient (momentum), first-moment decay (adam)
    beta2: float = 0.999  # adam second-moment decay
    adam_eps: float = 1e-8
    state: Literal["recompute", "dense"] = "recompute"  # momentum/adam state, see module docstring
    history: int = 0  # recompute window in steps; 0 = until beta1^k < 0.01, at most 100
    objective: str = "ce"  # ce | accuracy | f1 | module:function
    seed: int | None = None  # master seed of the perturbations; None = train.seed
    trajectory: bool = False  # save (seed, g) per step to trajectory.safetensors
    chunk: int = 1 << 20  # z is generated in slices of at most this many elements
    fuse_update: bool = True  # sgd: the last seed's restore and update in one z pass (3 draws a step, not 4)

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if self.eps <= 0:
            raise ConfigError(f"{prefix}.eps: expected a positive perturbation scale, got {self.eps}")
        if self.samples < 1:
            raise ConfigError(f"{prefix}.samples: expected >= 1, got {self.samples}")
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ConfigError(f"{prefix}.{name}: expected a number in [0, 1), got {v}")
        if self.history < 0:
            raise ConfigError(f"{prefix}.history: expected >= 0 (0 = automatic), got {self.history}")
        if self.chunk < 1:
            raise ConfigError(f"{prefix}.chunk: expected >= 1, got {self.chunk}")
        if self.objective not in ("ce", "accuracy", "f1") and ":" not in self.objective:
            raise ConfigError(f"{prefix}.objective: expected ce, accuracy, f1 or 'module:function', "
                              f"got {self.objective!r}")

    def window(self) -> int:
        if self.history:
            return self.history
        if self.beta1 == 0:
            return 1
        return max(1, min(100, math.ceil(math.log(0.01) / math.log(self.beta1))))


# ------------------------------------------------------------------------------------------------
# z: regenerated per (seed, tensor), in slices


def local_part(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(this process's elements of p as a flat view, their offset in the whole flattened p).

    A plain tensor is all of itself. An FSDP2 shard (a DTensor placed Shard(0) on a 1-D mesh) holds
    rows [r c, r c + c) of the whole, c = ceil(D0 / W), as torch.chunk splits them (fewer, or none,
    on the last ranks)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(p, DTensor):
        return p.view(-1), 0
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise ConfigError(f"optimizer.kind=mezo: a parameter is placed {p.placements} on a {p.device_mesh.ndim}-D "
                          f"mesh; MeZO perturbs FSDP shards split on dimension 0 of a 1-D mesh only")
    local = p.to_local()
    rows = p.shape[0]
    per = -(-rows // p.device_mesh.size())
    first = min(p.device_mesh.get_local_rank() * per, rows)
    if local.shape[0] != max(0, min(per, rows - first)):
        raise ConfigError(f"optimizer.kind=mezo: a shard of a {tuple(p.shape)} parameter has {local.shape[0]} rows, "
                          f"not torch.chunk's {max(0, min(per, rows - first))}")
    return local.view(-1), first * (p.numel() // max(rows, 1))


def z_slices(p: torch.Tensor, seed: int, index: int, chunk: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """(slice of local_part(p)'s flat view, z for it) for tensor number `index` under step seed `seed`.

    z is drawn from the whole tensor's start in slices of `chunk`, so an FSDP shard gets exactly the
    one-process z of its rows (the slices before it are drawn and dropped, the ones after never drawn)."""
    flat, start = local_part(p)
    stop = start + flat.numel()
    if stop == start:
        return
    g = torch.Generator(device=flat.device)
    g.manual_seed(mix(seed, index))
    n = p.numel()
    for c0 in range(0, stop, chunk):
        c1 = min(c0 + chunk, n)
        z = torch.randn(c1 - c0, generator=g, device=flat.device, dtype=flat.dtype)
        lo, hi = max(c0, start), min(c1, stop)
        if lo < hi:
            yield slice(lo - start, hi - start), (z if (lo, hi) == (c0, c1) else z[lo - c0:hi - c0])


def full_z(p: torch.Tensor, seed: int, index: int, chunk: int) -> torch.Tensor:
    """The whole z of one (unsharded) tensor (tests and diagnostics only)."""
    return torch.cat([z for _, z in z_slices(p, seed, index, chunk)]).view_as(p)


# ------------------------------------------------------------------------------------------------
# Objectives


def _class_scores(task, model: nn.Module, batch: dict) -> torch.Tensor:
    if hasattr(task, "scores"):
        return task.scores(model, batch)
    return model(**model_inputs(batch)).logits


def class_counts(pred: torch.Tensor, gold: torch.Tensor, num_classes: int) -> list[float]:
    """[tp, fp, fn] of each class in turn, flattened (3 C floats)."""
    out = []
    for c in range(num_classes):
        out += [float(((pred == c) & (gold == c)).sum()), float(((pred == c) & (gold != c)).sum()),
                float(((pred != c) & (gold == c)).sum())]
    return out


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, num_classes: int) -> float:
    """Mean over classes present in gold or pred of 2TP / (2TP + FP + FN)."""
    return -_f1_from_counts(class_counts(pred, gold, num_classes), 0)


@dataclass
class Objective:
    """The value a step minimizes, in two parts so it can be summed over data-parallel ranks:
    `sums(model, batch)` -> sums over the batch's examples (a few floats), and
    `value(sums, targets)` -> the objective of the whole step from the sums over every rank and the
    step's target count. `summable` is False for a user function, defined on one batch only."""

    sums: Callable[[nn.Module, dict], list[float]]
    value: Callable[[list[float], int], float]
    summable: bool = True


def _f1_from_counts(counts: list[float], targets: int) -> float:
    """-(macro-F1) from per-class [tp, fp, fn] counts (classes present in gold or pred)."""
    f1s = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in zip(counts[0::3], counts[1::3], counts[2::3])
           if tp + fp + fn]
    return -sum(f1s) / max(len(f1s), 1)


def make_objective(name: str, task) -> Objective:
    classification = task.name != "causal-lm"
    if name == "ce":
        return Objective(lambda model, batch: [float(task.loss_sum(model, batch)[0])],
                         lambda s, n: s[0] / max(n, 1))
    if name in ("accuracy", "f1"):
        if not classification:
            raise ConfigError(f"optimizer.objective={name}: needs a classification task, got task={task.name}")

        def counts(model, batch):
            scores = _class_scores(task, model, batch)  # (B, C)
            pred, gold = scores.argmax(-1), batch["label"]
            if name == "accuracy":
                return [float((pred == gold).sum())]
            return class_counts(pred, gold, scores.shape[-1])
        if name == "accuracy":
            return Objective(counts, lambda s, n: -s[0] / max(n, 1))
        return Objective(counts, _f1_from_counts)
    module_name, _, fn_name = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"optimizer.objective: cannot import '{name}' ({e})") from None
    if not callable(fn):
        raise ConfigError(f"optimizer.objective: '{name}' is not callable")

    def custom(model, batch):
        if classification and hasattr(task, "scores"):
            from types import SimpleNamespace

            outputs = SimpleNamespace(logits=task.scores(model, batch))
        else:
            outputs = model(**model_inputs(batch))
        return [float(fn(outputs, batch))]
    return Objective(custom, lambda s, n: s[0], summable=False)


# ------------------------------------------------------------------------------------------------
# The rule


class _DenseState(torch.optim.Optimizer):
    """Holds dense momentum/Adam buffers so the memory tracker counts them as optimizer state."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        super().__init__(params, {})

    def step(self, closure=None):  # the update is MeZO's; this object only owns the buffers
        return None


@OPTIMIZERS.register("mezo", MezoConfig)
class Mezo(UpdateRule):
    uses_backprop = False
    optimizer_key = "dense"
    config: MezoConfig

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        c = self.config
        self.named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.named:
            raise ConfigError("optimizer.kind=mezo: the model has no trainable parameters")
        self.params = [p for _, p in self.named]
        self.seed = self.train_cfg.seed if c.seed is None else c.seed
        self.objective = make_objective(c.objective, self.task)
        if self.world.distributed and not self.objective.summable:
            raise ConfigError(f"optimizer.objective={c.objective}: a user function is defined on one batch, and "
                              f"this run splits each batch over {self.world.size} ranks; use ce, accuracy or f1 "
                              f"(sums over examples, added up over the ranks)")
        # FSDP's gathered parameters cannot be inference tensors (they are written again next forward)
        self._no_grad = torch.no_grad if self.parallel.sharded else torch.inference_mode
        self.factor = schedule_factor(self.train_cfg.schedule, self.train_cfg.warmup_steps, self.total_steps)
        self.t = 0  # steps taken
        self.history: list[tuple[int, list[float]]] = []  # (step, g per seed), newest last
        self.grads: list[list[float]] = []  # every step's g values (trajectory)
        self._dense = None
        if c.variant != "sgd" and c.state == "dense":
            self._dense = _DenseState(self.params)
            for p in self.params:
                st = self._dense.state[p]
                st["exp_avg"] = torch.zeros_like(p)  # shaped (and sharded) like p
                if c.variant == "adam":
                    st["exp_avg_sq"] = torch.zeros_like(p)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._dense

    @property
    def lr(self) -> float:
        return self.config.lr * self.factor(self.t)

    def step_seed(self, step: int, j: int) -> int:
        return mix(self.seed, step, j)

    # -- perturbation ------------------------------------------------------------------------------
    @torch.no_grad()
    def perturb(self, seed: int, scale: float) -> None:
        """theta <- theta + scale * eps * z(seed), one slice at a time (this rank's shard under FSDP)."""
        a = scale * self.config.eps
        for k, p in enumerate(self.params):
            flat, _ = local_part(p)
            for sl, z in z_slices(p, seed, k, self.config.chunk):
                flat[sl].add_(z, alpha=a)

    def sums(self, batch: dict) -> list[float]:
        """The objective's sums over this rank's batch, at the current theta."""
        with self._no_grad(), self.forward_ctx():
            return self.objective.sums(self.model, batch)

    def loss(self, batch: dict) -> float:
        """The objective on `batch` alone."""
        return self.objective.value(self.sums(batch), self.task.count(batch))

    @property
    def fused(self) -> bool:
        """Whether the last seed's restore is folded into its update (see the module docstring)."""
        c = self.config
        return c.fuse_update and c.variant == "sgd" and (c.samples == 1 or not c.weight_decay)

    def estimate(self, batch: dict, seed: int, restore: bool = True, targets: int | None = None) -> tuple[float, float]:
        """(projected gradient g, l+) along z(seed); theta is restored afterwards, or left at
        theta - eps z with `restore=False` (the fused update restores it). Across ranks, each rank's
        sums at theta + eps z and theta - eps z go in one all-reduce (ce: 2 float32, 8 bytes);
        `targets`: the step's target count over every rank."""
        eps = self.config.eps
        self.perturb(seed, +1.0)
        s_plus = self.sums(batch)
        self.perturb(seed, -2.0)
        s_minus = self.sums(batch)
        if restore:
            self.perturb(seed, +1.0)
        if self.world.distributed:
            both = self.world.all_sum(s_plus + s_minus, dtype=torch.float32)
            s_plus, s_minus = both[:len(s_plus)], both[len(s_plus):]
        n = self.task.count(batch) if targets is None else targets
        l_plus, l_minus = self.objective.value(s_plus, n), self.objective.value(s_minus, n)
        g = (l_plus - l_minus) / (2 * eps)
        # rounded to float32 so a saved trajectory (float32) replays bit-for-bit
        return float(torch.tensor(g, dtype=torch.float32)), l_plus

    # -- update ------------------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, step: int, gs: list[float], lr: float) -> None:
        """The update of step `step` with projected gradients `gs` (one per seed) at rate `lr`; when
        `fused`, theta is at the last seed's -eps point and this pass also restores it."""
        c = self.config
        n = len(gs)
        if c.variant == "sgd":
            order = [n - 1, *range(n - 1)] if self.fused else list(range(n))
            for j in order:
                g, seed = gs[j], self.step_seed(step, j)
                restore = self.fused and j == n - 1
                for k, p in enumerate(self.params):
                    decay = lr / n * c.weight_decay if c.weight_decay and p.ndim >= 2 else 0.0
                    flat, _ = local_part(p)
                    if decay:
                        flat.mul_(1 - decay)
                    alpha = -lr / n * g + (c.eps * (1 - decay) if restore else 0.0)
                    for sl, z in z_slices(p, seed, k, c.chunk):
                        flat[sl].add_(z, alpha=alpha)
            return
        self.history.append((step, list(gs)))
        del self.history[:-c.window()]
        for k, p in enumerate(self.params):
            m, v = self._moments(k, p, step, gs)  # flat, this rank's elements
            direction = m if v is None else m / (v.sqrt() + c.adam_eps)
            flat, _ = local_part(p)
            if c.weight_decay and p.ndim >= 2:
                flat.mul_(1 - lr * c.weight_decay)
            flat.add_(direction, alpha=-lr)

    def _ghat(self, k: int, p: torch.Tensor, step: int, gs: list[float]) -> torch.Tensor:
        """(1/n) sum_j g_j z_j for tensor k at step `step`, flat (this rank's elements)."""
        out = torch.zeros_like(local_part(p)[0])
        for j, g in enumerate(gs):
            for sl, z in z_slices(p, self.step_seed(step, j), k, self.config.chunk):
                out[sl].add_(z, alpha=g / len(gs))
        return out

    def _moments(self, k: int, p: torch.Tensor, step: int, gs: list[float]):
        """Bias-corrected m (and v for adam) of tensor k after step `step`, flat (this rank's elements)."""
        c = self.config
        adam = c.variant == "adam"
        t = step + 1  # steps folded in so far
        if self._dense is not None:
            st = self._dense.state[p]
            gh = self._ghat(k, p, step, gs)
            m = local_part(st["exp_avg"])[0]
            m.mul_(c.beta1).add_(gh, alpha=1 - c.beta1)
            if not adam:
                return m, None
            v = local_part(st["exp_avg_sq"])[0]
            v.mul_(c.beta2).addcmul_(gh, gh, value=1 - c.beta2)
            return m / (1 - c.beta1 ** t), v / (1 - c.beta2 ** t)
        m = torch.zeros_like(local_part(p)[0])
        v = torch.zeros_like(m) if adam else None
        for s, g_s in self.history:  # sum over the window, one z regeneration per stored seed
            gh = self._ghat(k, p, s, g_s)
            age = step - s
            m.add_(gh, alpha=(1 - c.beta1) * c.beta1 ** age)
            if adam:
                v.addcmul_(gh, gh, value=(1 - c.beta2) * c.beta2 ** age)
        if not adam:
            return m, None
        span = min(t, len(self.history))  # exact Adam while t <= window
        return m / (1 - c.beta1 ** span), v / (1 - c.beta2 ** span)

    # -- the step ----------------------------------------------------------------------------------
    def step(self, micro_batches: list[dict], totals: StepTotals | None = None) -> StepStats:
        if len(micro_batches) != 1:
            raise ConfigError("optimizer.kind=mezo: one micro-batch per step (train.grad_accum must be 1)")
        batch = micro_batches[0]
        was_training = self.model.training
        self.model.eval()  # no dropout in the two forwards, as in the reference
        try:
            gs, losses = [], []
            n = self.config.samples
            for j in range(n):
                g, l_plus = self.estimate(batch, self.step_seed(self.t, j), restore=not (self.fused and j == n - 1),
                                          targets=totals.targets if totals is not None else None)
                gs.append(g)
                losses.append(l_plus)
            self.apply(self.t, gs, self.lr)
            if self.adapter is not None:
                self.adapter.after_update(self.model, self.t, self.total_steps)
        finally:
            self.model.train(was_training)
        self.grads.append(gs)
        self.t += 1
        targets, tokens = (totals.targets, totals.tokens) if totals is not None else (
            self.task.count(batch), self.task.tokens(batch))
        return StepStats(loss=sum(losses) / len(losses), targets=targets, tokens=tokens,
                         projected_grad=sum(gs) / len(gs))

    # -- state, trajectory -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"t": self.t, "history": [[s, list(g)] for s, g in self.history], "grads": self.grads,
                "dense": self._dense.state_dict() if self._dense is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.t = state["t"]
        self.history = [(s, list(g)) for s, g in state["history"]]
        self.grads = [list(g) for g in state["grads"]]
        if self._dense is not None and state.get("dense") is not None:
            self._dense.load_state_dict(state["dense"])

    def describe(self) -> dict:
        c = self.config
        return {"variant": c.variant, "samples": c.samples, "eps": c.eps, "objective": c.objective,
                "state": c.state if c.variant != "sgd" else None,
                "history": c.window() if c.variant != "sgd" and c.state == "recompute" else None,
                "seed": self.seed, "trainable_tensors": len(self.params)}

    def save_artifacts(self, out: Path) -> dict:
        if not self.config.trajectory:
            return {}
        from safetensors.torch import save_file

        meta = {"config": self.config.__dict__, "seed": self.seed, "total_steps": self.total_steps,
                "schedule": self.train_cfg.schedule, "warmup_steps": self.train_cfg.warmup_steps,
                "params": [[n, list(p.shape)] for n, p in self.named]}
        grads = torch.tensor(self.grads, dtype=torch.float32).reshape(len(self.grads), self.config.samples)
        path = Path(out) / TRAJECTORY
        save_file({"projected_grad": grads}, str(path), metadata={"memtune_mezo": json.dumps(meta)})
        return {"trajectory": TRAJECTORY, "trajectory_bytes": path.stat().st_size}


def load_trajectory(path: str | Path) -> tuple[dict, torch.Tensor]:
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / TRAJECTORY
    if not p.is_file():
        raise ConfigError(f"{p}: no MeZO trajectory here (train with optimizer.trajectory=true)")
    with safe_open(str(p), "pt") as f:
        meta = f.metadata() or {}
        if "memtune_mezo" not in meta:
            raise ConfigError(f"{p}: not a memtune MeZO trajectory (no 'memtune_mezo' metadata)")
        return json.loads(meta["memtune_mezo"]), f.get_tensor("projected_grad")


def replay(model: nn.Module, path: str | Path, task=None, adapter=None) -> int:
    """Apply a saved trajectory to `model` (the run's base with its trainable part attached, untrained;
    `adapter`: the run's AdapterMethod, whose per-step hooks run as in training).

    Replays each step's perturb/restore round trips too (no forward passes): restoring theta after
    +eps z, -2 eps z, +eps z is exact only up to rounding, and repeating it makes the replay bit-exact
    on the same device. Returns the number of steps replayed. Parameters must match the saved names
    and shapes.
    """
    meta, grads = load_trajectory(path)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    saved = [(n, tuple(s)) for n, s in meta["params"]]
    if [(n, tuple(p.shape)) for n, p in named] != saved:
        raise ConfigError(f"{path}: trainable parameters differ from the trajectory's "
                          f"({len(named)} tensors here, {len(saved)} saved)")
    from ..recipe import TrainConfig

    cfg = MezoConfig(**{"fuse_update": False, **meta["config"]})  # trajectories before fusing: unfused
    cfg.seed = meta["seed"]
    train_cfg = TrainConfig(schedule=meta["schedule"], warmup_steps=meta["warmup_steps"], seed=meta["seed"])
    rule = Mezo(cfg, model, task or _NoTask(), train_cfg, meta["total_steps"], lambda: None, adapter=adapter)
    for step in range(grads.shape[0]):
        gs = [float(g) for g in grads[step]]
        if adapter is not None:
            adapter.before_step(model, step, rule.total_steps)
        for j in range(len(gs)):  # the perturb/restore round trips, for their rounding: bit-exact replay
            seed = rule.step_seed(step, j)
            rule.perturb(seed, +1.0)
            rule.perturb(seed, -2.0)
            if not (rule.fused and j == len(gs) - 1):  # the fused update restores the last one
                rule.perturb(seed, +1.0)
        rule.apply(step, gs, rule.config.lr * rule.factor(step))
        if adapter is not None:
            adapter.after_update(model, step, rule.total_steps)
        rule.t = step + 1
    return grads.shape[0]


class _NoTask:
    """Replay runs no forward passes; the rule only needs a task for its objective."""

    name = "replay"

    def loss_sum(self, model, batch):  # pragma: no cover - never called during replay
        raise RuntimeError("replay runs no forward passes")

    def count(self, batch):  # pragma: no cover
        return 1
