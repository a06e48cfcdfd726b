"""Where a side network meets each backbone family: its layer stack, the point where the two streams
are mixed, and the backbone config scaled to the side network's width.

    family        layers (under model.base_model)   mixed at             side layer class
    llama/mistral layers                            norm (final RMSNorm) LlamaDecoderLayer (own RoPE)
    opt           decoder.layers                    decoder.final_layer_norm (else the last layer)
    gpt2          h                                 ln_f                 GPT2Block
    bert          encoder.layer                     the last layer       BertLayer (post-LN: no side norm)

Scaling to width d/r (`side_config`): hidden d -> d/r, intermediate (the MLP width) I -> I/r, and the
backbone's head count H (the QST reference code keeps it: LLaMA-2-7B at r = 16 has 32 heads of 8)
reduced to the largest count that divides d/r into head dims of at least `min_head_dim` (adapter key,
default MIN_HEAD_DIM = 16), even for RoPE (which rotates pairs); key/value heads to the largest count
<= the backbone's that divides the side's head count. LLaMA-2-7B at r = 16 gets 16 heads of 16, MiniLM
(384 wide, 12 heads) one head of 24. Why not the reference code's count: on MiniLM its heads are 2
channels wide, and head dims of 8 gained 2.2 SST-2 points at r = 8; head dims of 16 then scored the
same as 8 over three seeds (0.7856 vs 0.7848) while a CPU attention over heads of 8 costs 3x that over
heads of 16 for the same width (QST step 0.505 -> 0.472x QLoRA's; BENCHMARKS.md). Files saved before
the key was written used 8. The side layers are built from the backbone's own layer class with that
config (`type(layer)(config, layer_idx=i)`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError


@dataclass(frozen=True)
class Family:
    layers: str  # the backbone's layer ModuleList, relative to model.base_model
    mix_at: str | None  # module whose output is the LM-head / classifier input; None: the last layer's
    hidden: str  # config field names scaled by 1/r
    intermediate: str | None
    heads: str
    kv_heads: str | None = None
    rotary: str | None = None  # the body's rotary embedding (the side builds its own at its head dim)


FAMILIES = {
    "llama": Family("layers", "norm", "hidden_size", "intermediate_size", "num_attention_heads",
                    "num_key_value_heads", rotary="rotary_emb"),
    "mistral": Family("layers", "norm", "hidden_size", "intermediate_size", "num_attention_heads",
                      "num_key_value_heads", rotary="rotary_emb"),
    "opt": Family("decoder.layers", "decoder.final_layer_norm", "hidden_size", "ffn_dim", "num_attention_heads"),
    "gpt2": Family("h", "ln_f", "n_embd", "n_inner", "n_head"),
    "bert": Family("encoder.layer", None, "hidden_size", "intermediate_size", "num_attention_heads"),
}


def family_of(model: nn.Module) -> Family:
    kind = getattr(model.config, "model_type", None)
    if kind not in FAMILIES:
        raise ConfigError(f"adapter.kind=qst: no side network for model type '{kind}' "
                          f"(supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[kind]


def backbone_layers(model: nn.Module, fam: Family) -> nn.ModuleList:
    return model.base_model.get_submodule(fam.layers)


def mix_module(model: nn.Module, fam: Family) -> nn.Module | None:
    if fam.mix_at is None:
        return None
    try:
        return model.base_model.get_submodule(fam.mix_at)
    except AttributeError:  # e.g. OPT-350m has no final layer norm
        return None


MIN_HEAD_DIM = 16


def _largest_divisor(n: int, at_most: int, ok=lambda d: True) -> int:
    return next(d for d in range(min(n, at_most), 0, -1) if n % d == 0 and ok(d))


def side_config(config, r: int, fam: Family, min_head_dim: int = MIN_HEAD_DIM):
    """The backbone's config at width d/r (see the module docstring)."""
    d = getattr(config, fam.hidden)
    if d % r:
        raise ConfigError(f"adapter.r={r}: does not divide the backbone's hidden size {d}")
    ds = d // r
    heads = getattr(config, fam.heads)
    rope = fam.rotary is not None
    even = lambda h: not rope or (ds // h) % 2 == 0  # noqa: E731  (RoPE rotates pairs of channels)
    try:  # head dims of at least min_head_dim, so narrow side networks still attend usefully
        hs = _largest_divisor(ds, heads, lambda h: ds // h >= min_head_dim and even(h))
    except StopIteration:  # a side width below min_head_dim: one head of all of it
        hs = 1
    side = copy.deepcopy(config)
    setattr(side, fam.hidden, ds)
    setattr(side, fam.heads, hs)
    if fam.intermediate is not None:
        inner = getattr(config, fam.intermediate, None) or 4 * d  # GPT-2: n_inner None = 4d
        setattr(side, fam.intermediate, max(inner // r, 1))
    if fam.kv_heads is not None:
        kv = getattr(config, fam.kv_heads, None) or heads
        setattr(side, fam.kv_heads, _largest_divisor(hs, kv))
    if hasattr(side, "head_dim"):
        side.head_dim = ds // hs
    return side
