"""Running a recipe's own training step on tensors that have shapes and no data (for `memtune plan`).

Under torch's `FakeTensorMode` every operator computes only its output's shape, dtype and strides: a
70B model builds and steps at full depth in seconds with no memory allocated, and the memory tracker
(memory/tracker.py, which counts a fake tensor's storage by its size like any other) sees the same
storages a real run creates. What fake tensors cannot do is give values, and a training step does
read a few: lengths and label positions of the batch, TokenTune's seeded token choice, counts of
targets, a boolean mask used as an index. Those values all come from the batch, never from the
weights. So `PlanningMode`, a dispatch mode entered inside `FakeTensorMode`, decides per operator:

1. **Real** when none of its tensor inputs is fake (or a meta tensor), and, for a factory
   operator without tensor inputs, when its output has at most `REAL_FACTORY_NUMEL` elements or is
   asked for on `meta` (which allocates nothing). The
   batch stays a real CPU tensor, and everything computed from it alone is exact, so Python control
   flow on it takes the branches the real run takes. Big factory outputs (a weight-shaped MeZO
   perturbation, an optimizer buffer) stay fake.
2. **Fake** otherwise. A real boolean index or mask among the inputs is first turned into the integer
   indices torch itself would compute (`aten.index` / `index_put` with a mask), so the output shape is
   known. A real `meta` tensor among the inputs (bitsandbytes' `Params4bit` cannot hold a FakeTensor,
   bitsandbytes#697, so 4-bit weights are built on `meta`) is viewed as a fake CPU tensor sharing its
   storage.
3. A scalar read of a fake or meta tensor (`.item()`, `float(loss)`, `bool(t)`) returns 0 / 0.0 /
   False: losses and norms the step only logs. A step whose control flow depends on a weight-derived
   value would plan the branch taken by 0; no memtune step does (tests compare plans with runs).
4. An operator whose output shape depends on fake values (`nonzero` of an activation, as in
   mixture-of-experts routing) cannot be planned: `PlanningError` names it.

Why our own mode rather than torch's `propagate_real_tensors`: that runs every operator for real as
well, which allocates the memory we are planning. What this cannot see is the same as the tracker's
(kernel scratch memory, non-tensor memory) plus anything computed by a kernel with no fake
implementation (reported by torch as an error, turned into `PlanningError`).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch._subclasses.fake_tensor import (DataDependentOutputException, DynamicOutputShapeException, FakeTensor,
                                           FakeTensorMode, UnsupportedOperatorException, unset_fake_temporarily)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from ..errors import MemtuneError

__all__ = ["PlanningError", "PlanningMode", "planning", "is_planning", "is_fake", "weightless_like", "settle"]

REAL_FACTORY_NUMEL = 1 << 16  # factory outputs up to this many elements are computed for real (batch-sized)

_aten = torch.ops.aten
_MASK_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default,
                   _aten._unsafe_index_put.default, _aten._index_put_impl_.default}
_SCALAR_READS = {_aten._local_scalar_dense.default, _aten.item.default}

_active: list[FakeTensorMode] = []


class PlanningError(MemtuneError):
    """A step that cannot run on shapes alone (an operator needs tensor values)."""


def is_fake(t: object) -> bool:
    return isinstance(t, FakeTensor) or (isinstance(t, torch.Tensor) and t.device.type == "meta")


def is_planning() -> bool:
    return bool(_active)


def weightless_like(t: torch.Tensor) -> torch.Tensor:
    """A real `meta` tensor of `t`'s shape and dtype: what libraries that reject FakeTensors
    (bitsandbytes' Params4bit) are given while planning. Outside planning, `t` itself."""
    if not is_planning():
        return t
    with unset_fake_temporarily():
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def settle(model: torch.nn.Module) -> None:
    """Put every plain parameter and buffer left on `meta` onto the planning CPU (a FakeTensor sharing
    its storage). Adapters create their weights on the device of the layer they wrap, which is `meta`
    for a 4-bit layer; a trainable weight must be on the device its fake gradients are computed on.
    bitsandbytes' own tensors (Params4bit) stay on meta. Outside planning, nothing happens."""
    if not is_planning():
        return
    mode, done = _active[-1], {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or t.device.type != "meta" or isinstance(t, FakeTensor) or \
                        type(t) not in (torch.nn.Parameter, torch.Tensor):
                    continue
                if id(t) not in done:
                    fake = FakeTensor(mode, t.data, torch.device("cpu"))
                    done[id(t)] = torch.nn.Parameter(fake, t.requires_grad) if isinstance(t, torch.nn.Parameter) \
                        else fake
                table[name] = done[id(t)]


def _as_fake(mode: FakeTensorMode, t: object) -> object:
    if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) and t.device.type == "meta":
        return FakeTensor(mode, t, torch.device("cpu"))  # shares t's storage: counted once
    return t


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among an operator's arguments (top level and inside lists: cat, index, foreach)."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def _mask_to_indices(indices: list) -> list:
    """A boolean index is its nonzero positions, one index tensor per mask dimension (torch's rule)."""
    out = []
    for i in indices:
        if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) and i.dim() > 0 and not is_fake(i):
            with unset_fake_temporarily():
                out.extend(i.nonzero().unbind(1))
        else:
            out.append(i)
    return out


class PlanningMode(TorchDispatchMode):
    """Real for batch-derived operators, fake for everything that touches weights (module docstring)."""

    def __init__(self, fake: FakeTensorMode) -> None:
        super().__init__()
        self.fake = fake

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = _tensors(args, kwargs)
        if func in _SCALAR_READS and is_fake(args[0]):
            t = args[0]
            return False if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)
        on_meta = not tensors and str(kwargs.get("device", "")) == "meta"  # (a meta factory allocates nothing)
        if on_meta or (tensors and not any(isinstance(t, FakeTensor) for t in tensors)):
            with unset_fake_temporarily():  # real CPU tensors, or real meta tensors among themselves
                return func(*args, **kwargs)
        if func in _MASK_INDEX_OPS:
            args = (args[0], _mask_to_indices(args[1]), *args[2:])
        if any(t.device.type == "meta" and not isinstance(t, FakeTensor) for t in tensors):
            args, kwargs = tree_map(lambda a: _as_fake(self.fake, a), (args, kwargs))
        try:
            out = func(*args, **kwargs)
        except (DynamicOutputShapeException, DataDependentOutputException) as e:
            raise PlanningError(f"plan: operator {func} needs tensor values (its result depends on the "
                                f"weights' numbers), which a plan does not have") from e
        except UnsupportedOperatorException as e:
            raise PlanningError(f"plan: operator {func} has no shape-only (fake) implementation") from e
        if not tensors and isinstance(out, torch.Tensor) and out.numel() <= REAL_FACTORY_NUMEL:
            with unset_fake_temporarily():  # a small factory: its values may decide control flow
                return func(*args, **kwargs)
        return out


@contextlib.contextmanager
def planning() -> Iterator[FakeTensorMode]:
    """Everything inside builds and runs on shapes only (see the module docstring)."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake, PlanningMode(fake):
        _active.append(fake)
        try:
            yield fake
        finally:
            _active.pop()
