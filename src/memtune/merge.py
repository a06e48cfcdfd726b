"""`memtune merge RUN_DIR --to DIR`: fold the trained adapter into the base and save a plain
transformers model (with its tokenizer) that `AutoModel*.from_pretrained` loads without memtune.
A quantized base (NF4) is first dequantized exactly, so the merged model equals the adapter model;
QA-LoRA instead folds into its INT base's zero points and saves a pure INT model."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import MemtuneError
from .evaluate import load_for_eval


def merge(run_dir: str, to: str, overrides: list[str] = ()) -> Path:
    out = Path(to)
    if out.exists() and any(out.iterdir()):
        raise MemtuneError(f"--to {out}: directory exists and is not empty")
    if not Path(run_dir).is_dir():
        raise MemtuneError(f"{run_dir}: no such run directory")
    run = load_for_eval(run_dir, list(overrides))
    with torch.no_grad():
        keep_quantized = getattr(run.method, "merges_into_quantized", False)
        if run.storage.quantized and not keep_quantized:  # into the exact dequantized base (lossless)
            run.storage.dequantize(run.model)
        model = run.method.merged(run.model)
    model.to("cpu")
    if keep_quantized:  # QA-LoRA: a pure INT model, read back by memtune.storage.int4.load_quantized
        from .storage.int4 import save_quantized

        return save_quantized(model, run.tokenizer, out)
    model.save_pretrained(out)
    run.tokenizer.save_pretrained(out)
    return out
