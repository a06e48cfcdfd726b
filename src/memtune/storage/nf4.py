"""NF4 base storage (QLoRA, Dettmers et al. 2023) through bitsandbytes' `Linear4bit`.

Every linear layer of the base except the output head(s) becomes a `bnb.nn.Linear4bit`: weights in
blocks of 64, each block scaled by its absmax and rounded to the nearest of the 16 NF4 values
(quantiles of N(0, 1), normalized to [-1, 1]), two 4-bit codes per byte. With `double_quant` the
fp32 absmax constants are themselves quantized to 8 bits in blocks of 256 (plus one fp32 scale per
block), so a weight costs 4 + 8/64 + 32/(64*256) = 4.127 bits. Embeddings, norms and heads keep
their dtype. Forward: y = x dequant(W)^T + b, computed in `compute_dtype`.

Why bitsandbytes: it is the reference implementation (CUDA and, in current releases, CPU kernels),
so the packed codes and constants are bitsandbytes' own by construction (tests check them against
`bitsandbytes.functional.quantize_4bit`). Our part is only the layer walk and the round trip back
to full precision for merging.

A pretrained checkpoint is quantized while it is read: `load_kwargs` hands transformers a
`BitsAndBytesConfig` (same format, heads listed in `llm_int8_skip_modules`) and the run's device as
`device_map`, and transformers' bitsandbytes integration turns each linear weight into 4 bits as it
is loaded, on that device (on a GPU, the full-precision model never reaches it; on CPU,
benchmarks/quant_loading.py measures both paths). Models built in memory (presets)
are converted by `apply`, one layer at a time: each layer's full-precision weight is released as soon
as its 4-bit copy exists. Both paths produce the same codes (tests/test_quant_loading.py).
GPT-2's Conv1D (weights stored (in, out)) is converted through its transpose.

The layers keep bitsandbytes' canonical layout on every CPU: its AVX512-BF16 inference repacking is
switched off for runs (bnb_layout.py says why), and allowed only for eval-only commands with
`quantize.cpu_kernel=packed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..adapters.targets import set_submodule
from ..errors import ConfigError
from ..memory.planning import is_planning, weightless_like
from ..models import head_modules, is_linear, out_in_weight
from ..recipe import StorageConfig
from . import DTYPES, STORAGE, BaseStorage
from .bnb_layout import check_canonical, is_4bit, keep_quant_state_on_module, set_cpu_layout

BLOCKSIZE = 64


@dataclass
class NF4Config(StorageConfig):
    kind: str = "nf4"
    double_quant: bool = True  # 8-bit absmax constants in blocks of 256
    compute_dtype: Literal["fp32", "bf16"] = "fp32"
    # canonical: dequant(W) in compute_dtype on every machine; packed: commands that never train may let
    # bitsandbytes repack layers for its AVX512-BF16 CPU kernel (bf16 compute; see bnb_layout.py)
    cpu_kernel: Literal["canonical", "packed"] = "canonical"


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("quantize.kind=nf4: needs the bitsandbytes package (pip install bitsandbytes)") from None
    return bnb


@STORAGE.register("nf4", NF4Config)
class NF4Storage(BaseStorage):
    config: NF4Config
    quantized = True

    def bnb_config(self, keep: list[str]):
        """transformers' `BitsAndBytesConfig` for this format; `keep`: modules left unquantized."""
        from transformers import BitsAndBytesConfig

        _bnb()
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=self.config.double_quant,
                                  bnb_4bit_compute_dtype=DTYPES[self.config.compute_dtype],
                                  llm_int8_skip_modules=list(keep))

    def load_kwargs(self, keep: list[str], device: torch.device | None = None) -> dict:
        # an explicit device_map: without one transformers' bitsandbytes path picks a GPU when any exists
        return {"quantization_config": self.bnb_config(keep), "device_map": {"": str(device or "cpu")}}

    def apply(self, model: nn.Module) -> None:
        bnb = _bnb()
        head_ids = {id(m) for h in head_modules(model).values() for m in h.modules()}
        names = [n for n, m in model.named_modules() if is_linear(m) and id(m) not in head_ids and not is_4bit(m)]
        compute = DTYPES[self.config.compute_dtype]
        for name in names:  # one layer at a time
            old = model.get_submodule(name)
            w = out_in_weight(old)
            d_out, d_in = w.shape
            new = bnb.nn.Linear4bit(d_in, d_out, bias=old.bias is not None, compute_dtype=compute,
                                    compress_statistics=self.config.double_quant, quant_type="nf4",
                                    device="meta")
            # planning (memory/planning.py): Params4bit cannot hold a FakeTensor, so it gets a meta tensor
            src = weightless_like(w).contiguous()
            new.weight = bnb.nn.Params4bit(src, requires_grad=False, quant_type="nf4",
                                           compress_statistics=self.config.double_quant, blocksize=BLOCKSIZE)
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.data.clone(), requires_grad=False)
            if is_planning():
                _keep_code_table_on_cpu()
                new.weight._quantize("meta")  # (.to() would skip a meta tensor)
            else:
                new = new.to(w.device if w.device.type != "meta" else "cpu")  # quantizes
            set_submodule(model, name, new)
            del old, w
        self.count = set_cpu_layout(model, packed=False)  # 4-bit layers, converted here or while loading
        if not self.count:
            raise ConfigError("quantize.kind=nf4: the model has no linear layers outside its head to quantize")

    def prepare(self, model: nn.Module, for_training: bool) -> None:
        if self.config.cpu_kernel == "packed" and for_training:
            raise ConfigError("quantize.cpu_kernel=packed: bitsandbytes' packed CPU layout is for inference only "
                              "(it cannot backpropagate, and its bf16 constants are not the stored codes'); "
                              "train with quantize.cpu_kernel=canonical and pass packed to memtune eval")
        set_cpu_layout(model, packed=self.config.cpu_kernel == "packed")
        keep_quant_state_on_module(model)

    def dequantize(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> int:
        """Replace every Linear4bit by an nn.Linear holding its exact dequantized weight (for merging)."""
        import bitsandbytes.functional as F

        check_canonical(model, "dequantizing the NF4 base")
        names = [n for n, m in model.named_modules() if is_4bit(m)]
        for name in names:
            q = model.get_submodule(name)
            w = F.dequantize_4bit(q.weight.data, q.weight.quant_state).to(dtype)  # (out, in)
            lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=w.device, dtype=dtype)
            lin.weight.data.copy_(w)
            if q.bias is not None:
                lin.bias.data.copy_(q.bias.data.to(dtype))
            lin.requires_grad_(False)
            set_submodule(model, name, lin)
        forget_quantizer(model)
        return len(names)

    def describe(self) -> dict:
        return {"kind": "nf4", "blocksize": BLOCKSIZE, "double_quant": self.config.double_quant,
                "compute_dtype": self.config.compute_dtype, "cpu_kernel": self.config.cpu_kernel,
                "quantized_layers": getattr(self, "count", None)}


def _keep_code_table_on_cpu() -> None:
    """bitsandbytes caches double quantization's 8-bit code table on the device of the first tensor it
    quantizes; a plan quantizes on `meta`, and a later real run would get a table without data. Fill
    the cache first, on the CPU, with the table bitsandbytes itself would compute (it moves it to
    each input's device)."""
    import bitsandbytes.functional as F

    if "dynamic" not in F.name2qmap:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            F.name2qmap["dynamic"] = F.create_dynamic_map().to("cpu")


def forget_quantizer(model: nn.Module) -> None:
    """Drop transformers' record that the model was loaded quantized (after dequantizing it), so
    `save_pretrained` writes a plain model without a `quantization_config`."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def quantized_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of 4-bit codes + all quantization constants, weights they encode) over the Linear4bit layers."""
    check_canonical(model, "counting the 4-bit bytes")
    total, params = 0, 0

    def nbytes(t) -> int:
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    for m in model.modules():
        if not is_4bit(m):
            continue
        st = m.weight.quant_state
        total += nbytes(m.weight.data) + nbytes(st.absmax)  # (the 16-value NF4 code table is shared)
        if st.nested:
            total += nbytes(st.state2.absmax) + nbytes(st.offset)
        params += m.in_features * m.out_features
    return total, params
