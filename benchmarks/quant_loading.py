"""Peak memory while loading a checkpoint into a quantized base: quantize-while-reading vs load-then-quantize.

    python benchmarks/quant_loading.py [--size quant-memory|llama-1b] [--repeats 3]

Saves a random-init Llama (default: quant_memory.py's 8 layers x hidden 1024, untied fp32 embeddings
and head) as safetensors in a temporary folder, then loads it in a fresh process per mode:

    fp32                      from_pretrained as stored (the reference)
    nf4 after loading         from_pretrained in fp32, then NF4Storage.apply one layer at a time
    nf4 while loading         memtune's path: transformers quantizes each linear weight as it is read
    int4 after loading        from_pretrained in fp32, then IntStorage.apply (QA-LoRA's base)
    int4 folder               the INT4 model written by `memtune quantize` (save_quantized), loaded
                              by load_model -> load_quantized: a skeleton whose weights are never
                              initialized, the codes read from the folder

Memory is the process's resident set (VmRSS in /proc/self/status) minus its value before loading:
the peak is the kernel's high-water mark (VmHWM), exact, not sampled. It includes the pages of the
checkpoint that safetensors maps from disk while they are in use, which is memory the load needs
resident even though the kernel could drop it later. Anonymous memory (RssAnon: what cannot be
dropped) has no kernel high-water mark, so its peak is sampled every millisecond by a thread. Linux only. Writes benchmarks/results/quant_loading.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402

MODES = ["fp32", "nf4 after loading", "nf4 while loading", "int4 after loading", "int4 folder"]
INT_FOLDER = "int4"  # inside the checkpoint folder: the same model written by IntStorage + save_quantized


def status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM, RssAnon)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def child(mode: str, path: str) -> dict:
    import torch

    from memtune.models import load_model
    from memtune.storage import STORAGE
    from memtune.storage.int4 import IntConfig
    from memtune.storage.nf4 import NF4Config, quantized_bytes

    torch.set_num_threads(1)
    storage = {"nf4": lambda: STORAGE.get("nf4")(NF4Config()), "int4": lambda: STORAGE.get("int4")(IntConfig()),
               "fp32": lambda: None}[mode.split()[0]]()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current VmRSS
    base, anon = status("VmRSS"), status("RssAnon")
    peak_anon, done = [anon], threading.Event()

    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], status("RssAnon"))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    quantize = storage.load_kwargs if mode.endswith("while loading") else None
    path = str(Path(path) / INT_FOLDER) if mode == "int4 folder" else path
    model = load_model(path, "causal-lm", quantize=quantize).model
    if storage is not None:
        storage.apply(model)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"mode": mode, "peak_bytes": status("VmHWM") - base, "resident_after_bytes": status("VmRSS") - base,
           "anon_after_bytes": status("RssAnon") - anon,
           "anon_peak_bytes": max(peak_anon[0], status("RssAnon")) - anon, "parameter_bytes": params, "seconds": seconds}
    if mode.startswith("nf4"):
        out["quantized_bytes"] = quantized_bytes(model)[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="quant-memory", choices=["quant-memory", "llama-1b"])
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per mode (medians reported)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.path)))
        return
    if args.size == "quant-memory":
        from quant_memory import base_model

        model = base_model()
    else:
        from common import llama_sized

        model = llama_sized("llama-1b")
    n = sum(p.numel() for p in model.parameters())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        from memtune.models import byte_tokenizer

        byte_tokenizer().save_pretrained(tmp)
        from memtune.storage.int4 import IntConfig, IntStorage, save_quantized

        IntStorage(IntConfig()).apply(model)  # what `memtune quantize` writes (round to nearest)
        save_quantized(model, byte_tokenizer(), Path(tmp) / INT_FOLDER, how={"method": "rtn"})
        del model
        for mode in MODES:
            runs = []
            for _ in range(args.repeats):  # a fresh process each time; the table shows the medians
                res = subprocess.run([sys.executable, __file__, "--child", mode, "--path", tmp],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(res.stdout.strip().splitlines()[-1]))
            row = {k: (statistics.median(r[k] for r in runs) if isinstance(v, (int, float)) else v)
                   for k, v in runs[0].items()}
            row["anon_peak_bytes_runs"] = [r["anon_peak_bytes"] for r in runs]
            rows.append(row)
            print(f"{mode}: peak anon {[round(b / 2**20) for b in row['anon_peak_bytes_runs']]} MiB", flush=True)
    print(table(["mode", "parameters MiB", "peak RSS MiB", "resident after MiB", "peak anon MiB", "anon after MiB",
                 "seconds"],
                [[r["mode"], f"{r['parameter_bytes'] / 2**20:.1f}", f"{r['peak_bytes'] / 2**20:.1f}",
                  f"{r['resident_after_bytes'] / 2**20:.1f}", f"{r['anon_peak_bytes'] / 2**20:.1f}",
                  f"{r['anon_after_bytes'] / 2**20:.1f}", f"{r['seconds']:.1f}"] for r in rows]))
    path = save("quant_loading", {"size": args.size, "parameters": n, "repeats": args.repeats, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
