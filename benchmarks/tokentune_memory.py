"""TokenTune: measured activation bytes vs selected fraction, full fine-tuning and LoRA.

    python benchmarks/tokentune_memory.py

For each model (tiny-llama and llama-small at sequence 512, pretrained MiniLM at 128, and MiniLM on ragged SST-2-length
batches: 32 sentences of 8..48 tokens) and each trainable set
(full, LoRA r=8 all-linear), one AdamW step is measured by memtune's tracker with every token
backpropagated, and with TokenTune selecting 100%, 50%, 25%, 10% and k=16 tokens per example.
Same model weights, same batch. Step time: median of --rounds interleaved rounds of all settings.
Writes benchmarks/results/tokentune_memory.json and
tokentune_memory.png.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, autocast, llama_sized, mib, pick_device, release, save, sync, table  # noqa: E402

from memtune.adapters import ADAPTERS  # noqa: E402
from memtune.adapters.lora import LoraConfig  # noqa: E402
from memtune.gradient.backprop import accumulate_gradients  # noqa: E402
from memtune.gradient.tokentune import TokenTune, TokenTuneConfig  # noqa: E402
from memtune.memory.tracker import MemoryTracker  # noqa: E402
from memtune.models import load_model  # noqa: E402
from memtune.tasks import CausalLMTask, ClassificationTask  # noqa: E402

# (label, select, recompute_attention); select None = plain backprop
SETTINGS = [("backprop", None, True), ("tokentune 100%", 1.0, True), ("tokentune 50%", 0.5, True),
            ("tokentune 25%", 0.25, True), ("tokentune 10%", 0.10, True), ("tokentune k=16", 16, True),
            ("tokentune 25%, no recompute", 0.25, False)]
MODELS = {"tiny-llama": ("causal-lm", 512, 4), "minilm": ("classification", 128, 16),
          "llama-1b": ("causal-lm", 1024, 4),
          # a seq-512 row where the layers' matmuls, not per-op overheads, set the step (hidden 512, 6 layers)
          "llama-small": ("causal-lm", 512, 4),
          # short sentences as in SST-2 (~25 tokens): lengths 8..48, padded to 48, where k=16 keeps most tokens
          "minilm-short": ("classification", 48, 32)}
RAGGED = {"minilm-short": 8}  # shortest length of a ragged batch


def batch_for(task: str, seq: int, bs: int, vocab: int, shortest: int | None = None) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (bs, seq), generator=g)
    mask = torch.ones_like(ids)
    if shortest is not None:  # right-padded, lengths uniform in [shortest, seq]
        lengths = torch.randint(shortest, seq + 1, (bs,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).long()
        ids = ids * mask
    b = {"input_ids": ids, "attention_mask": mask}
    if task == "classification":
        b["label"] = torch.randint(0, 2, (bs,), generator=g)
    else:
        b["labels"] = ids.clone()
    return b


def setup(base, task_name: str, adapter: str, select, recompute: bool, device):
    model = copy.deepcopy(base).to(device).train()
    if adapter == "lora":
        ADAPTERS.get("lora")(LoraConfig(r=8, alpha=16, targets=["all-linear"]), task_name).attach(model)
        model.to(device)
    task = ClassificationTask() if task_name == "classification" else CausalLMTask()
    if select is not None:
        tt = TokenTune(TokenTuneConfig(select=select, recompute_attention=recompute), model,
                       model.config.pad_token_id or 0, task_name)
        task = tt.wrap(task)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, task, opt


def step(model, task, opt, batch: dict, device, ctx) -> None:
    accumulate_gradients(model, task, [dict(batch)], ctx)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)


def measure_group(base, task_name: str, adapter: str, batch: dict, device, ctx, rounds: int) -> list[dict]:
    """Every setting of one (model, trainable set): memory from two tracked steps each (step 2 is the
    steady state), then step time as the median of `rounds` interleaved rounds over all settings, the
    order rotated each round, so drifts of the machine hit every setting alike."""
    setups = [setup(base, task_name, adapter, select, recompute, device) for _, select, recompute in SETTINGS]
    reports = []
    for model, task, opt in setups:
        tracker = MemoryTracker(model, opt)
        torch.manual_seed(0)
        for _ in range(2):
            with tracker.measure(*batch.values()):
                step(model, task, opt, batch, device, ctx)
        reports.append(tracker.report().to_dict())
    times = [[] for _ in setups]
    n = len(setups)
    for i in range(rounds + 1):  # round 0 warms up
        for j in list(range(n))[i % n:] + list(range(n))[:i % n]:
            t0 = time.perf_counter()
            step(*setups[j], batch, device, ctx)
            if i:
                times[j].append(time.perf_counter() - t0)
    del setups
    release(device)
    return [{**r, "step_seconds": statistics.median(t), "step_seconds_all": t} for r, t in zip(reports, times)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny-llama,llama-small,minilm,minilm-short")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds per (model, trainable set)")
    args = ap.parse_args()
    device = pick_device(args.device)
    ctx = autocast(device, args.precision)
    models = args.models.split(",")
    rows = []
    for name in models:
        task_name, seq, bs = MODELS[name]
        if name in ("llama-1b", "llama-small"):
            base = llama_sized(name)
        else:
            base = load_model(name.removesuffix("-short"), task_name,
                              ["neg", "pos"] if task_name == "classification" else None).model
        batch = batch_for(task_name, seq, bs, base.config.vocab_size, RAGGED.get(name))
        batch = {k: v.to(device) for k, v in batch.items()}
        for adapter in ("full", "lora"):
            ref = None
            for (label, select, recompute), m in zip(SETTINGS, measure_group(base, task_name, adapter, batch,
                                                                              device, ctx, args.rounds)):
                ref = ref or m
                rows.append({"model": name, "seq": seq, "batch": bs, "adapter": adapter, "setting": label,
                             "select": select, "recompute_attention": recompute, **m,
                             "activations_ratio": m["activations"] / ref["activations"],
                             "peak_ratio": m["peak"] / ref["peak"],
                             "step_ratio": m["step_seconds"] / ref["step_seconds"]})
                if m["cuda_max_allocated"]:
                    rows[-1]["cuda_peak_ratio"] = m["cuda_max_allocated"] / ref["cuda_max_allocated"]
                print(f"{name} {adapter} {label}: activations {mib(m['activations'])} MiB "
                      f"({rows[-1]['activations_ratio']:.3f}x), peak {rows[-1]['peak_ratio']:.3f}x", flush=True)
    print(f"\ndevice {device}, precision {args.precision}\n")
    cuda = device.type == "cuda"
    print(table(["model", "seq x batch", "trains", "setting", "activ MiB", "activ ratio", "peak MiB", "peak ratio"]
                + (["cuda max MiB", "cuda ratio"] if cuda else []) + ["step s", "step ratio"],
                [[r["model"], f"{r['seq']}x{r['batch']}", r["adapter"], r["setting"], mib(r["activations"]),
                  f"{r['activations_ratio']:.3f}", mib(r["peak"]), f"{r['peak_ratio']:.3f}"]
                 + ([mib(r["cuda_max_allocated"]), f"{r['cuda_peak_ratio']:.3f}"] if cuda else [])
                 + [f"{r['step_seconds']:.3f}", f"{r['step_ratio']:.2f}"] for r in rows]))
    name = "tokentune_memory" + ("-cuda" if cuda else "")
    path = save(name, {"args": vars(args), "rows": rows})
    plot(rows, models, RESULTS / f"{name}.png")
    print(f"wrote {path} and {RESULTS / (name + '.png')}")


def plot(rows: list[dict], models: list[str], out: Path) -> None:
    from memtune.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), dpi=100, sharey=True, squeeze=False)
    for ax, model in zip(axes[0], models):
        seq = MODELS[model][1]
        for adapter, style in (("full", "o-"), ("lora", "s--")):
            mine = [r for r in rows if r["model"] == model and r["adapter"] == adapter and r["recompute_attention"]]
            pts = [(r["select"], r["activations_ratio"]) for r in mine if isinstance(r["select"], float)]
            ax.plot([p * 100 for p, _ in pts], [v for _, v in pts], style, label=f"{adapter}: fraction selected")
            k16 = [r["activations_ratio"] for r in mine if r["select"] == 16]
            ax.scatter([16 / seq * 100], k16, marker="*", s=120, label=f"{adapter}: k=16")
        ax.axhline(0.35, color="gray", lw=0.8, ls=":")
        ax.set_title(f"{model} (seq {seq})")
        ax.set_xlabel("tokens selected (%)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("activation bytes / full backprop")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


if __name__ == "__main__":
    main()
