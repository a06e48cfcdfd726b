"""Linear probing: only the output head trains (`adapter.kind=head`), the backbone stays frozen.

The baseline every adapter paper reports (MeZO's "LP" row), and the smallest trainable set: for a
classifier the head is C x H weights + C biases. It matters most for zeroth-order training, whose
estimate's variance grows with the number of trained parameters: MeZO moves a 770-parameter MiniLM
head within a few hundred steps where full-parameter MeZO needs tens of thousands.

The artifact uses PEFT's layout (adapter_config.json + adapter_model.safetensors, keys = module
path of each head tensor) with the memtune tag peft_type "HEAD"; PEFT has no such method.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..models import head_modules
from ..recipe import AdapterConfig
from .base import ADAPTERS, AdapterMethod, set_trainable
from .peft_format import TASK_TYPES, copy_tensors, read_adapter, write_adapter


@dataclass
class HeadConfig(AdapterConfig):
    kind: str = "head"


@ADAPTERS.register("head", HeadConfig)
class HeadOnly(AdapterMethod):
    peft_type = "HEAD"

    @classmethod
    def config_from_file(cls, peft_config: dict, path: Path) -> HeadConfig:
        return HeadConfig(path=str(path))

    def attach(self, model: nn.Module) -> None:
        set_trainable(model, False)
        self.heads = sorted(head_modules(model))
        if not self.heads:
            raise ConfigError(f"adapter.kind=head: {type(model).__name__} has no output head to train")
        for name in self.heads:
            model.get_submodule(name).requires_grad_(True)

    def _tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {f"{h}.{n}": p for h in self.heads for n, p in model.get_submodule(h).named_parameters()}

    def save(self, model: nn.Module, run_dir: Path, base_name: str) -> Path:
        config = {"peft_type": self.peft_type, "task_type": TASK_TYPES.get(self.task),
                  "base_model_name_or_path": base_name, "modules_to_save": self.heads, "inference_mode": True}
        return write_adapter(Path(run_dir) / self.artifact, config, self._tensors(model))

    def load(self, model: nn.Module, path: Path) -> None:
        _, tensors = read_adapter(path)
        want = self._tensors(model)
        if set(tensors) != set(want):
            raise ModelError(f"{path}: head tensors {sorted(tensors)} do not fit the model's {sorted(want)}")
        copy_tensors(path, want, tensors)

    def merged(self, model: nn.Module) -> nn.Module:
        return model  # the head is a plain module of the model already

    def describe(self) -> dict:
        return {"modules": self.heads}
