"""Wires the registries into the recipe parser and holds the rules about combining axes."""

from __future__ import annotations

from . import recipe as _recipe
from .adapters import ADAPTERS
from .attention import AttentionConfig
from .classifier_init import ClassifierInitConfig
from .distributed.config import DistributedConfig
from .errors import ConfigError
from .gradient import OPTIMIZERS
from .gradient.tokentune import TokenTuneConfig
from .prompting import PromptConfig, check_label_words
from .storage import STORAGE

_recipe.POLYMORPHIC.update({
    "quantize": (STORAGE, _recipe.StorageConfig),
    "adapter": (ADAPTERS, _recipe.AdapterConfig),
    "optimizer": (OPTIMIZERS, _recipe.OptimizerConfig),
})
_recipe.OPTIONAL.update({"tokentune": TokenTuneConfig, "prompt": PromptConfig,
                         "classifier_init": ClassifierInitConfig})
_recipe.OPTIONAL.update({"attention": AttentionConfig, "distributed": DistributedConfig})


def apply_axis_defaults(raw: dict) -> None:
    """Defaults one axis value sets for another, in the raw recipe before it is parsed: an adapter
    with a `default_storage` (QST: nf4, the paper's 4-bit backbone) gets it when the recipe has no
    `quantize` section at all (any quantize key, e.g. `quantize.dtype=bf16`, keeps the usual default)."""
    from .stored import get_dotted

    kind = get_dotted(raw, "adapter.kind")
    if not isinstance(kind, str) or kind not in ADAPTERS:
        return
    storage = getattr(ADAPTERS.get(kind), "default_storage", None)
    if storage is not None and raw.get("quantize") is None:
        _recipe.set_dotted(raw, "quantize.kind", storage)


def _needs_backbone_backprop(r: "_recipe.Recipe") -> list[tuple[str, str]]:
    """Recipe features that work on the backbone's backward pass: (how the recipe asks, what it does)."""
    out = []
    if r.tokentune is not None:
        out.append(("tokentune", "TokenTune selects which backbone tokens backpropagate"))
    if r.train.gradient_checkpointing:
        out.append(("train.gradient_checkpointing", "checkpointing recomputes the backbone's activations in "
                                                    "the backward pass"))
    if getattr(r.attention, "kind", None) == "s2":
        out.append(("attention.kind=s2", "S2-Attn replaces the attention of layers that record gradients"))
    return out


def check_combination(r: "_recipe.Recipe") -> None:
    """Reject combinations of axis values that cannot work, saying why."""
    if r.train.precision == "bf16" and getattr(r.quantize, "dtype", "auto") == "fp16":
        raise ConfigError("train.precision=bf16 with quantize.dtype=fp16: pick one half-precision type")
    if STORAGE.get(r.quantize.kind).quantized and r.adapter.kind == "full":
        raise ConfigError(f"quantize.kind={r.quantize.kind} with adapter.kind=full: a quantized base is frozen "
                          f"(its weights are codes, not floats); train an adapter over it, e.g. adapter.kind=lora")
    if not OPTIMIZERS.get(r.optimizer.kind).uses_backprop:
        if r.train.grad_accum != 1:
            raise ConfigError(f"train.grad_accum={r.train.grad_accum} with optimizer.kind={r.optimizer.kind}: a "
                              f"zeroth-order step has no gradients to accumulate; raise train.batch_size instead")
        if r.train.gradient_checkpointing:
            raise ConfigError(f"train.gradient_checkpointing with optimizer.kind={r.optimizer.kind}: it runs no "
                              f"backward pass, so there are no activations to checkpoint")
        if ADAPTERS.get(r.adapter.kind).needs_gradients:
            raise ConfigError(f"adapter.kind={r.adapter.kind} with optimizer.kind={r.optimizer.kind}: the adapter "
                              f"reads gradients during training, and this optimizer computes none")
    if getattr(r.optimizer, "objective", "ce") in ("accuracy", "f1") and r.task != "classification":
        raise ConfigError(f"optimizer.objective={r.optimizer.objective}: needs task=classification (predicted "
                          f"classes), got task={r.task}")
    if r.tokentune is not None:
        if not OPTIMIZERS.get(r.optimizer.kind).uses_backprop:
            raise ConfigError(f"tokentune with optimizer.kind={r.optimizer.kind}: TokenTune selects which tokens "
                              f"backpropagate, and this optimizer does not backpropagate at all")
        if r.train.gradient_checkpointing:
            raise ConfigError("tokentune with train.gradient_checkpointing: TokenTune already keeps activations "
                              "only for the selected tokens; checkpointing would recompute its two-stream forward "
                              "outside the selection. Use one of them")
    adapter_cls = ADAPTERS.get(r.adapter.kind)
    if not getattr(adapter_cls, "backbone_backprop", True):
        for feature, what in _needs_backbone_backprop(r):
            raise ConfigError(f"{feature} with adapter.kind={r.adapter.kind}: {what}, and this adapter runs the "
                              f"backbone without gradient (only its side network trains). Use one of them")
    if r.train.gradient_checkpointing and not getattr(adapter_cls, "supports_gradient_checkpointing", True):
        raise ConfigError(f"train.gradient_checkpointing with adapter.kind={r.adapter.kind}: the adapter lives in "
                          f"the KV cache, which checkpointed layers drop during training (and recomputation "
                          f"would extend twice). Use one of them")
    if r.tokentune is not None and getattr(adapter_cls, "extends_sequence", False):
        raise ConfigError(f"tokentune with adapter.kind={r.adapter.kind}: the adapter adds positions the model "
                          f"attends over (virtual tokens or key/value prefixes), while TokenTune permutes the "
                          f"batch's tokens and replaces the attention mask with its own (B, 1, T, T) mask. Use "
                          f"one of them")
    if getattr(adapter_cls, "extends_sequence", False) and getattr(getattr(r, "attention", None), "kind", None) == "s2":
        raise ConfigError(f"attention.kind=s2 with adapter.kind={r.adapter.kind}: S2-Attn lets tokens attend only "
                          f"within their group during training, so most tokens would not see the virtual tokens "
                          f"(and a key/value prefix makes it fall back to dense attention). Use one of them")
    if getattr(r, "pooling", "model") != "model" and getattr(adapter_cls, "prepends_hidden_states", False):
        raise ConfigError(f"pooling={r.pooling} with adapter.kind={r.adapter.kind}: the backbone's pooler would see "
                          f"the adapter's virtual tokens in front of the sequence, while the mask it pools with "
                          f"covers the real tokens only. Use one of them")
    if r.prompt is not None:
        if r.task != "classification":
            raise ConfigError(f"prompt with task={r.task}: a prompt scores class label words; it needs "
                              f"task=classification")
        check_label_words(r.prompt, r.data.labels)
        if r.tokentune is not None:
            raise ConfigError("tokentune with prompt: TokenTune permutes tokens and keeps the loss only at "
                              "selected positions, while prompt scoring reads the logits at {mask} or after the "
                              "prompt's last token. Use one of them")
    if r.pooling != "model" and (r.task != "classification" or r.prompt is not None):
        raise ConfigError(f"pooling={r.pooling}: pools the feature a classification head reads; it needs "
                          f"task=classification without a prompt (got task={r.task}"
                          f"{', with a prompt' if r.prompt is not None else ''})")
    if r.classifier_init is not None:
        if r.task != "classification":
            raise ConfigError(f"classifier_init with task={r.task}: it initializes a classification head; it "
                              f"needs task=classification")
        if r.prompt is not None:
            raise ConfigError("classifier_init with prompt: a prompt classifies through the LM head and its "
                              "label words, so there is no classification head to initialize. Use one of them")
    _check_attention(r)
    strategy = getattr(r.distributed, "strategy", "auto")
    if strategy not in ("auto", "none"):
        check_strategy(r, strategy)


def check_strategy(r: "_recipe.Recipe", strategy: str) -> None:
    """The recipe under the distributed strategy a run resolved (explicit, or what a launcher asked for)."""
    adapter_cls = ADAPTERS.get(r.adapter.kind)
    if strategy == "fsdp" and adapter_cls.needs_gradients:
        raise ConfigError(f"adapter.kind={r.adapter.kind} with distributed.strategy=fsdp: the adapter reads "
                          f"whole gradients of its parameters to rank them globally, and FSDP gives each rank a "
                          f"shard of them; use distributed.strategy=ddp")


def _check_attention(r: "_recipe.Recipe") -> None:
    """S2-Attn, from the `attention:` section or from an adapter that sets it (LongLoRA)."""
    own = getattr(r.adapter, "attention", None)  # an adapter config with its own attention field
    if r.attention is not None and own is not None:
        raise ConfigError(f"attention with adapter.kind={r.adapter.kind}: this adapter sets its attention itself "
                          f"(adapter.attention=s2|dense, adapter.group_ratio); remove the attention: section")
    kind = getattr(r.attention, "kind", None)
    if kind == "eager" and r.tokentune is not None:
        raise ConfigError("tokentune with attention.kind=eager: TokenTune replaces the model's attention function "
                          "with its own two-stream attention (over SDPA), so the eager kernel would not run; use "
                          "one of them (attention.kind=dense)")
    where = "attention.kind=s2" if kind == "s2" else (
        f"adapter.kind={r.adapter.kind} (adapter.attention=s2)" if own == "s2" else None)
    if where is None:
        return
    off = "adapter.attention=dense" if own == "s2" else "attention.kind=dense"
    if r.tokentune is not None:
        raise ConfigError(f"tokentune with {where}: both replace the model's attention function (TokenTune's "
                          f"two-stream attention, S2's shifted groups); use one of them ({off})")
    if not OPTIMIZERS.get(r.optimizer.kind).uses_backprop:
        raise ConfigError(f"{where} with optimizer.kind={r.optimizer.kind}: S2-Attn is a training-time approximation "
                          f"that runs only while gradients are recorded, and this optimizer records none (its "
                          f"forwards attend densely); set {off}")
