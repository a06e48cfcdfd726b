"""Atomic checkpoints for resuming a run.

    output_dir/checkpoints/step-000120/
        trainable.safetensors   every requires_grad tensor, keyed by its module path
        update_rule.pt          optimizer + scheduler state (whatever the update rule keeps)
        state.json              step, data position, counters
        rng.pt                  Python, torch CPU (and CUDA) RNG states
    output_dir/checkpoints/latest   name of the newest complete checkpoint

A checkpoint is written into a temporary directory and renamed into place, then `latest` is
replaced atomically, so a crash at any point leaves the previous checkpoint intact and `latest`
always names a complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import MemtuneError

LATEST = "latest"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(output_dir: str | Path, step: int, model: nn.Module, rule_state: dict, state: dict,
                    keep: int) -> Path:
    root = checkpoints_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    torch.save(rule_state, tmp / "update_rule.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    return publish(tmp, root, name, keep)


def publish(tmp: Path, root: Path, name: str, keep: int) -> Path:
    """Rename a complete checkpoint folder into place, point `latest` at it, keep the newest `keep`."""
    final = root / name
    if final.exists():  # re-saving the same step after a resume: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_atomic_text(root / LATEST, name + "\n")
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoints_dir(output_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: Path, model: nn.Module) -> tuple[dict, dict]:
    """Load trainable tensors into `model`; return (update-rule state, loop state). RNG is restored."""
    tensors = load_file(str(path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise MemtuneError(f"{path}: checkpoint does not match this recipe's trainable parameters "
                           f"(missing {missing[:2]}, unexpected {extra[:2]}); resume with the same recipe")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t.to(params[n].dtype))
    rule_state = torch.load(path / "update_rule.pt", map_location="cpu", weights_only=False)
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return rule_state, json.loads((path / "state.json").read_text())
