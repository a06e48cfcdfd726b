"""Run under torchrun by tests/test_distributed.py: train several recipes one after another in the same
processes (one process start for many runs), or one run that dies at a given step.

    torchrun --standalone --nproc_per_node 2 tests/helpers/dist_train.py JOBS.json

JOBS.json: {"runs": [[override, ...], ...], "die_at_step": null | int, "resume": false}. Each run writes
its output_dir as `memtune train` would; a run that raises writes `error.txt` there (rank 0) and the
driver goes on with the next one (an error raised by the setup on every rank alike; one that leaves
the ranks out of step ends the job). With `die_at_step`, every rank exits abruptly (os._exit) right after
that step, as a killed job would.
"""

import json
import os
import sys
import traceback
from pathlib import Path

import torch


def main() -> int:
    torch.set_num_threads(1)
    jobs = json.loads(Path(sys.argv[1]).read_text())
    import torch.distributed as dist
    from datetime import timedelta

    # one process group for every run (memtune's trainer uses it and leaves it up)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    from memtune.errors import MemtuneError
    from memtune.recipe import load_recipe
    from memtune.train import train

    callbacks = []
    if jobs.get("die_at_step"):
        def die(event):
            if event.step == jobs["die_at_step"]:
                os._exit(17)
        callbacks.append(die)
    for overrides in jobs["runs"]:
        out = Path([o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")][0])
        try:
            train(load_recipe(None, overrides), resume=jobs.get("resume", False), callbacks=callbacks)
        except MemtuneError as e:
            if int(os.environ.get("RANK", "0")) == 0:
                out.mkdir(parents=True, exist_ok=True)
                (out / "error.txt").write_text(f"{e}\n{traceback.format_exc()}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
