"""Which modules an adapter adapts, matched like PEFT so configs mean the same thing in both.

    "all-linear"        every Linear / GPT-2 Conv1D except the output head(s)
    ["q_proj", "v_proj"] a module whose full name equals an entry or ends with "." + entry
    "regex"              any other single string: a regex full-matched against the full name
"""

from __future__ import annotations

import re

from torch import nn

from ..errors import ConfigError
from ..models import head_modules, is_linear


def _inside(name: str, roots: set[str]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def match_targets(model: nn.Module, targets: list[str] | str, field: str = "adapter.targets") -> list[str]:
    """Full names of the linear modules selected by `targets` (never the output head)."""
    heads = set(head_modules(model))
    linear = {n: m for n, m in model.named_modules() if n and is_linear(m) and not _inside(n, heads)}
    if isinstance(targets, list) and len(targets) == 1 and targets[0] == "all-linear":
        targets = "all-linear"
    if targets == "all-linear":
        chosen = sorted(linear)
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ConfigError(f"{field}: '{targets}' is not a valid regular expression: {e}") from None
        chosen = sorted(n for n, _ in model.named_modules() if n and pattern.fullmatch(n))
    else:
        chosen = sorted(n for n, _ in model.named_modules()
                        if n and any(n == t or n.endswith("." + t) for t in targets))
    modules = dict(model.named_modules())
    not_linear = [n for n in chosen if n not in linear]
    if not_linear:
        n = not_linear[0]
        why = "is an output head" if _inside(n, heads) else f"is a {type(modules[n]).__name__}, not a linear layer"
        raise ConfigError(f"{field}: '{n}' {why}; adapters target linear layers")
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise ConfigError(f"{field}: {targets!r} matches no module of {type(model).__name__} "
                          f"(its linear layers are named: {', '.join(leaves)}; or use all-linear)")
    return chosen


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
