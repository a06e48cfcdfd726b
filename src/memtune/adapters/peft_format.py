"""Hugging Face PEFT's on-disk adapter layout, shared by every method PEFT also has.

    adapter_config.json          the method's config (PEFT field names), sorted keys, indent 2
    adapter_model.safetensors    tensors keyed "base_model.model." + module path + PEFT's suffix

In memory memtune's names are the module path plus the same suffix (e.g.
`model.layers.0.self_attn.q_proj.lora_A.weight`), so conversion is adding or stripping the prefix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ModelError

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's task_type per model head; PEFT has none for masked LMs (prompt-based classification with
# BERT-style models), whose adapters load as a plain PeftModel
TASK_TYPES = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS", "masked-lm": None}


def write_adapter(out: Path, config: dict, tensors: dict[str, torch.Tensor],
                  unprefixed: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config + weights; files are written to temporary names and renamed into place.
    `tensors` are keyed by in-memory module path (saved under PEFT's `base_model.model.` prefix);
    `unprefixed` are saved under their own keys (e.g. VeRA's shared projections)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    disk = {PREFIX + k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    disk.update({k: v.detach().contiguous().cpu() for k, v in (unprefixed or {}).items()})
    tmp_w, tmp_c = out / (WEIGHTS_FILE + ".tmp"), out / (CONFIG_FILE + ".tmp")
    save_file(disk, str(tmp_w), metadata={"format": "pt"})
    tmp_c.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp_w, out / WEIGHTS_FILE)
    os.replace(tmp_c, out / CONFIG_FILE)
    return out


def read_config(path: Path) -> dict:
    """adapter_config.json of an adapter directory, checked for `peft_type`."""
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ModelError(f"{path}: not an adapter directory (no {CONFIG_FILE})")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{cfg_file} line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ModelError(f"{cfg_file}: missing field 'peft_type'")
    return config


def read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors keyed by in-memory name) from a PEFT adapter directory."""
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        raw = load_file(str(weights))
    elif (path / "adapter_model.bin").is_file():
        raw = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ModelError(f"{path}: no {WEIGHTS_FILE} (or adapter_model.bin)")
    tensors = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in raw.items()}
    return config, tensors


@torch.no_grad()
def copy_tensors(path: Path, expected: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy each saved tensor into the model tensor of the same name (cast to its dtype), after
    checking its shape; `expected` keys must all be in `tensors` (callers check the key sets)."""
    for k, t in expected.items():
        if tensors[k].shape != t.shape:
            raise ModelError(f"{path}: '{k}' has shape {tuple(tensors[k].shape)}, the model expects {tuple(t.shape)}")
        t.copy_(tensors[k].to(t.dtype))
