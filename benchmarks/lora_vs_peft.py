"""Full fine-tuning vs memtune-LoRA vs PEFT-LoRA vs the frozen-base limit: same model, same batch, same
loss code, one process.

    python benchmarks/lora_vs_peft.py [--model llama-small|llama-1b|minilm|tiny-llama] [--rounds 15]
                                      [--device auto|cpu|cuda] [--precision fp32|bf16]

Each method gets an identical copy of the model, the same AdamW settings and the same batch.
"frozen-limit" is the physical limit of any LoRA step (issue 20): the same model with every weight
frozen and only the input embeddings' output requiring grad, so its step is the frozen forward plus
the backward to the inputs through every layer, with no weight gradients and no optimizer. A LoRA
step adds only the adapter's own matmuls (~2r/d of the base's FLOPs) and its AdamW update.
Memory is measured by memtune's tracker for all three (the same instrument), over two optimizer
steps. Step time is the median over `rounds` interleaved rounds of all three methods
after warm-up, in an order rotated each round, so slow drifts of the machine and the cost of
following another method hit every method alike. Writes
benchmarks/results/lora_vs_peft-<model>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import LLAMA_SIZES, autocast, llama_sized, mib, pick_device, save, sync, table  # noqa: E402

from memtune.adapters import ADAPTERS  # noqa: E402
from memtune.adapters.lora import LoraConfig  # noqa: E402
from memtune.gradient.backprop import accumulate_gradients  # noqa: E402
from memtune.memory.tracker import MemoryTracker  # noqa: E402
from memtune.models import build_preset, load_model  # noqa: E402
from memtune.tasks import CausalLMTask, ClassificationTask  # noqa: E402


def make(model_name: str):
    if model_name in LLAMA_SIZES:
        return llama_sized(model_name), CausalLMTask(), "CAUSAL_LM"
    if model_name == "minilm":
        return load_model("minilm", "classification", ["neg", "pos"]).model, ClassificationTask(), "SEQ_CLS"
    return build_preset(model_name, "causal-lm").model, CausalLMTask(), "CAUSAL_LM"


def batch_for(task, vocab: int, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if isinstance(task, ClassificationTask):
        b["label"] = torch.randint(0, 2, (batch,), generator=g)
    else:
        b["labels"] = ids.clone()
    return b


def prepare(kind: str, base, peft_task: str, r: int, targets, device):
    import peft

    model = copy.deepcopy(base)
    if kind == "frozen-limit":
        for p in model.parameters():
            p.requires_grad_(False)
        # the embeddings' output becomes a leaf that requires grad: backward reaches every layer's input
        model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
        return model.to(device).train(), None
    if kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif kind == "memtune-lora":
        task = "classification" if peft_task == "SEQ_CLS" else "causal-lm"
        ADAPTERS.get("lora")(LoraConfig(r=r, alpha=2 * r, targets=targets), task).attach(model)
    elif kind == "peft-lora":
        model = peft.get_peft_model(model, peft.LoraConfig(task_type=peft_task, r=r, lora_alpha=2 * r,
                                                           target_modules="all-linear" if targets == ["all-linear"]
                                                           else targets))
        # PEFT injects its LoRA layers in place: the wrapped model's forward is the base model's forward.
        # Stepping the base model lets the same loss code fuse its LM head (chunked CE) for every method.
        model = model.get_base_model()
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def step(model, opt, task, batch, ctx=contextlib.nullcontext) -> None:
    accumulate_gradients(model, task, [batch], ctx)
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--targets", default="all-linear")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    device = pick_device(args.device)
    ctx = autocast(device, args.precision)
    targets = args.targets.split(",")
    base, task, peft_task = make(args.model)
    vocab = base.config.vocab_size
    batch = {k: v.to(device) for k, v in batch_for(task, vocab, args.batch, args.seq).items()}
    kinds = ["memtune-lora", "peft-lora", "frozen-limit", "full"]
    setups = {k: prepare(k, base, peft_task, args.r, targets, device) for k in kinds}
    memory = {}
    for k, (model, opt) in setups.items():
        tracker = MemoryTracker(model, opt)
        for _ in range(2):  # step 1 allocates optimizer state; step 2 is the steady state
            with tracker.measure(*batch.values()):
                step(model, opt, task, batch, ctx)
                sync(device)
        memory[k] = tracker.report().to_dict()
    for _ in range(args.warmup):
        for k in kinds:
            step(*setups[k], task, batch, ctx)
    sync(device)
    times = {k: [] for k in kinds}
    for i in range(args.rounds):
        # rotate the order each round: whichever method follows full FT's large free pays the
        # allocator's page faults, so every method takes every position equally often
        for k in kinds[i % len(kinds):] + kinds[:i % len(kinds)]:
            t0 = time.perf_counter()
            step(*setups[k], task, batch, ctx)
            sync(device)
            times[k].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in times.items()}
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, (m, _) in setups.items()}
    rows = [{"method": k, "trainable": trainable[k], "step_seconds_median": median[k],
             "step_seconds": times[k], "memory_bytes": memory[k]} for k in kinds]
    ratio = median["memtune-lora"] / median["peft-lora"]
    ratio_limit = median["memtune-lora"] / median["frozen-limit"]
    ratio_peft_limit = median["peft-lora"] / median["frozen-limit"]
    print(f"model {args.model} on {device} ({args.precision}), batch {args.batch} x seq {args.seq}, "
          f"LoRA r={args.r} on {args.targets}, median of {args.rounds} interleaved rounds\n")
    print(table(["method", "trainable", "step s (median)", "params MiB", "grads MiB", "optim MiB", "activ MiB",
                 "peak MiB"],
                [[r["method"], f"{r['trainable']:,}", f"{r['step_seconds_median']:.4f}",
                  *(mib(r["memory_bytes"][c]) for c in ("parameters", "gradients", "optimizer", "activations",
                                                         "peak"))] for r in rows]))
    print(f"\nstep time memtune/PEFT = {ratio:.3f} (target <= 0.95), memtune/limit = {ratio_limit:.3f} "
          f"(target <= 1.1), PEFT/limit = {ratio_peft_limit:.3f}")
    suffix = "-cuda" if device.type == "cuda" else ""
    path = save(f"lora_vs_peft-{args.model}{suffix}", {"args": vars(args), "rows": rows, "ratio_memtune_over_peft": ratio,
                                                         "ratio_memtune_over_limit": ratio_limit,
                                                         "ratio_peft_over_limit": ratio_peft_limit})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
