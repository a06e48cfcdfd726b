"""Adapters as data: PEFT-format LoRA directories read into one canonical form, kept in host memory.

Every LoRA-family file memtune or PEFT writes is brought to the same thing per adapted module,

    delta(x) = s * (x @ A.T) @ B.T          A (r, d_in), B (d_out, r), s a float

at the module's exact rank (no padding), so one batched kernel serves all of them:

    LORA      A, B as saved; r and alpha from rank_pattern / alpha_pattern (PEFT's regex lookup),
              s = alpha / r, or alpha / sqrt(r) with use_rslora
    DYLORA    memtune's tag: the first k rows of A / columns of B, s = alpha / k, at a chosen rank k
              (the file's `rank`, or r_max)
    ADALORA   B @ diag(E) @ A with s = alpha / (ranknum + 1e-5), ranknum = init_r (as PEFT keeps it):
              A is stored pre-multiplied by E, so the kernel sees a plain rank-r_kept LoRA

Files are read from `adapter_model.safetensors` only: a pickle (`adapter_model.bin`) can run code
when loaded, so it is refused with the reason. Every tensor is checked against the base (module
exists, is a linear layer, A and B have its in/out features and the same rank) before the adapter
is accepted, so a bad adapter is refused with its name and the mismatch, and the engine keeps serving.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..adapters.lora import _pattern_value
from ..adapters.peft_format import CONFIG_FILE as CONFIG
from ..adapters.peft_format import PREFIX, read_config
from ..adapters.peft_format import WEIGHTS_FILE as WEIGHTS
from ..errors import ModelError
MAX_FILE_BYTES = 8 << 30  # a LoRA adapter larger than this is not an adapter


class AdapterError(ModelError):
    """An adapter cannot be served over this base (file, format or shape), with the reason."""


@dataclass
class ModuleLora:
    """One adapted module: delta(x) = scale * (x @ a.T) @ b.T. a (r, d_in), b (d_out, r); in a host
    adapter b is stored transposed (b.t() contiguous, the pool's layout), so a load is two plain copies."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class HostAdapter:
    """An adapter in host memory, in a fixed module order (the order its device pages use)."""

    name: str
    path: str
    modules: dict[str, ModuleLora]  # module path in the base model -> factors
    peft_type: str

    @property
    def numel(self) -> int:
        return sum(m.a.numel() + m.b.numel() for m in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(m.a.nbytes + m.b.nbytes for m in self.modules.values())

    @property
    def ranks(self) -> set[int]:
        return {m.rank for m in self.modules.values()}


def linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(d_in, d_out) of every module a LoRA adapter may target: nn.Linear, bitsandbytes Linear4bit,
    memtune's INT4 linear (all carry in_features / out_features)."""
    out = {}
    for name, m in model.named_modules():
        if name and hasattr(m, "in_features") and hasattr(m, "out_features") and hasattr(m, "weight"):
            out[name] = (int(m.in_features), int(m.out_features))
    return out


def _fail(name: str, path: Path, why: str) -> AdapterError:
    return AdapterError(f"adapter '{name}' ({path}): {why}")


def read_lora_dir(name: str, path: str | Path, shapes: dict[str, tuple[int, int]], dtype: torch.dtype,
                  rank: int | None = None) -> HostAdapter:
    """Read and check one adapter directory against the base's linear `shapes` (module -> (in, out)).
    `rank` picks a DyLoRA adapter's serving rank (default: the file's `rank`, else r_max)."""
    path = Path(path)
    if not path.is_dir():
        raise _fail(name, path, "no such directory")
    weights = path / WEIGHTS
    try:
        cfg = read_config(path)  # PEFT's adapter_config.json, with peft_type
    except ModelError as e:
        raise _fail(name, path, str(e).removeprefix(f"{path}: ")) from None
    if not weights.is_file():
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickled:
            raise _fail(name, path, f"weights only as pickle ({', '.join(sorted(pickled))}); pickles can run code "
                                    f"when loaded, so only {WEIGHTS} is read "
                                    f"(convert with safetensors.torch.save_file)")
        raise _fail(name, path, f"no {WEIGHTS}")
    if weights.stat().st_size > MAX_FILE_BYTES:
        raise _fail(name, path, f"{WEIGHTS} is {weights.stat().st_size / 2**30:.1f} GiB, over the "
                                f"{MAX_FILE_BYTES >> 30} GiB limit for an adapter")
    try:
        raw = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise _fail(name, path, f"{WEIGHTS} is not a readable safetensors file ({e})") from None
    tensors = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in raw.items()}
    kind = cfg["peft_type"]
    for flag in ("use_dora", "lora_bias"):
        if cfg.get(flag):
            raise _fail(name, path, f"{flag} adapters are not served (only plain low-rank terms)")
    if cfg.get("bias", "none") != "none":
        raise _fail(name, path, f"bias={cfg['bias']!r}: adapters that train biases are not served")
    saved = cfg.get("modules_to_save") or []
    if saved:
        raise _fail(name, path, f"modules_to_save {saved}: modules trained in full replace base weights for every "
                                f"request, so they cannot be served as an adapter (merge the run instead)")
    if kind == "LORA":
        modules = _lora(name, path, cfg, tensors, shapes)
    elif kind == "DYLORA":
        modules = _dylora(name, path, cfg, tensors, shapes, rank)
    elif kind == "ADALORA":
        modules = _adalora(name, path, cfg, tensors, shapes)
    else:
        raise _fail(name, path, f"peft_type {kind!r}: the engine serves LORA, DYLORA and ADALORA adapters")
    if not modules:
        raise _fail(name, path, "holds no LoRA tensors")
    # copies, never views: load_file maps the file lazily, and a host adapter must not fault pages in from
    # disk at its first use, change when the file is rewritten, or die (SIGBUS) when the file is truncated
    modules = {k: ModuleLora(m.a.to(dtype).clone(memory_format=torch.contiguous_format),
                             m.b.to(dtype).t().clone(memory_format=torch.contiguous_format).t(), m.scale)
               for k, m in sorted(modules.items())}
    return HostAdapter(name, str(path), modules, kind)


def _pairs(name: str, path: Path, tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
           a_key: str, b_key: str, extra: tuple[str, ...] = ()) -> dict[str, dict[str, torch.Tensor]]:
    """Group tensors by module (`<module>.<a_key>` / `<module>.<b_key>`), checked against the base."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    suffixes = (a_key, b_key, *extra)
    for key, t in tensors.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if suffix is None:
            raise _fail(name, path, f"tensor '{key}' is not a LoRA factor ({', '.join(suffixes)}); "
                                    f"embedding adapters and trained base weights are not served")
        by_module.setdefault(key[: -len(suffix) - 1], {})[suffix] = t
    for module, parts in by_module.items():
        if module not in shapes:
            raise _fail(name, path, f"target module '{module}' is not a linear layer of the base model")
        missing = [s for s in suffixes if s not in parts]
        if missing:
            raise _fail(name, path, f"module '{module}' lacks {', '.join(missing)}")
        d_in, d_out = shapes[module]
        a, b = parts[a_key], parts[b_key]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
            raise _fail(name, path, f"module '{module}': A {tuple(a.shape)} and B {tuple(b.shape)} do not fit a "
                                    f"linear layer of in={d_in}, out={d_out} (expected A (r, {d_in}), B ({d_out}, r))")
        if not (a.is_floating_point() and b.is_floating_point()):
            raise _fail(name, path, f"module '{module}': factors must be floating point, got {a.dtype}, {b.dtype}")
    return by_module


def _lora(name, path, cfg, tensors, shapes) -> dict[str, ModuleLora]:
    r0, alpha0, rslora = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora", False))
    out = {}
    for module, p in _pairs(name, path, tensors, shapes, "lora_A.weight", "lora_B.weight").items():
        r = int(_pattern_value(cfg.get("rank_pattern"), module, r0))
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, alpha0))
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if a.shape[0] != r:
            raise _fail(name, path, f"module '{module}': rank {a.shape[0]} in the file, {r} in {CONFIG}")
        out[module] = ModuleLora(a, b, alpha / math.sqrt(r) if rslora else alpha / r)
    return out


def _dylora(name, path, cfg, tensors, shapes, rank: int | None) -> dict[str, ModuleLora]:
    r_max, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", 8))
    k = rank or int(cfg.get("rank") or 0) or r_max
    if not 1 <= k <= r_max:
        raise _fail(name, path, f"DyLoRA rank {k}: expected 1..{r_max} (the adapter's r_max)")
    out = {}
    for module, p in _pairs(name, path, tensors, shapes, "lora_A.weight", "lora_B.weight").items():
        a, b = p["lora_A.weight"], p["lora_B.weight"]
        if a.shape[0] != r_max:
            raise _fail(name, path, f"module '{module}': rank {a.shape[0]} in the file, r_max {r_max} in {CONFIG}")
        out[module] = ModuleLora(a[:k], b[:, :k], alpha / k)  # DyLoRA at rank k: (alpha/k) B[:, :k] A[:k]
    return out


def _adalora(name, path, cfg, tensors, shapes) -> dict[str, ModuleLora]:
    alpha, init_r = float(cfg.get("lora_alpha", 8)), int(cfg.get("init_r", 12))
    scaling = alpha if alpha > 0 else float(init_r)
    out = {}
    for module, p in _pairs(name, path, tensors, shapes, "lora_A", "lora_B", ("lora_E",)).items():
        a, b, e = p["lora_A"], p["lora_B"], p["lora_E"]
        if e.shape != (a.shape[0], 1):
            raise _fail(name, path, f"module '{module}': lora_E {tuple(e.shape)}, expected ({a.shape[0]}, 1)")
        ranknum = torch.tensor(float(init_r), dtype=a.dtype)
        # PEFT: x @ (A * E).T @ B.T * scaling / (ranknum + 1e-5); the same float ops give s
        out[module] = ModuleLora(a * e, b, float(scaling / (ranknum + 1e-5)))
    return out
