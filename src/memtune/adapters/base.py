"""The *what trains* axis: the interface every adapter method implements.

A method is one class registered in `ADAPTERS` with its typed config. The trainer only ever calls:

    method = ADAPTERS.get(kind)(config, task)
    method.attach(model)            # inject layers, set requires_grad (the trainable set)
    method.save(model, run_dir)     # final artifact: adapter/ (PEFT format) or model/ (HF weights)
    method.load(model, path)        # load such an artifact onto a freshly attached model
    method.merged(model)            # a plain transformers model with the adapter folded in

Checkpoints for resuming do not go through the method: they save every `requires_grad` tensor by
its module path, which is the complete trainable state for any method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

from torch import nn

from ..errors import ModelError
from ..recipe import AdapterConfig
from ..registry import Registry


class AdapterMethod(ABC):
    """Base class; `artifact` names the output subdirectory."""

    artifact = "adapter"
    peft_type: str | None = None  # the adapter_config.json tag this method writes and reads

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


ADAPTERS: Registry[type[AdapterMethod]] = Registry("adapter")


def set_trainable(model: nn.Module, trainable: bool) -> None:
    for p in model.parameters():
        p.requires_grad_(trainable)
