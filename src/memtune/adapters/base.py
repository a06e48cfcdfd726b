"""The *what trains* axis: the interface every adapter method implements.

A method is one class registered in `ADAPTERS` with its typed config. The trainer only ever calls:

    method = ADAPTERS.get(kind)(config, task)
    method.attach(model)            # inject layers, set requires_grad (the trainable set)
    method.save(model, run_dir)     # final artifact: adapter/ (PEFT format) or model/ (HF weights)
    method.load(model, path)        # load such an artifact onto a freshly attached model
    method.merged(model)            # a plain transformers model with the adapter folded in

and, around every optimizer step, the hooks below (no-ops unless a method needs them):

    method.before_step(model, step, total)   # e.g. DyLoRA samples this step's rank
    method.regularizer(model)                # a term the backprop rule adds to the loss (AdaLoRA)
    method.after_update(model, step, total)  # after every rule's update (backprop: gradients still set)

Checkpoints for resuming save every `requires_grad` tensor by its module path, plus whatever
`method.state_dict()` returns (state that is not a trainable tensor: importance averages, masks).
"""

from __future__ import annotations

from abc import ABC, ABCMeta, abstractmethod
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, MemtuneError, ModelError
from ..models import CLASSIFICATION, head_modules
from ..recipe import AdapterConfig
from ..registry import Registry


class AdapterMethod(ABC):
    """Base class; `artifact` names the output subdirectory."""

    artifact = "adapter"
    peft_type: str | None = None  # the adapter_config.json tag this method writes and reads
    also_reads: tuple[str, ...] = ()  # other tags whose files this method loads (DyLoRA: a truncated LORA)
    recipe_fields: tuple[str, ...] = ()  # config fields a loaded file does not decide (DyLoRA: eval rank)
    marker_file: str | None = None  # a file beside adapter_config.json that marks this method's adapters

    @classmethod
    def config_from_file(cls, peft_config: dict, path: Path) -> AdapterConfig:
        """The typed config equivalent to a saved adapter_config.json (methods with files override)."""
        raise ModelError(f"{path}: {cls.__name__} cannot read adapter files")

    def __init__(self, config: AdapterConfig, task: str) -> None:
        self.config = config
        self.task = task

    @abstractmethod
    def attach(self, model: nn.Module) -> None:
        ...

    @abstractmethod
    def save(self, model: nn.Module, run_dir: Path, base_name: str) -> Path:
        ...

    @abstractmethod
    def load(self, model: nn.Module, path: Path) -> None:
        ...

    @abstractmethod
    def merged(self, model: nn.Module) -> nn.Module:
        ...

    def describe(self) -> dict:
        """Extra facts for summary.json (e.g. which modules were adapted)."""
        return {}

    def _modules_to_save(self, model: nn.Module) -> list[str]:
        """Modules trained in full next to the adapter (`adapter.modules_to_save`). Names match exactly
        or as a '.'-suffix, like PEFT; None = the head for classification. PEFT's SEQ_CLS default lists
        both 'classifier' and 'score', so names absent from the model are skipped unless none is found."""
        wanted = getattr(self.config, "modules_to_save", None)
        if wanted is None:
            return sorted(head_modules(model)) if self.task == CLASSIFICATION else []
        names = [n for n, _ in model.named_modules() if n]
        found = sorted({n for n in names for w in wanted if n == w or n.endswith("." + w)})
        found = [n for n in found if not any(n.startswith(o + ".") for o in found)]  # outermost only
        if wanted and not found:
            raise ConfigError(f"adapter.modules_to_save: {wanted} matches no module of {type(model).__name__}")
        return found

    def disabled(self, model: nn.Module):
        """Context manager: run the base model with this adapter switched off (methods that do not
        wrap layers, e.g. virtual tokens, override it)."""
        return disabled_adapters(model)

    # -- per-step hooks, called by the loop and the update rules for every method ----------------
    needs_gradients = False  # True: a hook reads gradients, so zeroth-order rules cannot drive it
    # set by the update rule that drives the method: False for zeroth-order rules, which perturb and
    # move every trainable tensor whole (no gradients, so no detach keeps a part still)
    rule_uses_backprop = True

    def before_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Before optimizer step `step` (0-based), ahead of its forward passes."""

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """A scalar added to the loss of every backprop step (None: nothing)."""
        return None

    def after_update(self, model: nn.Module, step: int, total_steps: int) -> None:
        """After the optimizer applied step `step`; gradients are still set (backprop rules)."""

    def state_dict(self) -> dict:
        """Method state that checkpoints must keep besides the trainable tensors."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""


ADAPTERS: Registry[type[AdapterMethod]] = Registry("adapter")


class DeltaLayer(nn.Module, metaclass=ABCMeta):
    """An adapter layer whose update is a weight delta: it wraps `base_layer` and defines
    `delta_weight()` (laid out like the base weight), so merging is W += dW and unmerging W -= dW."""

    merged: bool = False

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """dW, laid out like the base layer's weight."""

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            w = self.base_layer.weight
            if not w.is_floating_point():
                raise MemtuneError(f"merge: the base layer is quantized ({type(self.base_layer).__name__}); "
                                   f"dequantize the base first (memtune merge does)")
            w.add_(self.delta_weight().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.sub_(self.delta_weight().to(w.dtype))
            self.merged = False


class disabled_adapters:
    """Context: run the base model with every adapter layer switched off. An adapter layer wraps its
    `base_layer` and skips its own branch while its `disabled` flag is set (LoRA and its family)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if hasattr(m, "base_layer") and isinstance(
            getattr(m, "disabled", None), bool)]

    def __enter__(self):
        for m in self.layers:
            m.disabled = True

    def __exit__(self, *exc):
        for m in self.layers:
            m.disabled = False


def set_trainable(model: nn.Module, trainable: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(trainable)
