"""Mean pooling for encoder classifiers (`pooling: mean` in the recipe).

BERT-style sequence classifiers read one feature per sequence from their pooler: the [CLS] state
through a dense layer and tanh. Sentence encoders such as all-MiniLM-L6-v2 are trained with the
*mean* of the token states instead, and their [CLS] pooler is left untrained; on SST-2 its features
barely separate the classes (nearest class centroid, 64 sentences per class: 0.61 dev accuracy
with the pooler, 0.72 with the mean). With `pooling: mean` the classifier reads

    x = sum_t m_t h_t / sum_t m_t          h (B, T, H) last hidden states, m (B, T) attention mask

`MeanPooler` replaces the backbone's pooler module (it has no parameters). A pooler is called with
the hidden states only, so the mask reaches it through a forward pre-hook on the top model, which
hands the call's `attention_mask` to the pooler for the duration of that call (and a forward hook
clears it). Both hooks are registered here and nowhere else.

Runs keep `pooling` in their recipe, so `memtune eval` / `merge` rebuild the same model. A full
model saved with it has no pooler weights: plain transformers would load it with a random [CLS]
pooler, so load such a model through memtune with `pooling=mean`.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ConfigError

POOLINGS = ("model", "mean")


class MeanPooler(nn.Module):
    """Masked mean over the sequence. hidden (B, T, H) -> (B, H)."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None  # (B, T), set by the top model's pre-hook per call

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            m = hidden.new_ones(hidden.shape[:2])
        else:
            m = token_mask(self.mask).to(hidden.dtype)  # (B, T)
        return (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)


def token_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) real-token mask from the call's attention mask: a (B, T) padding mask as it is. A
    (B, 1, T, T) mask is TokenTune's two-stream forward (memtune.gradient.tokentune), whose token order
    is permuted; its real columns are the active layout's `valid` (a mean does not depend on the order)."""
    if mask.dim() != 4:
        return mask
    from .gradient.tokentune import active_valid

    valid = active_valid()
    if valid is None:
        raise ConfigError("pooling=mean: the model was called with a 4-D attention mask outside TokenTune's "
                          "forward; mean pooling needs the (batch, tokens) padding mask")
    return valid


def _pooler_owner(model: nn.Module) -> nn.Module:
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if base is None or getattr(base, "pooler", None) is None:
        raise ConfigError(f"pooling=mean: {type(model).__name__} has no pooler module to replace (mean pooling "
                          f"applies to encoder classifiers such as BERT; decoders classify from the last token)")
    return base


def use_mean_pooling(model: nn.Module) -> MeanPooler:
    """Replace the backbone's pooler with a `MeanPooler` fed by the call's attention mask."""
    base = _pooler_owner(model)
    pooler = MeanPooler()
    base.pooler = pooler

    def give_mask(module, args, kwargs):
        # transformers' classifiers take (input_ids, attention_mask, ...) positionally too
        pooler.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        return None

    def clear_mask(module, args, kwargs, output):
        pooler.mask = None
        return None

    model.register_forward_pre_hook(give_mask, with_kwargs=True)
    model.register_forward_hook(clear_mask, with_kwargs=True)
    return pooler
