"""Shared machinery of the virtual-token adapters: Prompt Tuning, Prefix Tuning, P-Tuning v2.

These methods add positions the frozen model attends over instead of changing any weight:

    Prompt Tuning   X_e = [P ; E(X)]                  P (n, d): n soft tokens at the input only
    Prefix Tuning   K'_l = [Pk_l ; K_l], V'_l = [Pv_l ; V_l]   per-layer key/value prefixes (n of them)

         input_ids ─► ┌─────────────── backbone (frozen) ───────────────┐ ─► head ─► logits (B, T, ·)
                      │ pre-hook: [P ; E(x)] / prefix into the KV cache │
                      │ post-hook: drop the n virtual hidden states     │
                      └─────────────────────────────────────────────────┘

Integration point: two `nn.Module` hooks on the *backbone*, the transformer body that embeds the
tokens (LlamaModel, BertModel, GPT2Model, OPT's decoder: found structurally as the innermost module
above the input embedding whose forward takes input_ids, inputs_embeds and attention_mask),
registered by `attach` and removable (`detach`):

* a forward pre-hook (`with_kwargs=True`) that rewrites the backbone's inputs: Prompt Tuning turns
  `input_ids` into `inputs_embeds` with the soft tokens prepended; Prefix Tuning puts the prefix
  into the KV cache (`cache`, `past_key_values` before transformers 5.24: a `DynamicCache`). Both extend the 2-D
  `attention_mask` by n ones and move given `position_ids` n places later;
* a forward hook that, for Prompt Tuning, slices the n virtual positions off `last_hidden_state`
  (and `hidden_states`), after the backbone computed everything that reads them (BERT's pooler
  reads position 0, the first virtual token, exactly as PEFT's model does); and that keeps a KV
  cache the pre-hook created for a caller who asked for none (`use_cache=False`) out of the output.

Why the backbone and not the top model (PEFT wraps the top model's forward): every head then sees
exactly the real positions, so nothing downstream changes. Causal-LM logits stay (B, T, V), so the
task's label shift and `logits_to_keep` are untouched and the LM head is not computed for virtual
positions; a decoder classifier (Llama `score`) still finds each row's last real token from its
`input_ids` (PEFT hands it `inputs_embeds`, where transformers cannot see padding and pools the last
column); prompt-based classification (memtune.prompting) reads logits at the same columns. The
training loop, `tasks.py` and `pipeline.py` know nothing of these methods.

Generation (`model.generate`, KV cache on): transformers creates an empty `DynamicCache` and calls
the model with it. The pre-hook recognises the prefill by the empty cache: Prefix Tuning writes the
prefix into that very cache object (so it lives in the cache for every later step), Prompt Tuning
prepends the soft tokens to the prefill. At later steps the cache already holds the n virtual
entries; the hook only extends the mask and positions. Without a cache (`use_cache=False`) every
forward is a prefill.

The adapter's parameters live in a submodule of the backbone (`<backbone>.prompt_encoder`), so they
move with `model.to`, train through `named_parameters` and resume from checkpoints like any other
trainable tensor, and are not mistaken for an output head (`memtune.models.head_modules`).

Files follow PEFT's prompt-learning layout: `adapter_config.json` (PROMPT_TUNING / PREFIX_TUNING)
and `adapter_model.safetensors` with the single key `prompt_embeddings` plus, for classification,
the head under `base_model.<module path>.<param>` (PEFT's key for `modules_to_save` of a
prompt-learning model, which has no `.model.` in it).

`merged()` raises a MemtuneError: virtual tokens are extra attended positions, not a weight delta,
so there is nothing to fold into the weights (`memtune merge` reports that; evaluate or generate
with the adapter attached instead). Limits: one virtual-token adapter per model; 2-D attention masks
only (a 4-D mask cannot be extended without knowing its layout); encoder-decoder models are not
supported (PEFT's num_transformer_submodules=2); `attentions` outputs still include the virtual
positions (hidden states do not); inside the backbone a Prompt-Tuning sequence is n + T long, so
absolute-position models need n + T <= max_position_embeddings and a pooler that reads the caller's
(B, T) mask (`pooling: mean`) cannot be combined with it (the recipe rejects that).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ConfigError, MemtuneError, ModelError
from ..recipe import AdapterConfig
from .base import AdapterMethod, set_trainable
from .peft_format import CONFIG_FILE, TASK_TYPES, WEIGHTS_FILE, copy_tensors, read_config

PROMPT_KEY = "prompt_embeddings"  # PEFT's one key for a prompt-learning adapter's virtual tokens
MODULE_PREFIX = "base_model."  # PEFT's key prefix for modules_to_save of a prompt-learning model
ENCODER_NAME = "prompt_encoder"  # the adapter submodule, attached to the backbone


@dataclass
class VirtualTokenConfig(AdapterConfig):
    """Fields shared by every virtual-token method."""

    num_virtual_tokens: int = 20  # n: soft tokens / prefix length
    modules_to_save: list[str] | None = None  # trained in full; None = the head for classification

    def check(self, prefix: str) -> None:
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"{prefix}.num_virtual_tokens: expected >= 1, got {self.num_virtual_tokens}")


# ------------------------------------------------------------------------------------------------
# Model geometry


@dataclass
class Geometry:
    """What the virtual tokens must fit: PEFT's `_prepare_prompt_learning_config` rules."""

    num_layers: int
    hidden: int  # token_dim of Prompt Tuning: the input embedding width
    heads: int
    kv_heads: int  # grouped-query attention caches fewer key/value heads (PEFT #1901)
    head_dim: int

    @property
    def kv_dim(self) -> int:
        """token_dim of Prefix Tuning: the width of one layer's cached keys (or values)."""
        return self.kv_heads * self.head_dim


def geometry(model: nn.Module) -> Geometry:
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    try:
        layers, hidden, heads = cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads
    except AttributeError as e:
        raise ModelError(f"{type(model).__name__}: cannot read layers/hidden size/heads from its config "
                         f"({e})") from None
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    return Geometry(layers, hidden, heads, kv_heads, head_dim)


BODY_INPUTS = ("input_ids", "inputs_embeds", "attention_mask")


def backbone(model: nn.Module) -> nn.Module:
    """The transformer body whose inputs the hooks rewrite: the innermost module above the input
    embedding whose forward takes input_ids, inputs_embeds and attention_mask (LlamaModel,
    BertModel, GPT2Model; OPT's `model.decoder`, which OPTForCausalLM calls directly, bypassing
    `model.model`)."""
    emb = model.get_input_embeddings()
    path = next((n for n, m in model.named_modules() if m is emb), None)
    if path is None:
        raise ModelError(f"{type(model).__name__}: its input embedding is not one of its modules")
    parts = path.split(".")[:-1]
    for i in range(len(parts), -1, -1):
        m = model.get_submodule(".".join(parts[:i]))
        if all(k in _forward_params(type(m)) for k in BODY_INPUTS):
            return m
    raise ModelError(f"{type(model).__name__}: no module above its input embedding takes "
                     f"{', '.join(BODY_INPUTS)}; virtual tokens cannot be attached")


def param_dtype(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """(dtype to train the adapter in, device): fp32 over a half-precision base, as LoRA does."""
    w = model.get_input_embeddings().weight
    dtype = w.dtype if w.dtype in (torch.float32, torch.float64) else torch.float32
    return dtype, w.device


# ------------------------------------------------------------------------------------------------
# The adapter module and its hooks


@functools.cache
def _forward_params(cls: type) -> tuple[str, ...]:
    return tuple(list(inspect.signature(cls.forward).parameters)[1:])


def cache_kwarg(body: nn.Module) -> str:
    """The backbone's name for its KV cache argument and output field: `cache` from transformers
    5.24 on (with `past_key_values` a deprecated alias that is dropped when both are passed, as the
    heads do), `past_key_values` before."""
    return "cache" if "cache" in _forward_params(type(body)) else "past_key_values"


class VirtualTokens(nn.Module, metaclass=ABCMeta):
    """Base of the module a method attaches to the backbone; subclasses implement `rewrite`.

    `enabled=False` (see `disabled_virtual_tokens`) makes the hooks pass inputs through, so the
    model computes exactly the base model.
    """

    def __init__(self, num_virtual_tokens: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.enabled = True
        self._handles: list = []
        # per active backbone call: (real length T to keep after n prepended positions, or None;
        # whether the output's cache is ours alone and must not be handed back)
        self._calls: list[tuple[int | None, bool]] = []
        self.cache_name = "past_key_values"  # the backbone's KV cache argument (set by `hook`)

    # -- hooks ------------------------------------------------------------------------------
    def hook(self, body: nn.Module) -> None:
        self.cache_name = cache_kwarg(body)
        self._handles = [body.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                         body.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True)]

    def unhook(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _pre_hook(self, body: nn.Module, args: tuple, kwargs: dict):
        self._calls.append((None, False))  # popped by the post-hook, which runs even if the forward raises
        if not self.enabled:
            return None
        if args:  # e.g. BertForSequenceClassification calls self.bert(input_ids, ...)
            kwargs = {**dict(zip(_forward_params(type(body)), args)), **kwargs}
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise MemtuneError(f"{type(self).__name__}: expected a 2-D attention_mask (B, T), got shape "
                               f"{tuple(mask.shape)}; virtual tokens extend the mask themselves")
        name = self.cache_name
        if name != "past_key_values" and "past_key_values" in kwargs:  # the deprecated alias, renamed once here
            old = kwargs.pop("past_key_values")
            if kwargs.get(name) is None:
                kwargs[name] = old
        own_cache = kwargs.get(name) is None and kwargs.get("use_cache") is False
        keep = self.rewrite(body, kwargs)
        # a cache the hook created although the caller asked for none (generate with use_cache=False)
        # must not come back: the caller would pass it to the next step as if it had asked for it
        self._calls[-1] = (keep, own_cache and kwargs.get(name) is not None)
        return (), kwargs

    def _post_hook(self, body: nn.Module, args: tuple, kwargs: dict, output):
        keep, own_cache = self._calls.pop() if self._calls else (None, False)
        if output is None or (keep is None and not own_cache):
            return None
        if isinstance(output, tuple):  # return_dict=False: (last_hidden_state, ...)
            return (output[0][:, -keep:],) + output[1:] if keep is not None else None
        if own_cache and getattr(output, self.cache_name, None) is not None:
            setattr(output, self.cache_name, None)  # what the heads read (ModelOutput keeps None out of its dict)
        if keep is not None:
            # output: BaseModelOutput*; drop the n virtual positions in front: (B, n + T, d) -> (B, T, d)
            output.last_hidden_state = output.last_hidden_state[:, -keep:]
            hs = getattr(output, "hidden_states", None)
            if hs is not None:
                output.hidden_states = tuple(h[:, -keep:] for h in hs)
        return output

    @abstractmethod
    def rewrite(self, body: nn.Module, kwargs: dict) -> int | None:
        """Rewrite the backbone's keyword inputs in place; return the real length T when n
        positions were prepended to the sequence (the post-hook then slices them off)."""

    # -- shared input edits -------------------------------------------------------------------
    def extend_mask(self, kwargs: dict) -> None:
        """attention_mask (B, T) -> (B, n + T): the virtual positions are always attended to."""
        mask = kwargs.get("attention_mask")
        if mask is not None:
            ones = mask.new_ones(mask.shape[0], self.num_virtual_tokens)
            kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)

    def shift_positions(self, kwargs: dict, prepend: bool) -> None:
        """Given position_ids (B or 1, T): real tokens move n places later; with `prepend`, the n
        virtual tokens take positions 0..n-1 in front. (Absent position_ids, the model counts from
        the cache length, which gives the same numbers.)"""
        pos = kwargs.get("position_ids")
        if pos is None:
            return
        n = self.num_virtual_tokens
        shifted = pos + n
        if prepend:
            virtual = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], n)
            shifted = torch.cat([virtual, shifted], dim=-1)
        kwargs["position_ids"] = shifted

    # -- files --------------------------------------------------------------------------------
    @abstractmethod
    def prompt_embeddings(self) -> torch.Tensor:
        """What PEFT saves under `prompt_embeddings` (its `get_prompt_embedding_to_save`)."""

    @abstractmethod
    def load_prompt_embeddings(self, t: torch.Tensor) -> None:
        """Set the trained tokens from a saved `prompt_embeddings` tensor."""


def virtual_token_modules(model: nn.Module) -> list[VirtualTokens]:
    return [m for m in model.modules() if isinstance(m, VirtualTokens)]


@contextlib.contextmanager
def disabled_virtual_tokens(model: nn.Module):
    """Context: run the base model (hooks pass inputs through unchanged)."""
    mods = virtual_token_modules(model)
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


# ------------------------------------------------------------------------------------------------
# The method base


class VirtualTokenMethod(AdapterMethod):
    """attach/save/load shared by the virtual-token methods; subclasses build the module."""

    config: VirtualTokenConfig
    # the adapter adds positions the model attends over (soft tokens or key/value prefixes), so a
    # gradient rule that rewrites the token layout and attention mask itself (TokenTune) cannot apply
    extends_sequence = True

    def __init__(self, config: VirtualTokenConfig, task: str) -> None:
        super().__init__(config, task)
        self.saved_modules: list[str] = []
        self.geometry: Geometry | None = None

    @abstractmethod
    def build(self, model: nn.Module) -> VirtualTokens:
        """The method's VirtualTokens module for `model`."""

    def attach(self, model: nn.Module) -> None:
        if virtual_token_modules(model):
            raise ModelError(f"{type(model).__name__} already has virtual-token adapters attached")
        set_trainable(model, False)
        self.saved_modules = self._modules_to_save(model)  # before the encoder exists
        self.geometry = geometry(model)
        body = backbone(model)
        encoder = self.build(model)
        body.add_module(ENCODER_NAME, encoder)
        encoder.hook(body)
        for name in self.saved_modules:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)

    def detach(self, model: nn.Module) -> None:
        """Remove the hooks and the adapter module: the model is the base model again."""
        body = backbone(model)
        enc = getattr(body, ENCODER_NAME, None)
        if isinstance(enc, VirtualTokens):
            enc.unhook()
            delattr(body, ENCODER_NAME)

    def encoder(self, model: nn.Module) -> VirtualTokens:
        enc = getattr(backbone(model), ENCODER_NAME, None)
        if not isinstance(enc, VirtualTokens):
            raise ModelError(f"{type(model).__name__}: no virtual-token adapter attached (call attach first)")
        return enc

    # -- files -------------------------------------------------------------------------------
    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """On-disk name -> tensor: `prompt_embeddings` and the saved modules' parameters."""
        out = {PROMPT_KEY: self.encoder(model).prompt_embeddings()}
        for name in self.saved_modules:
            for pname, p in model.get_submodule(name).named_parameters():
                out[f"{MODULE_PREFIX}{name}.{pname}"] = p
        return out

    def peft_config(self, base_name: str) -> dict:
        g = self.geometry
        return {"task_type": TASK_TYPES[self.task], "base_model_name_or_path": base_name,
                "num_virtual_tokens": self.config.num_virtual_tokens, "num_transformer_submodules": 1,
                "num_layers": g.num_layers, "modules_to_save": self.saved_modules or None,
                "inference_mode": True, "revision": None, "auto_mapping": None}

    def save(self, model: nn.Module, run_dir: Path, base_name: str) -> Path:
        out = Path(run_dir) / self.artifact
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.adapter_tensors(model).items()}
        tmp_w, tmp_c = out / (WEIGHTS_FILE + ".tmp"), out / (CONFIG_FILE + ".tmp")
        save_file(tensors, str(tmp_w), metadata={"format": "pt"})
        tmp_c.write_text(json.dumps(self.peft_config(base_name), indent=2, sort_keys=True) + "\n")
        os.replace(tmp_w, out / WEIGHTS_FILE)
        os.replace(tmp_c, out / CONFIG_FILE)
        return out

    def load(self, model: nn.Module, path: Path) -> None:
        tensors = read_prompt_adapter(Path(path))
        enc = self.encoder(model)
        expected = {k: v for k, v in self.adapter_tensors(model).items() if k != PROMPT_KEY}
        missing = sorted((set(expected) | {PROMPT_KEY}) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected) - {PROMPT_KEY})
        if missing or unexpected:
            raise ModelError(f"{path}: adapter does not fit the model: {len(missing)} tensors missing "
                             f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        want = enc.prompt_embeddings().shape
        if tensors[PROMPT_KEY].shape != want:
            raise ModelError(f"{path}: '{PROMPT_KEY}' has shape {tuple(tensors[PROMPT_KEY].shape)}, the model "
                             f"expects {tuple(want)}")
        with torch.no_grad():
            enc.load_prompt_embeddings(tensors[PROMPT_KEY])
        copy_tensors(path, expected, tensors)

    def merged(self, model: nn.Module) -> nn.Module:
        """Not defined: virtual tokens are extra attended positions, not a weight delta."""
        raise MemtuneError(f"adapter.kind={self.config.kind}: cannot be merged into the base weights (its "
                           f"virtual tokens are extra positions the model attends over, not a weight update); "
                           f"evaluate or generate with the adapter attached instead (memtune eval, or "
                           f"peft.PeftModel.from_pretrained on the run's adapter/)")

    def disabled(self, model: nn.Module):
        return disabled_virtual_tokens(model)

    def describe(self) -> dict:
        return {"num_virtual_tokens": self.config.num_virtual_tokens, "modules_to_save": self.saved_modules}


def read_prompt_adapter(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a prompt-learning adapter directory, keyed as on disk."""
    read_config(path)
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        return load_file(str(weights))
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise ModelError(f"{path}: no {WEIGHTS_FILE} (or adapter_model.bin)")


def common_from_peft(peft_cfg: dict, path: Path, tag: str) -> dict:
    """Constructor fields shared by the virtual-token configs, from a PEFT adapter_config.json."""
    if peft_cfg.get("peft_type") != tag:
        raise ModelError(f"{path}: peft_type {peft_cfg.get('peft_type')!r} is not {tag}")
    subs = peft_cfg.get("num_transformer_submodules") or 1
    if subs != 1:
        raise ModelError(f"{path}: num_transformer_submodules={subs} (encoder-decoder models) is not supported")
    n = peft_cfg.get("num_virtual_tokens")
    if not isinstance(n, int) or n < 1:
        raise ModelError(f"{path}: adapter_config.json has no valid num_virtual_tokens (got {n!r})")
    return {"num_virtual_tokens": n, "modules_to_save": peft_cfg.get("modules_to_save"), "path": str(path)}
