"""QA-LoRA (Xu et al., ICLR 2024): LoRA over a group-wise INT base that merges back into INT.

Over an `IntLinear` base with groups of g inputs (quantize.kind=int4), A acts on the input
average-pooled over each group:

    pool(x)_j = (1/g) sum_{i in group j} x_i          (..., d_in) -> (..., d_in/g)
    h = W~ x + s * B A dropout(pool(x))               A (r, d_in/g) Xavier-uniform, B (d_out, r) zero

so the update's weight, dW[o, i] = s (B A)[o, j(i)] / g, is constant within each group and folds
into the zero points exactly: zero[o, j] -= s (B A)[o, j] / (g * scale[o, j]). The merged model is a
pure group-quantized INT model with no adapter (memtune.storage.int4.save_quantized writes it).

Everything else (targets, modules_to_save, checkpoints, files) is LoRA's. The adapter files use
PEFT's LoRA layout with peft_type "QALORA", a memtune tag (PEFT's own QA-LoRA works only over GPTQ
layers), so PEFT does not read them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from .base import ADAPTERS
from .lora import LoraConfig, LoraLinear, LoraMethod, lora_layers


@dataclass
class QALoraConfig(LoraConfig):
    kind: str = "qalora"


class QALoraLinear(LoraLinear):
    """LoRA whose A reads the group-pooled input. x (..., d_in) -> (..., d_out)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        if not getattr(base_layer, "is_quantized_linear", False) or not hasattr(base_layer, "group_size"):
            raise ConfigError(f"adapter.kind=qalora: needs a group-quantized base (quantize.kind=int4), found "
                              f"{type(base_layer).__name__}")
        self.group_size = base_layer.group_size
        super().__init__(base_layer, r, alpha, dropout, rslora)
        d_pool = base_layer.in_features // self.group_size
        self.lora_A = nn.Linear(d_pool, r, bias=False, device=self.lora_B.weight.device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.lora_A.weight)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        pooled = x.to(self.lora_A.weight.dtype).unflatten(-1, (-1, self.group_size)).mean(-1)  # (..., d_in/g)
        update = self.lora_B(self.lora_A(self.lora_dropout(pooled)))  # (..., d_out)
        return y + (update * self.scaling).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s B A / g into the base's zero points (exact up to float rounding of the zeros)."""
        if self.merged:
            return
        base = self.base_layer
        c = (self.lora_B.weight @ self.lora_A.weight) * self.scaling / self.group_size  # (d_out, d_in/g)
        base.zeros.sub_(c.to(base.zeros.dtype) / base.scales)
        self.merged = True

    def unmerge(self) -> None:
        raise ModelError("qalora: a merge into the zero points is not undone; reload the adapter instead")

    def delta_weight(self) -> torch.Tensor:
        """s B A / g expanded to (d_out, d_in)."""
        c = (self.lora_B.weight @ self.lora_A.weight) * self.scaling / self.group_size
        return c.repeat_interleave(self.group_size, 1)


@ADAPTERS.register("qalora", QALoraConfig)
class QALoraMethod(LoraMethod):
    config: QALoraConfig
    peft_type = "QALORA"
    layer_cls = QALoraLinear
    merges_into_quantized = True  # `memtune merge` keeps the INT base; LoRA's merged() calls our merge()

    @classmethod
    def config_from_file(cls, peft_config: dict, path: Path) -> QALoraConfig:
        lora = LoraMethod.config_from_file({**peft_config, "peft_type": "LORA"}, path)
        return QALoraConfig(**{**lora.__dict__, "kind": "qalora"})

    def peft_config(self, base_name: str) -> dict:
        return {**super().peft_config(base_name), "peft_type": "QALORA",
                "qalora_group_size": next((m.group_size for m in self._layers.values()), None)}

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self._layers = lora_layers(model)
