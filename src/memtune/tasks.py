"""Tasks: how a batch turns into a summed loss and a target count, and how a model is evaluated.

Losses are returned as *sums* with the number of targets they cover, so gradient accumulation can
normalize over all targets of the accumulated batch (see `memtune.gradient.backprop`):

    causal-lm       sum over positions t of CE(logits[t], labels[t+1]) for labels[t+1] != -100
    classification  sum over examples of CE(logits, label)
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .data import IGNORE
from .linear_ce import linear_cross_entropy, mix_applies, mix_cross_entropy, mix_of

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def _keeps_logits(model: nn.Module) -> bool:
    """Whether the model's forward takes `logits_to_keep` (transformers' causal LMs do)."""
    return _forward_takes(type(model), "logits_to_keep")


@functools.cache
def _forward_takes(cls: type, name: str) -> bool:
    import inspect

    return name in inspect.signature(cls.forward).parameters


# model types whose causal-LM forward is `logits = lm_head(body(...).last_hidden_state)`, nothing more
# (no logit scaling or soft-capping), so the loss can be taken from the hidden states
PLAIN_LM_HEADS = ("llama", "mistral", "qwen2", "opt", "gpt2")


def fused_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(body, head) when the model's logits are `head(body(...).last_hidden_state)` and can be computed
    outside its forward, else None. Only a transformers causal LM of a plain-head family qualifies: a
    wrapper (e.g. a `peft.PeftModel`, whose attributes forward to the model it wraps) is not one, so its
    own forward runs."""
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or getattr(model.config, "model_type", None) not in PLAIN_LM_HEADS:
        return None
    body = getattr(model, model.base_model_prefix or "", None)
    if not isinstance(body, PreTrainedModel) or body is model:
        return None
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head._forward_hooks or head._forward_pre_hooks:
        return None  # e.g. a quantized or wrapped head, or one whose calls are hooked (TokenTune)
    return body, head


class Task(ABC):
    name: str

    @classmethod
    def from_recipe(cls, recipe) -> "Task":
        return cls()

    @abstractmethod
    def count(self, batch: dict) -> int:
        """Number of loss targets in a batch."""

    @abstractmethod
    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        """(summed loss over the batch's targets, extra statistics)."""

    def tokens(self, batch: dict) -> int:
        """Non-padding input tokens (the throughput unit)."""
        return int(batch["attention_mask"].sum())

    # names of the extra statistics `loss_sum` returns (summed over batches, and over ranks)
    eval_stats: tuple[str, ...] = ()

    def evaluate(self, model: nn.Module, batches: Iterable, forward_ctx) -> dict:
        """`batches`: (batch, counted) pairs; a rank's uncounted forwards only keep ranks in step
        (memtune.distributed), one process counts every batch."""
        return self.finish_eval(*self.eval_sums(model, batches, forward_ctx))

    @torch.no_grad()
    def eval_sums(self, model: nn.Module, batches: Iterable, forward_ctx) -> tuple[float, int, dict]:
        """(summed loss, targets, summed statistics) over the counted batches."""
        was_training = model.training
        model.eval()
        total, count, stats = 0.0, 0, dict.fromkeys(self.eval_stats, 0)
        for batch, counted in batches:
            with forward_ctx():
                s, extra = self.loss_sum(model, batch)
            if not counted:
                continue
            total += float(s)
            count += self.count(batch)
            for k, v in extra.items():
                stats[k] = stats.get(k, 0) + v
        model.train(was_training)
        return total, count, stats

    def finish_eval(self, total: float, count: int, stats: dict) -> dict:
        return {"loss": total / max(count, 1), "targets": count}


class CausalLMTask(Task):
    """`chunked` (train.chunked_ce, default on): where the model's logits are exactly its output head
    applied to its body's last hidden state (`fused_head`), the loss is computed from the hidden
    states through memtune.linear_ce, so no (N, V) logits exist; elsewhere (and when a hook watches
    the head, e.g. TokenTune's streams) the model's own logits are used."""

    name = "causal-lm"

    def __init__(self, chunked: bool = True) -> None:
        self.chunked = chunked

    @classmethod
    def from_recipe(cls, recipe) -> "CausalLMTask":
        return cls(chunked=recipe.train.chunked_ce)

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        # position t predicts token t+1; only positions with a target enter the loss, so the
        # log-softmax saved for backward is (N_targets, V), not (B*T, V)
        labels = batch["labels"][:, 1:]  # (B, T-1)
        keep = labels != IGNORE
        # columns before the first target (prompts; TokenTune's unselected stream) need no logits:
        # the model computes the LM head only for columns first..T-1 (transformers' logits_to_keep)
        fused = fused_head(model) if self.chunked else None
        if fused is not None:  # hidden states only; the head's logits a chunk at a time (memtune.linear_ce)
            body, head = fused
            hidden = body(**model_inputs(batch), use_cache=False).last_hidden_state  # (B, T, d)
            pick = lambda t: t[:, :-1][keep]  # noqa: E731  (B, T, .) -> (N, .)
            mix = mix_of(hidden)  # a frozen stream plus a low-rank one (QST's α-mix): dL/dh is not needed
            if mix is not None and mix_applies(mix, head.weight):
                mix = mix.rows(pick)
                del hidden  # h, the full c and what h's graph saved: the loss needs only the picked factors
                return mix_cross_entropy(mix, head.weight, head.bias, labels[keep]), {}
            return linear_cross_entropy(pick(hidden), head.weight, head.bias, labels[keep]), {}
        cols = keep.any(0).nonzero()
        first = int(cols[0]) if len(cols) and _keeps_logits(model) else 0
        extra = {"logits_to_keep": labels.shape[1] + 1 - first} if first else {}
        logits = model(**model_inputs(batch), **extra).logits  # (B, T - first, V)
        picked = logits[:, :-1][keep[:, first:]].float()  # (N, V)
        return F.cross_entropy(picked, labels[:, first:][keep[:, first:]], reduction="sum"), {}

    def finish_eval(self, total: float, count: int, stats: dict) -> dict:
        out = super().finish_eval(total, count, stats)
        out["perplexity"] = float(torch.tensor(out["loss"]).exp())
        return out


class ClassificationTask(Task):
    name = "classification"
    eval_stats = ("correct",)

    def count(self, batch: dict) -> int:
        return int(batch["label"].numel())

    def loss_sum(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        logits = model(**model_inputs(batch)).logits.float()  # (B, num_labels)
        correct = int((logits.argmax(-1) == batch["label"]).sum())
        return F.cross_entropy(logits, batch["label"], reduction="sum"), {"correct": correct}

    def finish_eval(self, total: float, count: int, stats: dict) -> dict:
        out = super().finish_eval(total, count, stats)
        out["accuracy"] = stats.get("correct", 0) / max(count, 1)
        return out


TASKS = {"causal-lm": CausalLMTask, "classification": ClassificationTask}
