"""Exact byte accounting of live tensors during a training step, by category.

Categories (the memtune summary contract; every number is in bytes, each storage counted once):

- ``parameters_trainable`` / ``parameters_frozen``: storages of the model's parameters that do / do
  not require grad (for 4-bit parameters, the codes plus their quantization constants). Tied weights share one storage and are counted once; a storage shared by a
  trainable and a frozen parameter counts as trainable.
- ``buffers``: storages of the model's buffers that are not also parameter storages.
- ``gradients``: storages of ``p.grad`` over all parameters, the most at any sample (sampled at the
  end of every backward, before every ``optimizer.step()`` and at the end of the window).
- ``optimizer``: storages of the tensors in ``optimizer.state`` (moments and the per-parameter
  ``step`` tensors), the most at any sample (after every ``optimizer.step()``, end of window).
- ``activations``: bytes saved for backward by autograd, at their peak. A storage enters when the
  first saved tensor that views it is packed and leaves when the last such saved tensor is released
  by its graph (normally during its backward, so gradient accumulation does not add up). Parameter
  and buffer storages saved by matmuls are weights, not activations, and are left out.
- ``peak``: the most bytes of live tensors at once: everything above plus every temporary, observed
  after each operator returns.
- ``cuda_max_allocated``: ``torch.cuda.max_memory_allocated`` over the windows, when the model has
  parameters on CUDA; it also includes the caching allocator's rounding and cuBLAS/kernel workspaces.

Why our own tracker: on CPU there are no allocator statistics, and process RSS is noisy and depends on
the allocator. A ``TorchDispatchMode`` sees the output of every operator below autograd and autocast,
so counting each new storage when it appears and uncounting it in a weakref callback when it is freed
gives byte counts that are exact, repeatable, and the same on every device.

Under planning's fake tensors (memory/planning.py) a storage is a `meta` storage with a size and no
data; it is counted by that size like any other, so a plan and a run are measured by this same code.
``block`` rounds every storage up to a multiple of that many bytes, as a device allocator does (the
CUDA caching allocator: 512 B), for plans of a GPU run; 1 (the default) counts exact bytes.

What it cannot see: scratch memory inside a single kernel (it is freed before the operator returns),
memory that is not a tensor (CUDA context, library workspaces), and storages that never reach
Python (created and freed inside one C++ call). Tensors alive before ``measure()`` that it was not
told about are counted from their first use as an operator input. Inside a non-reentrant gradient
checkpoint region the checkpoint's own saved-tensor hooks replace ours, so its recomputed tensors
count towards ``peak`` but not ``activations``. Under ``torch.compile`` only the compiled graph's
outputs are seen, not its intermediates.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator, Mapping, Set
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass

__all__ = ["MemoryReport", "MemoryTracker", "measure_step"]

_CATEGORIES = ("parameters_trainable", "parameters_frozen", "buffers", "gradients", "optimizer",
               "activations", "peak")


@dataclass
class MemoryReport:
    parameters_trainable: int
    parameters_frozen: int
    buffers: int
    gradients: int
    optimizer: int
    activations: int
    peak: int
    cuda_max_allocated: int | None = None

    @property
    def parameters(self) -> int:
        return self.parameters_trainable + self.parameters_frozen

    def to_dict(self) -> dict:
        out: dict[str, int | None] = {"parameters": self.parameters}
        out.update({f.name: getattr(self, f.name) for f in fields(self)})
        return out


def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Tensors inside nested lists, tuples and mappings (a batch dict, an op's arguments)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            if isinstance(item, torch.Tensor):  # the common case, without a nested generator
                yield item
            elif isinstance(item, (list, tuple, Mapping)):
                yield from _iter_tensors(item)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from _iter_tensors(item)


def _storages(t: torch.Tensor) -> list[torch.UntypedStorage]:
    """The storages that hold ``t``'s data; wrapper subclasses are unwrapped to their inner tensors."""
    if is_traceable_wrapper_subclass(t):
        inner, _ = t.__tensor_flatten__()
        # DTensor (FSDP shards) names its device mesh among its inner tensors too: tensors only
        return [st for name in inner if isinstance(x := getattr(t, name), torch.Tensor) for st in _storages(x)]
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested or functorch-batched: no plain storage
        return []
    return [st]  # meta storages too: a planned (fake) tensor's storage has its size and no data


class _Saved:
    """What the graph keeps instead of a saved tensor, so we learn when the graph lets go of it.

    It holds a detached alias: holding the tensor itself would make a reference cycle through its
    grad_fn (see ``torch.autograd.graph.saved_tensors_hooks``).
    """

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


def _unpack(saved: _Saved) -> torch.Tensor:
    # Module-level, so a graph that outlives the window does not keep the tracker alive.
    return saved.tensor


class _OpWatcher(TorchDispatchMode):
    """Registers every storage an operator reads or writes, then samples the live total."""

    def __init__(self, tracker: MemoryTracker) -> None:
        super().__init__()
        self._tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracker = self._tracker
        tracker._track_tensors(args)  # inputs alive before the window are found here
        if kwargs:
            tracker._track_tensors(kwargs)
        out = func(*args, **kwargs)
        tracker._track_tensors(out)
        if tracker._live > tracker._max["peak"]:
            tracker._note_peak(func)
        return out


class MemoryTracker:
    """Measures memory by category over one or more ``measure()`` windows (maxima over all of them)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 block: int = 1, attribute: bool = False) -> None:
        self.model = model
        self.optimizer = optimizer
        self.block = block  # bytes each storage is rounded up to (1: exact)
        # attribute: record the operator and module where the peak happens (`peak_at`)
        self._modules = _ModuleStack(model) if attribute else None
        self.peak_at: dict | None = None
        self._in_optimizer = False
        self._lock = threading.RLock()  # weakref callbacks may run on autograd's device threads
        self._max = dict.fromkeys(_CATEGORIES, 0)
        self._cuda_max: int | None = None
        self._active = False
        self._optimizer_hooks: list[Any] = []
        self._reset_window()

    # -- public API ------------------------------------------------------------------------------
    def set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        self._unhook_optimizer()
        self.optimizer = optimizer
        if self._active:
            self._hook_optimizer()

    @contextlib.contextmanager
    def measure(self, *extra_tensors: Any) -> Iterator[MemoryTracker]:
        """Measure everything run inside; ``extra_tensors`` (tensors or nested containers of them,
        such as the input batch) are counted as live from the start."""
        if self._active:
            raise RuntimeError("MemoryTracker.measure() is already active; windows cannot nest")
        self._reset_window()
        cuda_devices = sorted({p.device for p in self.model.parameters() if p.is_cuda}, key=str)
        for dev in cuda_devices:
            torch.cuda.reset_peak_memory_stats(dev)
        with contextlib.ExitStack() as stack:
            self._active = True
            stack.callback(self._close_window, cuda_devices)
            self._register_model()
            self._track_tensors(extra_tensors)
            self._sample_gradients()
            self._sample_optimizer()
            self._note_peak()
            self._hook_optimizer()
            for p in self._params:
                if p.requires_grad:
                    self._grad_hooks.append(p.register_post_accumulate_grad_hook(self._after_accumulate))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack))
            if self._modules is not None:
                stack.enter_context(self._modules)
            stack.enter_context(_OpWatcher(self))
            yield self

    def report(self) -> MemoryReport:
        """Each category's most bytes over all windows so far (zeros before the first window)."""
        with self._lock:
            return MemoryReport(**self._max, cuda_max_allocated=self._cuda_max)

    def live_bytes(self) -> int:
        """Bytes of the tensors alive right now; 0 outside a window."""
        return self._live if self._active else 0

    # -- window bookkeeping ----------------------------------------------------------------------
    def _reset_window(self) -> None:
        self._sizes: dict[int, int] = {}             # id(storage) -> bytes counted for it
        self._refs: dict[int, weakref.ref] = {}      # id(storage) -> weakref whose callback uncounts it
        self._live = 0
        self._weights: set[int] = set()              # parameter and buffer storages
        self._saved: dict[int, list[int]] = {}       # id(storage) -> [saved tensors viewing it, bytes]
        self._saved_refs: dict[int, weakref.ref] = {}
        self._saved_live = 0
        self._params: list[torch.nn.Parameter] = []
        self._resizable = False
        self._grad_hooks: list[Any] = []
        self._backward_callback_queued = False

    def _close_window(self, cuda_devices: list[torch.device]) -> None:
        for handle in self._grad_hooks:
            handle.remove()
        self._unhook_optimizer()
        self._sample_gradients()
        self._sample_optimizer()
        if cuda_devices:
            used = sum(torch.cuda.max_memory_allocated(dev) for dev in cuda_devices)
            self._cuda_max = max(self._cuda_max or 0, used)
        self._active = False
        with self._lock:
            self._reset_window()  # dropping the weakrefs also drops their callbacks

    def _hook_optimizer(self) -> None:
        if self.optimizer is not None:
            self._optimizer_hooks = [
                self.optimizer.register_step_pre_hook(lambda *_: self._before_optimizer_step()),
                self.optimizer.register_step_post_hook(lambda *_: self._after_optimizer_step()),
            ]

    def _before_optimizer_step(self) -> None:
        self._sample_gradients()
        self._in_optimizer = True

    def _after_optimizer_step(self) -> None:
        self._in_optimizer = False
        self._sample_optimizer()

    def _unhook_optimizer(self) -> None:
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks = []

    def _bump(self, category: str, value: int) -> None:
        with self._lock:
            if value > self._max[category]:
                self._max[category] = value

    # -- live storages ---------------------------------------------------------------------------
    def _track(self, st: torch.UntypedStorage) -> int:
        """Count ``st`` if it is new (or its size changed by a resize); returns its key.

        The key is the identity of the storage's Python object, which torch keeps for as long as the
        storage lives; the weakref callback removes the key while the object is being freed, so an
        address or id reused later is always seen as a new storage.
        """
        key = id(st)
        nbytes = self._size(st)
        with self._lock:
            old = self._sizes.get(key)
            if old is None:
                self._refs[key] = weakref.ref(st, partial(self._release, key))
                self._sizes[key] = nbytes
                self._live += nbytes
            elif old != nbytes:
                self._sizes[key] = nbytes
                self._live += nbytes - old
        return key

    def _size(self, st: torch.UntypedStorage) -> int:
        n, b = st.nbytes(), self.block
        return n if b == 1 else -(-n // b) * b

    def _recount(self) -> None:
        """Re-read every live storage's size. FSDP2 frees a gathered parameter with
        `untyped_storage().resize_(0)`, which is not an operator (no dispatch sees it): without this,
        every layer's gathered weights would count as live until the layer is gathered again."""
        for key, ref in list(self._refs.items()):
            st = ref()
            if st is None:
                continue
            n = self._size(st)
            old = self._sizes.get(key)
            if old is not None and n != old:
                self._sizes[key] = n
                self._live += n - old
                entry = self._saved.get(key)
                if entry is not None:
                    self._saved_live += n - entry[1]
                    entry[1] = n

    def _release(self, key: int, _ref: weakref.ref) -> None:
        with self._lock:
            self._refs.pop(key, None)
            self._live -= self._sizes.pop(key, 0)

    def _track_tensors(self, obj: Any) -> None:
        for t in _iter_tensors(obj):
            for st in _storages(t):
                self._track(st)

    def _note_peak(self, func=None) -> None:
        with self._lock:
            if self._live <= self._max["peak"]:
                return
            if self._resizable:  # a storage may have shrunk without an operator: recount before a new peak
                self._recount()
                if self._live <= self._max["peak"]:
                    return
            self._max["peak"] = self._live
        if self._modules is not None:
            self.peak_at = {"op": str(func) if func is not None else "(start of the step)", **self._where()}

    def _where(self) -> dict:
        if self._in_optimizer:
            return {"phase": "optimizer step", "module": type(self.optimizer).__name__}
        return self._modules.where()

    def _unique_bytes(self, tensors: Any, exclude: Set[int] = frozenset()) -> tuple[int, set[int]]:
        """Bytes of the distinct storages behind ``tensors`` (registering them as live)."""
        keys: set[int] = set()
        total = 0
        for t in _iter_tensors(tensors):
            for st in _storages(t):
                key = self._track(st)
                if key not in keys and key not in exclude:
                    keys.add(key)
                    total += self._size(st)
        return total, keys

    def _register_model(self) -> None:
        self._params = list(self.model.parameters())
        trainable, t_keys = self._unique_bytes([p for p in self._params if p.requires_grad])
        frozen_tensors = [p for p in self._params if not p.requires_grad]
        frozen_tensors += [t for p in frozen_tensors for t in _quantization_constants(p)]
        frozen, f_keys = self._unique_bytes(frozen_tensors, t_keys)
        buffers, b_keys = self._unique_bytes(list(self.model.buffers()), t_keys | f_keys)
        self._weights = t_keys | f_keys | b_keys
        # sharded (DTensor) parameters: FSDP2, which resizes storages outside the dispatcher
        self._resizable = any(is_traceable_wrapper_subclass(p) for p in self._params)
        self._bump("parameters_trainable", trainable)
        self._bump("parameters_frozen", frozen)
        self._bump("buffers", buffers)

    # -- gradients and optimizer state -----------------------------------------------------------
    def _sample_gradients(self) -> None:
        self._bump("gradients", self._unique_bytes([p.grad for p in self._params if p.grad is not None])[0])

    def _sample_optimizer(self) -> None:
        if self.optimizer is not None:
            self._bump("optimizer", self._unique_bytes(list(self.optimizer.state.values()))[0])

    def _after_accumulate(self, _param: torch.Tensor) -> None:
        # Sample once per backward, after every .grad of this backward has been accumulated.
        if not self._backward_callback_queued:
            self._backward_callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._backward_callback_queued = False
        self._sample_gradients()

    # -- activations -----------------------------------------------------------------------------
    def _pack(self, tensor: torch.Tensor) -> _Saved:
        saved = _Saved(tensor.detach())
        keys = []
        for st in _storages(tensor):
            key = self._track(st)
            if key in self._weights:
                continue
            keys.append(key)
            with self._lock:
                entry = self._saved.get(key)
                if entry is None:
                    self._saved[key] = [1, self._size(st)]
                    self._saved_live += self._size(st)
                else:
                    entry[0] += 1
        if keys:
            ref = weakref.ref(saved, partial(self._unsave, keys))
            self._saved_refs[id(ref)] = ref
            if self._resizable and self._saved_live > self._max["activations"]:
                with self._lock:
                    self._recount()
            self._bump("activations", self._saved_live)
        return saved

    def _unsave(self, keys: list[int], ref: weakref.ref) -> None:
        with self._lock:
            self._saved_refs.pop(id(ref), None)
            for key in keys:
                entry = self._saved.get(key)
                if entry is None:
                    continue
                entry[0] -= 1
                if entry[0] == 0:
                    del self._saved[key]
                    self._saved_live -= entry[1]


class _ModuleStack:
    """Which of the model's modules is running, for `peak_at`: in forward the innermost module whose
    forward has begun and not returned; in backward the module whose forward made the autograd node
    being run (each module's nodes are tagged in `Node.metadata` as its forward returns, innermost
    first). It holds no tensor (torch's ModuleTracker keeps tensors of recomputed checkpoint regions
    alive through its grad hooks, which would change what is measured)."""

    KEY = "memtune.module"

    def __init__(self, model: torch.nn.Module) -> None:
        self.names = {id(m): n or type(model).__name__ for n, m in model.named_modules()}
        self.stack: list[str | None] = []
        self.handles: list[Any] = []

    def __enter__(self) -> _ModuleStack:
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

        self.stack = []
        self.handles = [register_module_forward_pre_hook(self._enter),
                        register_module_forward_hook(self._leave, always_call=True)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _enter(self, module, args) -> None:
        self.stack.append(self.names.get(id(module)))

    def _leave(self, module, args, output) -> None:
        name = self.stack.pop() if self.stack else None
        if name is None:
            return
        todo = [t.grad_fn for t in _iter_tensors(output) if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or self.KEY in node.metadata or type(node).__name__ == "AccumulateGrad":
                continue
            node.metadata[self.KEY] = name
            todo.extend(fn for fn, _ in node.next_functions)

    def where(self) -> dict:
        node = torch._C._current_autograd_node()
        if node is not None:
            return {"phase": "backward", "module": node.metadata.get(self.KEY, "(outside any module)")}
        inside = [n for n in self.stack if n is not None]
        return {"phase": "forward", "module": inside[-1] if inside else "(outside any module)"}


def _quantization_constants(p: torch.Tensor) -> list[torch.Tensor]:
    """Tensors a quantized parameter carries beside its codes (bitsandbytes' QuantState: absmax,
    the code table, and the nested state of double quantization); they count as frozen weights."""
    out, st = [], getattr(p, "quant_state", None)
    while st is not None:
        out += [t for t in (getattr(st, "absmax", None), getattr(st, "code", None), getattr(st, "offset", None))
                if isinstance(t, torch.Tensor)]
        st = getattr(st, "state2", None)
    return out


def measure_step(model: torch.nn.Module, fn: Callable[[], Any],
                 optimizer: torch.optim.Optimizer | None = None) -> MemoryReport:
    """Run ``fn()`` once under a fresh tracker and return what it measured."""
    tracker = MemoryTracker(model, optimizer)
    with tracker.measure():
        fn()
    return tracker.report()
