"""`BatchedLoraLinear`: a base linear layer plus the step's per-token adapter terms.

    y = base(x) + [token t's adapter term]        x (1, T, d_in) packed tokens of every sequence

It wraps whatever layer the base has (nn.Linear, bitsandbytes Linear4bit, memtune's INT4 layer),
calls it once for the whole batch, and reads the step's adapters from a `LoraContext` the engine
fills before each forward (no hooks are registered per call, unlike PEFT's mixed batch).
"""

from __future__ import annotations

import torch
from torch import nn

from .lora_kernels import StepLora


class LoraContext:
    """Shared by every wrapped layer of one model: the step currently running (or none)."""

    def __init__(self) -> None:
        self.step: StepLora | None = None


class BatchedLoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Module, name: str, context: LoraContext) -> None:
        super().__init__()
        self.base_layer, self.name, self.context = base_layer, name, context
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:  # the base's, for code that reads a layer's dtype or device
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # one base matmul for every token of every request
        step = self.context.step
        if step is None or not step.segments:
            return y
        flat_y, flat_x = y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1])  # (T, d_out), (T, d_in)
        step.apply(self.name, flat_x.to(flat_y.dtype), flat_y)
        return y

    def extra_repr(self) -> str:
        return f"name={self.name}"


def wrap_linears(model: nn.Module, names: list[str], context: LoraContext) -> dict[str, BatchedLoraLinear]:
    """Replace each named module by a BatchedLoraLinear around it (the explicit, PEFT-style wrap)."""
    out = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = BatchedLoraLinear(getattr(parent, child), name, context)
        setattr(parent, child, layer)
        out[name] = layer
    return out
