"""Chunked linear cross-entropy (train.chunked_ce) against the model's own logits: memory and time.

    python benchmarks/chunked_ce.py [--model llama-small] [--batch 4] [--seq 2048] [--rounds 2]

One training step of a seeded random-init Llama shape (benchmarks/common.py, vocab 32000) with LoRA
r=8 on all linear layers, causal-LM loss on every position, batch x seq tokens, measured by memtune's
tracker, with the loss computed chunked (memtune.linear_ce) and unchunked (logits, log-softmax, their
gradient); plus a one-forward MeZO-style inference loss (no grad) both ways. `logits MiB` is the size
of one (tokens, vocab) fp32 tensor, for reference. Times are medians of `--rounds` steps after the
measured ones. Writes benchmarks/results/chunked_ce.json.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import llama_sized, measure_step, mib, save, table  # noqa: E402

from memtune.adapters import ADAPTERS  # noqa: E402
from memtune.adapters.lora import LoraConfig  # noqa: E402
from memtune.memory.tracker import MemoryTracker  # noqa: E402
from memtune.tasks import CausalLMTask  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model = llama_sized(args.model)
    ADAPTERS.get("lora")(LoraConfig(r=8, alpha=16, targets=["all-linear"]), "causal-lm").attach(model)
    ids = torch.randint(5, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    logits_bytes = args.batch * (args.seq - 1) * 32000 * 4
    rows = []
    for chunked in (False, True):
        task = CausalLMTask(chunked=chunked)
        with torch.inference_mode():  # the same weights for both inference losses (before any step)
            inference_model = model.eval()
            tracker = MemoryTracker(inference_model)
            with tracker.measure(ids):
                t0 = time.perf_counter()
                loss, _ = task.loss_sum(inference_model, batch)
                infer_s = time.perf_counter() - t0
        inference_peak = tracker.report().peak
        step = measure_step(copy.deepcopy(model), task, batch, torch.device("cpu"), args.rounds)
        rows.append({"chunked": chunked, "step": step, "inference_peak": inference_peak,
                     "inference_seconds": infer_s, "inference_loss": float(loss)})
        print(f"chunked={chunked}: step peak {mib(step['peak'])} MiB, {step['step_seconds']:.1f} s", flush=True)
    a, b = rows
    print(f"\n{args.model}, LoRA r=8, {args.batch} x {args.seq} tokens, vocab 32000, CPU fp32; one (tokens, vocab) fp32 "
          f"logits tensor = {mib(logits_bytes)} MiB\n")
    print(table(["loss", "step peak MiB", "step activ MiB", "step s", "inference peak MiB", "inference s"],
                [["chunked" if r["chunked"] else "model logits", mib(r["step"]["peak"]), mib(r["step"]["activations"]),
                  f"{r['step']['step_seconds']:.2f}", mib(r["inference_peak"]), f"{r['inference_seconds']:.2f}"]
                 for r in rows]))
    print(f"\nstep peak falls by {mib(a['step']['peak'] - b['step']['peak'])} MiB "
          f"({(a['step']['peak'] - b['step']['peak']) / logits_bytes:.2f} logits tensors); inference peak by "
          f"{mib(a['inference_peak'] - b['inference_peak'])} MiB; losses {a['inference_loss']:.4f} vs "
          f"{b['inference_loss']:.4f}")
    path = save("chunked_ce", {"args": vars(args), "logits_bytes": logits_bytes, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
