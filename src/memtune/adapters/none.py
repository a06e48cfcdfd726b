"""No trainable part (`adapter.kind=none`): the model exactly as loaded, every weight frozen.

For using a model rather than training it: `memtune eval model=DIR` of a merged or quantized folder
(which records its storage, so no adapter has to be named), the float model `memtune quantize` starts
from. A training recipe with it stops at its first check: nothing would train.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import ModelError
from ..recipe import AdapterConfig
from .base import ADAPTERS, AdapterMethod, set_trainable


@dataclass
class NoAdapterConfig(AdapterConfig):
    kind: str = "none"


@ADAPTERS.register("none", NoAdapterConfig)
class NoAdapter(AdapterMethod):
    artifact = "model"

    def attach(self, model: nn.Module) -> None:
        set_trainable(model, False)

    def save(self, model: nn.Module, run_dir: Path, base_name: str) -> Path:
        raise ModelError("adapter.kind=none: there is nothing trained to save")

    def load(self, model: nn.Module, path: Path) -> None:
        raise ModelError(f"adapter.kind=none with adapter.path={path}: this kind loads no adapter; set "
                         f"adapter.kind to the adapter's method")

    def merged(self, model: nn.Module) -> nn.Module:
        return model
