"""`memtune demo`: full fine-tuning, LoRA, TokenTune, QLoRA, QA-LoRA, QST and MeZO on the pretrained
MiniLM-L6, side by side (`--all`: also linear probing, DyLoRA, AdaLoRA, VeRA, prompt tuning, prefix
tuning, P-Tuning v2 and LongLoRA).

Both runs use the same data, batch, seed and number of steps; the table shows what each trains,
the memory measured by category during training, and accuracy before and after. With no
arguments it uses the bundled sentiment set (320 train / 80 test sentences) and finishes in well
under five minutes on two CPU cores. `--data FILE` takes any labeled TSV/CSV/JSONL (e.g. SST-2's
train.tsv); a held-out part of it is used for testing unless `--eval FILE` is given.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from .data import read_records
from .data.readers import Record
from .recipe import build_recipe
from .train import train

BUNDLED = Path(__file__).parent / "demo_data"

# One row per method: recipe overrides on top of the shared ones. Later methods add rows here.
METHODS: dict[str, list[str]] = {
    "full": ["adapter.kind=full", "optimizer.lr=1e-4", "optimizer.weight_decay=0.01"],
    "lora": ["adapter.kind=lora", "adapter.r=8", "adapter.alpha=16", "adapter.targets=all-linear",
             "optimizer.lr=1e-3"],
    "full+tokentune": ["adapter.kind=full", "optimizer.lr=1e-4", "optimizer.weight_decay=0.01",
                       "tokentune.select=8"],
    # 4-bit bases: LoRA over NF4 (QLoRA), and QA-LoRA over group-wise INT4 (merges back into INT4)
    "qlora": ["adapter.kind=lora", "adapter.r=8", "adapter.alpha=16", "adapter.targets=all-linear",
              "optimizer.lr=1e-3", "quantize.kind=nf4"],
    "qa-lora": ["adapter.kind=qalora", "adapter.r=8", "adapter.alpha=16", "adapter.targets=all-linear",
                "optimizer.lr=3e-3", "quantize.kind=int4", "quantize.group_size=32"],
    # a side network beside the NF4 backbone, which runs without gradient (QST; 384 wide: r=8)
    "qst": ["adapter.kind=qst", "adapter.r=8", "optimizer.lr=3e-3"],
    # zeroth-order: forwards only, no backward. The start BENCHMARKS.md shows working: mean-pooled
    # MiniLM features and a head at the class centroids; MeZO then trains the head (its estimate's
    # variance grows with the trained set), two perturbation seeds per step (n-SPSA)
    "mezo": ["adapter.kind=head", "optimizer.kind=mezo", "optimizer.samples=2", "optimizer.lr=1e-2",
             "optimizer.eps=1e-3", "pooling=mean", "classifier_init.examples_per_class=16",
             "train.schedule=constant", "train.warmup_steps=0", "train.max_steps=500"],
}
# `memtune demo --all`: the rest of the adapter family, after the default rows
MORE_METHODS: dict[str, list[str]] = {
    "head": ["adapter.kind=head", "optimizer.lr=1e-2"],
    "dylora": ["adapter.kind=dylora", "adapter.r=8", "adapter.alpha=16", "optimizer.lr=1e-3"],
    "adalora": ["adapter.kind=adalora", "adapter.init_r=12", "adapter.target_r=8", "adapter.alpha=16",
                "adapter.tinit=10", "adapter.tfinal=20", "adapter.delta_t=5", "optimizer.lr=1e-3"],
    "vera": ["adapter.kind=vera", "adapter.r=256", "optimizer.lr=1e-2"],
    "prompt": ["adapter.kind=prompt", "adapter.num_virtual_tokens=20", "optimizer.lr=3e-2"],
    "prefix": ["adapter.kind=prefix", "adapter.num_virtual_tokens=16", "optimizer.lr=1e-2"],
    "ptuning-v2": ["adapter.kind=ptuning-v2", "adapter.num_virtual_tokens=16", "optimizer.lr=1e-2"],
    # S2-Attn is causal-only; on this encoder LongLoRA is LoRA on q,k,v,o + trainable embeddings and norms
    "longlora (dense attn)": ["adapter.kind=longlora", "adapter.attention=dense", "adapter.targets=[query,key,value]",
                              "optimizer.lr=1e-3"],
}
CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "peak")


def _write_tsv(records: list[Record], path: Path) -> None:
    """Re-write a split as a sentence/label TSV the trainer reads."""
    from .data.formats import LABEL_KEYS, TEXT_KEYS

    def pick(fields, keys):
        return next(fields[k] for k in keys if k in fields)

    lines = ["sentence\tlabel"]
    for r in records:
        text = " ".join(str(pick(r.fields, TEXT_KEYS)).split())
        lines.append(f"{text}\t{pick(r.fields, LABEL_KEYS)}")
    path.write_text("\n".join(lines) + "\n")


def _splits(data: str | None, eval_file: str | None, out: Path, max_examples: int | None) -> tuple[str, str]:
    if data is None:
        train_file, test_file = str(BUNDLED / "sentiment_train.tsv"), str(BUNDLED / "sentiment_test.tsv")
        if not max_examples:
            return train_file, test_file
        data, eval_file = train_file, test_file
    records = read_records(data)
    rng = random.Random(0)
    if eval_file is None:  # hold out a fixed 20% (at most 1000) of the shuffled data
        rng.shuffle(records)
        n_test = min(1000, max(1, len(records) // 5))
        test, records = records[:n_test], records[n_test:]
    else:
        test = read_records(eval_file)
    if max_examples:
        rng.shuffle(records)
        records = records[:max_examples]
    out.mkdir(parents=True, exist_ok=True)
    _write_tsv(records, out / "train.tsv")
    _write_tsv(test, out / "test.tsv")
    return str(out / "train.tsv"), str(out / "test.tsv")


def run_demo(data: str | None = None, eval_file: str | None = None, out_dir: str = "runs/demo",
             epochs: float | None = None, max_examples: int | None = None,
             methods: list[str] | None = None, quiet: bool = False) -> list[dict]:
    out = Path(out_dir)
    if data is not None and max_examples is None:
        max_examples = 2000  # keeps `--data` on SST-2 inside the five-minute budget
    train_file, test_file = _splits(data, eval_file, out / "data", max_examples)
    epochs = epochs if epochs is not None else (4.0 if data is None else 1.0)
    shared = ["model=minilm", "task=classification", f"data.train={train_file}", f"data.eval={test_file}",
              "data.max_length=64", f"train.epochs={epochs}", "train.batch_size=16", "train.schedule=linear",
              "train.warmup_steps=5", "train.eval_at_start=true", "train.seed=0",
              f"train.progress={'false' if quiet else 'true'}"]
    rows = []
    table = {**METHODS, **MORE_METHODS}
    for name in methods or list(METHODS):
        recipe = build_recipe({}, shared + table[name] + [f"output_dir={out / name.split()[0]}"])
        if not quiet:
            print(f"\n== {name}: training MiniLM-L6 on {train_file}")
        t0 = time.perf_counter()
        s = train(recipe)
        rows.append({
            "method": name,
            "params_trainable": s["params"]["trainable"],
            "params_total": s["params"]["total"],
            "memory_bytes": {k: s["memory_bytes"][k] for k in CATEGORIES},
            "accuracy_before": s["eval_start"]["accuracy"],
            "accuracy_after": s["eval"]["accuracy"],
            "train_seconds": s["train"]["seconds"],
            "wall_seconds": time.perf_counter() - t0,
            "steps": s["train"]["steps"],
        })
    report = {"model": "minilm (MiniLM-L6, 22M)", "train": train_file, "test": test_file, "epochs": epochs,
              "batch_size": 16, "max_length": 64, "rows": rows}
    (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(rows, out / "demo.png")
    if not quiet:
        print("\n" + format_table(rows))
        print(f"\nwrote {out / 'demo.json'} and {out / 'demo.png'}")
    return rows


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def format_table(rows: list[dict]) -> str:
    head = ["method", "trainable", "params MiB", "grads MiB", "optim MiB", "activ MiB", "peak MiB",
            "acc before", "acc after", "wall s"]
    body = [[r["method"], f"{r['params_trainable']:,}", *(_mib(r["memory_bytes"][k]) for k in CATEGORIES),
             f"{r['accuracy_before']:.3f}", f"{r['accuracy_after']:.3f}", f"{r['wall_seconds']:.1f}"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])


def _plot(rows: list[dict], path: Path) -> None:
    from .plots import _pyplot

    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100, gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(CATEGORIES))]
        ax.bar(xs, [r["memory_bytes"][k] / 2**20 for k in CATEGORIES], width, label=r["method"])
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(CATEGORIES))], CATEGORIES)
    ax.set_ylabel("MiB (measured)")
    ax.set_title("memory by category")
    ax.legend()
    ax2.bar([r["method"] for r in rows], [r["accuracy_after"] for r in rows], color="tab:green", label="after")
    ax2.scatter([r["method"] for r in rows], [r["accuracy_before"] for r in rows], color="k", zorder=3,
                label="before")
    ax2.set_ylim(0, 1)
    ax2.set_title("test accuracy")
    ax2.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_demo()
