"""Per-rank memory and bytes communicated per step: one process, DDP and FSDP2 at 2 ranks.

    python benchmarks/distributed_memory.py [--steps 2] [--batch 2] [--methods full,lora,qlora,mezo]

The model is quant_memory.py's (tiny-llama's architecture at 8 layers, hidden 1024, intermediate
2816, vocab 32000, random init), written once to benchmarks/results/.cache/ as a model folder so the
real command runs on it: `memtune train` for one process (train.batch_size = 2 x --batch, the same
global batch) and `torchrun --standalone --nproc_per_node 2 -m memtune train` with
distributed.strategy=ddp|fsdp (--batch per rank). CPU, gloo, fp32. Memory comes from each rank's
tracker (summary.json's memory_bytes_per_rank); communication from the collectives each rank ran in
the measured steps (memtune.distributed.comm): payload = the size of each collective (all-reduce: the
tensor, all-gather: the gathered whole, reduce-scatter: the whole input), sent = ring-algorithm bytes
one rank sends. Writes benchmarks/results/distributed_memory.json.

Throughput scaling is not measured here: gloo on 2 shared CPU cores says nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, mib, save, table  # noqa: E402

from memtune.train import _human  # noqa: E402  (bytes as B / KiB / MiB / GiB)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data" / "alpaca.jsonl"
METHODS = {
    "full": [],
    "lora": ["adapter.kind=lora", "adapter.r=8", "adapter.targets=all-linear"],
    "qlora": ["adapter.kind=lora", "adapter.r=8", "adapter.targets=all-linear", "quantize.kind=nf4"],
    "mezo": ["optimizer.kind=mezo", "optimizer.lr=1e-6"],  # full-parameter MeZO
}
CATS = ("parameters", "gradients", "optimizer", "activations", "peak")


def model_folder() -> Path:
    """quant_memory.py's model with memtune's byte-level tokenizer, saved once."""
    path = RESULTS / ".cache" / "llama-8x1024"
    if (path / "config.json").is_file():
        return path
    from quant_memory import base_model

    from memtune.models import byte_tokenizer

    base_model().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def run(strategy: str, method: str, model: Path, out: Path, steps: int, batch: int) -> dict:
    common = [f"model={model}", f"data.train={DATA}", f"train.max_steps={steps}", "data.max_length=256",
              f"train.measure_memory_steps={steps}", "train.progress=false", f"output_dir={out}", *METHODS[method]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if strategy == "one":
        cmd = [sys.executable, "-m", "memtune", "train", *common, f"train.batch_size={2 * batch}"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "memtune", "train", *common, f"train.batch_size={batch}", f"distributed.strategy={strategy}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{strategy}/{method} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    s = json.loads((out / "summary.json").read_text())
    ranks = s["distributed"].get("memory_bytes_per_rank") or [{**s["memory_bytes"], "rank": 0}]
    comm = s["distributed"].get("communication_per_step")
    return {"strategy": s["distributed"]["strategy"], "method": method, "ranks": ranks, "communication": comm,
            "loss_last": s["train"]["loss_last"], "seconds_per_step": s["train"]["seconds"] / s["train"]["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=2, help="examples per rank (one process: 2x)")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    model = model_folder()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            for strategy in ("one", "ddp", "fsdp"):
                r = run(strategy, method, model, Path(tmp) / f"{method}-{strategy}", args.steps, args.batch)
                rows.append(r)
                print(f"{method}/{r['strategy']}: rank 0 peak {mib(r['ranks'][0]['peak'])} MiB", flush=True)
    print(f"\nllama 8 x 1024 (random init), global batch {2 * args.batch}, CPU gloo, fp32; per-rank bytes (rank 0; "
          f"every rank within 1%)\n")
    print(table(["method", "strategy", *[f"{c} MiB" for c in CATS], "vs one process (param+grad+opt)"],
                [[r["method"], r["strategy"], *[mib(r["ranks"][0][c]) for c in CATS], _ratio(r, rows)] for r in rows]))
    print("\nbytes communicated per step, per rank\n")
    print(table(["method", "strategy", "all-reduce", "all-gather", "reduce-scatter", "sent (ring)"],
                [[r["method"], r["strategy"], *[_payload(r, k) for k in ("all_reduce", "all_gather", "reduce_scatter")],
                  _human(r["communication"]["sent_bytes"]) if r["communication"] else "0"] for r in rows]))
    path = save("distributed_memory", {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


def _states(rank: dict) -> int:
    return rank["parameters"] + rank["gradients"] + rank["optimizer"]


def _ratio(r: dict, rows: list[dict]) -> str:
    one = next(x for x in rows if x["method"] == r["method"] and x["strategy"] == "none")
    return f"{_states(r['ranks'][0]) / _states(one['ranks'][0]):.3f}"


def _payload(r: dict, kind: str) -> str:
    if not r["communication"]:
        return "-"
    n = r["communication"]["payload_bytes"].get(kind)
    return _human(n) if n else "-"


if __name__ == "__main__":
    main()
