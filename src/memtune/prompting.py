"""Prompt-based classification: classify with the model's own LM head through a template and label words.

Each class c has a label word w_c. An example is rendered through a template and the classes are
scored by how well the language model predicts their word there (Gao et al., LM-BFF, ACL 2021; the
recipe MeZO starts from, Malladi et al., NeurIPS 2023, which is why it matters: zeroth-order
training needs a start that already scores the task above chance):

    causal LM   "{text} It was"          score_c = (1/m) sum_j log p(w_c,j | prompt, w_c,<j)
                                          (mean log-prob of w_c's m tokens as the prompt's continuation;
                                          MeZO's --train_as_classification)
    masked LM   "{text} It was {mask} ."  score_c = log p([MASK] = w_c | prompt)
                                          (log_softmax over the vocabulary at the mask, at w_c's id;
                                          each w_c must be one token)

    loss = sum over examples of CE(scores (C,), label)        prediction = argmax_c score_c

Placeholders: `{text}`, optional `{text_pair}`, `{mask}` (the tokenizer's mask token; its presence
selects the masked-LM path). `{{` and `}}` are literal braces. The model is loaded with its LM head
(`AutoModelForCausalLM` / `AutoModelForMaskedLM`), not a sequence classifier, so no new weights are
needed and an adapter (LoRA) or full fine-tuning trains it like any other model.

Label words are tokenized on their own (a causal LM's word usually starts with a space, " great").
Truncation to data.max_length removes tokens from the end of the text (longest field first for
pairs), never from the template, so "It was {mask} ." always survives.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data.formats import _bos
from .errors import ConfigError, DataError
from .models import CAUSAL_LM, MASKED_LM
from .tasks import ClassificationTask, model_inputs

PLACEHOLDERS = ("text", "text_pair", "mask")


@dataclass
class PromptConfig:
    """`prompt:` section (absent = a sequence-classification head on the model's features)."""

    template: str = "{text} It was"  # {text}, optional {text_pair}, {mask} for masked LMs
    label_words: list[str] = field(default_factory=list)  # one per class, in data.labels order

    def check(self, prefix: str) -> None:
        parse_template(self.template, f"{prefix}.template")
        words = self.label_words
        if not words:
            raise ConfigError(f"{prefix}.label_words: expected one label word per class (e.g. "
                              f"[' terrible', ' great']), got an empty list")
        for i, w in enumerate(words):
            if not w.strip():
                raise ConfigError(f"{prefix}.label_words[{i}]: a label word cannot be empty or blank, got {w!r}")
        dup = next((w for i, w in enumerate(words) if w in words[:i]), None)
        if dup is not None:
            raise ConfigError(f"{prefix}.label_words: {dup!r} appears twice; each class needs its own word")

    @property
    def head(self) -> str:
        """The LM head the model is loaded with: `masked-lm` when the template has {mask}."""
        return MASKED_LM if "mask" in dict(parse_template(self.template, "prompt.template")).values() else CAUSAL_LM


def check_label_words(config: PromptConfig, labels: list[str] | None, prefix: str = "prompt") -> None:
    """One label word per class, in data.labels order (labels may be known only after reading the data)."""
    if labels is not None and len(config.label_words) != len(labels):
        raise ConfigError(f"{prefix}.label_words: {len(config.label_words)} words {config.label_words} for "
                          f"{len(labels)} classes {labels}; give one label word per class, in data.labels order")


def parse_template(template: str, name: str) -> list[tuple[str, str]]:
    """'{text} It was {mask} .' ->
    [('field', 'text'), ('literal', ' It was '), ('field', 'mask'), ('literal', ' .')]."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"{name}: {e} in {template!r} (write literal braces as {{{{ and }}}})") from None
    parts: list[tuple[str, str]] = []
    for literal, fname, spec, conv in parsed:
        if literal:
            parts.append(("literal", literal))
        if fname is None:
            continue
        if fname not in PLACEHOLDERS or spec or conv:
            shown = "{" + fname + (f"!{conv}" if conv else "") + (f":{spec}" if spec else "") + "}"
            raise ConfigError(f"{name}: unknown placeholder {shown} (expected {{text}}, {{text_pair}}, {{mask}})")
        if ("field", fname) in parts:
            raise ConfigError(f"{name}: {{{fname}}} appears twice; each placeholder may appear once")
        parts.append(("field", fname))
    if ("field", "text") not in parts:
        raise ConfigError(f"{name}: the template must contain {{text}}, got {template!r}")
    return parts


class PromptClassificationTask(ClassificationTask):
    """Classification scored by an LM head through a template; `count`/`finish_eval` as ClassificationTask."""

    def __init__(self, config: PromptConfig, tokenizer, labels: list[str], max_length: int) -> None:
        check_label_words(config, labels)
        self.config, self.tokenizer, self.max_length = config, tokenizer, max_length
        self.parts = parse_template(config.template, "prompt.template")
        self.fields = {name for kind, name in self.parts if kind == "field"}
        self.masked = "mask" in self.fields
        self.mask_id = tokenizer.mask_token_id if self.masked else None
        if self.masked and self.mask_id is None:
            raise ConfigError("prompt.template: uses {mask}, but the model's tokenizer has no mask token "
                              "(a masked LM such as BERT has one; for a causal LM leave {mask} out)")
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("prompt: needs a fast tokenizer (character offsets locate the text to truncate)")
        self.word_ids: list[list[int]] = []  # per class, the label word's token ids
        for i, w in enumerate(config.label_words):
            ids = tokenizer(w, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConfigError(f"prompt.label_words[{i}]: {w!r} tokenizes to no tokens")
            if self.masked and len(ids) != 1:
                pieces = tokenizer.convert_ids_to_tokens(ids)
                raise ConfigError(f"prompt.label_words[{i}]: {w!r} is {len(ids)} tokens {pieces} for this "
                                  f"tokenizer; the masked-LM path predicts one token at {{mask}}, so each "
                                  f"label word must be a single token")
            self.word_ids.append(ids)
        self.single_token = all(len(ids) == 1 for ids in self.word_ids)

    # -- data ----------------------------------------------------------------------------------
    def render(self, text: str, pair: str | None) -> tuple[str, dict[str, tuple[int, int]]]:
        """The prompt string and the character span of each text field in it."""
        out, spans = "", {}
        for kind, value in self.parts:
            if kind == "literal":
                out += value
                continue
            piece = self.tokenizer.mask_token if value == "mask" else (text if value == "text" else pair)
            spans[value] = (len(out), len(out) + len(piece))
            out += piece
        return out, spans

    def encode(self, text: str, pair: str | None, where: str) -> dict:
        """Record text(s) -> {"input_ids", "token_type_ids"?}, at most max_length tokens, template intact.

        The whole prompt is tokenized once (so tokens at the text/template boundary are the ones the
        model sees untruncated); if it is too long, the last tokens lying inside the text's character
        span are removed, from the longer of text / text_pair first.
        """
        if "text_pair" in self.fields and pair is None:
            raise DataError(f"{where}: prompt.template uses {{text_pair}}, but the record has no second text "
                            f"(text_pair or sentence2)")
        if pair is not None and "text_pair" not in self.fields:
            raise DataError(f"{where}: the record has a second text (text_pair/sentence2), but prompt.template "
                            f"has no {{text_pair}} placeholder for it")
        prompt, spans = self.render(text, pair)
        tok = self.tokenizer
        # masked LMs take the tokenizer's own specials ([CLS] ... [SEP]); causal LMs a BOS (as the
        # causal-LM formats) and never a trailing EOS: the prompt's last token predicts the label word
        enc = tok(prompt, add_special_tokens=self.masked, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        prefix = [] if self.masked else _bos(tok)
        ids, offsets = prefix + ids, [(0, 0)] * len(prefix) + list(enc["offset_mapping"])
        types = list(enc["token_type_ids"]) if self.masked and "token_type_ids" in enc else None
        drop = self._truncation(offsets, spans, len(ids), where)
        if drop:
            ids = [t for i, t in enumerate(ids) if i not in drop]
            types = [t for i, t in enumerate(types) if i not in drop] if types is not None else None
        if self.masked:
            n = ids.count(self.mask_id)
            if n != 1:
                raise DataError(f"{where}: the rendered prompt holds {n} mask tokens, expected exactly one "
                                f"(does the text itself contain {tok.mask_token!r}?)")
        ex = {"input_ids": ids}
        if types is not None:
            ex["token_type_ids"] = types
        return ex

    def _truncation(self, offsets: list[tuple[int, int]], spans: dict, n: int, where: str) -> set[int]:
        """Token indices to remove so that n - removed <= max_length, taken from the ends of the texts."""
        excess = n - self.max_length
        if excess <= 0:
            return set()
        inside = {f: [i for i, (a, b) in enumerate(offsets) if b > a and s <= a and b <= e]
                  for f, (s, e) in spans.items() if f != "mask"}
        if excess >= sum(len(v) for v in inside.values()):
            fixed = n - sum(len(v) for v in inside.values())
            raise DataError(f"{where}: data.max_length={self.max_length} leaves no room for the text: the "
                            f"prompt template alone takes {fixed} tokens")
        keep = {f: len(v) for f, v in inside.items()}
        for _ in range(excess):  # longest first, like the tokenizers' 'longest_first'
            f = max(keep, key=lambda k: (keep[k], k == "text"))
            keep[f] -= 1
        return {i for f, v in inside.items() for i in v[keep[f]:]}

    # -- scoring -------------------------------------------------------------------------------
    def scores(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """(B, C) class scores: label-word log-probs (mean over its tokens for a causal LM)."""
        if self.masked:
            return self._masked_scores(model, batch)
        if self.single_token:
            return self._causal_single(model, batch)
        return self._causal_multi(model, batch)

    def _masked_scores(self, model: nn.Module, batch: dict) -> torch.Tensor:
        logits = model(**model_inputs(batch)).logits  # (B, T, V)
        at = batch["input_ids"] == self.mask_id  # (B, T), one True per row (checked in encode)
        logp = F.log_softmax(logits[at].float(), dim=-1)  # (B, V)
        return logp[:, [ids[0] for ids in self.word_ids]]  # (B, C)

    def _causal_single(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Every label word is one token: one forward, read the next-token distribution at the end."""
        logits = model(**model_inputs(batch)).logits  # (B, T, V)
        last = batch["attention_mask"].sum(1) - 1  # (B,) right padding: each row's last real token
        rows = torch.arange(logits.shape[0], device=logits.device)
        logp = F.log_softmax(logits[rows, last].float(), dim=-1)  # (B, V)
        return logp[:, [ids[0] for ids in self.word_ids]]  # (B, C)

    def _causal_multi(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Some label word has several tokens: one forward per class with its word appended.

        Row b's word tokens go at positions L_b .. L_b+m-1 (right after its L_b real tokens, inside
        what was padding), so position p-1 predicts the word token at p.
        """
        ids, mask = batch["input_ids"], batch["attention_mask"]  # (B, T)
        B = ids.shape[0]
        length = mask.sum(1)  # (B,)
        rows = torch.arange(B, device=ids.device)[:, None]  # (B, 1)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = []
        for word in self.word_ids:
            m = len(word)
            w = torch.tensor(word, device=ids.device).expand(B, m)  # (B, m)
            pos = length[:, None] + torch.arange(m, device=ids.device)  # (B, m)
            ext_ids = torch.cat([ids, ids.new_full((B, m), pad)], 1).scatter(1, pos, w)  # (B, T+m)
            ext_mask = torch.cat([mask, mask.new_zeros(B, m)], 1).scatter(1, pos, 1)  # (B, T+m)
            logits = model(input_ids=ext_ids, attention_mask=ext_mask).logits  # (B, T+m, V)
            logp = F.log_softmax(logits[rows, pos - 1].float(), dim=-1)  # (B, m, V)
            out.append(logp.gather(2, w[..., None]).squeeze(-1).mean(1))  # (B,)
        return torch.stack(out, 1)  # (B, C)

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        scores = self.scores(model, batch)  # (B, C)
        correct = int((scores.argmax(-1) == batch["label"]).sum())
        return F.cross_entropy(scores, batch["label"], reduction="sum"), {"correct": correct}
