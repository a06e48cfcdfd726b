"""`memtune merge RUN_DIR --to DIR`: fold the trained adapter into the base and save a plain
transformers model (with its tokenizer) that `AutoModel*.from_pretrained` loads without memtune.
A quantized base (NF4) is first dequantized exactly, so the merged model equals the adapter model;
QA-LoRA instead folds into its INT base's zero points and saves a pure INT model.

`--requantize nf4` is the lossy alternative for QLoRA users who want a 4-bit model again: the
merged weights W = W0 + dW are quantized to NF4 (the run's blocksize/double-quant settings), and
saved with transformers' bitsandbytes `quantization_config`, so `from_pretrained` loads it as a
4-bit model. Rounding W loses part of the update: per layer the report gives

    weight error  ||Q(W) - W||_F / ||W||_F        update error  ||Q(W) - W||_F / ||dW||_F

(an update error near or above 1 means the rounding noise is as large as what training changed),
and the largest change of the model's output on a probe batch, in `requantize_report.json`."""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import MemtuneError
from .evaluate import load_for_eval


def merge(run_dir: str, to: str, overrides: list[str] = (), requantize: str | None = None) -> Path:
    out = Path(to)
    if requantize not in (None, "nf4"):
        raise MemtuneError(f"--requantize: expected nf4, got {requantize!r}")
    if out.exists() and any(out.iterdir()):
        raise MemtuneError(f"--to {out}: directory exists and is not empty")
    if not Path(run_dir).is_dir():
        raise MemtuneError(f"{run_dir}: no such run directory")
    run = load_for_eval(run_dir, list(overrides))
    keep_quantized = getattr(run.method, "merges_into_quantized", False)
    if requantize and keep_quantized:
        raise MemtuneError(f"--requantize {requantize}: this run ({run.recipe.adapter.kind}) already merges into "
                           f"its own quantized base; merge without --requantize")
    with torch.no_grad():
        if run.storage.quantized and not keep_quantized:  # into the exact dequantized base (lossless)
            run.storage.dequantize(run.model)
        deltas = _update_norms(run.model) if requantize else {}
        model = run.method.merged(run.model)
    model.to("cpu")
    if requantize:
        _save_requantized_nf4(model, run, deltas, out)
    elif keep_quantized:  # QA-LoRA: a pure INT model, read back by memtune.storage.int4.load_quantized
        from .storage.int4 import save_quantized

        save_quantized(model, run.tokenizer, out, how={"method": "QA-LoRA merge", "run": str(run_dir),
                                                       "base": run.recipe.model})
    else:
        model.save_pretrained(out)
        run.tokenizer.save_pretrained(out)
    _record_use(run, out, run_dir, requantize)
    return out


def _record_use(run, out: Path, run_dir: str, requantize: str | None) -> None:
    """memtune_model.json: the task, labels, pooling and prompt the merged model is used with, so
    `memtune eval model=OUT` rebuilds it as the run did (memtune.stored)."""
    from .stored import write_model_file

    r = run.recipe
    use = {"task": r.task, "data.labels": r.data.labels if r.task == "classification" else None,
           "pooling": r.pooling if r.pooling != "model" else None,
           "prompt.template": r.prompt.template if r.prompt is not None else None,
           "prompt.label_words": r.prompt.label_words if r.prompt is not None else None}
    write_model_file(out, use, {"method": "memtune merge", "run": str(run_dir), "base": r.model,
                                "adapter": r.adapter.kind, "requantize": requantize})


def _update_norms(model) -> dict[str, float]:
    """||dW||_F of every adapted layer whose adapter defines `delta_weight` (LoRA and its family)."""
    return {name: float(m.delta_weight().norm()) for name, m in model.named_modules()
            if hasattr(m, "delta_weight") and hasattr(m, "base_layer")}


@torch.no_grad()
def _save_requantized_nf4(model, run, deltas: dict[str, float], out: Path) -> Path:
    import json

    import bitsandbytes.functional as F
    from .models import head_modules, is_linear, out_in_weight
    from .storage.nf4 import BLOCKSIZE, NF4Config, NF4Storage
    from .tasks import model_inputs

    cfg = run.recipe.quantize if isinstance(run.recipe.quantize, NF4Config) else NF4Config()
    probe = _probe_batch(run)
    before = model(**model_inputs(probe)).logits.float() if probe is not None else None
    head_ids = {id(m) for h in head_modules(model).values() for m in h.modules()}
    layers = {}
    for name, m in model.named_modules():
        if not is_linear(m) or id(m) in head_ids:
            continue
        w = out_in_weight(m).float()  # (out, in)
        codes, state = F.quantize_4bit(w.contiguous(), blocksize=BLOCKSIZE, compress_statistics=cfg.double_quant,
                                       quant_type="nf4")
        err = float((F.dequantize_4bit(codes, state) - w).norm())
        row = {"weight_error": err / max(float(w.norm()), 1e-30)}
        # LoRA's module path is the base layer's path plus nothing: the adapted layer's own name
        if name in deltas and deltas[name] > 0:
            row["update_error"] = err / deltas[name]
        layers[name] = row
    NF4Storage(cfg).apply(model)
    after = model(**model_inputs(probe)).logits.float() if probe is not None else None
    # heads stay float (transformers would quantize e.g. BERT's classifier)
    model.config.quantization_config = NF4Storage(cfg).bnb_config(sorted(head_modules(model)))
    model.save_pretrained(out)
    run.tokenizer.save_pretrained(out)
    upd = [r["update_error"] for r in layers.values() if "update_error" in r]
    report = {"requantize": "nf4", "blocksize": BLOCKSIZE, "double_quant": cfg.double_quant, "layers": len(layers),
              "weight_error_mean": sum(r["weight_error"] for r in layers.values()) / max(len(layers), 1),
              "weight_error_max": max((r["weight_error"] for r in layers.values()), default=0.0),
              "update_error_mean": sum(upd) / len(upd) if upd else None,
              "update_error_max": max(upd) if upd else None,
              "probe_logits_max_abs_change": float((after - before).abs().max()) if probe is not None else None,
              "per_layer": layers}
    (out / "requantize_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return out


def _probe_batch(run, n: int = 8):
    """The first n examples of the run's eval (else train) data, collated, or None without data."""
    from .data import collate

    d = run.recipe.data
    spec, split = (d.eval, d.eval_split) if d.eval else (d.train, d.split)
    if not spec:
        return None
    data = run.load_data(spec, split)
    return collate(data.examples[:n], run.tokenizer.pad_token_id)
