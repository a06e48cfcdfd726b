"""SST-2 (GLUE) with the pretrained MiniLM-L6: backprop methods, or MeZO from its starting point.

    python benchmarks/sst2.py [--sst2 ../shared/data/sst2] [--train-examples 4000] [--epochs 1]
    python benchmarks/sst2.py --suite mezo [--steps 1000]
    python benchmarks/sst2.py --suite adapters
    python benchmarks/sst2.py --suite qst [--seeds 0,1,2] [--methods "qlora;qst r=8, lr 3e-3"]

Suite `backprop` (default): full fine-tuning, LoRA, both with TokenTune (k=16), QLoRA (LoRA over
an NF4 base) and QA-LoRA (INT4, group 32), each on the same
random 4,000 training sentences (seed 0) for one epoch at max_length 64, batch 16.
Suite `mezo`: MeZO over the head only (linear probing), full parameters and LoRA, with cross-entropy
and with the accuracy objective, from a classifier over mean-pooled features (`pooling=mean`, how
MiniLM was trained) initialized at the class centroids of 16 training sentences per class, for a
fixed number of steps (batch 16, constant LR; the accuracy row: 400 steps of 64) drawn from 20,000
training sentences; then the probes behind the chosen settings.
Suite `qst`: QLoRA and QST (adapter.kind=qst over NF4) with the backprop suite's data and settings, over a
sweep of r and learning rate.
Suite `adapters`: every adapter of the family (LoRA, DyLoRA, AdaLoRA, VeRA, prompt tuning, prefix
tuning, P-Tuning v2, QA-LoRA) with the backprop suite's data and settings, plus a PNG.
All report dev accuracy (872 sentences) before and after, time per step and measured memory, and
write benchmarks/results/sst2[-suite][-Nep].json (-Nep: --epochs other than 1).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, mib, save, table  # noqa: E402

from memtune.data import read_records  # noqa: E402
from memtune.demo import MORE_METHODS  # noqa: E402
from memtune.recipe import build_recipe  # noqa: E402
from memtune.train import train  # noqa: E402

FULL = ["adapter.kind=full", "optimizer.lr=1e-4", "optimizer.weight_decay=0.01"]
LORA = ["adapter.kind=lora", "adapter.r=8", "adapter.alpha=16", "adapter.targets=all-linear", "optimizer.lr=1e-3"]
METHODS = {
    "full": FULL,
    "lora": LORA,
    "full+tokentune(k=16)": FULL + ["tokentune.select=16"],
    "lora+tokentune(k=16)": LORA + ["tokentune.select=16"],
    "qlora": LORA + ["quantize.kind=nf4"],
    "qa-lora(int4,g32)": [("adapter.kind=qalora" if o == "adapter.kind=lora" else o) for o in LORA]
    + ["quantize.kind=int4", "quantize.bits=4", "quantize.group_size=32"],
}
MEZO = ["optimizer.kind=mezo", "pooling=mean", "classifier_init.examples_per_class=16", "train.schedule=constant",
        "train.warmup_steps=0"]
MEZO_LORA = MEZO + ["adapter.kind=lora", "adapter.r=8", "adapter.alpha=16", "adapter.targets=all-linear",
                    "optimizer.eps=1e-2"]
HEAD_ACC = MEZO + ["adapter.kind=head", "optimizer.objective=accuracy"]
MEZO_METHODS = {
    "mezo head (linear probe)": MEZO + ["adapter.kind=head", "optimizer.lr=1e-3", "optimizer.eps=1e-3"],
    # a batch of 64 gives the accuracy steps of 1/64 and more flips per perturbation; 400 steps of 64
    # cost about what 1,000 of 16 do
    "mezo head (accuracy objective)": HEAD_ACC + ["train.batch_size=64", "train.max_steps=400", "optimizer.lr=2e-3",
                                                  "optimizer.eps=1e-2"],
    "mezo full": MEZO + ["optimizer.lr=1e-5", "optimizer.eps=1e-3"],
    # 1,000 full-parameter steps take 12 min here (z for 22.6M weights is drawn 4 times a step):
    # 800 steps at the same lr x steps fit in 10
    "mezo full (800 steps)": MEZO + ["train.max_steps=800", "optimizer.lr=1.25e-5", "optimizer.eps=1e-3"],
    "mezo lora": MEZO_LORA + ["optimizer.lr=3e-4"],
    # probes, recorded in BENCHMARKS.md
    "mezo lora (lr 1e-4)": MEZO_LORA + ["optimizer.lr=1e-4"],
    "mezo head (accuracy objective, batch 16)": HEAD_ACC + ["optimizer.lr=1e-3", "optimizer.eps=1e-3"],
    "mezo head (accuracy objective, batch 16, lr 1e-2, eps 1e-2)": HEAD_ACC + ["optimizer.lr=1e-2",
                                                                                "optimizer.eps=1e-2"],
    "mezo head (accuracy objective, batch 16, lr 3e-3, eps 1e-2)": HEAD_ACC + ["optimizer.lr=3e-3",
                                                                                "optimizer.eps=1e-2"],
    "mezo head (accuracy objective, batch 16, lr 1e-2, eps 3e-2)": HEAD_ACC + ["optimizer.lr=1e-2",
                                                                                "optimizer.eps=3e-2"],
    "mezo head (accuracy objective, batch 16, adam)": HEAD_ACC + ["optimizer.variant=adam", "optimizer.lr=3e-4",
                                                                   "optimizer.eps=1e-2"],
}
# issue 6: every adapter of the family, same data, epochs and batch as the backprop suite; the
# demo's settings (memtune.demo.MORE_METHODS) except AdaLoRA's schedule, fitted to 250 steps
ADALORA = ["adapter.kind=adalora", "adapter.init_r=12", "adapter.target_r=8", "adapter.alpha=16",
           "adapter.tinit=25", "adapter.tfinal=50", "adapter.delta_t=10", "optimizer.lr=1e-3"]
PREFIX = MORE_METHODS["prefix"]
ADAPTER_METHODS = {
    "lora": LORA,
    "dylora": MORE_METHODS["dylora"],
    "adalora": ADALORA,
    **{k: MORE_METHODS[k] for k in ("vera", "prompt", "prefix", "ptuning-v2")},
    "qa-lora(int4,g32)": METHODS["qa-lora(int4,g32)"],
    # learning-rate probes for the two rows that stayed at chance at the shared settings (a later
    # key=value overrides an earlier one). Li & Liang train the MLP-reparameterized prefix at 5e-5:
    # Adam moves every MLP weight by ~lr per step, so at 1e-3 the prefix keys grow until attention
    # sees only the prefix
    "adalora (lr 1e-2)": ADALORA + ["optimizer.lr=1e-2"],
    **{f"prefix (lr {lr})": PREFIX + [f"optimizer.lr={lr}"] for lr in ("1e-3", "1e-4", "5e-5", "3e-4")},
}
# QA-LoRA probes: A reads the group mean, so at LoRA's lr its update is ~g times smaller (see BENCHMARKS.md)
QALORA = METHODS["qa-lora(int4,g32)"]
METHODS["qa-lora(int4,g32), lr 1e-2"] = QALORA + ["optimizer.lr=1e-2"]
METHODS["qa-lora(int4,g32), alpha 512"] = QALORA + ["adapter.alpha=512"]
METHODS["qa-lora(int4,g32), lr 1e-2, r 16"] = QALORA + ["optimizer.lr=1e-2", "adapter.r=16", "adapter.alpha=32"]
METHODS["qa-lora(int4,g32), lr 5e-3"] = QALORA + ["optimizer.lr=5e-3"]
METHODS["qa-lora(int4,g32), lr 2e-2"] = QALORA + ["optimizer.lr=2e-2"]
METHODS["qa-lora(int4,g32), alpha 192, lr 3e-3"] = QALORA + ["adapter.alpha=192", "optimizer.lr=3e-3"]
METHODS["qa-lora(int4,g32), lr 7e-3"] = QALORA + ["optimizer.lr=7e-3"]
METHODS["qa-lora(int4,g32), lr 1.5e-2"] = QALORA + ["optimizer.lr=1.5e-2"]
# narrower bases for the deployed-model comparison (benchmarks/quantized_deploy.py)
for bits in (3, 2):
    METHODS[f"qa-lora(int{bits},g32), lr 1e-2"] = [o for o in QALORA if o != "quantize.bits=4"] + [
        f"quantize.bits={bits}", "optimizer.lr=1e-2"]
METHODS["lora over int4 (no pooling)"] = LORA + ["quantize.kind=int4", "quantize.bits=4", "quantize.group_size=32"]
# smaller groups: A reads d_in/8 group means (48 on MiniLM's 384-wide layers, not 12); the base is
# finer too (12 bits per weight as stored), so this mixes a better base with a wider adapter input
for lr in ("3e-3", "1e-2"):
    METHODS[f"qa-lora(int4,g8), lr {lr}"] = [o for o in QALORA if o != "quantize.group_size=32"] + [
        "quantize.group_size=8", f"optimizer.lr={lr}"]
# the QA-LoRA paper's base: GPTQ instead of round-to-nearest, quantized once per seed by `memtune quantize`
# (calibration: --calibration-samples sentences of the training subset); GPTQ_BASE is replaced by its folder
GPTQ_BASE = "model=<gptq base>"
METHODS["qa-lora over gptq(int4,g32), lr 1.5e-2"] = QALORA + ["optimizer.lr=1.5e-2", GPTQ_BASE]
METHODS["qa-lora over gptq(int4,g32), lr 1e-2"] = QALORA + ["optimizer.lr=1e-2", GPTQ_BASE]
METHODS["lora over gptq int4 (no pooling)"] = METHODS["lora over int4 (no pooling)"] + [GPTQ_BASE]
# issue 15: QST (side network beside the NF4 backbone, which runs without gradient) next to QLoRA, same
# data, epoch and batch; r and lr swept for this 384-wide model (r=16 leaves a 24-wide side network)
QST_METHODS = {
    "qlora": METHODS["qlora"],
    **{f"qst r={r}, lr {lr}": ["adapter.kind=qst", f"adapter.r={r}", f"optimizer.lr={lr}"]
       for r, lr in [(8, "3e-3"), (4, "3e-3"), (16, "3e-3"), (8, "1e-3"), (8, "1e-2"), (4, "1e-3"),
                     (16, "1e-2"), (32, "1e-2"), (16, "3e-2"), (16, "1e-3")]},
    # the classifier over the mean of the (mixed) last hidden states instead of MiniLM's untrained [CLS]
    # pooler, for both methods
    "qlora (mean pooling)": METHODS["qlora"] + ["pooling=mean"],
    "qst r=16, lr 3e-3 (mean pooling)": ["adapter.kind=qst", "adapter.r=16", "optimizer.lr=3e-3", "pooling=mean"],
    "qst r=8, lr 3e-3 (mean pooling)": ["adapter.kind=qst", "adapter.r=8", "optimizer.lr=3e-3", "pooling=mean"],
    # the adapter downsampler's inner width 16 -> 64 (paper Table 6 keeps 16)
    "qst r=16, rank 64, lr 3e-3 (mean pooling)": ["adapter.kind=qst", "adapter.r=16", "adapter.rank=64",
                                                  "optimizer.lr=3e-3", "pooling=mean"],
    # what the frozen NF4 backbone's features give a linear classifier alone (backprop into the head only)
    "linear probe, lr 1e-2": ["adapter.kind=head", "quantize.kind=nf4", "optimizer.lr=1e-2"],
    "linear probe, lr 1e-2 (mean pooling)": ["adapter.kind=head", "quantize.kind=nf4", "optimizer.lr=1e-2",
                                             "pooling=mean"],
}
SUITES = {"backprop": METHODS, "mezo": MEZO_METHODS, "adapters": ADAPTER_METHODS, "qst": QST_METHODS}


def write_subset(sst2: Path, out: Path, n: int) -> Path:
    """The first n sentences of SST-2 train after a seed-0 shuffle, as out/train_subset.tsv."""
    records = read_records(str(sst2 / "train.tsv"))
    random.Random(0).shuffle(records)
    out.mkdir(parents=True, exist_ok=True)
    subset = out / "train_subset.tsv"
    subset.write_text("sentence\tlabel\n" + "".join(
        f"{r.fields['sentence'].strip()}\t{r.fields['label']}\n" for r in records[:n]))
    return subset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sst2", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"))
    ap.add_argument("--suite", default="backprop", choices=list(SUITES))
    ap.add_argument("--train-examples", type=int, default=None, help="default: 4000 (backprop), 20000 (mezo)")
    ap.add_argument("--epochs", type=float, default=1.0, help="backprop suite")
    ap.add_argument("--steps", type=int, default=1000, help="mezo suite: optimizer steps per method")
    ap.add_argument("--out", default=None)
    ap.add_argument("--methods", default=None, help="';'-separated method names (default: the whole suite)")
    ap.add_argument("--set", action="append", default=[], help="extra key=value override for every method")
    ap.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0],
                    help="train.seed values, e.g. 0,1,2: data order, adapter and head init (and the GPTQ sample)")
    ap.add_argument("--calibration-samples", type=int, default=1024, help="GPTQ rows: calibration sentences")
    args = ap.parse_args()
    methods = SUITES[args.suite]
    mezo = args.suite == "mezo"
    args.train_examples = args.train_examples or (20000 if mezo else 4000)
    suffix = "" if args.suite == "backprop" else f"-{args.suite}"
    if not mezo and args.epochs != 1:  # e.g. sst2-3ep.json, runs/bench-sst2-3ep: apart from the 1-epoch rows
        suffix += f"-{args.epochs:g}ep"
    args.out = args.out or f"runs/bench-sst2{suffix}"
    sst2, out = Path(args.sst2), Path(args.out)
    subset = write_subset(sst2, out, args.train_examples)
    shared = ["model=minilm", "task=classification", f"data.train={subset}", f"data.eval={sst2 / 'dev.tsv'}",
              "data.labels=[0,1]", "data.max_length=64", "train.batch_size=16", "train.schedule=linear",
              "train.warmup_steps=25", "train.progress=false", "train.eval_at_start=true"]
    shared += [f"train.max_steps={args.steps}"] if mezo else [f"train.epochs={args.epochs}"]
    rows = []
    names = args.methods.split(";") if args.methods else list(methods)
    for seed, name in [(seed, name) for seed in args.seeds for name in names]:
        t0 = time.perf_counter()
        run_dir = method_dir(out, name, seed)
        recipe = shared + [f"train.seed={seed}"] + methods[name] + args.set
        base = {}
        if GPTQ_BASE in recipe:
            base = gptq_base(out, [o for o in recipe if o != GPTQ_BASE], args.calibration_samples)
            recipe = [o for o in recipe if o != GPTQ_BASE] + [f"model={base['quantized']}"]
            t0 = time.perf_counter()  # quantizing is reported apart (base_seconds)
        s = train(build_recipe({}, recipe + [f"output_dir={run_dir}"]))
        wall = time.perf_counter() - t0
        rows.append({"method": name, "seed": seed, "tokens_per_second": s["train"]["tokens_per_second"], "dev_accuracy": s["eval"]["accuracy"], "dev_accuracy_start":
                     s["eval_start"]["accuracy"], "dev_loss": s["eval"]["loss"], "steps": s["train"]["steps"],
                     "train_seconds": s["train"]["seconds"], "wall_seconds": wall,
                     "seconds_per_step": s["train"]["seconds"] / s["train"]["steps"],
                     "params_trainable": s["params"]["trainable"], "memory_bytes": s["memory_bytes"],
                     "recipe": methods[name] + args.set, **({"base": base} if base else {})})
        print(f"{name}: dev accuracy {s['eval']['accuracy']:.4f} in {wall:.0f}s", flush=True)
        # written after every method, so a run stopped part-way keeps the rows it finished
        path = write_results(args, suffix, mezo, rows)
    print(table(["method", "seed", "trainable", "dev acc (start)", "dev acc", "steps", "s/step", "wall s", "grads MiB",
                 "optim MiB", "activ MiB", "peak MiB"],
                [[r["method"], r["seed"], f"{r['params_trainable']:,}", f"{r['dev_accuracy_start']:.3f}",
                  f"{r['dev_accuracy']:.4f}", r["steps"], f"{r['seconds_per_step']:.3f}", f"{r['wall_seconds']:.0f}",
                  mib(r["memory_bytes"]["gradients"]), mib(r["memory_bytes"]["optimizer"]),
                  mib(r["memory_bytes"]["activations"]), mib(r["memory_bytes"]["peak"])] for r in rows]))
    if len(args.seeds) > 1:
        print(seed_summary(json.loads(path.read_text())["rows"], names))  # every seed run so far
    print(f"wrote {path}")


def method_dir(out: Path, name: str, seed: int) -> Path:
    """Where a method's run for `seed` goes: out/<name, punctuation as _>[-seedN] (seed 0: no suffix)."""
    return out / ("".join(c if c.isalnum() or c == "-" else "_" for c in name) + (f"-seed{seed}" if seed else ""))


def seed_summary(rows: list[dict], names: list[str]) -> str:
    """Dev accuracy mean ± sample std over seeds, per method."""
    import statistics

    out = []
    for name in names:
        acc = [r["dev_accuracy"] for r in sorted(rows, key=lambda r: r.get("seed", 0)) if r["method"] == name]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        out.append([name, len(acc), f"{statistics.mean(acc):.4f}", f"{sd:.4f}", " ".join(f"{a:.4f}" for a in acc)])
    return table(["method", "seeds", "mean dev acc", "std", "per seed"], out)


def gptq_base(out: Path, recipe: list[str], samples: int) -> dict:
    """The recipe's base quantized by GPTQ (memtune quantize) into out/, once per bits, group and seed."""
    from memtune.quantize import quantize_to_folder

    keep = [o for o in recipe if not o.startswith(("adapter.", "optimizer.", "quantize.method", "output_dir"))]
    r = build_recipe({}, keep + ["adapter.kind=head", "quantize.method=gptq",
                                 f"quantize.calibration_samples={samples}"])
    folder = out / f"gptq-int{r.quantize.bits}-g{r.quantize.group_size}-seed{r.train.seed}-n{samples}"
    report = folder / "quantize_report.json"
    if report.exists():
        return {k: v for k, v in json.loads(report.read_text()).items() if k != "per_layer"}
    summary = quantize_to_folder(r, folder)
    print(f"GPTQ base {folder}: output error {summary['output_error_mean']} in {summary['seconds']:.0f}s", flush=True)
    return summary


def write_results(args, suffix: str, mezo: bool, rows: list[dict]) -> Path:
    """benchmarks/results/sst2[-suite].json; with --methods, other methods' rows of the previous file stay."""
    name = f"sst2{suffix}"
    old = RESULTS / f"{name}.json"
    if args.methods and old.exists():
        mine = {(r["method"], r["seed"]) for r in rows}
        rows = [r for r in json.loads(old.read_text())["rows"] if (r["method"], r.get("seed", 0)) not in mine] + rows
    if args.suite == "adapters":
        plot(rows, RESULTS / f"{name}.png")
    return save(name, {
        "suite": args.suite, "train_examples": args.train_examples, "max_length": 64, "batch_size": 16,
        **({"steps": args.steps} if mezo else {"epochs": args.epochs}), "rows": rows})


def plot(rows: list[dict], path: Path) -> None:
    """Dev accuracy and peak memory per method, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100)
    names = [r["method"] for r in rows]
    a1.bar(names, [r["dev_accuracy"] for r in rows], color="tab:green")
    a1.set_ylim(0.5, 0.9)
    a1.set_title("SST-2 dev accuracy (MiniLM-L6, 1 epoch of 4k)")
    a2.bar(names, [r["memory_bytes"]["peak"] / 2**20 for r in rows], color="tab:blue")
    a2.set_title("measured peak MiB")
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
