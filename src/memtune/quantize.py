"""`memtune quantize [CONFIG.yaml] key=value ... --to DIR`: store a model's linear layers (all but the
head) as group-wise INT once, in a folder that later runs load as their base with model=DIR and
quantize.kind=int4 (QA-LoRA over a GPTQ base is the QA-LoRA paper's setting).

    quantize.method=rtn    round to nearest (what a run does itself while loading)
    quantize.method=gptq   GPTQ (memtune.storage.gptq): each layer's rounding error corrected from the
                           inputs it sees on `quantize.calibration_samples` examples of data.train

The folder is the model as a run would build it (same head, drawn from train.seed for a new
classifier) in memtune's INT format (memtune.storage.int4.save_quantized), with the tokenizer and
`quantize_report.json`: per layer, the relative output error ||(Ŵ - W) X|| / ||W X|| on the
calibration tokens for GPTQ and for round-to-nearest, and for the whole model the relative change of
its last hidden state on 64 training examples outside the calibration sample (either method). It is written next to DIR and renamed into
place when complete, so a killed run never leaves a half-written model behind.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from pathlib import Path

import torch

from .errors import ConfigError, MemtuneError
from .recipe import Recipe
from .storage.int4 import IntConfig, IntStorage, quantizable_layers, save_quantized
from .tasks import model_inputs

HELD_OUT = 64  # examples after the calibration sample that measure the quantized model's output error


def quantize_to_folder(recipe: Recipe, to: str | Path) -> dict:
    """Quantize the recipe's model as `recipe.quantize` says (an IntConfig) into the folder `to`;
    returns the summary written to its quantize_report.json (without the per-layer rows)."""
    cfg = recipe.quantize
    if not isinstance(cfg, IntConfig):
        raise ConfigError(f"quantize.kind={cfg.kind}: memtune quantize writes group-wise INT models "
                          "(quantize.kind=int4); NF4 needs no separate step, a run quantizes while loading")
    out = Path(to)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MemtuneError(f"--to {out}: exists and is not an empty directory")
    from .adapters.none import NoAdapterConfig
    from .pipeline import build_run, read_train_records
    from .storage import PlainConfig

    t0 = time.perf_counter()
    # the float model with the run's head and nothing attached
    plain = copy.deepcopy(recipe)
    plain.quantize, plain.adapter = PlainConfig(), NoAdapterConfig()
    if cfg.method == "gptq" and not recipe.data.train:
        raise ConfigError("quantize.method=gptq: needs calibration data (data.train=FILE)")
    records = read_train_records(recipe) if recipe.data.train else None
    torch.manual_seed(recipe.train.seed)  # a new classifier head is drawn as `memtune train` draws it
    run = build_run(plain, records)
    model = run.model.eval()
    names = quantizable_layers(model)
    how = {"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size, "base": recipe.model}
    report: dict = {}
    bs = recipe.train.eval_batch_size or recipe.train.batch_size
    chosen = list(records or [])
    random.Random(recipe.train.seed).shuffle(chosen)
    n = cfg.calibration_samples
    # examples after the calibration ones (used by GPTQ only, skipped by RTN too, so both methods are
    # measured on the same examples): how far the quantized model's outputs move on unseen text
    held = run.load_data(recipe.data.train, recipe.data.split, chosen[n:n + HELD_OUT]) if chosen[n:] else None
    before = _hidden(run, model, held, bs) if held is not None else None
    if cfg.method == "gptq":
        from .storage.gptq import calibrate_and_quantize

        data = run.load_data(recipe.data.train, recipe.data.split, chosen[:n])
        batches = list(run.batches(data, bs))
        tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
        how["calibration"] = {"data": recipe.data.train, "examples": len(data), "tokens": tokens,
                              "seed": recipe.train.seed, "damp": cfg.damp, "max_length": recipe.data.max_length}
        with torch.no_grad(), run.forward_ctx()():
            report = calibrate_and_quantize(model, names, batches, lambda b: model(**model_inputs(b)),
                                            cfg.bits, cfg.group_size, cfg.damp)
    else:
        IntStorage(cfg).apply(model)
    held_out = {}
    if before is not None:  # ||H_q - H|| / ||H|| over the held-out examples' real tokens
        after = _hidden(run, model, held, bs)
        held_out = {"held_out_examples": len(held),
                    "held_out_hidden_error": float((after - before).norm() / before.norm().clamp_min(1e-30))}
    model.to("cpu")
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_quantized(model, run.tokenizer, partial, how=how)
    summary = {"quantized": str(out), **how, "layers": len(names), "seconds": round(time.perf_counter() - t0, 1),
               **held_out}
    if report:
        summary["output_error_mean"] = {k: sum(r[k] for r in report.values()) / len(report) for k in ("gptq", "rtn")}
    (partial / "quantize_report.json").write_text(json.dumps({**summary, "per_layer": report}, indent=2) + "\n")
    if out.exists():
        out.rmdir()  # empty (checked above)
    partial.rename(out)
    return summary


@torch.no_grad()
def _hidden(run, model, data, batch_size: int) -> torch.Tensor:
    """The backbone's last hidden state at every real (unpadded) token of `data`: (N, d) fp32. Not the
    logits: a new classifier head is random, and its few outputs would say little."""
    out = []
    with run.forward_ctx()():
        for b in run.batches(data, batch_size):
            h = model(**model_inputs(b), output_hidden_states=True).hidden_states[-1].float()  # (B, T, d)
            out.append(h[b["attention_mask"].bool()])
    return torch.cat(out)
