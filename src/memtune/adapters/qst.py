"""QST: quantized side tuning (Zhang et al., ACL 2024), `adapter.kind=qst`.

A side network at 1/r of the backbone's width (the backbone's own layer class) reads every backbone
layer's hidden state through a downsampler and a gate, and its upsampled output is mixed into the
backbone's final hidden state (memtune.side.network has the equations). The backbone, stored in any
base storage (NF4 by default: the paper's QST; `quantize.kind=none` is LST-style side tuning of a
full-precision backbone), runs without gradient: it keeps no activations for backward, and its
weights get no gradient or optimizer state. Only the side network (plus a new classification head)
trains. At r = 16 on LLaMA-2-7B's shape the trainable share is 0.43% (tests/test_qst.py; paper: ~0.4%).

Keys: `adapter.r` (16: side width d/r), `adapter.downsample` (adapter | lora | linear | maxpool |
avgpool), `adapter.rank` (16: the adapter/lora downsamplers' inner width), `adapter.mix` (scalar |
channel: one α or one per channel, see memtune.side.network), `adapter.min_head_dim` (16: the side's
head count is the largest <= the backbone's with head dims at least this, see memtune.side.arch),
`adapter.modules_to_save`.

Files: PEFT's layout with memtune's own tag (PEFT has no QST): adapter_config.json with
peft_type "QST" and adapter_model.safetensors holding the side network (`qst_side.*`) and the saved
modules. `memtune merge` refuses: a side network is a second stream of layers, not a weight delta.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError, MemtuneError, ModelError
from ..recipe import AdapterConfig
from ..side.arch import MIN_HEAD_DIM, family_of
from ..side.downsample import KINDS
from ..side.network import SideNetwork, SideRunner
from .base import ADAPTERS, AdapterMethod, set_trainable
from .peft_format import TASK_TYPES, copy_tensors, read_adapter, write_adapter

SIDE = "qst_side"  # the side network's module name on the model


@dataclass
class QSTConfig(AdapterConfig):
    kind: str = "qst"
    r: int = 16  # side width d/r (paper default 16; Fig. 5 sweeps 2-64)
    downsample: Literal["adapter", "lora", "linear", "maxpool", "avgpool"] = "adapter"
    rank: int = 16  # inner width k of the adapter / lora downsamplers (paper: 16)
    # α of the output mix: one scalar (the paper's equation; lets the causal-LM loss skip dL/dh) or one
    # weight per channel (the reference code's lm_head_z)
    mix: Literal["scalar", "channel"] = "scalar"
    min_head_dim: int = MIN_HEAD_DIM  # side heads: the largest count <= the backbone's with head dims >= this
    modules_to_save: list[str] | None = None  # trained in full next to the side network (default: a new head)

    def check(self, prefix: str) -> None:
        for name in ("r", "rank", "min_head_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{prefix}.{name}: expected a positive integer, got {getattr(self, name)}")
        if self.mix not in ("scalar", "channel"):
            raise ConfigError(f"{prefix}.mix: expected scalar or channel, got {self.mix!r}")
        if self.downsample not in KINDS:
            raise ConfigError(f"{prefix}.downsample: expected one of {', '.join(KINDS)}, got {self.downsample!r}")


@ADAPTERS.register("qst", QSTConfig)
class QSTMethod(AdapterMethod):
    config: QSTConfig
    peft_type = "QST"
    backbone_backprop = False  # the backbone runs without gradient (memtune.methods' rules read this)
    default_storage = "nf4"  # the paper's 4-bit backbone, unless the recipe names a storage

    @classmethod
    def config_from_file(cls, peft_config: dict, path: Path) -> QSTConfig:
        try:
            return QSTConfig(r=int(peft_config["r"]), downsample=peft_config["downsample"],
                             rank=int(peft_config["downsample_rank"]),
                             mix=peft_config.get("mix", "channel"),  # files from before the key: per channel
                             min_head_dim=int(peft_config.get("min_head_dim", 8)),  # before the key: 8
                             modules_to_save=peft_config.get("modules_to_save"), path=str(path))
        except (KeyError, TypeError, ValueError) as e:
            raise ModelError(f"{path}/adapter_config.json: not a QST config ({type(e).__name__}: {e})") from None

    def __init__(self, config: QSTConfig, task: str) -> None:
        super().__init__(config, task)
        self.saved_modules: list[str] = []
        self.runner: SideRunner | None = None

    def attach(self, model: nn.Module) -> None:
        c = self.config
        fam = family_of(model)
        set_trainable(model, False)
        self.saved_modules = self._modules_to_save(model)
        side = SideNetwork(model, fam, c.r, c.downsample, c.rank, c.mix, c.min_head_dim)
        model.add_module(SIDE, side)
        self.runner = SideRunner(model, side, fam)
        for name in self.saved_modules:
            model.get_submodule(name).requires_grad_(True)

    def side(self, model: nn.Module) -> SideNetwork:
        return model.get_submodule(SIDE)

    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        out = {f"{SIDE}.{n}": p for n, p in self.side(model).named_parameters()}
        for name in self.saved_modules:
            out.update({f"{name}.{n}": p for n, p in model.get_submodule(name).named_parameters()})
        return out

    def peft_config(self, model: nn.Module, base_name: str) -> dict:
        c, sc = self.config, self.side(model).config
        return {"peft_type": self.peft_type, "task_type": TASK_TYPES.get(self.task),
                "base_model_name_or_path": base_name, "r": c.r, "downsample": c.downsample,
                "downsample_rank": c.rank, "mix": c.mix, "min_head_dim": c.min_head_dim,
                "side_heads": getattr(sc, family_of(model).heads), "modules_to_save": self.saved_modules or None,
                "inference_mode": True,
                "side_layers": len(self.side(model).layers), "side_config": sc.to_diff_dict()}

    def save(self, model: nn.Module, run_dir: Path, base_name: str) -> Path:
        return write_adapter(Path(run_dir) / self.artifact, self.peft_config(model, base_name),
                             self.adapter_tensors(model))

    def load(self, model: nn.Module, path: Path) -> None:
        _, tensors = read_adapter(path)
        want = self.adapter_tensors(model)
        missing, unexpected = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
        if missing or unexpected:
            raise ModelError(f"{path}: QST side network does not fit the model: {len(missing)} tensors missing "
                             f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        copy_tensors(path, want, tensors)

    def merged(self, model: nn.Module) -> nn.Module:
        raise MemtuneError("memtune merge: a QST run trains a side network, a second stream of layers beside the "
                           "backbone, not a change of its weights, so there is nothing to fold into them. Use the "
                           "run as it is: memtune eval RUN_DIR, or adapter.kind=qst adapter.path=RUN_DIR/adapter")

    def disabled(self, model: nn.Module):
        """The backbone alone: α = 1 for the duration (its output, exactly)."""
        return _alpha_one(self.side(model))

    def describe(self) -> dict:
        c = self.config
        return {"r": c.r, "downsample": c.downsample, "rank": c.rank, "mix": c.mix, "min_head_dim": c.min_head_dim,
                "modules_to_save": self.saved_modules}


@contextlib.contextmanager
def _alpha_one(side: SideNetwork):
    saved = side.alpha.detach().clone()
    with torch.no_grad():
        side.alpha.fill_(1.0)
    try:
        yield
    finally:
        with torch.no_grad():
            side.alpha.copy_(saved)
