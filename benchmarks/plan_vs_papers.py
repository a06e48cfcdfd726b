"""memtune plan against what runs measure here, and against the memory figures papers publish.

    python benchmarks/plan_vs_papers.py [--skip-measured] [--skip-papers] [--only QST,QLoRA]

1. Predicted vs measured, this machine (CPU, exact bytes): the demo's methods on the pretrained
   MiniLM-L6 (bundled sentiment data, batch 16, 64 tokens, 3 measured steps), every category of
   `memtune plan` minus summary.json's memory_bytes of `memtune train` on the same recipe.
2. Predicted vs published, each paper's setting as far as it states one, planned for its GPU
   (`device=cuda`: 512-byte allocator rounding plus context and cuBLAS workspaces) at full depth:
   MeZO Table 22 (OPT-1.3B..66B, MultiRC ~400 tokens, batch 1), QST Fig. 1a (LLaMA-2-70B, batch 16,
   seq 384), QLoRA (LLaMA-65B on one 48 GB GPU), LoRA (GPT-3 175B, 1.2 TB -> 350 GB).
   Settings a paper leaves out are chosen and listed in the row's `setting`.
3. Seconds per plan, from the same rows (7B-scale and 70B-scale included).

Writes benchmarks/results/plan_vs_papers.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import save, table  # noqa: E402

from memtune.memory.plan import plan  # noqa: E402
from memtune.recipe import load_recipe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src" / "memtune" / "demo_data" / "sentiment_train.tsv"
CATS = ("parameters", "gradients", "optimizer", "activations", "peak")
MINILM = ["model=minilm", "task=classification", f"data.train={DATA}", "data.max_length=64", "train.batch_size=16",
          "train.max_steps=3", "train.progress=false"]
METHODS = {
    "full": [],
    "lora": ["adapter.kind=lora"],
    "full+tokentune": ["tokentune.select=16"],
    "qlora": ["adapter.kind=lora", "quantize.kind=nf4"],
    "qa-lora": ["adapter.kind=qalora", "quantize.kind=int4"],
    "qst": ["adapter.kind=qst"],
    "mezo": ["optimizer.kind=mezo"],
}
GB = 10 ** 9
STEPS = "train.measure_memory_steps=2"  # the peak is reached in step 2 (state exists); plans stay short
BF16 = ["train.precision=bf16"]
NF4 = ["quantize.kind=nf4", "quantize.compute_dtype=bf16"]
# the MeZO scripts' fine-tuning setting (large_models/finetune.sh: `--fp16` over weights loaded in fp32, HF
# Trainer's AMP); memtune's autocast is bf16, the same bytes per tensor
AMP = ["train.precision=bf16"]
# the QST reference code's side network (modeling_llama_qst.py): its own eager LlamaAttention (scores
# materialized, softmax in fp32) and the backbone's head count (64 heads of 8 at r=16)
QST_REFERENCE = ["attention.kind=eager", "adapter.min_head_dim=1"]

# (paper, row, published GB, recipe overrides, batch, seq, setting we chose)
PAPERS = [
    *[(f"MeZO T22 OPT-{n}", m, pub, [f"model=opt-{n}", STEPS, *o], 1, 400, s)
      for n, pubs in (("1.3b", (4, 19, 27)), ("2.7b", (7, 29, 55)), ("6.7b", (14, 46, 156)), ("13b", (26, 158, 316)),
                      ("30b", (58, 315, 633)), ("66b", (128, None, None)))
      for m, pub, o, s in (("zero-shot/MeZO", pubs[0], ["optimizer.kind=mezo", "quantize.dtype=fp16"],
                            "fp16 weights, forward only"),
                           ("prefix FT", pubs[1], ["adapter.kind=prefix", "adapter.num_virtual_tokens=5",
                                                "adapter.prefix_projection=false", "quantize.dtype=fp32", *AMP],
                            "fp32 weights, 16-bit autocast, AdamW, 5 prefix tokens, no reparameterization"),
                           ("full FT", pubs[2], ["quantize.dtype=fp32", *AMP], "fp32 weights, 16-bit autocast, AdamW"))
      if pub is not None],
    ("QST Fig1a LLaMA-2-70B", "full FT", 757, ["model=llama-2-70b", STEPS, *BF16], 16, 384,
     "bf16 weights and AdamW state"),
    ("QST Fig1a LLaMA-2-70B", "QLoRA", 246, ["model=llama-2-70b", STEPS, "adapter.kind=lora", "adapter.r=64", *NF4,
                                            *BF16], 16, 384, "r=64 all linear, bf16 compute"),
    ("QST Fig1a LLaMA-2-70B", "LST", 242, ["model=llama-2-70b", STEPS, "adapter.kind=qst", "quantize.kind=none",
                                          *BF16], 16, 384, "side network r=16 over bf16 weights"),
    ("QST Fig1a LLaMA-2-70B", "QST", 109, ["model=llama-2-70b", STEPS, "adapter.kind=qst", *NF4, *BF16], 16, 384,
     "side network r=16 over NF4"),
    ("QST Fig1a LLaMA-2-70B", "LST, reference code's side attention", 242,
     ["model=llama-2-70b", STEPS, "adapter.kind=qst", "quantize.kind=none", *BF16, *QST_REFERENCE], 16, 384,
     "side network r=16 over bf16 weights; eager attention, 64 side heads of 8"),
    ("QST Fig1a LLaMA-2-70B", "QST, reference code's side attention", 109,
     ["model=llama-2-70b", STEPS, "adapter.kind=qst", *NF4, *BF16, *QST_REFERENCE], 16, 384,
     "side network r=16 over NF4; eager attention, 64 side heads of 8"),
    ("QLoRA 65B on 48 GB", "QLoRA", 48, ["model=llama-65b", STEPS, "adapter.kind=lora", "adapter.r=64", *NF4, *BF16,
                                        "train.gradient_checkpointing=true", "optimizer.paged=true"], 1, 512,
     "r=64 all linear, checkpointing, paged AdamW, 512 tokens; published: fits 48 GB"),
    ("LoRA GPT-3 175B", "full FT", 1200, ["model=gpt3-175b", STEPS], 1, 512, "fp16 weights and AdamW state"),
    ("LoRA GPT-3 175B", "LoRA r=4 q,v", 350, ["model=gpt3-175b", STEPS, "adapter.kind=lora", "adapter.r=4",
                                             "adapter.targets=[c_attn]"], 1, 512,
     "r=4 on the fused qkv projection (GPT-2 architecture), fp16"),
]


def measured_rows() -> list[dict]:
    from memtune.train import train

    rows = []
    for name, extra in METHODS.items():
        overrides = MINILM + extra + ["output_dir=runs/bench-plan"]
        rep = plan(load_recipe(None, overrides))
        real = train(load_recipe(None, overrides))["memory_bytes"]
        rows.append({"method": name, "measured": {k: real[k] for k in CATS},
                     "planned": {k: rep.memory_bytes[k] for k in CATS},
                     "difference": {k: rep.memory_bytes[k] - real[k] for k in CATS}, "plan_seconds": rep.seconds})
        print(name, rows[-1]["difference"], flush=True)
    return rows


def paper_rows(only: list[str]) -> list[dict]:
    rows = []
    for paper, row, pub, overrides, batch, seq, setting in PAPERS:
        if only and not any(w in paper for w in only):
            continue
        rep = plan(load_recipe(None, overrides), batch_size=batch, seq_len=seq, device="cuda")
        m = rep.memory_bytes
        rows.append({"paper": paper, "row": row, "published_gb": pub, "planned_total_gb": rep.total / GB,
                     "weights_gb": (m["parameters"] + m["buffers"]) / GB, "optimizer_gb": m["optimizer"] / GB,
                     "gradients_gb": m["gradients"] / GB, "activations_gb": m["activations"] / GB,
                     "peak_at": rep.peak_at, "difference": rep.total / GB / pub - 1, "setting": setting,
                     "batch": batch, "seq": seq, "plan_seconds": rep.seconds})
        print(f"{paper} {row}: planned {rep.total / GB:.1f} GB vs {pub} ({rows[-1]['difference']:+.0%}), "
              f"{rep.seconds:.1f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-measured", action="store_true")
    ap.add_argument("--skip-papers", action="store_true")
    ap.add_argument("--only", default="", help="paper rows whose paper name contains one of these (comma-separated)")
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    out = {}
    if not args.skip_measured:
        out["measured"] = measured_rows()
        print(table(["method", *[f"{k} (plan - measured, B)" for k in CATS], "plan s"],
                    [[r["method"], *[r["difference"][k] for k in CATS], f"{r['plan_seconds']:.2f}"]
                     for r in out["measured"]]))
    if not args.skip_papers:
        out["papers"] = paper_rows([w for w in args.only.split(",") if w])
        print(table(["paper", "row", "published GB", "planned GB", "W", "grads", "opt", "act", "diff", "plan s"],
                    [[r["paper"], r["row"], r["published_gb"], f"{r['planned_total_gb']:.1f}",
                      f"{r['weights_gb']:.1f}", f"{r['gradients_gb']:.1f}", f"{r['optimizer_gb']:.1f}",
                      f"{r['activations_gb']:.1f}", f"{r['difference']:+.0%}", f"{r['plan_seconds']:.1f}"]
                     for r in out["papers"]]))
    print(save("plan_vs_papers" + ("-" + "-".join(args.only.split(",")).replace(" ", "_") if args.only else ""), out))


if __name__ == "__main__":
    main()
