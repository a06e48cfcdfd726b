"""Wires the registries into the recipe parser and holds the rules about combining axes."""

from __future__ import annotations

from . import recipe as _recipe
from .adapters import ADAPTERS
from .errors import ConfigError
from .gradient import OPTIMIZERS
from .storage import STORAGE

_recipe.POLYMORPHIC.update({
    "quantize": (STORAGE, _recipe.StorageConfig),
    "adapter": (ADAPTERS, _recipe.AdapterConfig),
    "optimizer": (OPTIMIZERS, _recipe.OptimizerConfig),
})


def check_combination(r: "_recipe.Recipe") -> None:
    """Reject combinations of axis values that cannot work, saying why."""
    if r.train.precision == "bf16" and getattr(r.quantize, "dtype", "auto") == "fp16":
        raise ConfigError("train.precision=bf16 with quantize.dtype=fp16: pick one half-precision type")
