"""VeRA: vector-based random matrix adaptation (Kopiczko et al., ICLR 2024, arXiv 2310.11454).

    h = W0 x + Λ_b B Λ_d A dropout(x)          Λ_b = diag(b), Λ_d = diag(d)

            x ──► [ W0 (frozen, any storage) ] ─────────────────────────────────────┐
            │                                                                      (+) ──► h
            └─► dropout ─► A (r × d_in) ─► ⊙ d (r) ─► B (d_out × r) ─► ⊙ b (d_out) ─┘
                           └ A, B frozen: one pair for all layers ┘

A and B are frozen random matrices drawn once for the whole model; only the vectors d (r) and b
(d_out) train, per layer: L (d_out + r) parameters in all (§3, Table 1). b starts at 0, so the
adapted model equals the base at step 0; d starts at `d_initial` (0.1, §3.2 / Table 6c).

Layers differ in size while the pair is shared, so (as PEFT does) A is (r × max d_in) and B is
(max d_out × r) over the adapted layers, and a layer uses the slices A[:, :d_in] and B[:d_out, :].
Both are drawn, A first, from a CPU `torch.Generator` seeded with `projection_prng_key`, Kaiming-
uniform with gain √2: U(-√(6 / fan_in), +√(6 / fan_in)), fan_in = the matrix's second dimension.
This is PEFT's draw bit for bit, so `save_projection: false` files (d and b plus the seed) mean the
same model in PEFT and here.

Files use PEFT's layout (peft_type "VERA"): per layer `<module>.vera_lambda_b` (d_out) and
`.vera_lambda_d` (r), and, with save_projection, the shared `base_model.vera_A` / `base_model.vera_B`
(outside the `base_model.model.` prefix). For classification the new head trains in full and is
saved under its plain path (`modules_to_save`), as with LoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelError
from ..recipe import AdapterConfig
from .base import ADAPTERS, AdapterMethod, DeltaLayer, set_trainable
from .peft_format import TASK_TYPES, copy_tensors, read_adapter, write_adapter
from .targets import match_targets, set_submodule

SHARED_A, SHARED_B = "base_model.vera_A", "base_model.vera_B"  # PEFT's keys for the shared pair


@dataclass
class VeraConfig(AdapterConfig):
    kind: str = "vera"
    r: int = 256  # rows of A / columns of B (§3); higher than LoRA ranks, as only d (r) trains per layer
    targets: list[str] = field(default_factory=lambda: ["all-linear"])  # names, suffixes, or all-linear
    d_initial: float = 0.1  # initial value of every entry of d (§3.2; Table 6c: <= 0.1 works best)
    dropout: float = 0.0  # on the adapter's input only
    projection_prng_key: int = 0  # seed of the generator that draws A and B
    save_projection: bool = True  # store A and B in the file; false: only the seed, A and B redrawn on load
    modules_to_save: list[str] | None = None  # trained in full; None = the head for classification

    def check(self, prefix: str) -> None:
        if self.r < 1:
            raise ConfigError(f"{prefix}.r: expected a rank >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout: expected 0 <= dropout < 1, got {self.dropout}")
        if not self.targets:
            raise ConfigError(f"{prefix}.targets: expected module names or all-linear, got an empty list")
        if not 0 <= self.projection_prng_key < 2 ** 63:
            raise ConfigError(f"{prefix}.projection_prng_key: expected a seed in 0..2^63-1, "
                              f"got {self.projection_prng_key}")


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's `_kaiming_init`: U(-bound, bound), bound = √3 · √2 / √fan_in, fan_in = shape[1]."""
    std = math.sqrt(2) / math.sqrt(shape[1])  # same float operations as PEFT, so the same bound
    bound = math.sqrt(3.0) * std
    return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)


def draw_projections(r: int, d_in: int, d_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)) from a CPU generator seeded with `key`, A drawn first."""
    g = torch.Generator(device="cpu").manual_seed(key)
    a = kaiming_uniform((r, d_in), g)
    b = kaiming_uniform((d_out, r), g)
    return a, b


class VeraProjections(nn.Module):
    """The frozen pair shared by every VeRA layer of a model: A (r, max d_in), B (max d_out, r).

    One module object is a submodule of every layer, so `model.to()` moves one copy. The buffers are
    not persistent (not in `model.state_dict()` once per layer); files store them once, under
    PEFT's model-level keys."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("vera_A", a, persistent=False)  # (r, max d_in)
        self.register_buffer("vera_B", b, persistent=False)  # (max d_out, r)

    def extra_repr(self) -> str:
        return f"A={tuple(self.vera_A.shape)}, B={tuple(self.vera_B.shape)}"


def _dims(layer: nn.Module) -> tuple[int, int, bool]:
    """(d_in, d_out, fan_in_fan_out) of a linear layer; GPT-2's Conv1D stores its weight (d_in, d_out)."""
    if type(layer).__name__ == "Conv1D":
        return layer.nx, layer.nf, True
    return layer.in_features, layer.out_features, False


class VeraLinear(DeltaLayer):
    """A linear layer plus Λ_b B Λ_d A. Shapes: x (..., d_in) -> (..., d_out)."""

    def __init__(self, base_layer: nn.Module, projections: VeraProjections, d_initial: float = 0.1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self.fan_in_fan_out = _dims(base_layer)
        self.projections = projections  # shared; its A, B are at least (r, d_in), (d_out, r)
        a = projections.vera_A
        r = a.shape[0]
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, device=a.device, dtype=a.dtype))  # (d_out)
        self.vera_lambda_d = nn.Parameter(torch.full((r,), float(d_initial), device=a.device, dtype=a.dtype))  # (r)
        self.vera_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r = r
        self.merged = False
        self.disabled = False

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's A[:, :d_in] (r, d_in) and B[:d_out, :] (d_out, r)."""
        p = self.projections
        return p.vera_A[:, :self.in_features], p.vera_B[:self.out_features, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        a, b = self.sliced()
        h = self.vera_lambda_d * F.linear(self.vera_dropout(x.to(a.dtype)), a)  # (..., r)
        update = self.vera_lambda_b * F.linear(h, b)  # (..., d_out); PEFT's order of operations
        return y + update.to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Λ_b B Λ_d A, laid out like the base weight ((d_in, d_out) for Conv1D)."""
        a, b = self.sliced()
        delta = (self.vera_lambda_b[:, None] * b) @ (self.vera_lambda_d[:, None] * a)  # (d_out, d_in)
        return delta.T if self.fan_in_fan_out else delta

    def extra_repr(self) -> str:
        return f"r={self.r}, in={self.in_features}, out={self.out_features}"


def vera_layers(model: nn.Module) -> dict[str, VeraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, VeraLinear)}


@ADAPTERS.register("vera", VeraConfig)
class VeraMethod(AdapterMethod):
    config: VeraConfig
    peft_type = "VERA"

    @classmethod
    def config_from_file(cls, peft_config: dict, path: Path) -> VeraConfig:
        return config_from_peft(peft_config, path)

    def __init__(self, config: VeraConfig, task: str) -> None:
        super().__init__(config, task)
        self.targets: list[str] = []
        self.saved_modules: list[str] = []
        self.projections: VeraProjections | None = None
        self.fan_in_fan_out = False

    def attach(self, model: nn.Module) -> None:
        cfg = self.config
        set_trainable(model, False)
        # which modules train in full: LoRA's rule (PEFT's matching, the head for classification)
        self.saved_modules = self._modules_to_save(model)
        self.targets = [t for t in match_targets(model, cfg.targets)
                        if not any(t == s or t.startswith(s + ".") for s in self.saved_modules)]
        bases = {name: model.get_submodule(name) for name in self.targets}
        dims = [_dims(m) for m in bases.values()]
        max_in, max_out = max(d[0] for d in dims), max(d[1] for d in dims)
        a, b = draw_projections(cfg.r, max_in, max_out, cfg.projection_prng_key)
        w = next(iter(bases.values())).weight
        # the adapter computes in fp32 over a bf16/fp16 or quantized base; over an fp32/fp64 base, in its dtype
        dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
        self.projections = VeraProjections(a.to(w.device, dtype), b.to(w.device, dtype))
        for name, base in bases.items():
            layer = VeraLinear(base, self.projections, cfg.d_initial, cfg.dropout)
            self.fan_in_fan_out = layer.fan_in_fan_out
            set_submodule(model, name, layer)
        for name in self.saved_modules:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)

    # -- files -------------------------------------------------------------------------------
    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per-layer vectors and fully trained modules, by module path (PEFT's names without prefix)."""
        out = {}
        for name, layer in vera_layers(model).items():
            out[f"{name}.vera_lambda_b"] = layer.vera_lambda_b
            out[f"{name}.vera_lambda_d"] = layer.vera_lambda_d
        for name in self.saved_modules:
            for pname, p in model.get_submodule(name).named_parameters():
                out[f"{name}.{pname}"] = p
        return out

    def peft_config(self, base_name: str) -> dict:
        c = self.config
        return {
            "peft_type": "VERA", "task_type": TASK_TYPES[self.task], "base_model_name_or_path": base_name,
            "r": c.r, "target_modules": sorted(self.targets), "projection_prng_key": c.projection_prng_key,
            "save_projection": c.save_projection, "vera_dropout": c.dropout, "d_initial": c.d_initial,
            "fan_in_fan_out": self.fan_in_fan_out, "bias": "none", "modules_to_save": self.saved_modules or None,
            "init_weights": True, "layers_to_transform": None, "layers_pattern": None, "inference_mode": True,
            "revision": None,
        }

    def save(self, model: nn.Module, run_dir: Path, base_name: str) -> Path:
        """PEFT's files; the shared pair sits outside the `base_model.model.` prefix."""
        shared = {}
        if self.config.save_projection:
            shared = {SHARED_A: self.projections.vera_A, SHARED_B: self.projections.vera_B}
        return write_adapter(Path(run_dir) / self.artifact, self.peft_config(base_name), self.adapter_tensors(model),
                             unprefixed=shared)

    def load(self, model: nn.Module, path: Path) -> None:
        _, tensors = read_adapter(path)
        shared = {k: tensors.pop(k) for k in (SHARED_A, SHARED_B) if k in tensors}
        expected = self.adapter_tensors(model)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ModelError(f"{path}: adapter does not fit the model: "
                             f"{len(missing)} tensors missing (e.g. {missing[:2]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        if self.config.save_projection and len(shared) < 2:
            raise ModelError(f"{path}: save_projection is true but {SHARED_A} / {SHARED_B} are not in the file")
        # save_projection false: A and B are the ones attach() drew from projection_prng_key (stored
        # copies, if any, are ignored, as PEFT ignores them)
        if self.config.save_projection:
            expected = {**expected, SHARED_A: self.projections.vera_A, SHARED_B: self.projections.vera_B}
            tensors = {**tensors, **shared}
        copy_tensors(path, expected, tensors)

    def merged(self, model: nn.Module) -> nn.Module:
        """Fold every Λ_b B Λ_d A into its base weight and put the plain base layers back."""
        for name, layer in vera_layers(model).items():
            layer.merge()
            set_submodule(model, name, layer.base_layer)
        return model

    def describe(self) -> dict:
        p = self.projections
        return {"targets": self.targets, "modules_to_save": self.saved_modules,
                "projections": {"A": list(p.vera_A.shape), "B": list(p.vera_B.shape)} if p is not None else None}


def config_from_peft(peft_cfg: dict, path: Path) -> VeraConfig:
    """A VeraConfig equivalent to a PEFT VeRA adapter_config.json."""
    if peft_cfg.get("peft_type") != "VERA":
        raise ModelError(f"{path}: peft_type {peft_cfg.get('peft_type')!r} is not VERA")
    unsupported = [k for k in ("layers_to_transform", "layers_pattern") if peft_cfg.get(k) is not None]
    if peft_cfg.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise ModelError(f"{path}: VeRA options not supported by memtune: {', '.join(unsupported)}")
    targets = peft_cfg.get("target_modules")
    if targets is None:
        raise ModelError(f"{path}: adapter_config.json has no target_modules")
    return VeraConfig(r=int(peft_cfg.get("r", 256)), targets=targets if isinstance(targets, str) else list(targets),
                      d_initial=float(peft_cfg.get("d_initial", 0.1)),
                      dropout=float(peft_cfg.get("vera_dropout", 0.0)),
                      projection_prng_key=int(peft_cfg.get("projection_prng_key", 0)),
                      save_projection=bool(peft_cfg.get("save_projection", True)),
                      modules_to_save=peft_cfg.get("modules_to_save"), path=str(path))
