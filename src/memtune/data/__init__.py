"""Data: read records, format and tokenize them, and batch them in a reproducible order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import DataError
from .formats import (BUILDERS, IGNORE, LabelMap, check_format_task, classification_example, detect_format,
                      infer_labels)
from .readers import Record, read_records

__all__ = ["TokenizedData", "load_data", "collate", "epoch_order", "IGNORE", "Record", "read_records",
           "infer_labels"]


@dataclass
class TokenizedData:
    examples: list[dict]
    format: str
    source: str
    dropped: int = 0  # examples with no target token left after truncation

    def __len__(self) -> int:
        return len(self.examples)


def load_data(spec: str, *, task: str, fmt: str, tokenizer, max_length: int, labels: list[str] | None = None,
              split: str = "train", records: list[Record] | None = None,
              encode: Callable[[str, str | None, str], dict] | None = None) -> TokenizedData:
    """Read `spec` and tokenize every record. Errors name the file and line of the bad record.

    `encode` (classification only): (text, text_pair, where) -> token fields, instead of the
    tokenizer's pair encoding (prompt templates use it)."""
    records = records if records is not None else read_records(spec, split)
    if fmt == "auto":
        fmt = detect_format(records, task, spec)
    check_format_task(fmt, task)
    examples, dropped = [], 0
    if fmt == "classification":
        if labels is None:
            raise DataError(f"{spec}: classification needs label names")
        label_map = LabelMap(labels)
        examples = [classification_example(r, tokenizer, max_length, label_map, encode) for r in records]
    else:
        build = BUILDERS[fmt]
        for r in records:
            ex = build(r, tokenizer, max_length)
            # a causal LM learns from position t predicting t+1, so labels[1:] must hold a target
            if all(v == IGNORE for v in ex["labels"][1:]):
                dropped += 1
                continue
            examples.append(ex)
    if not examples:
        raise DataError(f"{spec}: no usable examples ({dropped} had no target token within "
                        f"data.max_length={max_length})")
    return TokenizedData(examples, fmt, spec, dropped)


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch. Shapes: input_ids/attention_mask/labels (B, T); label (B,)."""
    width = max(len(e["input_ids"]) for e in examples)
    pad = lambda seq, v: list(seq) + [v] * (width - len(seq))  # noqa: E731
    batch = {
        "input_ids": torch.tensor([pad(e["input_ids"], pad_id) for e in examples]),
        "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples]),
    }
    if "token_type_ids" in examples[0]:
        batch["token_type_ids"] = torch.tensor([pad(e["token_type_ids"], 0) for e in examples])
    if "labels" in examples[0]:
        batch["labels"] = torch.tensor([pad(e["labels"], IGNORE) for e in examples])
    if "label" in examples[0]:
        batch["label"] = torch.tensor([e["label"] for e in examples])
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch), so a
    resumed run sees exactly the data an uninterrupted one would."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
