"""Adapters: the *what trains* axis. Importing this package registers every method."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import ModelError
from . import adalora, dylora, full, head, longlora, lora, none, prefix, prompt_tuning, qalora, qst, vera  # noqa: F401,E501  (registration)
from .base import ADAPTERS, AdapterMethod
from .lora import LoraLinear, disabled_adapters
from .peft_format import read_config

__all__ = ["ADAPTERS", "AdapterMethod", "LoraLinear", "disabled_adapters", "method_for_saved", "load_adapter"]


def method_for_saved(path: str | Path, task: str) -> AdapterMethod:
    """The method (with its config rebuilt from adapter_config.json) that reads the adapter at `path`."""
    peft_cfg = read_config(Path(path))
    tag = peft_cfg["peft_type"]
    for name in ADAPTERS.names():  # a method that marks its files with its own extra file comes first
        cls = ADAPTERS.get(name)
        if cls.marker_file and (Path(path) / cls.marker_file).is_file() and tag in (cls.peft_type, *cls.also_reads):
            return cls(cls.config_from_file(peft_cfg, Path(path)), task)
    for name in ADAPTERS.names():
        cls = ADAPTERS.get(name)
        if cls.peft_type == tag:
            return cls(cls.config_from_file(peft_cfg, Path(path)), task)
    known = sorted(c.peft_type for c in map(ADAPTERS.get, ADAPTERS.names()) if c.peft_type)
    raise ModelError(f"{path}: peft_type '{tag}' is not supported (memtune reads: {', '.join(known)})")


def load_adapter(model: nn.Module, path: str | Path, task: str) -> AdapterMethod:
    """Attach the adapter saved at `path` (by memtune or by PEFT) to `model` and load its weights."""
    method = method_for_saved(path, task)
    method.attach(model)
    method.load(model, Path(path))
    return method
