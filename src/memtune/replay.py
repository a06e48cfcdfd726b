"""`memtune replay RUN_DIR --to DIR`: rebuild a MeZO run's trained weights from its starting point and
its saved trajectory (seed + one projected gradient per step), with no data and no forward passes.

The starting point is rebuilt exactly as training built it (same recipe: base model, adapter init,
classifier init from the training data), then `memtune.gradient.mezo.replay` applies the steps.
DIR receives the same artifact a trained run has (adapter/ or model/, tokenizer/, recipe.yaml), so
`memtune eval DIR` and `memtune merge DIR` work on it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .errors import MemtuneError
from .evaluate import _records_for_labels
from .gradient.mezo import TRAJECTORY, replay
from .pipeline import build_run, read_train_records
from .recipe import load_recipe


def replay_run(run_dir: str, to: str) -> dict:
    src, out = Path(run_dir), Path(to)
    if not (src / "recipe.yaml").is_file():
        raise MemtuneError(f"{src}: not a memtune run directory (no recipe.yaml)")
    if not (src / TRAJECTORY).is_file():
        raise MemtuneError(f"{src}: no {TRAJECTORY} (train with optimizer.kind=mezo optimizer.trajectory=true)")
    if out.exists() and any(out.iterdir()):
        raise MemtuneError(f"--to {out}: directory exists and is not empty")
    recipe = load_recipe(src / "recipe.yaml")
    records = read_train_records(recipe) if recipe.data.train else _records_for_labels(recipe)
    torch.manual_seed(recipe.train.seed)  # as the trainer does before building: same adapter init
    run = build_run(recipe, train_records=records, for_training=True)
    with torch.no_grad():
        steps = replay(run.model, src / TRAJECTORY, adapter=run.method)
    out.mkdir(parents=True, exist_ok=True)
    artifact = run.method.save(run.model, out, recipe.model)
    run.tokenizer.save_pretrained(out / "tokenizer")
    shutil.copyfile(src / "recipe.yaml", out / "recipe.yaml")
    return {"replayed_steps": steps, "artifact": str(artifact)}
