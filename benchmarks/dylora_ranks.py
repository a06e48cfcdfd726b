"""DyLoRA: accuracy against evaluation rank from ONE run, next to LoRA trained separately per rank.

    python benchmarks/dylora_ranks.py [--sst2 ../shared/data/sst2] [--ranks 1,2,4,8] [--modes frozen,all]
    python benchmarks/dylora_ranks.py --modes all --no-lora     # DyLoRA rows only: dylora_ranks-all.json

One DyLoRA run per mode (r_max = the largest rank, b ~ U[1, r_max] each step) on the same 4,000
SST-2 sentences, epoch, batch and LR as `sst2.py`'s LoRA row, then `memtune eval` of that run at
each rank (`adapter.rank=b`); and one LoRA run per rank. Reports dev accuracy per rank and the total
training time of each approach (one run vs one per rank). Writes benchmarks/results/dylora_ranks.json
(with --no-lora: dylora_ranks-<modes>.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402
from sst2 import LORA, write_subset  # noqa: E402

from memtune.evaluate import evaluate  # noqa: E402
from memtune.recipe import build_recipe  # noqa: E402
from memtune.train import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sst2", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"))
    ap.add_argument("--ranks", default="1,2,4,8")
    ap.add_argument("--train-examples", type=int, default=4000)
    ap.add_argument("--out", default="runs/bench-dylora")
    ap.add_argument("--modes", default="frozen", help="DyLoRA modes, one run each: frozen, all")
    ap.add_argument("--no-lora", action="store_true", help="skip the per-rank LoRA runs")
    args = ap.parse_args()
    modes = args.modes.split(",")
    ranks = [int(r) for r in args.ranks.split(",")]
    out = Path(args.out)
    subset = write_subset(Path(args.sst2), out, args.train_examples)
    shared = ["model=minilm", "task=classification", f"data.train={subset}",
              f"data.eval={Path(args.sst2) / 'dev.tsv'}", "data.labels=[0,1]", "data.max_length=64",
              "train.batch_size=16", "train.schedule=linear", "train.warmup_steps=25", "train.seed=0",
              "train.progress=false", "train.epochs=1"]
    lora = [o for o in LORA if not o.startswith("adapter.r=")]

    rows = {r: {"rank": r} for r in ranks}
    dy_seconds = {}
    for mode in modes:  # the frozen row keeps its old key names
        key = "dylora" if mode == "frozen" else f"dylora_{mode}"
        t0 = time.perf_counter()
        train(build_recipe({}, shared + ["adapter.kind=dylora", f"adapter.r={max(ranks)}", "adapter.alpha=16",
                                         f"adapter.mode={mode}", "optimizer.lr=1e-3", f"output_dir={out / key}"]))
        dy_seconds[mode] = time.perf_counter() - t0
        for r in ranks:
            rows[r][f"{key}_dev_accuracy"] = evaluate(str(out / key), [f"adapter.rank={r}"])["accuracy"]
    lora_seconds = 0.0
    for r in ranks if not args.no_lora else []:
        t0 = time.perf_counter()
        s = train(build_recipe({}, shared + lora + [f"adapter.r={r}", f"output_dir={out / f'lora-r{r}'}"]))
        lora_seconds += time.perf_counter() - t0
        rows[r]["lora_dev_accuracy"] = s["eval"]["accuracy"]
        rows[r]["lora_params_trainable"] = s["params"]["trainable"]
    cols = [k for k in rows[ranks[0]] if k.endswith("_dev_accuracy")]
    print(table(["rank"] + cols, [[r] + [f"{v[c]:.4f}" for c in cols] for r, v in rows.items()]))
    print(f"training time: DyLoRA one run per mode {dy_seconds} s (eval at every rank from it); "
          f"LoRA {len(ranks)} runs {lora_seconds:.0f}s")
    name = "dylora_ranks" if not args.no_lora else f"dylora_ranks-{'-'.join(modes)}"
    path = save(name, {"train_examples": args.train_examples, "epochs": 1, "batch_size": 16, "max_length": 64,
                       "r_max": max(ranks), "modes": modes, "dylora_train_seconds": dy_seconds.get("frozen"),
                       "dylora_train_seconds_by_mode": dy_seconds,
                       "lora_train_seconds_total": lora_seconds if not args.no_lora else None,
                       "rows": list(rows.values())})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
