"""Initialize a new classification head from class centroids of the model's own features.

A sequence classifier ends in a Linear layer, logits = W x + b, where x is the feature the model
pools (BERT: the pooler output; Llama/OPT/GPT-2: the last real token's hidden state). A random W
starts training from chance; zeroth-order training (MeZO) in particular needs a better start. With
mu_c the mean feature of k training examples of class c, set

    W[c] = mu_c,   b[c] = -||mu_c||^2 / 2

so that  logit_c = mu_c . x - ||mu_c||^2 / 2 = -(||x - mu_c||^2 - ||x||^2) / 2,  and, since ||x||^2
is the same for every c, argmax_c logit_c is the nearest centroid (Euclidean): the head starts as a
nearest-class-mean classifier. A head without a bias (Llama's `score`) gets W only, which is the
nearest centroid only when the centroids have equal norms; this is reported.

The features are those entering the head's last Linear, captured by a forward pre-hook with the
model in eval mode (no dropout) under no_grad; the examples are the first k of each class in file
order, so the initialization is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn

from .errors import ConfigError
from .models import head_modules
from .tasks import model_inputs


@dataclass
class ClassifierInitConfig:
    """`classifier_init:` section (absent = the head keeps its random initialization)."""

    kind: Literal["centroids"] = "centroids"
    examples_per_class: int = 16  # the first k training examples of each class

    def check(self, prefix: str) -> None:
        if self.examples_per_class < 1:
            raise ConfigError(f"{prefix}.examples_per_class: expected >= 1, got {self.examples_per_class}")


def classifier_layer(model: nn.Module, num_labels: int) -> tuple[str, nn.Linear]:
    """The head's last nn.Linear with `num_labels` outputs (BERT `classifier`, Llama `score`,
    RoBERTa `classifier.out_proj`), found structurally among the head modules."""
    found = [(f"{hname}.{n}" if n else hname, m) for hname, head in head_modules(model).items()
             for n, m in head.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    if not found:
        raise ConfigError(f"classifier_init: {type(model).__name__} has no nn.Linear with {num_labels} outputs in "
                          f"its head ({', '.join(head_modules(model)) or 'none'}) to initialize")
    return found[-1]


def first_per_class(examples: list[dict], k: int, num_labels: int) -> list[dict]:
    """The first k examples of each class, in their original order."""
    seen = [0] * num_labels
    out = []
    for ex in examples:
        if seen[ex["label"]] < k:
            seen[ex["label"]] += 1
            out.append(ex)
    return out


@torch.no_grad()
def class_centroids(model: nn.Module, layer: nn.Module, batches: Iterable[dict],
                    num_labels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((C, H) mean of the features entering `layer` per class, (C,) examples per class).
    A class without examples is an error."""
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    was_training = model.training
    model.eval()
    sums, counts = None, torch.zeros(num_labels)
    try:
        for batch in batches:
            captured.clear()
            model(**model_inputs(batch))
            x = captured[-1].float()  # (B, H), or (B, T, H) when the head scores every position
            if x.dim() == 3:  # decoder classifiers pool the last real token (right padding)
                last = batch["attention_mask"].sum(1) - 1
                x = x[torch.arange(x.shape[0], device=x.device), last]  # (B, H)
            if sums is None:
                sums = torch.zeros(num_labels, x.shape[-1], device=x.device)
            sums.index_add_(0, batch["label"].to(x.device), x)
            counts += torch.bincount(batch["label"].cpu(), minlength=num_labels).float()
    finally:
        handle.remove()
        model.train(was_training)
    missing = [c for c in range(num_labels) if counts[c] == 0]
    if sums is None or missing:
        raise ConfigError(f"classifier_init: no training example of class id(s) {missing}; every class needs one")
    return sums / counts.to(sums.device)[:, None], counts


@torch.no_grad()
def init_classifier_from_centroids(model: nn.Module, batches: Iterable[dict], num_labels: int) -> dict:
    """Set the head's last Linear to W[c] = mu_c, b[c] = -||mu_c||^2 / 2 (see the module docstring).

    `batches` hold the chosen examples (with "label"). Returns what was done, for logs and reports.
    """
    name, layer = classifier_layer(model, num_labels)
    mu, counts = class_centroids(model, layer, batches, num_labels)  # (C, H), (C,)
    layer.weight.copy_(mu.to(layer.weight.dtype))
    if layer.bias is not None:
        layer.bias.copy_((-0.5 * mu.pow(2).sum(-1)).to(layer.bias.dtype))
    return {"kind": "centroids", "layer": name, "bias": layer.bias is not None,
            "examples_per_class": [int(c) for c in counts],
            "centroid_norms": [round(float(v), 4) for v in mu.norm(dim=-1)]}
