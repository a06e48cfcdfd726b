"""MeZO: measured memory of a zeroth-order step vs an inference forward, AdamW full FT and AdamW LoRA.

    python benchmarks/mezo_memory.py [--models tiny-llama,minilm] [--device auto|cpu|cuda]

Same model weights, same batch (tiny-llama: 4 x 512 tokens; pretrained MiniLM: 16 x 128), all
measured by memtune's tracker. "inference" is one forward plus the loss under inference_mode (what
MeZO runs twice per step); the MeZO rows are full-parameter and LoRA (r=8, all-linear) steps; the
AdamW rows are ordinary backprop steps at steady state (second step). Time per step is the median
of the last 3 of 5 timed steps (after the 2 measured ones). Writes benchmarks/results/mezo_memory[-cuda].json.
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
from common import llama_sized, mib, pick_device, release, save, sync, table  # noqa: E402
from tokentune_memory import MODELS, batch_for  # noqa: E402

from memtune.adapters import ADAPTERS  # noqa: E402
from memtune.adapters.lora import LoraConfig  # noqa: E402
from memtune.gradient.backprop import AdamWConfig, Backprop  # noqa: E402
from memtune.gradient.mezo import Mezo, MezoConfig  # noqa: E402
from memtune.memory.tracker import MemoryTracker  # noqa: E402
from memtune.models import load_model  # noqa: E402
from memtune.recipe import TrainConfig  # noqa: E402
from memtune.tasks import CausalLMTask, ClassificationTask  # noqa: E402

METHODS = ["inference", "mezo full", "mezo full (unfused)", "inference lora", "mezo lora", "adamw full", "adamw lora"]


def build(base, task_name: str, method: str, device):
    model = copy.deepcopy(base)
    if "lora" in method:
        ADAPTERS.get("lora")(LoraConfig(r=8, alpha=16, targets=["all-linear"]), task_name).attach(model)
    model.to(device)
    task = ClassificationTask() if task_name == "classification" else CausalLMTask()
    train_cfg = TrainConfig(schedule="constant")
    import contextlib

    if method.startswith("mezo"):
        # "unfused": the restoring perturbation and the update as two z passes (4 draws a step, not 3)
        cfg = MezoConfig(lr=1e-6, fuse_update="unfused" not in method)
        rule = Mezo(cfg, model, task, train_cfg, 100, contextlib.nullcontext)
    elif method.startswith("adamw"):
        rule = Backprop(AdamWConfig(lr=1e-5), model, task, train_cfg, 100, contextlib.nullcontext)
    else:
        rule = None
    return model, task, rule


def run_once(model, task, rule, batch) -> None:
    if rule is None:  # inference: forward + loss, as each of MeZO's two forwards
        model.eval()
        with torch.inference_mode():
            loss, _ = task.loss_sum(model, batch)
            float(loss)
    else:
        model.train()
        rule.step([dict(batch)])


def measure(base, task_name: str, method: str, batch: dict, device) -> dict:
    model, task, rule = build(base, task_name, method, device)
    tracker = MemoryTracker(model, rule.optimizer if rule is not None else None)
    for _ in range(2):  # the second AdamW step has its optimizer state
        with tracker.measure(*batch.values()):
            run_once(model, task, rule, batch)
            sync(device)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        run_once(model, task, rule, batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    largest = max(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    out = {**tracker.report().to_dict(), "step_seconds": statistics.median(times[2:] if len(times) > 2 else times),
           "largest_trainable_tensor_bytes": largest}
    del model, rule, tracker
    release(device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny-llama,minilm")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    rows = []
    for name in args.models.split(","):
        task_name, seq, bs = MODELS[name]
        if name == "llama-1b":
            base = llama_sized(name)
        else:
            base = load_model(name, task_name, ["neg", "pos"] if task_name == "classification" else None).model
        batch = {k: v.to(device) for k, v in batch_for(task_name, seq, bs, base.config.vocab_size).items()}
        inference = {}
        for method in METHODS:
            m = measure(base, task_name, method, batch, device)
            kind = "lora" if "lora" in method else "full"
            if method.startswith("inference"):
                inference[kind] = m
            ref = inference[kind]
            key = "cuda_max_allocated" if device.type == "cuda" else "peak"
            rows.append({"model": name, "seq": seq, "batch": bs, "method": method, **m,
                         "peak_vs_inference": m[key] / ref[key],
                         "peak_vs_base_inference": m[key] / inference["full"][key],
                         "time_vs_inference": m["step_seconds"] / ref["step_seconds"]})
            print(f"{name} {method}: peak {mib(m[key])} MiB ({rows[-1]['peak_vs_inference']:.3f}x inference)",
                  flush=True)
    key = "cuda_max_allocated" if device.type == "cuda" else "peak"
    print(f"\ndevice {device}; peak = {'torch.cuda.max_memory_allocated' if key != 'peak' else 'tracker peak'}\n")
    print(table(["model", "seq x batch", "method", "params MiB", "grads MiB", "optim MiB", "activ MiB", "peak MiB",
                 "peak / inference (same model)", "peak / base inference", "step s", "step / inference"],
                [[r["model"], f"{r['seq']}x{r['batch']}", r["method"], mib(r["parameters"]), mib(r["gradients"]),
                  mib(r["optimizer"]), mib(r["activations"]), mib(r[key]), f"{r['peak_vs_inference']:.3f}",
                  f"{r['peak_vs_base_inference']:.3f}", f"{r['step_seconds']:.3f}", f"{r['time_vs_inference']:.2f}"]
                 for r in rows]))
    path = save("mezo_memory" + ("-cuda" if device.type == "cuda" else ""), {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
