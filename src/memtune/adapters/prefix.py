"""Prefix Tuning (Li & Liang, ACL 2021, arXiv 2101.00190) and P-Tuning v2 (Liu et al., ACL 2022,
arXiv 2110.07602): per-layer key/value prefixes.

    K'_l = [Pk_l ; K_l]     V'_l = [Pv_l ; V_l]     queries unchanged; the mask gains n ones

    P ∈ R^{n × (L·2·d_kv)}: row i holds, for every layer l, the key (block 2l) and the value
    (block 2l+1) of virtual position i; d_kv = kv_heads · head_dim (grouped-query attention caches
    fewer heads, PEFT #1901)

    prefix_projection (reparameterization, Li & Liang §4.3; training only):

        P' (n, d_kv) ─► Linear(d_kv → h) ─► tanh ─► Linear(h → L·2·d_kv) ─► P

    without it (P-Tuning v2's default, "deep prompt tuning") P itself is the parameter.

               P (n, L·2·d_kv) ─► view (n, 2L, H_kv, hd) ─► layer l: Pk_l, Pv_l (B, H_kv, n, hd)
                                                                │
    input_ids ─► layer 0 ─► ... ─► layer l: attention over [Pk_l; K_l], [Pv_l; V_l] ─► ... ─► head

The prefix enters through transformers' KV cache: a forward pre-hook on the backbone (see
memtune.adapters.virtual_tokens) writes it into a `DynamicCache` as n cached positions before the
real tokens, so the model's own attention code (eager, SDPA, ...) attends over it. Positions follow
from the cache length: real tokens sit at n..n+T-1, as in PEFT and the P-Tuning v2 reference (BERT's
position embeddings, Llama's RoPE). In `generate` the prefix is written into the cache transformers
created for the prefill and stays there for the decoding steps.

After training the MLP is dropped: `save` writes the computed P (PEFT's layout: one tensor
`prompt_embeddings`, (n, L·2·d_kv), `prefix_projection` kept in adapter_config.json), and `load`
always loads that P as the parameter, so a loaded prefix trains directly from then on (PEFT's
inference-mode encoder has no MLP either). As in PEFT, the MLP's input width is d_kv (Li & Liang use
the model width; they coincide without grouped-query attention).

The two recipe kinds are one method with different defaults (PEFT's PREFIX_TUNING *is* P-Tuning v2's
encoder; PEFT's P_TUNING is v1):

    adapter.kind=prefix       n = 10, prefix_projection on, h = 512   (Li & Liang's gpt2 reference:
                                                                      preseqlen 10, mid_dim 512)
    adapter.kind=ptuning-v2   n = 4, prefix_projection off            (THUDM/P-tuning-v2 defaults:
                                                                      pre_seq_len 4, for classification
                                                                      with a trained head, e.g. BERT)

Initialization: nn.Embedding's N(0, 1) and nn.Linear's default (PEFT and both references), or
`init: zero` (PEFT's init_weights="zero": a zero prefix, or a zero last MLP layer). The P-Tuning v2
reference applies dropout (0.1) to the prefix; here `dropout`, default 0 as in PEFT.

Prefix methods cannot run under gradient checkpointing: transformers' checkpointed layers drop the
cache during training (and recomputation would append to it twice), so the recipe rejects the
combination (`supports_gradient_checkpointing = False`), as PEFT does. `merged()` raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError, MemtuneError
from .base import ADAPTERS
from .virtual_tokens import (Geometry, VirtualTokenConfig, VirtualTokenMethod, VirtualTokens, common_from_peft,
                             param_dtype)


@dataclass
class PrefixConfig(VirtualTokenConfig):
    """`adapter.kind: prefix`: Prefix Tuning, with the MLP reparameterization by default."""

    kind: str = "prefix"
    num_virtual_tokens: int = 10  # n, the prefix length (reference preseqlen=10)
    prefix_projection: bool = True  # train P through an MLP (§4.3), dropped after training
    encoder_hidden_size: int = 512  # h, the MLP's hidden width (reference mid_dim=512)
    init: Literal["random", "zero"] = "random"  # zero: P = 0 (or a zero last MLP layer)
    dropout: float = 0.0  # on the prefix during training (P-Tuning v2 reference: 0.1)

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if self.encoder_hidden_size < 1:
            raise ConfigError(f"{prefix}.encoder_hidden_size: expected >= 1, got {self.encoder_hidden_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout: expected 0 <= dropout < 1, got {self.dropout}")


@dataclass
class PTuningV2Config(PrefixConfig):
    """`adapter.kind: ptuning-v2`: deep prompts on every layer, no reparameterization by default."""

    kind: str = "ptuning-v2"
    num_virtual_tokens: int = 4  # reference pre_seq_len=4 (best length is task-dependent, §3.3)
    prefix_projection: bool = False  # reference default; set true for the MLP (prefix_hidden_size)


class KVPrefix(VirtualTokens):
    """P, as `embedding.weight` (n, L·2·d_kv), or `embedding` (n, d_kv) + `transform` (the MLP):
    PEFT's PrefixEncoder names, so PEFT-initialized weights copy across."""

    def __init__(self, n: int, g: Geometry, projection: bool, hidden: int, init: str, dropout: float,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(n)
        self.g = g
        self.width = g.num_layers * 2 * g.kv_dim
        self.projection = projection
        kw = {"dtype": dtype, "device": device}
        if projection:
            self.embedding = nn.Embedding(n, g.kv_dim, **kw)
            self.transform = nn.Sequential(nn.Linear(g.kv_dim, hidden, **kw), nn.Tanh(),
                                           nn.Linear(hidden, self.width, **kw))
            if init == "zero":
                nn.init.zeros_(self.transform[-1].weight)
                nn.init.zeros_(self.transform[-1].bias)
        else:
            self.embedding = nn.Embedding(n, self.width, **kw)
            if init == "zero":
                nn.init.zeros_(self.embedding.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def prefix(self) -> torch.Tensor:
        """P (n, L·2·d_kv)."""
        x = self.embedding.weight
        return self.transform(x) if self.projection else x

    def rewrite(self, body: nn.Module, kwargs: dict) -> None:
        name = self.cache_name
        cache = kwargs.get(name)
        if cache is None:
            from transformers import DynamicCache

            cache = kwargs[name] = DynamicCache(config=body.config)
        if not hasattr(cache, "get_seq_length"):
            raise MemtuneError(f"prefix tuning: {name} must be a transformers Cache, got "
                               f"{type(cache).__name__}")
        if cache.get_seq_length() == 0:  # a prefill (or a plain forward): the prefix goes in first
            x = kwargs.get("input_ids")
            x = kwargs["inputs_embeds"] if x is None else x
            self.fill(cache, x.shape[0], self._kv_dtype(body))
        # else: a decoding step, the cache already starts with the n prefix positions
        self.extend_mask(kwargs)
        self.shift_positions(kwargs, prepend=False)
        return None

    def fill(self, cache, batch: int, dtype: torch.dtype) -> None:
        n, g = self.num_virtual_tokens, self.g
        p = self.prefix().to(dtype).view(n, 2 * g.num_layers, g.kv_heads, g.head_dim)  # (n, 2L, H, hd)
        kv = p.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # (2L, B, H, n, hd)
        kv = self.dropout(kv)
        where = {"cache_position": torch.arange(n, device=kv.device)}  # for caches that index slots
        for layer in range(g.num_layers):
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer, where)  # keys, values (B, H, n, hd)

    @staticmethod
    def _kv_dtype(body: nn.Module) -> torch.dtype:
        """The dtype the layers compute keys in: autocast's when active, else the weights'."""
        w = body.get_input_embeddings().weight
        if torch.is_autocast_enabled(w.device.type):
            return torch.get_autocast_dtype(w.device.type)
        return w.dtype

    def prompt_embeddings(self) -> torch.Tensor:
        return self.prefix()  # (n, L·2·d_kv): the MLP's output when reparameterized

    @torch.no_grad()
    def load_prompt_embeddings(self, t: torch.Tensor) -> None:
        """Load a computed P; with the MLP, P becomes the parameter and the MLP is dropped."""
        w = self.embedding.weight
        if self.projection:
            self.embedding = nn.Embedding(t.shape[0], self.width, dtype=w.dtype, device=w.device)
            del self.transform
            self.projection = False
        self.embedding.weight.copy_(t.to(self.embedding.weight.dtype))


@ADAPTERS.register("ptuning-v2", PTuningV2Config)
@ADAPTERS.register("prefix", PrefixConfig)
class PrefixTuning(VirtualTokenMethod):
    config: PrefixConfig
    peft_type = "PREFIX_TUNING"
    supports_gradient_checkpointing = False  # checkpointed layers drop the KV cache that holds the prefix

    @classmethod
    def config_from_file(cls, peft_config: dict, path: Path) -> PrefixConfig:
        """A saved prefix is always the computed P; which kind it reads back as follows the file's
        prefix_projection flag (true: prefix, false: ptuning-v2); both are this method."""
        common = common_from_peft(peft_config, path, cls.peft_type)
        projection = bool(peft_config.get("prefix_projection", False))
        hidden = peft_config.get("encoder_hidden_size") or PrefixConfig.encoder_hidden_size
        init = "zero" if peft_config.get("init_weights") == "zero" else "random"
        config_cls = PrefixConfig if projection else PTuningV2Config
        return config_cls(prefix_projection=projection, encoder_hidden_size=int(hidden), init=init, **common)

    def build(self, model: nn.Module) -> KVPrefix:
        c = self.config
        dtype, device = param_dtype(model)
        # a config read from a file: the file holds P itself, so no MLP is built
        projection = c.prefix_projection and not c.path
        return KVPrefix(c.num_virtual_tokens, self.geometry, projection, c.encoder_hidden_size, c.init, c.dropout,
                        dtype, device)

    def peft_config(self, base_name: str) -> dict:
        c, g = self.config, self.geometry
        return {**super().peft_config(base_name), "peft_type": self.peft_type, "token_dim": g.kv_dim,
                "num_attention_heads": g.kv_heads, "prefix_projection": c.prefix_projection,
                "encoder_hidden_size": c.encoder_hidden_size, "init_weights": "zero" if c.init == "zero" else None}

    def describe(self) -> dict:
        g = self.geometry
        return {**super().describe(), "prefix_projection": self.config.prefix_projection,
                "prefix_shape": [self.config.num_virtual_tokens, g.num_layers * 2 * g.kv_dim] if g else None}
