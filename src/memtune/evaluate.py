"""`memtune eval`: loss (and accuracy for classification) of a trained run or of a recipe's model."""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError
from .pipeline import Run, build_run
from .recipe import Recipe, load_recipe


def recipe_for(target: str | None, overrides: list[str]) -> tuple[Recipe, Path | None]:
    """A run directory (its recipe.yaml + saved artifact) or a config file (or nothing: defaults)."""
    if target and Path(target).is_dir():
        run_dir = Path(target)
        if not (run_dir / "recipe.yaml").is_file():
            raise ConfigError(f"{run_dir}: not a memtune run directory (no recipe.yaml)")
        recipe = load_recipe(run_dir / "recipe.yaml", overrides)
        artifact = _artifact(run_dir)
        return recipe, artifact
    return load_recipe(target, overrides), None


def _artifact(run_dir: Path) -> Path:
    for name in ("adapter", "model"):
        if (run_dir / name).is_dir():
            return run_dir / name
    raise ConfigError(f"{run_dir}: has no adapter/ or model/ (did the run finish?)")


def load_for_eval(target: str | None, overrides: list[str]) -> Run:
    recipe, artifact = recipe_for(target, overrides)
    return build_run(recipe, train_records=_records_for_labels(recipe), adapter_path=artifact)


def _records_for_labels(recipe: Recipe):
    if recipe.task == "classification" and not recipe.data.labels and recipe.data.train:
        from .data import read_records

        return read_records(recipe.data.train, recipe.data.split)
    return None


def evaluate(target: str | None, overrides: list[str]) -> dict:
    run = load_for_eval(target, overrides)
    spec = run.recipe.data.eval
    if not spec:
        raise ConfigError("data.eval: nothing to evaluate on (pass data.eval=FILE)")
    data = run.load_data(spec, run.recipe.data.eval_split)
    result = run.evaluate(data)
    out = {"loss": result["loss"]}
    for k in ("accuracy", "perplexity"):
        if k in result:
            out[k] = result[k]
    out["examples"] = len(data)
    out["data"] = spec
    return out
