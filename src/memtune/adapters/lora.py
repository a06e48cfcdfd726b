"""LoRA (Hu et al., ICLR 2022, arXiv 2106.09685).

    h = W0 x + s * B A dropout(x)          s = alpha / r   (rsLoRA: alpha / sqrt(r))

            x ──► [ W0 (frozen, any storage) ] ──────────────┐
            │                                                 (+) ──► h
            └─► dropout ─► A (r × d_in) ─► B (d_out × r) ─► ×s ┘

A is Kaiming-uniform (a = sqrt(5), as nn.Linear and PEFT), B is zero, so the adapted model equals the
base at step 0. `LoraLinear` wraps whatever linear layer it adapts and calls it, so the base may be
plain, bf16 or quantized. Files use PEFT's layout and key names (`<module>.lora_A.weight`), so
`peft.PeftModel.from_pretrained` loads our adapters and we load PEFT's.

For classification the output head is new and must train; as PEFT does for SEQ_CLS, it is trained
in full and saved under its plain path (`modules_to_save`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..recipe import AdapterConfig
from .base import ADAPTERS, AdapterMethod, DeltaLayer, disabled_adapters, set_trainable  # noqa: F401  (re-export)
from .lora_kernel import fusable, fused_lora
from .peft_format import TASK_TYPES, copy_tensors, read_adapter, write_adapter
from .targets import match_targets, set_submodule


@dataclass
class LoraConfig(AdapterConfig):
    kind: str = "lora"
    r: int = 8  # rank (§4.1)
    alpha: float = 16.0  # scale numerator: s = alpha / r
    dropout: float = 0.0  # on the adapter's input only
    targets: list[str] = field(default_factory=lambda: ["all-linear"])  # names, suffixes, or all-linear
    rslora: bool = False  # s = alpha / sqrt(r) (Kalajdzievski 2023)
    modules_to_save: list[str] | None = None  # trained in full; None = the head for classification
    rank_pattern: dict[str, int] | None = None  # per-module r, PEFT's matching: regex (.*\.)?KEY$
    alpha_pattern: dict[str, float] | None = None  # per-module alpha, same matching

    def check(self, prefix: str) -> None:
        if self.r < 1:
            raise ConfigError(f"{prefix}.r: expected a rank >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout: expected 0 <= dropout < 1, got {self.dropout}")
        if not self.targets:
            raise ConfigError(f"{prefix}.targets: expected module names or all-linear, got an empty list")


def _pattern_value(pattern: dict | None, name: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key with re.match(rf"(.*\.)?{key}$", name)."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?{key}$", name):
            return value
    return default


def lora_scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoraLinear(DeltaLayer):
    """A linear layer plus a low-rank update. Shapes: x (..., d_in) -> (..., d_out)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        # GPT-2's Conv1D stores its weight (d_in, d_out) with sizes nx, nf; nn.Linear (d_out, d_in)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        if self.fan_in_fan_out:
            d_in, d_out = base_layer.nx, base_layer.nf
        else:
            d_in, d_out = base_layer.in_features, base_layer.out_features
        w = base_layer.weight
        # adapters train in fp32 over a bf16/fp16 or quantized base; over an fp32/fp64 base, in its dtype
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.lora_A = nn.Linear(d_in, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r, d_out, bias=False, device=w.device, dtype=dtype)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = lora_scale(alpha, r, rslora)
        self.merged = False
        self.disabled = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.merged or self.disabled) and fusable(self, x):  # training over a plain base: one node
            return fused_lora(self, x)
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        a = self.lora_A.weight
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))  # (..., r) -> (..., d_out)
        if not torch.is_grad_enabled():  # inference (eval, MeZO): no extra output-sized temporaries
            return y.add_(update.to(y.dtype), alpha=self.scaling)
        return y + (update * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """s * B @ A, laid out like the base weight ((d_in, d_out) for Conv1D)."""
        delta = (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (d_out, d_in)
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}"


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


@ADAPTERS.register("lora", LoraConfig)
class LoraMethod(AdapterMethod):
    config: LoraConfig
    peft_type = "LORA"
    layer_cls = LoraLinear  # the layer injected at each target (QA-LoRA substitutes its own)

    @classmethod
    def config_from_file(cls, peft_config: dict, path: Path) -> LoraConfig:
        return config_from_peft(peft_config, path)

    def __init__(self, config: LoraConfig, task: str) -> None:
        super().__init__(config, task)
        self.targets: list[str] = []
        self.saved_modules: list[str] = []

    def attach(self, model: nn.Module) -> None:
        cfg = self.config
        set_trainable(model, False)
        self.saved_modules = self._modules_to_save(model)
        self.targets = [t for t in match_targets(model, cfg.targets)
                        if not any(t == s or t.startswith(s + ".") for s in self.saved_modules)]
        for name in self.targets:
            r = int(_pattern_value(cfg.rank_pattern, name, cfg.r))
            alpha = float(_pattern_value(cfg.alpha_pattern, name, cfg.alpha))
            layer = self.layer_cls(model.get_submodule(name), r, alpha, cfg.dropout, cfg.rslora)
            self._fan_in_fan_out = layer.fan_in_fan_out
            set_submodule(model, name, layer)
        for name in self.saved_modules:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)

    # -- files -------------------------------------------------------------------------------
    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {}
        for name, layer in lora_layers(model).items():
            out[f"{name}.lora_A.weight"] = layer.lora_A.weight
            out[f"{name}.lora_B.weight"] = layer.lora_B.weight
        for name in self.saved_modules:
            for pname, p in model.get_submodule(name).named_parameters():
                out[f"{name}.{pname}"] = p
        return out

    def peft_config(self, base_name: str) -> dict:
        c = self.config
        return {
            "peft_type": "LORA", "task_type": TASK_TYPES[self.task], "base_model_name_or_path": base_name,
            "r": c.r, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "use_rslora": c.rslora,
            "target_modules": sorted(self.targets), "modules_to_save": self.saved_modules or None,
            "bias": "none", "fan_in_fan_out": self.fan_in_fan_out, "init_lora_weights": True, "inference_mode": True,
            "rank_pattern": dict(c.rank_pattern or {}), "alpha_pattern": dict(c.alpha_pattern or {}),
            "use_dora": False, "lora_bias": False, "revision": None,
        }

    def save(self, model: nn.Module, run_dir: Path, base_name: str) -> Path:
        return write_adapter(Path(run_dir) / self.artifact, self.peft_config(base_name), self.adapter_tensors(model))

    def load(self, model: nn.Module, path: Path) -> None:
        _, tensors = read_adapter(path)
        expected = self.adapter_tensors(model)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ModelError(f"{path}: adapter does not fit the model: "
                             f"{len(missing)} tensors missing (e.g. {missing[:2]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        copy_tensors(path, expected, tensors)

    def merged(self, model: nn.Module) -> nn.Module:
        """Fold every B A into its base weight and put the plain base layers back."""
        for name, layer in lora_layers(model).items():
            layer.merge()
            set_submodule(model, name, layer.base_layer)
        return model

    @property
    def fan_in_fan_out(self) -> bool:
        """True when the adapted layers are GPT-2 Conv1D (PEFT's flag for (d_in, d_out) weights)."""
        return getattr(self, "_fan_in_fan_out", False)

    def describe(self) -> dict:
        return {"targets": self.targets, "modules_to_save": self.saved_modules}


def config_from_peft(peft_cfg: dict, path: Path) -> LoraConfig:
    """A LoraConfig (plus per-module ranks) equivalent to a PEFT LoRA adapter_config.json."""
    if peft_cfg.get("peft_type") != "LORA":
        raise ModelError(f"{path}: peft_type {peft_cfg.get('peft_type')!r} is not LORA")
    unsupported = [k for k in ("use_dora", "lora_bias") if peft_cfg.get(k)]
    if peft_cfg.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise ModelError(f"{path}: LoRA options not supported by memtune: {', '.join(unsupported)}")
    targets = peft_cfg.get("target_modules")
    if targets is None:
        raise ModelError(f"{path}: adapter_config.json has no target_modules")
    return LoraConfig(r=int(peft_cfg.get("r", 8)), alpha=float(peft_cfg.get("lora_alpha", 8)),
                      dropout=float(peft_cfg.get("lora_dropout", 0.0)),
                      targets=targets if isinstance(targets, str) else list(targets),
                      rslora=bool(peft_cfg.get("use_rslora", False)),
                      modules_to_save=peft_cfg.get("modules_to_save"),
                      rank_pattern=peft_cfg.get("rank_pattern") or None,
                      alpha_pattern=peft_cfg.get("alpha_pattern") or None, path=str(path))
