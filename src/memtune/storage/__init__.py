"""The *base storage* axis: how frozen base weights are kept.

A storage is applied to the loaded model before the trainable part is attached, so any adapter
wraps whatever the storage left in place (a plain Linear here; quantized layers later). Values:

    none   weights as loaded, optionally cast (`dtype: bf16` halves frozen-weight bytes)
    nf4    4-bit NormalFloat with double quantization (QLoRA), through bitsandbytes (nf4.py)
    int4   group-wise asymmetric INT4/3/2 with float zero points (QA-LoRA's base, int4.py)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..recipe import StorageConfig
from ..registry import Registry
from .bnb_layout import keep_quant_state_on_module, set_cpu_layout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class BaseStorage(ABC):
    quantized = False  # True: frozen weights are not floats (only an adapter can train over them)
    reads_int_folders = False  # True: a model saved as group-wise INT (memtune quantize) can be its base

    def __init__(self, config: StorageConfig) -> None:
        self.config = config

    def load_dtype(self) -> torch.dtype | None:
        """dtype to load pretrained weights in (None: as stored)."""
        return None

    def load_kwargs(self, keep: list[str], device: torch.device | None = None) -> dict:
        """Extra `from_pretrained` arguments that quantize while the checkpoint is read, one layer at a
        time, so loading never holds the whole model in full precision; `keep`: head module names left
        as they are; `device`: where the run trains (quantized weights are placed there as they are
        made). {} (the default): load as stored, then `apply`."""
        return {}

    @abstractmethod
    def apply(self, model: nn.Module) -> None:
        """Convert the base model's frozen weights in place (layers converted while loading are kept)."""

    def prepare(self, model: nn.Module, for_training: bool) -> None:
        """Called once the run's model is assembled, before it computes anything. Any bitsandbytes
        4-bit layer (e.g. of a folder saved 4-bit) keeps its canonical layout (see bnb_layout.py)."""
        set_cpu_layout(model, packed=False)
        keep_quant_state_on_module(model)

    def describe(self) -> dict:
        return {}


STORAGE: Registry[type[BaseStorage]] = Registry("quantize")


@dataclass
class PlainConfig(StorageConfig):
    kind: str = "none"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = as loaded (fp32 for presets)


@STORAGE.register("none", PlainConfig)
class PlainStorage(BaseStorage):
    config: PlainConfig

    def load_dtype(self) -> torch.dtype | None:
        return DTYPES.get(self.config.dtype)

    def apply(self, model: nn.Module) -> None:
        dtype = DTYPES.get(self.config.dtype)
        tensors = (*model.parameters(), *model.buffers())
        # (loaded in the dtype already: nothing to cast, and a plan's fake tensors cannot be swapped)
        if dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in tensors):
            model.to(dtype)


from . import int4, nf4  # noqa: E402,F401  (registration)
