"""Prompt Tuning (Lester, Al-Rfou & Constant, EMNLP 2021, arXiv 2104.08691).

    X_e = [P ; E(X)]        P ∈ R^{n×d} trained, the whole model frozen

        P (n, d) ──────► expand (B, n, d) ─┐
                                           ├─► [P ; E(x)] (B, n + T, d) ─► frozen layers ─► drop n ─► head
        input_ids (B, T) ─► E ─► (B, T, d) ┘

n soft tokens are prepended at the input embeddings only (contrast Prefix Tuning, memtune.adapters.
prefix, which adds keys/values at every layer). Trainable: n·d (plus the classification head, trained
in full like LoRA's modules_to_save). How the soft tokens enter the model (a forward pre-hook on the
backbone, removed by `detach`, bypassed by `disabled_virtual_tokens`) and how they behave under
generation is described in memtune.adapters.virtual_tokens. Positions: the virtual tokens take
positions 0..n-1 and every real token moves n later, as in PEFT. With token_type_ids (BERT) the
virtual tokens get segment 0, as in PEFT.

Initialization (`init`, §3.2 and Fig. 3b of the paper: class-label > sampled vocabulary > random):

    random   U(-0.5, 0.5), the reference's `initializers.uniform(scale=0.5)` (PEFT's RANDOM is
             nn.Embedding's N(0, 1) instead)
    vocab    embeddings of n token ids drawn uniformly from the whole vocabulary (PEFT's SAMPLE_VOCAB;
             the reference draws from the 5,000 most frequent tokens, which a vocabulary does not tell)
    text     embeddings of `init_text`'s tokens, tiled or truncated to n (PEFT's TEXT), e.g. the class
             names or a task description

`text` needs a tokenizer while `attach` receives only the model: it loads the tokenizer named by
`tokenizer`, or by default the model's own, by `model.config.name_or_path` (which memtune's loader
sets to the preset name, local path or hub id), as PEFT loads `tokenizer_name_or_path`. Unlike PEFT
it tokenizes without special tokens (no [CLS]/[SEP] among the soft tokens). The resolved ids are
reported by `describe()` (summary.json). A config read from a saved adapter skips initialization:
the file holds the trained prompt.

Default n = 20: Lester et al. report only marginal gains beyond 20 tokens (Fig. 3a; the reference
configs use 100). `merged()` raises: a soft prompt is not a weight delta.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from .base import ADAPTERS
from .virtual_tokens import (VirtualTokenConfig, VirtualTokenMethod, VirtualTokens, common_from_peft,
                             param_dtype)

INIT_TO_PEFT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


@dataclass
class PromptTuningConfig(VirtualTokenConfig):
    """`adapter.kind: prompt` (distinct from the `prompt:` section, memtune.prompting, which
    classifies through a text template and label words; the two combine)."""

    kind: str = "prompt"
    num_virtual_tokens: int = 20  # n soft tokens (§3.2: little gain beyond 20)
    init: Literal["random", "vocab", "text"] = "vocab"  # §3.2 initializations
    init_text: str | None = None  # init=text: tokenized, tiled/truncated to n
    tokenizer: str | None = None  # init=text: tokenizer name/path; None = the model's own

    def check(self, prefix: str) -> None:
        super().check(prefix)
        if self.init == "text" and not self.init_text:
            raise ConfigError(f"{prefix}.init_text: init=text needs the text whose token embeddings start the "
                              f"prompt (e.g. adapter.init_text='Classify the sentiment')")
        if self.init != "text" and self.init_text is not None:
            raise ConfigError(f"{prefix}.init_text: only used with init=text, got init={self.init}")
        if self.init != "text" and self.tokenizer is not None:
            raise ConfigError(f"{prefix}.tokenizer: only used with init=text, got init={self.init}")


class SoftPrompt(VirtualTokens):
    """P (n, d) as `embedding.weight` (PEFT's PromptEmbedding names it the same)."""

    def __init__(self, n: int, d: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(n)
        self.embedding = nn.Embedding(n, d, dtype=dtype, device=device)

    def rewrite(self, body: nn.Module, kwargs: dict) -> int | None:
        cache = kwargs.get(self.cache_name)
        if cache is not None and cache.get_seq_length() > 0:
            # a decoding step: the cache already holds the n virtual positions (from the prefill)
            self.extend_mask(kwargs)
            self.shift_positions(kwargs, prepend=False)
            return None
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = body.get_input_embeddings()(kwargs["input_ids"])  # (B, T, d)
        B, T = embeds.shape[:2]
        prompt = self.embedding.weight.to(embeds.dtype).unsqueeze(0).expand(B, -1, -1)  # (B, n, d)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, n + T, d)
        kwargs["input_ids"] = None
        tt = kwargs.get("token_type_ids")
        if tt is not None:  # (B, T) -> (B, n + T), segment 0 for the virtual tokens
            kwargs["token_type_ids"] = torch.cat([tt.new_zeros(tt.shape[0], self.num_virtual_tokens), tt], dim=1)
        self.extend_mask(kwargs)
        self.shift_positions(kwargs, prepend=True)
        return T

    def prompt_embeddings(self) -> torch.Tensor:
        return self.embedding.weight  # (n, d)

    def load_prompt_embeddings(self, t: torch.Tensor) -> None:
        self.embedding.weight.copy_(t.to(self.embedding.weight.dtype))


def load_tokenizer(name: str):
    """A model's tokenizer by the name memtune loaded it under (preset, local path or hub id)."""
    from transformers import AutoTokenizer

    from ..models import TINY_PRESETS, byte_tokenizer, minilm_path

    if name in ("tiny-bert", "minilm"):  # both use MiniLM's WordPiece tokenizer
        name = minilm_path()
    elif name in TINY_PRESETS:
        return byte_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"adapter.tokenizer: cannot load a tokenizer from '{name}' for init=text: {first}") from None


def tile(ids: list[int], n: int) -> list[int]:
    """Repeat or truncate `ids` to exactly n entries (PEFT's TEXT rule)."""
    return (ids * math.ceil(n / len(ids)))[:n]


@ADAPTERS.register("prompt", PromptTuningConfig)
class PromptTuning(VirtualTokenMethod):
    config: PromptTuningConfig
    peft_type = "PROMPT_TUNING"
    # inside the backbone the hidden states are (B, n + T, d): a pooler there sees the soft tokens
    prepends_hidden_states = True

    def __init__(self, config: PromptTuningConfig, task: str) -> None:
        super().__init__(config, task)
        self.init_token_ids: list[int] | None = None
        self.tokenizer_name: str | None = None

    @classmethod
    def config_from_file(cls, peft_config: dict, path: Path) -> PromptTuningConfig:
        common = common_from_peft(peft_config, path, cls.peft_type)
        init = {v: k for k, v in INIT_TO_PEFT.items()}.get(str(peft_config.get("prompt_tuning_init", "RANDOM")),
                                                           "random")
        text = peft_config.get("prompt_tuning_init_text") if init == "text" else None
        if init == "text" and not text:
            init = "random"
        tok = peft_config.get("tokenizer_name_or_path") if init == "text" else None
        return PromptTuningConfig(init=init, init_text=text, tokenizer=tok, **common)

    def build(self, model: nn.Module) -> SoftPrompt:
        cfg, g = self.config, self.geometry
        dtype, device = param_dtype(model)
        prompt = SoftPrompt(cfg.num_virtual_tokens, g.hidden, dtype, device)
        if cfg.path:  # weights come from the file: no (tokenizer-dependent) initialization
            return prompt
        emb = model.get_input_embeddings().weight  # (V, d)
        with torch.no_grad():
            if cfg.init == "random":
                nn.init.uniform_(prompt.embedding.weight, -0.5, 0.5)
            else:
                if cfg.init == "vocab":
                    ids = torch.randint(0, emb.shape[0], (cfg.num_virtual_tokens,)).tolist()
                else:
                    self.tokenizer_name = cfg.tokenizer or model.config.name_or_path
                    tok = load_tokenizer(self.tokenizer_name)
                    text_ids = tok(cfg.init_text)["input_ids"]  # with the tokenizer's special tokens, as PEFT
                    if not text_ids:
                        raise ConfigError(f"adapter.init_text: {cfg.init_text!r} has no tokens")
                    ids = tile(text_ids, cfg.num_virtual_tokens)
                self.init_token_ids = ids
                prompt.embedding.weight.copy_(emb[torch.tensor(ids, device=emb.device)].to(dtype))
        return prompt

    def peft_config(self, base_name: str) -> dict:
        c, g = self.config, self.geometry
        text = c.init == "text"
        return {**super().peft_config(base_name), "peft_type": self.peft_type, "token_dim": g.hidden,
                "num_attention_heads": g.heads, "prompt_tuning_init": INIT_TO_PEFT[c.init],
                "prompt_tuning_init_text": c.init_text if text else None,
                "tokenizer_name_or_path": (c.tokenizer or base_name) if text else None, "tokenizer_kwargs": None}

    def describe(self) -> dict:
        out = {**super().describe(), "init": self.config.init}
        if self.init_token_ids is not None:
            out["init_token_ids"] = self.init_token_ids
        if self.tokenizer_name is not None:
            out["init_tokenizer"] = self.tokenizer_name
        return out
