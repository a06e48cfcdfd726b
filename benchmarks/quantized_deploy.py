"""The accuracy of the model you ship: QA-LoRA's merged INT model against LoRA / QLoRA merged and then
quantized after training (the QA-LoRA paper's comparison, "QLoRA w/ GPTQ"), at INT4/3/2, group 32.

    python benchmarks/sst2.py --seeds 0,1,2 --methods "lora;qlora;qa-lora(int4,g32), lr 1e-2;qa-lora(int3,g32), lr 1e-2;qa-lora(int2,g32), lr 1e-2"
    python benchmarks/quantized_deploy.py [--runs runs/bench-sst2] [--seeds 0,1,2] [--bits 4,3,2]

It reads the runs sst2.py left in --runs (same data, epoch and settings as BENCHMARKS.md's SST-2
tables) and, for each seed:
- LoRA (fp32 base) and QLoRA (NF4 base): `memtune merge` (QLoRA: into its exact dequantized base),
  then the merged float model quantized to INT-b, group 32, by round-to-nearest (quantized while it
  loads) and by GPTQ (`memtune quantize`, calibrated on 1,024 of the run's training sentences);
  QLoRA also `--requantize nf4` (back to its own 4-bit format);
- QA-LoRA at INT-b: `memtune merge` folds B A into the zero points; the INT folder is evaluated as it
  is stored (no adapter), which must equal the run's own (unmerged) accuracy.
Every figure is SST-2 dev accuracy of the stored model, evaluated by `memtune eval`'s code path.
Writes benchmarks/results/quantized_deploy.json and .png (mean accuracy of each stored form against bits).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402
from sst2 import method_dir  # noqa: E402

from memtune.evaluate import evaluate  # noqa: E402
from memtune.merge import merge  # noqa: E402
from memtune.quantize import quantize_to_folder  # noqa: E402
from memtune.recipe import build_recipe  # noqa: E402

GROUP = 32


def int_base(bits: int) -> list[str]:
    """The overrides that read (or round to nearest while loading) an INT-b, group-32 base."""
    return ["quantize.kind=int4", f"quantize.bits={bits}", f"quantize.group_size={GROUP}"]


def accuracy(model: str, data: list[str], extra: list[str] = ()) -> float:
    """Dev accuracy of a stored model (float folder, INT folder or 4-bit NF4 folder), nothing attached."""
    return evaluate(None, [f"model={model}", "task=classification", "adapter.kind=head", *data, *extra])["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="runs/bench-sst2")
    ap.add_argument("--sst2", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"))
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2])
    ap.add_argument("--bits", type=lambda v: [int(x) for x in v.split(",")], default=[4, 3, 2])
    ap.add_argument("--calibration-samples", type=int, default=1024)
    args = ap.parse_args()
    runs = Path(args.runs)
    work = runs / "deploy"
    subset = runs / "train_subset.tsv"
    data = [f"data.eval={Path(args.sst2) / 'dev.tsv'}", "data.labels=[0,1]", "data.max_length=64",
            "train.batch_size=16", "train.progress=false"]
    rows = []

    def add(seed: int, method: str, stored: str, bits: int | None, acc: float, t0: float, **extra) -> None:
        rows.append({"seed": seed, "method": method, "stored_as": stored, "bits": bits, "dev_accuracy": acc,
                     "seconds": round(time.perf_counter() - t0, 1), **extra})
        print(f"seed {seed} {method:>8} {stored:<34} {acc:.4f}", flush=True)

    for seed in args.seeds:
        for method in ("lora", "qlora"):
            src = method_dir(runs, method, seed)
            if not (src / "summary.json").is_file():
                raise SystemExit(f"{src}: no finished run (run sst2.py first, see this file's docstring)")
            trained = json.loads((src / "summary.json").read_text())["eval"]["accuracy"]
            merged = work / f"{method}-seed{seed}-merged"
            shutil.rmtree(merged, ignore_errors=True)
            t0 = time.perf_counter()
            merge(str(src), str(merged))
            add(seed, method, "float (exact merge)", None, accuracy(str(merged), data), t0, trained=trained)
            if method == "qlora":
                nf4 = work / f"{method}-seed{seed}-nf4"
                shutil.rmtree(nf4, ignore_errors=True)
                t0 = time.perf_counter()
                merge(str(src), str(nf4), requantize="nf4")
                add(seed, method, "NF4 (merge, then re-quantize)", 4, accuracy(str(nf4), data), t0, trained=trained)
            for bits in args.bits:
                t0 = time.perf_counter()
                rtn = accuracy(str(merged), data, int_base(bits))
                add(seed, method, f"INT{bits} g{GROUP} RTN after merge", bits, rtn, t0, trained=trained)
                folder = work / f"{method}-seed{seed}-gptq-int{bits}"
                shutil.rmtree(folder, ignore_errors=True)
                t0 = time.perf_counter()
                quantize_to_folder(build_recipe({}, [
                    f"model={merged}", "task=classification", f"data.train={subset}", *data, "adapter.kind=head",
                    *int_base(bits), "quantize.method=gptq", f"quantize.calibration_samples={args.calibration_samples}",
                    f"train.seed={seed}"]), folder)
                acc = accuracy(str(folder), data, int_base(bits))
                add(seed, method, f"INT{bits} g{GROUP} GPTQ after merge", bits, acc, t0, trained=trained)
        for bits in args.bits:
            src = method_dir(runs, f"qa-lora(int{bits},g{GROUP}), lr 1e-2", seed)
            if not (src / "summary.json").is_file():
                print(f"{src}: no finished run, skipped", flush=True)
                continue
            trained = json.loads((src / "summary.json").read_text())["eval"]["accuracy"]
            folder = work / f"qalora-int{bits}-seed{seed}-merged"
            shutil.rmtree(folder, ignore_errors=True)
            t0 = time.perf_counter()
            merge(str(src), str(folder))
            acc = accuracy(str(folder), data, int_base(bits))
            add(seed, "qa-lora", f"INT{bits} g{GROUP} merged (B A in the zeros)", bits, acc, t0, trained=trained)
        path = save("quantized_deploy", {"runs": str(runs), "group_size": GROUP, "rows": rows})
    summary = {}
    for r in rows:
        summary.setdefault((r["method"], r["stored_as"]), []).append(r)
    print(table(["method", "stored as", "seeds", "trained (unmerged) mean", "stored model mean", "std", "per seed"],
                [[m, s, len(v), f"{statistics.mean(x['trained'] for x in v):.4f}",
                  f"{statistics.mean(x['dev_accuracy'] for x in v):.4f}",
                  f"{statistics.stdev([x['dev_accuracy'] for x in v]) if len(v) > 1 else 0.0:.4f}",
                  " ".join(f"{x['dev_accuracy']:.4f}" for x in v)] for (m, s), v in summary.items()]))
    plot(summary, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png').name}")


def plot(summary: dict, out: Path) -> None:
    """Mean dev accuracy of each (method, stored form) over the seeds: a line against bits for the INT
    forms, a horizontal line for the float merges, a marker for NF4."""
    from memtune.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    lines: dict[str, list] = {}
    for (method, stored), v in summary.items():
        mean = statistics.mean(x["dev_accuracy"] for x in v)
        if v[0]["bits"] is None:
            ax.axhline(mean, ls=":", lw=1, color="gray" if method == "lora" else "tab:purple",
                       label=f"{method}, {stored}")
        elif stored.startswith("NF4"):
            ax.plot([4], [mean], "s", label=f"{method}, {stored}")
        else:
            lines.setdefault(f"{method}, {stored.split(' ', 2)[-1]}", []).append((v[0]["bits"], mean))
    for label, pts in lines.items():
        ax.plot(*zip(*sorted(pts)), "o-", lw=2 if label.startswith("qa-lora") else 1.2, label=label)
    ax.set_xticks(sorted({b for pts in lines.values() for b, _ in pts}))
    ax.set_xlabel("bits per weight code (group 32)")
    ax.set_ylabel("SST-2 dev accuracy of the stored model")
    ax.set_title("MiniLM-L6: the model you ship")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


if __name__ == "__main__":
    main()
