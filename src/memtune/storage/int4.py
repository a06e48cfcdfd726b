"""Group-wise asymmetric integer base storage (QA-LoRA's base): INT4, INT3 or INT2.

Each linear weight W (d_out, d_in) is cut into groups of `group_size` consecutive inputs per output
row; group (o, j) holds W[o, j*g:(j+1)*g] and gets its own scale and (float) zero point:

    scale[o, j] = (max - min) / (2^bits - 1)        zero[o, j] = -min / scale[o, j]
    q[o, i] = clamp(round(W[o, i] / scale + zero), 0, 2^bits - 1)
    W~[o, i] = (q[o, i] - zero[o, j(i)]) * scale[o, j(i)]

Codes are bit-packed: each run of 8 consecutive codes of a row becomes one (8·bits)-bit little-endian
word stored as `bits` bytes, so a row takes d_in·bits/8 bytes (INT4: two codes per byte, low nibble
first; INT3: 8 codes in 3 bytes; INT2: four per byte). Scales and zeros are fp32, (d_out, d_in/g).
A weight costs bits + 64/g bits (INT4, g=32: 6 bits).
The float zero point is what lets QA-LoRA fold its update into the quantized model: an update that
is constant within each group, c[o, j], is absorbed exactly by zero[o, j] -= c[o, j] / scale[o, j]
(see memtune.adapters.qalora).

Codes come from round-to-nearest while a run loads (`quantize_groups`), or from GPTQ once, ahead of
training (memtune.storage.gptq through `memtune quantize`, which saves a folder in this format that
runs then load as their base: `load_quantized`).

Our own code, not a library's: bitsandbytes has no group-wise INT format, and GPTQ/AWQ packages
need CUDA kernels; round-to-nearest group quantization is a few tensor ops.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.targets import set_submodule
from ..errors import ConfigError, ModelError
from ..models import head_modules, is_linear, out_in_weight
from ..recipe import StorageConfig
from . import STORAGE, BaseStorage

QUANT_FILE = "memtune_quantization.json"
PACKING = "8 codes per bits-byte little-endian word"


@dataclass
class IntConfig(StorageConfig):
    kind: str = "int4"
    bits: int = 4  # 4, 3 or 2
    group_size: int = 32  # consecutive inputs sharing one scale and zero
    # rtn: round to nearest, while the run loads. gptq: error-correcting rounding from calibration
    # data (memtune.storage.gptq), done once by `memtune quantize ... --to DIR`; runs then use model=DIR
    method: Literal["rtn", "gptq"] = "rtn"
    calibration_samples: int = 128  # gptq: training examples whose tokens give H
    damp: float = 0.01  # gptq: fraction of mean(diag H) added to H's diagonal

    def check(self, prefix: str) -> None:
        if self.bits not in (2, 3, 4):
            raise ConfigError(f"{prefix}.bits: expected 2, 3 or 4, got {self.bits}")
        if self.group_size < 1:
            raise ConfigError(f"{prefix}.group_size: expected >= 1, got {self.group_size}")
        if self.calibration_samples < 1:
            raise ConfigError(f"{prefix}.calibration_samples: expected >= 1, got {self.calibration_samples}")
        if not 0 <= self.damp < 1:
            raise ConfigError(f"{prefix}.damp: expected a fraction in [0, 1), got {self.damp}")


def group_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., g) -> scale, zero (...): asymmetric min/max over the last dim."""
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8)
    return scale, -lo / scale


def quantize_groups(w: torch.Tensor, bits: int, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (d_out, d_in) -> codes (d_out, d_in) uint8, scales and zeros (d_out, d_in/g) fp32
    (round to nearest; memtune.storage.gptq gives the same triple from calibration data)."""
    d_out, d_in = w.shape
    grouped = w.float().reshape(d_out, d_in // g, g)
    scale, zero = group_params(grouped, bits)  # (d_out, d_in/g)
    q = torch.clamp(torch.round(grouped / scale[..., None] + zero[..., None]), 0, 2 ** bits - 1)
    return q.to(torch.uint8).reshape(d_out, d_in), scale, zero


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, g: int) -> torch.Tensor:
    """codes q (d_out, d_in), scale and zero (d_out, d_in/g) -> W~ (d_out, d_in) fp32: (q - zero) * scale."""
    grouped = q.float().unflatten(1, (-1, g))  # (d_out, d_in/g, g)
    return ((grouped - zero[..., None]) * scale[..., None]).flatten(1)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (d_out, d_in) uint8 < 2^bits -> (d_out, d_in·bits/8) uint8; d_in a multiple of 8."""
    d_out, d_in = q.shape
    chunks = q.long().reshape(d_out, d_in // 8, 8)
    word = sum(chunks[..., i] << (bits * i) for i in range(8))  # (d_out, d_in/8), 8·bits bits used
    packed = torch.stack([(word >> (8 * k)) & 255 for k in range(bits)], -1)  # (d_out, d_in/8, bits)
    return packed.to(torch.uint8).reshape(d_out, d_in * bits // 8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of `pack_codes`: (d_out, d_in·bits/8) uint8 -> codes (d_out, d_in) uint8. Runs on every
    forward and backward, so INT4 and INT2 (whole codes per byte) stay in uint8 ops."""
    d_out = packed.shape[0]
    if 8 % bits == 0:  # byte j holds codes j·(8/bits) + i at bit offset bits·i
        mask = 2 ** bits - 1
        return torch.stack([(packed >> (bits * i)) & mask for i in range(8 // bits)], -1).reshape(d_out, -1)
    chunks = packed.long().reshape(d_out, -1, bits)  # (d_out, d_in/8, bits)
    word = sum(chunks[..., k] << (8 * k) for k in range(bits))
    codes = torch.stack([(word >> (bits * i)) & (2 ** bits - 1) for i in range(8)], -1)  # (d_out, d_in/8, 8)
    return codes.to(torch.uint8).reshape(d_out, -1)


class IntLinear(nn.Module):
    """y = x W~^T + b with W~ dequantized from group-wise integer codes. x (..., d_in) -> (..., d_out)."""

    is_quantized_linear = True

    def __init__(self, d_in: int, d_out: int, bits: int, group_size: int, bias: bool, device=None) -> None:
        super().__init__()
        if d_in % group_size:
            raise ConfigError(f"quantize.group_size={group_size} does not divide a layer's {d_in} inputs")
        if d_in % 8:
            raise ConfigError(f"quantize.kind=int4: codes are packed 8 at a time, but a layer has {d_in} inputs "
                              "(not a multiple of 8)")
        self.in_features, self.out_features, self.bits, self.group_size = d_in, d_out, bits, group_size
        g = d_in // group_size
        # frozen Parameters (not buffers), so they count and save as the layer's weights; codes packed
        self.qweight = nn.Parameter(torch.zeros(d_out, d_in * bits // 8, dtype=torch.uint8, device=device),
                                    requires_grad=False)
        self.scales = nn.Parameter(torch.ones(d_out, g, device=device), requires_grad=False)
        self.zeros = nn.Parameter(torch.zeros(d_out, g, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(d_out, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int) -> IntLinear:
        """Round-to-nearest codes of w (d_out, d_in)."""
        return cls.from_codes(bias, *quantize_groups(w, bits, group_size), bits)

    @classmethod
    def from_codes(cls, bias: torch.Tensor | None, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                   bits: int) -> IntLinear:
        """codes q (d_out, d_in), scales and zeros (d_out, d_in/g), e.g. from memtune.storage.gptq."""
        (d_out, d_in), groups = q.shape, s.shape[1]
        layer = cls(d_in, d_out, bits, d_in // groups, bias is not None, device=q.device)
        layer.qweight.data.copy_(pack_codes(q, bits))
        layer.scales.data.copy_(s)
        layer.zeros.data.copy_(z)
        if bias is not None:
            layer.bias.data.copy_(bias.float())
        return layer

    @property
    def weight(self) -> torch.Tensor:  # what adapters read for device (and find not floating point)
        return self.qweight

    def codes(self) -> torch.Tensor:
        """The unpacked integer codes q (d_out, d_in) uint8."""
        return unpack_codes(self.qweight, self.bits)

    def dequantized(self) -> torch.Tensor:
        """W~ (d_out, d_in) in fp32: (q - zero) * scale, group by group."""
        return dequantize_groups(self.codes(), self.scales, self.zeros, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _IntMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class _IntMatmul(torch.autograd.Function):
    """y = x W~^T that keeps nothing for backward but the layer (its codes are weights already):
    dL/dx = dL/dy W~ dequantizes again, instead of autograd keeping the fp W~ of every layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: IntLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized().to(x.dtype))  # (..., d_out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantized().to(grad.dtype), None  # (..., d_in); the codes are frozen


def quantizable_layers(model: nn.Module) -> list[str]:
    head_ids = {id(m) for h in head_modules(model).values() for m in h.modules()}
    return [n for n, m in model.named_modules()
            if is_linear(m) and id(m) not in head_ids and not getattr(m, "is_quantized_linear", False)]


@STORAGE.register("int4", IntConfig)
class IntStorage(BaseStorage):
    config: IntConfig
    quantized = True
    reads_int_folders = True

    def apply(self, model: nn.Module) -> None:
        names = quantizable_layers(model)
        done = [m for m in model.modules() if isinstance(m, IntLinear)]
        if done:  # loaded from a quantized folder (memtune quantize, or a merged QA-LoRA run)
            if names:
                raise ConfigError(f"quantize.kind=int4: the model is partly quantized already ('{names[0]}' is not)")
            found = sorted({(m.bits, m.group_size) for m in done})
            if found != [(self.config.bits, self.config.group_size)]:
                raise ConfigError("quantize: the model's layers are stored as " + ", ".join(
                    f"INT{b} group {g}" for b, g in found) + f"; the recipe asks for INT{self.config.bits} "
                    f"group {self.config.group_size} (set quantize.bits and quantize.group_size to match)")
            self.count, self.loaded_quantized = len(done), True
            return
        if not names:
            raise ConfigError("quantize.kind=int4: the model has no linear layers outside its head to quantize")
        if self.config.method == "gptq":
            raise ConfigError("quantize.method=gptq: GPTQ needs calibration data and runs once, before training: "
                              "`memtune quantize model=... data.train=FILE quantize.method=gptq --to DIR`, "
                              "then train with model=DIR")
        for name in names:  # one layer at a time
            old = model.get_submodule(name)
            w = out_in_weight(old)
            if w.shape[1] % self.config.group_size:
                raise ConfigError(f"quantize.group_size={self.config.group_size}: does not divide the "
                                  f"{w.shape[1]} inputs of '{name}'")
            set_submodule(model, name, IntLinear.from_weight(w, old.bias, self.config.bits, self.config.group_size))
        self.count = len(names)

    def dequantize(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
        """Replace every IntLinear by an nn.Linear holding its dequantized weight."""
        names = [n for n, m in model.named_modules() if isinstance(m, IntLinear)]
        for name in names:
            q = model.get_submodule(name)
            lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=q.qweight.device,
                            dtype=dtype)
            lin.weight.data.copy_(q.dequantized())
            if q.bias is not None:
                lin.bias.data.copy_(q.bias)
            set_submodule(model, name, lin.requires_grad_(False))
        return len(names)

    def describe(self) -> dict:
        return {"kind": "int4", "bits": self.config.bits, "group_size": self.config.group_size,
                "quantized_layers": getattr(self, "count", None),
                "loaded_quantized": getattr(self, "loaded_quantized", False)}


def save_quantized(model: nn.Module, tokenizer, out: Path, how: dict | None = None) -> Path:
    """An INT model: transformers' files (config, safetensors with qweight/scales/zeros) plus
    memtune_quantization.json listing the quantized layers and `how` they were made (e.g. method,
    calibration); `load_quantized` reads it back."""
    layers = {n: {"bits": m.bits, "group_size": m.group_size, "in": m.in_features, "out": m.out_features,
                  "bias": m.bias is not None}
              for n, m in model.named_modules() if isinstance(m, IntLinear)}
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    meta = {"format": "memtune-int", "packing": PACKING, **({"quantized_by": how} if how else {}), "layers": layers}
    (Path(out) / QUANT_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return Path(out)


def is_quantized_folder(path: str | Path) -> bool:
    return (Path(path) / QUANT_FILE).is_file()


def describe_folder(path: str | Path) -> str:
    """e.g. "INT4 group 32 (gptq)": the formats of a quantized folder's layers and how they were made."""
    meta_file = Path(path) / QUANT_FILE
    try:
        meta = json.loads(meta_file.read_text())
        formats = sorted({(spec["bits"], spec["group_size"]) for spec in meta["layers"].values()})
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{meta_file}: not a memtune quantization file ({type(e).__name__}: {e})") from None
    method = (meta.get("quantized_by") or {}).get("method", "")
    return ", ".join(f"INT{b} group {g}" for b, g in formats) + (f" ({method})" if method else "")


def load_quantized(path: str | Path, auto_class=None, may_lack: tuple[str, ...] = (),
                   **config_kwargs) -> nn.Module:
    """Rebuild a model saved by `save_quantized` (architecture from config.json, IntLinear layers).

    `auto_class` (default: causal LM) may differ from the class saved, e.g. a sequence classifier over
    a quantized causal LM: head weights missing from the folder are initialized (global RNG, as
    transformers does for a new head); any other missing weight is an error. `config_kwargs` (e.g.
    num_labels) update the saved config. Weights of modules named in `may_lack` (e.g. "pooler", which
    mean pooling replaces and so never saves) may be absent; they are initialized. The skeleton is built without initializing its weights, so
    the full-precision layers it replaces are never written (untouched pages, no resident memory), and
    the tensors read from the folder become its parameters as they are."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from ..models import head_modules

    p = Path(path)
    meta_file = p / QUANT_FILE
    if not meta_file.is_file():
        raise ModelError(f"{p}: no {QUANT_FILE} (not a quantized memtune INT model)")
    meta = json.loads(meta_file.read_text())
    if meta.get("packing") != PACKING:
        raise ModelError(f"{meta_file}: codes packed as {meta.get('packing', 'one per byte')!r}; this memtune reads "
                         f"{PACKING!r} (merge the adapter again with this version)")
    with no_init_weights():
        model = (auto_class or AutoModelForCausalLM).from_config(AutoConfig.from_pretrained(p, **config_kwargs))
    for name, spec in meta["layers"].items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"{meta_file}: layer '{name}' is not in a {type(model).__name__}") from None
        set_submodule(model, name, IntLinear(spec["in"], spec["out"], spec["bits"], spec["group_size"], spec["bias"]))
    state = {}
    for f in sorted(p.glob("*.safetensors")):
        state.update(load_file(str(f)))
    heads = head_modules(model)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    new_head = {k for k in state if k.split(".")[0] in heads and k in shapes and state[k].shape != shapes[k]}
    state = {k: v for k, v in state.items() if k not in new_head}  # e.g. another number of labels
    # assign: the file's tensors become the parameters (no second copy; the skeleton's never-written
    # allocations are freed); tie_weights re-ties what assignment untied (e.g. the LM head to the embeddings)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in missing if not _tied(model, k) and not set(k.split(".")) & set(may_lack)]
    fresh = {k.split(".")[0] for k in missing if k.split(".")[0] in heads}
    missing = [k for k in missing if k.split(".")[0] not in fresh]
    # the saved model's own head (e.g. an LM head, loaded now as a classifier): outside the backbone
    unexpected = [k for k in unexpected if k.split(".")[0] == model.base_model_prefix]
    if missing or unexpected:
        raise ModelError(f"{p}: weights do not fit a {type(model).__name__}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    for name in sorted(fresh):  # a head the folder does not hold: drawn as transformers draws a new one
        heads[name].apply(model._init_weights)
    for name, module in model.named_modules():  # e.g. a pooler the caller replaces: never left unwritten
        if name.split(".")[-1] in may_lack:
            module.apply(model._init_weights)
    return model.eval()


def _tied(model: nn.Module, key: str) -> bool:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return key in tied
