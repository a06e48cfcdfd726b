"""Quantized bases: training memory by category for full FT, LoRA, QLoRA and QLoRA + TokenTune.

    python benchmarks/quant_memory.py [--device auto|cpu|cuda] [--seq 512] [--batch 4] [--rounds 3]
    python benchmarks/quant_memory.py --device cuda --model llama-1b     # the issue's GPU table

The model (`--model quant-memory`, default) is tiny-llama's architecture scaled up (8 layers, hidden
1024, intermediate 2816, 16 heads / 8 KV heads, vocab 32000, random init); `llama-1b` is
TinyLlama-1.1B's shape (benchmarks/common.py). Methods: full FT, LoRA, QLoRA (NF4), QLoRA and LoRA
with TokenTune (25%), QA-LoRA (INT4, group 32); LoRA r=8 on all linear layers. One AdamW step at
steady state per method, same batch, measured by memtune's tracker (4-bit codes and their
quantization constants count as frozen parameters); step time is the median of `--rounds` further
steps. Also reports the bytes per quantized weight, constants included. Writes
benchmarks/results/quant_memory[-llama-1b][-cuda].json and .png.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, llama_sized, measure_step, mib, pick_device, release, save, table  # noqa: E402

from memtune.adapters import ADAPTERS  # noqa: E402
from memtune.adapters.lora import LoraConfig  # noqa: E402
from memtune.gradient.tokentune import TokenTune, TokenTuneConfig  # noqa: E402
from memtune.storage import STORAGE  # noqa: E402
from memtune.adapters.qalora import QALoraConfig  # noqa: E402
from memtune.storage.int4 import IntConfig, IntLinear  # noqa: E402
from memtune.storage.nf4 import NF4Config, quantized_bytes  # noqa: E402
from memtune.tasks import CausalLMTask  # noqa: E402

METHODS = ["full", "lora", "qlora", "qlora+tokentune(25%)", "lora+tokentune(25%)", "qa-lora(int4,g32)"]
CATS = ("parameters", "gradients", "optimizer", "activations", "peak")


def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LlamaForCausalLM(cfg)


def measure(base, method: str, batch: dict, device, rounds: int = 3) -> dict:
    model = copy.deepcopy(base)
    extra = {}
    if method.startswith("qlora"):
        storage = STORAGE.get("nf4")(NF4Config())
        storage.apply(model)
        codes, weights = quantized_bytes(model)
        extra = {"quantized_bytes": codes, "quantized_weights": weights, "bytes_per_weight": codes / weights}
    if method.startswith("qa-lora"):
        STORAGE.get("int4")(IntConfig(bits=4, group_size=32)).apply(model)
        ADAPTERS.get("qalora")(QALoraConfig(r=8, alpha=16, targets=["all-linear"]), "causal-lm").attach(model)
    elif method != "full":
        ADAPTERS.get("lora")(LoraConfig(r=8, alpha=16, targets=["all-linear"]), "causal-lm").attach(model)
    task = CausalLMTask()
    if "tokentune" in method:
        task = TokenTune(TokenTuneConfig(select=0.25), model, 0, "causal-lm").wrap(task)
    out = {**measure_step(model, task, batch, device, rounds), **extra}
    del model
    release(device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3, help="timed steps per method after the measured ones")
    ap.add_argument("--model", default="quant-memory", choices=["quant-memory", "llama-1b"])
    args = ap.parse_args()
    device = pick_device(args.device)
    base = base_model() if args.model == "quant-memory" else llama_sized("llama-1b")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 32000, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "labels": ids.clone().to(device)}
    rows = []
    for method in METHODS:
        m = measure(base, method, batch, device, args.rounds)
        rows.append({"method": method, **m})
        print(f"{method}: peak {mib(m['peak'])} MiB", flush=True)
    full, lora = rows[0], next(r for r in rows if r["method"] == "lora")
    key = "cuda_max_allocated" if device.type == "cuda" else "peak"
    for r in rows:
        r["peak_ratio"] = r[key] / full[key]
    print(f"\n{args.model} (random init), batch {args.batch} x seq {args.seq}, {device}, fp32\n")
    print(table(["method"] + [f"{c} MiB" for c in CATS] + (["cuda max MiB"] if key != "peak" else [])
                + ["peak / full FT", "step s", "step / lora"],
                [[r["method"]] + [mib(r[c]) for c in CATS] + ([mib(r[key])] if key != "peak" else [])
                 + [f"{r['peak_ratio']:.3f}", f"{r['step_seconds']:.3f}",
                    f"{r['step_seconds'] / lora['step_seconds']:.2f}"] for r in rows]))
    q = next(r for r in rows if r["method"] == "qlora")
    print(f"\nNF4 + double quant: {q['bytes_per_weight']:.4f} bytes per quantized weight "
          f"({8 * q['bytes_per_weight']:.3f} bits), constants included")
    formats = int_formats()
    for f in formats:
        print(f"INT{f['bits']} group {f['group_size']}: {f['bits_stored']:.3f} bits per weight as stored (codes "
              f"bit-packed, fp32 scale + zero per group)")
    name = ("quant_memory" + ("-llama-1b" if args.model == "llama-1b" else "")
            + ("-cuda" if device.type == "cuda" else ""))
    path = save(name, {"args": vars(args), "rows": rows, "int_formats": formats})
    plot(rows, RESULTS / f"{name}.png")
    print(f"wrote {path}")


def int_formats() -> list[dict]:
    """Bits per weight of the group-wise INT formats, measured on one 1024x1024 layer."""
    out = []
    for bits in (4, 3, 2):
        for g in (32, 64, 128):
            q = IntLinear.from_weight(torch.randn(1024, 1024), None, bits, g)
            consts = (q.scales.numel() + q.zeros.numel()) * 4 * 8
            n = q.in_features * q.out_features
            out.append({"bits": bits, "group_size": g, "bits_stored": (q.qweight.numel() * 8 + consts) / n})
    return out


def plot(rows: list[dict], out: Path) -> None:
    from memtune.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.8), dpi=100)
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar([j + i * width for j in range(len(CATS))], [r[c] / 2**20 for c in CATS], width, label=r["method"])
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(CATS))], CATS)
    ax.set_ylabel("MiB (measured)")
    ax.set_title("training memory by category")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


if __name__ == "__main__":
    main()
