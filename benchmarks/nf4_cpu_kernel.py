"""NF4 inference on the CPU: bitsandbytes' canonical layout vs its AVX512-BF16 packed kernel.

    python benchmarks/nf4_cpu_kernel.py [--model llama-small] [--rounds 5]

Why it exists: memtune keeps every NF4 layer in bitsandbytes' canonical layout during runs
(memtune.storage.bnb_layout) and lets `memtune eval quantize.cpu_kernel=packed` use the packed one.
This measures what that choice costs: one NF4 model (`--model`, a seeded random-init Llama shape of
benchmarks/common.py, vocab 32000), copied into both layouts, no-grad eval forwards at decode-like
(1 sequence x 1 token), small-batch (4 x 16) and prefill (4 x 256) shapes, compute dtype fp32 and
bf16. Times are medians over `--rounds` interleaved rounds (canonical, packed, canonical, ...), in
one process. `logits rel. diff` = ||packed - canonical|| / ||canonical|| on the same input. On a CPU
without AVX512-BF16 the packed rows read n/a (bitsandbytes has no packed kernel there).
Writes benchmarks/results/nf4_cpu_kernel.json.
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
from common import llama_sized, save, table  # noqa: E402

from memtune.storage import STORAGE  # noqa: E402
from memtune.storage.bnb_layout import cpu_supports_packed, is_packed, linear4bit_layers, set_cpu_layout  # noqa: E402
from memtune.storage.nf4 import NF4Config  # noqa: E402

SHAPES = {"decode 1x1": (1, 1), "small 4x16": (4, 16), "prefill 4x256": (4, 256)}


def forward_seconds(model, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-small")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    packed_ok = cpu_supports_packed()
    rows, out = [], []
    for compute in ("fp32", "bf16"):
        base = llama_sized(args.model)
        STORAGE.get("nf4")(NF4Config(compute_dtype=compute)).apply(base)  # canonical layout
        base.eval()  # after apply: its new 4-bit layers are built in train mode
        models = {"canonical": base}
        if packed_ok:
            models["packed"] = copy.deepcopy(base)
            set_cpu_layout(models["packed"], packed=True)
        for shape, (b, t) in SHAPES.items():
            ids = torch.randint(3, 32000, (b, t), generator=torch.Generator().manual_seed(0))
            for m in models.values():  # warm-up; repacks the packed copy's layers on its first forward
                forward_seconds(m, ids)
            times = {k: [] for k in models}
            for _ in range(args.rounds):
                for k, m in models.items():
                    times[k].append(forward_seconds(m, ids))
            med = {k: statistics.median(v) for k, v in times.items()}
            diff = None
            if packed_ok:
                assert all(is_packed(layer) for _, layer in linear4bit_layers(models["packed"]))
                assert not any(is_packed(layer) for _, layer in linear4bit_layers(base))  # a copy, not shared
                with torch.no_grad():
                    a, p = (models[k](input_ids=ids).logits.float() for k in ("canonical", "packed"))
                diff = float((p - a).norm() / a.norm())
            rec = {"compute_dtype": compute, "shape": shape, "batch": b, "tokens": t,
                   "canonical_s": med["canonical"], "packed_s": med.get("packed"),
                   "speedup": med["canonical"] / med["packed"] if packed_ok else None, "logits_rel_diff": diff}
            out.append(rec)
            rows.append([compute, shape, f"{med['canonical'] * 1e3:.1f}",
                         f"{med['packed'] * 1e3:.1f}" if packed_ok else "n/a",
                         f"{rec['speedup']:.2f}x" if packed_ok else "n/a", f"{diff:.1e}" if diff is not None else "n/a"])
    print(table(["compute", "shape", "canonical ms", "packed ms", "packed speed-up", "logits rel. diff"], rows))
    path = save("nf4_cpu_kernel", {"model": args.model, "rounds": args.rounds, "cpu_supports_packed": packed_ok,
                                   "threads": torch.get_num_threads(), "rows": out})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
