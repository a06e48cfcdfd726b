"""QST: training memory by category and step time against full FT, LoRA and QLoRA, plus QST's sweeps.

    python benchmarks/qst_memory.py [--device auto|cpu|cuda] [--seq 512] [--batch 4] [--rounds 3]
    python benchmarks/qst_memory.py --device cuda --model llama-1b      # TinyLlama-1.1B's shape on a GPU

The model is benchmarks/quant_memory.py's (8 Llama layers, hidden 1024, intermediate 2816, vocab 32000,
random init; `--model llama-1b`: TinyLlama-1.1B's shape). Rows, each one AdamW step at steady state
under memtune's tracker on the same batch (quant_memory.py's setup; LoRA r=8 on all linear layers):

    full, lora, qlora                                     the baselines
    qst (nf4, r=16, adapter)                              the paper's QST (one scalar α)
    qst, per-channel α                                    the reference code's α (d,): the loss needs dL/dh
    lst (fp32 backbone, r=16, adapter)                    side tuning of a full-precision backbone
    qst r=4 / 8 / 32                                      the r sweep (adapter downsampler)
    qst linear / lora / maxpool / avgpool                 the downsampler sweep (r=16)

Writes benchmarks/results/qst_memory[-llama-1b][-cuda].json.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import llama_sized, measure_step, mib, pick_device, release, save, table  # noqa: E402
from quant_memory import CATS, base_model  # noqa: E402

from memtune.adapters import ADAPTERS  # noqa: E402
from memtune.adapters.lora import LoraConfig  # noqa: E402
from memtune.adapters.qst import QSTConfig  # noqa: E402
from memtune.storage import STORAGE  # noqa: E402
from memtune.storage.nf4 import NF4Config  # noqa: E402
from memtune.tasks import CausalLMTask  # noqa: E402

# name -> (storage, adapter kind, adapter config)
ROWS = {
    "full": (None, "full", None),
    "lora": (None, "lora", LoraConfig(r=8, alpha=16, targets=["all-linear"])),
    "qlora": ("nf4", "lora", LoraConfig(r=8, alpha=16, targets=["all-linear"])),
    "qst (nf4, r=16, adapter)": ("nf4", "qst", QSTConfig(r=16)),
    "qst, per-channel α": ("nf4", "qst", QSTConfig(r=16, mix="channel")),
    "lst (fp32, r=16, adapter)": (None, "qst", QSTConfig(r=16)),
    **{f"qst r={r}": ("nf4", "qst", QSTConfig(r=r)) for r in (4, 8, 32)},
    **{f"qst {k}": ("nf4", "qst", QSTConfig(r=16, downsample=k)) for k in ("linear", "lora", "maxpool", "avgpool")},
}


def measure(base, name: str, batch: dict, device, rounds: int) -> dict:
    storage, kind, cfg = ROWS[name]
    model = copy.deepcopy(base)
    if storage:
        STORAGE.get(storage)(NF4Config()).apply(model)
    method = ADAPTERS.get(kind)(cfg or ADAPTERS.config_class(kind)(), "causal-lm")
    method.attach(model)
    out = measure_step(model, CausalLMTask(), batch, device, rounds)
    out["params_trainable_count"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    out["params_total_count"] = sum(p.numel() for p in model.parameters())
    del model
    release(device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="quant-memory", choices=["quant-memory", "llama-1b"])
    ap.add_argument("--rows", default=";".join(ROWS), help="';'-separated row names (default: all)")
    args = ap.parse_args()
    device = pick_device(args.device)
    base = base_model() if args.model == "quant-memory" else llama_sized("llama-1b")
    ids = torch.randint(5, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
             "labels": ids.clone().to(device)}
    rows = []
    for name in args.rows.split(";"):
        m = measure(base, name, batch, device, args.rounds)
        rows.append({"method": name, **m})
        print(f"{name}: peak {mib(m['peak'])} MiB, step {m['step_seconds']:.2f} s", flush=True)
    key = "cuda_max_allocated" if device.type == "cuda" else "peak"
    ref = {r["method"]: r for r in rows}
    full, qlora = ref.get("full"), ref.get("qlora")
    print(f"\n{args.model} (random init), batch {args.batch} x seq {args.seq}, {device}, fp32\n")
    print(table(["method", "trainable", "share"] + [f"{c} MiB" for c in CATS]
                + (["cuda max MiB"] if key != "peak" else []) + ["peak / full", "peak / qlora", "step s",
                                                                  "step / qlora"],
                [[r["method"], f"{r['params_trainable_count']:,}",
                  f"{100 * r['params_trainable_count'] / r['params_total_count']:.2f}%"]
                 + [mib(r[c]) for c in CATS] + ([mib(r[key])] if key != "peak" else [])
                 + [f"{r[key] / full[key]:.3f}" if full else "-", f"{r[key] / qlora[key]:.3f}" if qlora else "-",
                    f"{r['step_seconds']:.2f}",
                    f"{r['step_seconds'] / qlora['step_seconds']:.2f}" if qlora else "-"] for r in rows]))
    name = "qst_memory" + ("-llama-1b" if args.model == "llama-1b" else "") + ("-cuda" if device.type == "cuda" else "")
    path = save(name, {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
