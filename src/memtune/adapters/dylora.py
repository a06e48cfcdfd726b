"""DyLoRA: LoRA trained for every rank at once (Valipour et al., EACL 2023, arXiv 2210.07558).

Each training step samples a rank b uniformly from {r_min, ..., r_max} (§3, p_B uniform) and runs
LoRA truncated to it:

    h = W0 x + (alpha / b) B[:, :b] A[:b, :] dropout(x)

            x ──► [ W0 (frozen, any storage) ] ───────────────────────────────────┐
            │                                                                    (+) ──► h
            └─► dropout ─► A[:b] (b × d_in) ─► B[:, :b] (d_out × b) ─► × alpha/b ─┘
                           └──────── the first b of r_max ────────┘

Low indices take part in more steps than high ones (nested dropout), so information is ordered by
rank index and one trained adapter is usable at any rank b* <= r_max: W0 + (alpha/b*) B[:, :b*] A[:b*].
The reference code (huawei-noah/Efficient-NLP, DyLoRA/loralib) multiplies each truncated factor by
sqrt(r_max/b) under a layer scale alpha/r_max; the product is the alpha/b above.

Modes (`mode`): `frozen` (the paper's default) trains only the newest component, row b-1 of A and
column b-1 of B, the ones below being detached (at b = r_min all of the first r_min train, or
components below r_min would never train); `all` trains all of A[:b] and B[:, :b].

When which rank is used:
  - a training step uses its sampled b from `before_step` until `after_update` (every update rule,
    backprop or zeroth-order, calls it once the step's update is applied), so all forwards of a
    MeZO step see the same b. b is a function of (run seed, step), so a resumed run (and a replayed
    MeZO trajectory) samples the same ranks.
  - every other forward (evaluation, merging, inference) uses `rank` (0 = r_max).

Zeroth-order rules (MeZO) perturb and move every trainable tensor whole, so components that are
not part of the step's rank would take a random walk. Under such a rule `before_step` copies the
components that do not train at b (frozen: all but [k, b); all: [b, r_max)) and `after_update`
writes them back (at most the adapter's own bytes, once). Backprop keeps the reference code's
behaviour: detached components get no gradient, though AdamW's momentum from earlier steps still
moves them.

Files use PEFT's LoRA layout (`<module>.lora_A.weight` (r, d_in), `.lora_B.weight` (d_out, r)). The
whole adapter is tagged "DYLORA" (a memtune tag; PEFT has no DyLoRA, huggingface/peft#289) with
r = r_max and r_min in its config. With `save_rank: k` the file is a plain "LORA" adapter truncated
to k (r = k, lora_alpha = alpha, so PEFT's alpha/r is DyLoRA's alpha/k), which PEFT loads as is.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ModelError
from ..recipe import AdapterConfig
from .base import ADAPTERS
from .lora import LoraLinear, LoraMethod, config_from_peft, lora_layers
from .peft_format import write_adapter


@dataclass
class DyLoraConfig(AdapterConfig):
    kind: str = "dylora"
    r: int = 8  # r_max: the largest rank trained (§3)
    r_min: int = 1  # the smallest rank sampled
    alpha: float = 16.0  # scale numerator: s = alpha / b at rank b
    dropout: float = 0.0  # on the adapter's input only
    targets: list[str] = field(default_factory=lambda: ["all-linear"])  # names, suffixes, or all-linear
    mode: Literal["frozen", "all"] = "frozen"  # frozen: only component b-1 trains at rank b; all: A[:b], B[:, :b]
    modules_to_save: list[str] | None = None  # trained in full; None = the head for classification
    rank: int = 0  # rank of evaluation, merging and inference; 0 = r
    save_rank: int = 0  # > 0: save a plain LoRA adapter truncated to this rank; 0: the whole DyLoRA adapter

    # LoRA options DyLoRA does not have (LoraMethod.attach and peft_config read them); not fields
    rslora = False
    rank_pattern = None
    alpha_pattern = None

    def check(self, prefix: str) -> None:
        if self.r < 1:
            raise ConfigError(f"{prefix}.r: expected the largest rank r_max >= 1, got {self.r}")
        if not 1 <= self.r_min <= self.r:
            raise ConfigError(f"{prefix}.r_min: expected 1 <= r_min <= r (r = {self.r}), got {self.r_min}")
        if not 0 <= self.rank <= self.r:
            raise ConfigError(f"{prefix}.rank: expected 0 (= r) or a rank in 1..{self.r} (r), got {self.rank}")
        if self.mode not in ("frozen", "all"):  # parsing checks it; adapter files too
            raise ConfigError(f"{prefix}.mode: expected one of 'frozen', 'all', got {self.mode!r}")
        if not 0 <= self.save_rank <= self.r:
            raise ConfigError(f"{prefix}.save_rank: expected 0 (save every rank) or a rank in 1..{self.r} (r), "
                              f"got {self.save_rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout: expected 0 <= dropout < 1, got {self.dropout}")
        if not self.targets:
            raise ConfigError(f"{prefix}.targets: expected module names or all-linear, got an empty list")


def sample_rank(seed: int, step: int, r_min: int, r_max: int) -> int:
    """b ~ U{r_min, ..., r_max} for optimizer step `step`, a pure function of (seed, step)."""
    return random.Random(f"dylora/{seed}/{step}").randint(r_min, r_max)


class RankState:
    """The rank the DyLoRA layers of one model use now; one object shared by all of them."""

    def __init__(self, eval_rank: int, frozen: bool, r_min: int = 1) -> None:
        self.eval_rank = eval_rank  # outside training steps
        self.frozen = frozen  # mode=frozen: only component b-1 receives gradients in a step
        self.r_min = r_min
        self.step_rank: int | None = None  # the sampled b, while a training step is running

    @property
    def rank(self) -> int:
        return self.step_rank if self.step_rank is not None else self.eval_rank


class DyLoraLinear(LoraLinear):
    """LoRA of rank r_max whose forward uses the first `ranks.rank` components. x (..., d_in) -> (..., d_out)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 *, ranks: RankState) -> None:
        super().__init__(base_layer, r, alpha, dropout, rslora)
        self.ranks = ranks
        self.merged_rank = 0

    @property
    def scaling(self) -> float:
        """alpha / b at the rank in use."""
        return self.alpha / min(self.ranks.rank, self.r)

    @scaling.setter
    def scaling(self, value: float) -> None:
        pass  # LoraLinear.__init__ sets alpha / r_max; here the scale follows the rank

    def first_trained(self, b: int, frozen: bool) -> int:
        """k: components k..b-1 train in a step at rank b (frozen: only b-1, or all of the first
        r_min at b = r_min; all: 0..b-1)."""
        return b - 1 if frozen and b > self.ranks.r_min else 0

    def factors(self, b: int, frozen: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """A[:b] (b, d_in) and B[:, :b] (d_out, b); with `frozen`, components 0..b-2 are detached
        (none at b = r_min)."""
        a, bm = self.lora_A.weight[:b], self.lora_B.weight[:, :b]
        k = self.first_trained(b, frozen)
        if k > 0:
            a = torch.cat([a[:k].detach(), a[k:]], 0)
            bm = torch.cat([bm[:, :k].detach(), bm[:, k:]], 1)
        return a, bm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged or self.disabled:
            return y
        b = min(self.ranks.rank, self.r)
        a, bm = self.factors(b, frozen=self.ranks.frozen and self.ranks.step_rank is not None)
        update = F.linear(F.linear(self.lora_dropout(x.to(a.dtype)), a), bm)  # (..., b) -> (..., d_out)
        if not torch.is_grad_enabled():  # inference (eval, MeZO): no extra output-sized temporaries
            return y.add_(update.to(y.dtype), alpha=self.alpha / b)
        return y + (update * (self.alpha / b)).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/b) B[:, :b] A[:b] at the rank merged (or, unmerged, the evaluation rank), laid out like
        the base weight."""
        b = min(self.merged_rank if self.merged else self.ranks.eval_rank, self.r)
        a, bm = self.factors(b)
        delta = (bm @ a) * (self.alpha / b)  # (d_out, d_in)
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.merged_rank = self.ranks.eval_rank
        super().merge()

    @torch.no_grad()
    def hold(self) -> None:
        """Copy the components that do not train in this step (ranks.step_rank)."""
        b = min(self.ranks.step_rank, self.r)
        idx = [i for i in range(self.r) if not self.first_trained(b, self.ranks.frozen) <= i < b]
        self.held = (idx, self.lora_A.weight[idx].clone(), self.lora_B.weight[:, idx].clone()) if idx else None

    @torch.no_grad()
    def release(self) -> None:
        """Write the held components back: this step's update leaves them as they were."""
        if getattr(self, "held", None) is not None:
            idx, a, bm = self.held
            self.lora_A.weight[idx] = a
            self.lora_B.weight[:, idx] = bm
        self.held = None

    def extra_repr(self) -> str:
        return f"r_max={self.r}, alpha={self.alpha}, rank={self.ranks.rank}"


@ADAPTERS.register("dylora", DyLoraConfig)
class DyLoraMethod(LoraMethod):
    config: DyLoraConfig
    peft_type = "DYLORA"
    also_reads = ("LORA",)  # an adapter saved with save_rank is a plain LoRA file
    recipe_fields = ("rank", "save_rank")  # chosen by the recipe even when the config comes from a file

    @classmethod
    def config_from_file(cls, peft_config: dict, path: Path) -> DyLoraConfig:
        tag = peft_config.get("peft_type")
        if tag == "LORA":  # a truncated DyLoRA adapter, or any plain LoRA: rank r, all ranks below usable
            lora = config_from_peft(peft_config, path)
            if lora.rslora or lora.rank_pattern or lora.alpha_pattern:
                raise ModelError(f"{path}: a LoRA adapter with use_rslora, rank_pattern or alpha_pattern cannot "
                                 f"be read as DyLoRA")
            return DyLoraConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets,
                                modules_to_save=lora.modules_to_save, path=str(path))
        if tag != "DYLORA":
            raise ModelError(f"{path}: peft_type {tag!r} is not DYLORA")
        fields = {"r": "r", "r_min": "r_min", "lora_alpha": "alpha", "lora_dropout": "dropout",
                  "target_modules": "targets", "mode": "mode", "rank": "rank", "modules_to_save": "modules_to_save"}
        kwargs = {ours: peft_config[theirs] for theirs, ours in fields.items() if theirs in peft_config}
        if kwargs.get("targets") is None:
            raise ModelError(f"{path}: adapter_config.json has no target_modules")
        cfg = DyLoraConfig(**kwargs, path=str(path))
        try:
            cfg.check("adapter")
        except ConfigError as e:
            raise ModelError(f"{path}: {e}") from None
        return cfg

    def __init__(self, config: DyLoraConfig, task: str) -> None:
        super().__init__(config, task)
        self.ranks = RankState(config.rank or config.r, config.mode == "frozen", config.r_min)
        self.layer_cls = functools.partial(DyLoraLinear, ranks=self.ranks)
        # ranks are drawn from (seed, step); the trainer seeds torch with train.seed before building
        # the run, so this is the run's seed; checkpoints keep it (state_dict)
        self.seed = torch.initial_seed()

    def attach(self, model: nn.Module) -> None:
        self.config.check("adapter")  # again: recipe_fields may have been set after parsing
        self.ranks.r_min, self.ranks.frozen = self.config.r_min, self.config.mode == "frozen"
        self.set_rank(self.config.rank)
        super().attach(model)

    def set_rank(self, rank: int) -> None:
        """Evaluate (and merge) at `rank` from now on; 0 = r_max."""
        if not 0 <= rank <= self.config.r:
            raise ConfigError(f"adapter.rank: expected 0 (= r) or a rank in 1..{self.config.r} (r), got {rank}")
        self.ranks.eval_rank = rank or self.config.r

    # -- per-step hooks ----------------------------------------------------------------------
    def before_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        self.ranks.step_rank = sample_rank(self.seed, step, self.config.r_min, self.config.r)
        if not self.rule_uses_backprop:
            for layer in lora_layers(model).values():
                layer.hold()

    def after_update(self, model: nn.Module, step: int, total_steps: int) -> None:
        for layer in lora_layers(model).values():
            layer.release()
        self.ranks.step_rank = None

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state.get("seed", self.seed)

    # -- files -------------------------------------------------------------------------------
    def adapter_tensors(self, model: nn.Module, rank: int = 0) -> dict[str, torch.Tensor]:
        """LoRA's tensors; with `rank`, A and B truncated to it."""
        out = super().adapter_tensors(model)
        if rank:
            for name in lora_layers(model):
                out[f"{name}.lora_A.weight"] = out[f"{name}.lora_A.weight"][:rank]
                out[f"{name}.lora_B.weight"] = out[f"{name}.lora_B.weight"][:, :rank]
        return out

    def peft_config(self, base_name: str) -> dict:
        c = self.config
        lora = super().peft_config(base_name)
        if c.save_rank:  # a plain LoRA of rank save_rank: PEFT's alpha / r is alpha / save_rank
            return {**lora, "r": c.save_rank}
        for k in ("use_rslora", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias"):
            lora.pop(k)
        return {**lora, "peft_type": "DYLORA", "r": c.r, "r_min": c.r_min, "mode": c.mode, "rank": c.rank}

    def save(self, model: nn.Module, run_dir: Path, base_name: str) -> Path:
        return write_adapter(Path(run_dir) / self.artifact, self.peft_config(base_name),
                             self.adapter_tensors(model, self.config.save_rank))

    def describe(self) -> dict:
        c = self.config
        return {**super().describe(), "r_max": c.r, "r_min": c.r_min, "mode": c.mode,
                "eval_rank": self.ranks.eval_rank, "saved_rank": c.save_rank or c.r, "rank_seed": self.seed}
