"""memtune: fine-tune transformer language models inside a memory budget.

A run is a recipe with orthogonal axes (base storage, what trains, how updates are computed); see
`memtune.recipe`. Public entry points:

    from memtune import load_recipe, train, plan, load_adapter
"""

from .errors import ConfigError, DataError, MemtuneError, ModelError
from .recipe import Recipe, build_recipe, load_recipe

__version__ = "0.1.0"
__all__ = ["Recipe", "build_recipe", "load_recipe", "train", "plan", "load_adapter", "MemtuneError", "ConfigError",
           "DataError", "ModelError"]


def train(recipe: Recipe, resume: bool = False, callbacks=()) -> dict:
    """Run the recipe's training; returns the summary (also written to output_dir/summary.json)."""
    from .train import train as _train

    return _train(recipe, resume=resume, callbacks=callbacks)


def plan(recipe: Recipe, **kwargs):
    """Predict the recipe's memory before running it (memtune.memory.plan.plan: batch_size=, seq_len=,
    device=, budget=, gpu=); returns a PlanReport (`.memory_bytes` as in summary.json, `.to_dict()`)."""
    from .memory.plan import plan as _plan

    return _plan(recipe, **kwargs)


def load_adapter(model, path, task: str = "causal-lm"):
    """Attach an adapter saved by memtune or PEFT to a transformers model and load its weights."""
    from .adapters import load_adapter as _load

    return _load(model, path, task)
