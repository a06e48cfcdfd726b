"""A model folder that records how it is stored, and what it is for, loads as what it is.

`memtune quantize` and `memtune merge` write folders that say how to read them:

    memtune_quantization.json   group-wise INT layers (memtune quantize, a merged QA-LoRA run)
                                -> quantize.kind=int4, quantize.bits, quantize.group_size
    config.json                 a bitsandbytes 4-bit `quantization_config` (memtune merge --requantize nf4)
      quantization_config       -> quantize.kind=nf4, quantize.double_quant, quantize.compute_dtype
    memtune_model.json          the recipe fields a merged model is used with (memtune merge)
                                -> task, data.labels, pooling, prompt.template, prompt.label_words

When a recipe's `model` is such a folder, `apply_recorded` fills those keys into the raw recipe
before it is parsed, so `memtune eval model=DIR data.eval=FILE` needs nothing else: a stored
quantized model with no adapter named is evaluated as it is (`adapter.kind=none`). How the weights
are stored is a fact: a `quantize.*` key the recipe sets to another value is an error naming both
values and the file that records it. What the model was used for is a default: a recipe may give
another task, labels, pooling or prompt (e.g. fine-tuning a merged classifier on new classes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelError

MODEL_FILE = "memtune_model.json"
USE_FIELDS = ("task", "data.labels", "pooling", "prompt.template", "prompt.label_words")
_BNB_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}
_MISSING = object()


def recorded(path: str | Path) -> dict[str, tuple[Any, str]]:
    """Dotted recipe key -> (value, the file that records it), for the folder at `path`."""
    from .storage.int4 import QUANT_FILE

    p = Path(path)
    out: dict[str, tuple[Any, str]] = {}
    qfile = p / QUANT_FILE
    if qfile.is_file():
        meta = _read_json(qfile)
        try:
            formats = sorted({(spec["bits"], spec["group_size"]) for spec in meta["layers"].values()})
        except (KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{qfile}: not a memtune quantization file ({type(e).__name__}: {e})") from None
        out["quantize.kind"] = ("int4", str(qfile))
        if len(formats) == 1:  # mixed formats: IntStorage names them when it loads the folder
            out["quantize.bits"], out["quantize.group_size"] = (formats[0][0], str(qfile)), (formats[0][1], str(qfile))
    cfile = p / "config.json"
    qc = _read_json(cfile).get("quantization_config") if cfile.is_file() else None
    if isinstance(qc, dict) and qc.get("load_in_4bit") and qc.get("bnb_4bit_quant_type") == "nf4":
        src = f"{cfile} (quantization_config)"
        out["quantize.kind"] = ("nf4", src)
        out["quantize.double_quant"] = (bool(qc.get("bnb_4bit_use_double_quant", False)), src)
        dtype = _BNB_DTYPES.get(str(qc.get("bnb_4bit_compute_dtype", "float32")).removeprefix("torch."))
        if dtype is not None:
            out["quantize.compute_dtype"] = (dtype, src)
    mfile = p / MODEL_FILE
    if mfile.is_file():
        use = _read_json(mfile).get("use", {})
        for key in USE_FIELDS:
            if use.get(key) is not None:
                out[key] = (use[key], str(mfile))
    return out


def apply_recorded(raw: dict[str, Any]) -> None:
    """Fill what the folder named by raw['model'] records into `raw` (in place); see the module doc."""
    model = raw.get("model")
    if not isinstance(model, str) or not os.path.isdir(model):
        return
    from .recipe import set_dotted

    found = recorded(model)
    for key, (value, source) in found.items():
        given = get_dotted(raw, key)
        if given is _MISSING:
            set_dotted(raw, key, value)
        elif given != value and key.startswith("quantize."):
            raise ConfigError(f"{key}={_show(given)}: model '{model}' is stored with {key}={_show(value)} ({source}); "
                              f"drop {key} from the recipe or set it to {_show(value)}")
    if "quantize.kind" in found and get_dotted(raw, "adapter.kind") is _MISSING:
        set_dotted(raw, "adapter.kind", "none")  # evaluated as stored; training names its adapter


def write_model_file(out: Path, use: dict[str, Any], how: dict[str, Any]) -> Path:
    """memtune_model.json for a merged model: the recipe fields it is used with (`use`, dotted keys
    from USE_FIELDS; None values are left out) and where it came from (`how`)."""
    path = Path(out) / MODEL_FILE
    fields = {k: v for k, v in use.items() if k in USE_FIELDS and v is not None}
    path.write_text(json.dumps({"format": "memtune-model", "use": fields, "made_by": how}, indent=1) + "\n")
    return path


def get_dotted(raw: dict[str, Any], dotted: str) -> Any:
    """raw['a']['b'] for 'a.b', or _MISSING; `quantize: int4` is short for `quantize: {kind: int4}`."""
    node: Any = raw
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if isinstance(node, str) and i == 1:
            node = {"kind": node}
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: cannot read it as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object at the top level")
    return data


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)
