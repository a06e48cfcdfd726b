"""Quantization error of the group-wise INT base: GPTQ vs round-to-nearest, INT4/3/2, on the pretrained
MiniLM-L6 with SST-2 sentences (`memtune quantize` for each cell).

    python benchmarks/gptq_error.py [--sst2 ../shared/data/sst2] [--calibration-samples 1024] [--group-size 32]

Per cell: the mean over the 37 quantized layers of the relative output error ||(Ŵ - W) X|| / ||W X||
on the calibration tokens (GPTQ's objective, so optimistic for GPTQ), and the relative change of the
model's last hidden state on 64 held-out sentences (the same for both methods), plus the time taken.
Calibration: the first N sentences of the SST-2 training subset that benchmarks/sst2.py uses (4,000,
seed 0) after a seed-0 shuffle. Writes benchmarks/results/gptq_error.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402
from sst2 import write_subset  # noqa: E402

from memtune.quantize import quantize_to_folder  # noqa: E402
from memtune.recipe import build_recipe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sst2", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"))
    ap.add_argument("--calibration-samples", type=int, default=1024)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--bits", default="4,3,2")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        subset = write_subset(Path(args.sst2), Path(tmp), 4000)
        for bits in [int(b) for b in args.bits.split(",")]:
            for method in ("rtn", "gptq"):
                recipe = build_recipe({}, [
                    "model=minilm", "task=classification", f"data.train={subset}", "data.labels=[0,1]",
                    "data.max_length=64", "train.batch_size=16", "adapter.kind=head", "quantize.kind=int4",
                    f"quantize.bits={bits}", f"quantize.group_size={args.group_size}", f"quantize.method={method}",
                    f"quantize.calibration_samples={args.calibration_samples}"])
                s = quantize_to_folder(recipe, Path(tmp) / f"int{bits}-{method}")
                per_layer = json.loads((Path(tmp) / f"int{bits}-{method}" / "quantize_report.json").read_text())
                rows.append({"bits": bits, "method": method, "layers": s["layers"], "seconds": s["seconds"],
                             "held_out_examples": s["held_out_examples"],
                             "held_out_hidden_error": s["held_out_hidden_error"],
                             "layer_output_error_mean": s.get("output_error_mean"),
                             "calibration": s.get("calibration"), "per_layer": per_layer["per_layer"]})
                print(f"INT{bits} {method}: hidden error {s['held_out_hidden_error']:.4f} in {s['seconds']:.0f}s",
                      flush=True)
    print(table(["base", "layer output error, calib. (GPTQ / RTN)", "held-out hidden-state error", "seconds"],
                [[f"INT{r['bits']} g{args.group_size} {r['method']}",
                  (f"{r['layer_output_error_mean']['gptq']:.4f} / {r['layer_output_error_mean']['rtn']:.4f}"
                   if r["layer_output_error_mean"] else "-"),
                  f"{r['held_out_hidden_error']:.4f}", f"{r['seconds']:.0f}"] for r in rows]))
    path = save("gptq_error", {"model": "minilm", "group_size": args.group_size,
                               "calibration_samples": args.calibration_samples, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
