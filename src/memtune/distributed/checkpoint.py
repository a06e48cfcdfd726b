"""Checkpoints of a run over several ranks, through torch.distributed.checkpoint (DCP).

    output_dir/checkpoints/step-000120/
        dcp/              trainable parameters and optimizer state: one .distcp file per rank plus
                          .metadata (each FSDP shard written once, by the rank holding it; a
                          replicated DDP tensor written once)
        update_rule.pt    the rest of the update rule's state (schedule, MeZO's seeds and g's) and
                          the adapter method's state; identical on every rank, written by rank 0
        rng-<rank>.pt     each rank's RNG states
        state.json        step, data position, counters
        world.json        ranks and examples per micro-batch the checkpoint was written with

Only trainable parameters are saved (a frozen base is read from the model again): DCP's
`ignore_frozen_params`, and loading with `strict=False`. DCP re-shards on load, so the same files
load at any world size, and in a single process with no process group at all; the data position
means the same examples only when ranks x train.batch_size (examples per micro-batch) is unchanged,
which resuming checks.

Atomicity as for one process (memtune.checkpoint): every rank writes into `.step-N.partial/`, and
once all have finished rank 0 renames it into place and then replaces `latest`.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import checkpoints_dir, publish, rng_state, set_rng_state
from ..errors import MemtuneError
from .world import World

DCP_DIR = "dcp"
WORLD_FILE = "world.json"


def is_sharded(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


def _trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _state(model: nn.Module, optimizer) -> dict:
    """{"model": trainable parameters by name, "optim": the optimizer's state by parameter name}: the
    structure DCP saves and loads in place."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(ignore_frozen_params=True)
    names = _trainable_names(model)
    out = {"model": {k: v for k, v in get_model_state_dict(model, options=options).items() if k in names}}
    if optimizer is not None:
        out["optim"] = get_optimizer_state_dict(model, optimizer, options=options)
    return out


def save_sharded(output_dir: str | Path, step: int, model: nn.Module, rule, extra_state: dict, loop_state: dict,
                 keep: int, world: World, micro_batch_examples: int) -> Path:
    """Every rank calls this at the same step. `extra_state`: what the trainer keeps besides the rule
    (the adapter method's state)."""
    import torch.distributed.checkpoint as dcp

    root = checkpoints_dir(output_dir)
    name = f"step-{step:06d}"
    tmp = root / f".{name}.partial"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    world.barrier()
    dcp.save(_state(model, rule.optimizer), checkpoint_id=str(tmp / DCP_DIR))
    torch.save(rng_state(), tmp / f"rng-{world.rank}.pt")
    if world.is_main:
        rule_state = rule.state_dict()
        rule_state.pop(rule.optimizer_key, None)  # in dcp/
        torch.save({**rule_state, **extra_state}, tmp / "update_rule.pt")
        (tmp / "state.json").write_text(json.dumps(loop_state, indent=2))
        (tmp / WORLD_FILE).write_text(json.dumps({"world_size": world.size,
                                                  "micro_batch_examples": micro_batch_examples}) + "\n")
    world.barrier()  # every rank's files are complete
    final = root / name
    if world.is_main:
        publish(tmp, root, name, keep)
    world.barrier()
    return final


def load_sharded(path: Path, model: nn.Module, rule, world: World, micro_batch_examples: int) -> tuple[dict, dict]:
    """Load a DCP checkpoint into `model` and `rule.optimizer` (sharded or not, any world size); returns
    (the rule's state with the optimizer's, loop state). This rank's RNG state is restored (rank 0's
    when the checkpoint had fewer ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    saved = json.loads((path / WORLD_FILE).read_text())
    if saved["micro_batch_examples"] != micro_batch_examples:
        per_rank = saved["micro_batch_examples"] // saved["world_size"]
        raise MemtuneError(f"{path}: written with {saved['world_size']} ranks x {per_rank} "
                           f"examples ({saved['micro_batch_examples']} per micro-batch); this run has "
                           f"{world.size} x {micro_batch_examples // world.size}. Resume with train.batch_size = "
                           f"{saved['micro_batch_examples']} / ranks, so the data continues where it stopped")
    state = _state(model, rule.optimizer)
    expected = set(state["model"])
    try:
        with warnings.catch_warnings():  # one process: DCP says it assumes so, which is the point here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path / DCP_DIR))
    except (Exception, CheckpointException) as e:  # noqa: BLE001  (a BaseException, with each rank's traceback)
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise MemtuneError(f"{path}: checkpoint does not match this recipe's {len(expected)} trainable tensors; "
                           f"resume with the same recipe ({lines[-1][:300] if lines else type(e).__name__})") from None
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    set_model_state_dict(model, state["model"], options=options)
    if rule.optimizer is not None:
        set_optimizer_state_dict(model, rule.optimizer, state["optim"], options=options)
    rule_state = torch.load(path / "update_rule.pt", map_location="cpu", weights_only=False)
    if rule.optimizer is not None:
        rule_state[rule.optimizer_key] = rule.optimizer.state_dict()
    rng = path / f"rng-{world.rank}.pt"
    set_rng_state(torch.load(rng if rng.is_file() else path / "rng-0.pt", weights_only=False))
    return rule_state, json.loads((path / "state.json").read_text())
