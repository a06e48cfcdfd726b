"""The engine's heterogeneous LoRA kernels alone: time per step over every adapted layer.

    python benchmarks/serve_lora_kernels.py        # llama-512x8 fp32 (the throughput benchmark's model)

One step's LoRA work is what every BatchedLoraLinear adds after its base matmul: a decode step is
`batch` tokens, one per sequence, spread over k distinct adapters (k = 1 .. batch; ranks 8/16/32/64
by adapter index); a mixed step adds one prefill of `prefill` tokens for one more adapter. Each
kernel (segment: the Python loop; gather: BGMV; native: the C++ loop) runs the same step on the
same engine, rounds interleaved so machine drift hits every kernel alike; the median is reported,
next to the base matmuls of the same layers (the floor the LoRA terms sit on). The adapters' bytes
read per step are printed too: past a few adapters the CPU's memory bandwidth, not dispatch, is
the limit every kernel shares. Last, whole decode steps of two engines (10 and `batch` distinct
adapters under the same 32 sequences), stepped in turn: the adapter count's cost on a real step.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402
from serve_throughput import DTYPES, MODELS, IdTokenizer, build_model, target_shapes, write_adapters  # noqa: E402

from memtune.serve import Engine, EngineConfig, SamplingParams, native_lora  # noqa: E402
from memtune.serve.lora_kernels import Segment  # noqa: E402

KERNELS = ("segment", "gather", "native")


def layers(eng: Engine) -> list:
    return [m for m in eng.model.modules() if type(m).__name__ == "BatchedLoraLinear"]


def time_step(eng: Engine, wrapped: list, xs: list[torch.Tensor], lora) -> float:
    """Seconds for one pass over every adapted layer with `lora` as the step (None: base matmuls only)."""
    eng.lora.step = lora
    t = time.perf_counter()
    for layer, x in zip(wrapped, xs):
        layer(x)
    eng.lora.step = None
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="llama-512x8")
    ap.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    ap.add_argument("--batch", type=int, default=32, help="decode tokens per step (one per sequence)")
    ap.add_argument("--adapters", default="1,2,10,32", help="distinct adapters in the decode batch")
    ap.add_argument("--prefill", type=int, default=48, help="tokens of the mixed step's one prefill (0: none)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--steps", type=int, default=40, help="whole decode steps per engine (0: skip that part)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.adapters.split(",")]
    dtype = DTYPES[args.dtype]
    base = build_model(args.model, dtype, torch.device("cpu"))
    ranks = [8, 16, 32, 64]
    root = Path(tempfile.gettempdir()) / "memtune_serve_adapters" / f"{args.model}-{args.dtype}-r8-16-32-64"
    dirs = write_adapters(root, max(ks) + 1, ranks, target_shapes(base), dtype, f"random-init {args.model}")
    eng = Engine(base, IdTokenizer(), EngineConfig(pool_mib=512.0, lora_kernel="segment"))
    for i, d in enumerate(dirs):
        eng.add_adapter(f"a{i}", d)
    views = [eng.adapters.acquire(f"a{i}") for i in range(len(dirs))]
    wrapped = layers(eng)
    built = native_lora.load() is not None
    kernels = [k for k in KERNELS if k != "native" or built]
    print(f"{args.model} {args.dtype}, {len(wrapped)} adapted layers, {torch.get_num_threads()} threads; native kernel "
          f"{'built' if built else 'not built: ' + str(native_lora.build_error())}", flush=True)
    rows, out = [], []
    cases = [(f"decode, {k} adapters", k, 0) for k in ks]
    if args.prefill:
        cases.append((f"decode ({max(ks)} adapters) + one {args.prefill}-token prefill", max(ks), args.prefill))
    g = torch.Generator().manual_seed(0)
    for label, k, prefill in cases:
        # tokens of one adapter are one segment: batch tokens over k adapters, then the prefill's
        cuts = [args.batch * i // k for i in range(k + 1)]
        segs = [Segment(cuts[i], cuts[i + 1], i) for i in range(k)]
        if prefill:
            segs.append(Segment(args.batch, args.batch + prefill, k))
        total = args.batch + prefill
        xs = [torch.randn(1, total, layer.in_features, generator=g).to(dtype) for layer in wrapped]
        adapters = views[:k + (1 if prefill else 0)]
        read = sum(f.a.nbytes + f.b.nbytes for a in adapters for f in a.modules.values())
        times = {name: [] for name in ["base", *kernels]}
        with torch.inference_mode():
            for _ in range(3):  # warm-up
                for kern in kernels:
                    time_step(eng, wrapped, xs, eng.step_lora(segs, adapters, kern))
            for _ in range(args.rounds):
                times["base"].append(time_step(eng, wrapped, xs, None))
                for kern in kernels:
                    times[kern].append(time_step(eng, wrapped, xs, eng.step_lora(segs, adapters, kern)))
        med = {name: statistics.median(v) * 1e3 for name, v in times.items()}
        lora = {kern: med[kern] - med["base"] for kern in kernels}
        rows.append([label, f"{read / 2**20:.1f}", f"{med['base']:.2f}",
                     *(f"{lora[kern]:.2f}" for kern in kernels),
                     *([f"{lora['segment'] / lora['native']:.2f}x"] if built and lora["native"] > 0 else [])])
        out.append({"case": label, "adapters": k, "prefill": prefill, "adapter_bytes_read": read,
                    "base_ms": med["base"], "lora_ms": lora, "all_ms": med})
        print(f"  {label}: base {med['base']:.2f} ms; LoRA " + ", ".join(f"{k} {v:.2f}" for k, v in lora.items()),
              flush=True)
    steps = whole_steps(base, dirs, args, ks) if args.steps else []
    head = ["step", "adapter MiB read", "base matmuls ms", *(f"+ {k} ms" for k in kernels),
            *(["segment / native"] if built else [])]
    print()
    print(table(head, rows))
    if steps:
        print("\nwhole engine steps (auto kernel), 32 sequences decoding, engines stepped in turn:")
        print(table(["distinct adapters", "median step ms", "vs the fewest"],
                    [[k, f"{ms:.1f}", f"{steps[0][1] / ms:.3f}"] for k, ms in steps]))
    payload = {"args": vars(args), "native_built": built, "rows": out, "steps": steps}
    print(f"wrote {save('serve_lora_kernels', payload)}")


def whole_steps(base, dirs: list[Path], args, ks: list[int]) -> list[tuple[int, float]]:
    """Median time of whole decode steps (model forward, sampling, bookkeeping) with `batch` sequences
    over k distinct adapters, one engine per k, stepped in turn so drift hits each alike."""
    engines = {}
    for k in sorted({min(ks[-1], 10), ks[-1]}):
        eng = Engine(copy.deepcopy(base), IdTokenizer(), EngineConfig(pool_mib=512.0))
        for i in range(k):
            eng.add_adapter(f"a{i}", dirs[i])
        g = torch.Generator().manual_seed(0)
        for i in range(args.batch):
            eng.add_request(torch.randint(5, 32000, (24,), generator=g).tolist(), f"a{i % k}",
                            SamplingParams(max_tokens=args.steps + 8, ignore_eos=True))
        eng.step()  # every prefill
        engines[k] = eng
    times: dict[int, list[float]] = {k: [] for k in engines}
    for _ in range(args.steps):
        for k, eng in engines.items():
            t = time.perf_counter()
            eng.step()
            times[k].append(time.perf_counter() - t)
    return [(k, statistics.median(v) * 1e3) for k, v in times.items()]


if __name__ == "__main__":
    main()
