"""Which memory layout bitsandbytes' 4-bit layers keep on the CPU.

bitsandbytes (>= 0.49) repacks a `Linear4bit` for its AVX512-BF16 inference kernel the first time the
layer runs on a CPU that has that instruction set, in eval mode, on an input that needs no gradient
(`Linear4bit.forward` -> `_convert_weight_packed_for_cpu`). The repacking is made for inference only:

    codes     (N*K/2, 1) nibbles in row order  ->  (N, K/2) interleaved in tiles of 32 output rows
    absmax    8-bit double-quantized blocks    ->  dequantized, then rounded to bf16 (lossy)
    compute   dequant(W) in compute_dtype      ->  x cast to bf16, bf16 kernel (same for fp32 runs)

and nothing converts it back when the module returns to training: the next training forward takes the
inference-only path (`result += bias` on a leaf that needs grad fails), and the codes and constants no
longer equal `bitsandbytes.functional.quantize_4bit`'s. bitsandbytes' own inverse re-quantizes the bf16
absmax, so it is not an exact round trip either. On CPUs without AVX512-BF16 none of this happens, so a
run's behaviour would depend on the machine.

memtune therefore decides the layout itself, per layer, through the flag bitsandbytes reads
(`support_avx512bf16_for_cpu`, set from the CPU in the layer's constructor):

- `canonical` (every run, and the default everywhere): the flag is cleared, the layout is never
  produced, and every machine computes dequant(W) in compute_dtype. Codes stay bitsandbytes'.
- `packed` (`quantize.cpu_kernel=packed`, commands that never train: `memtune eval`): the flag keeps
  what bitsandbytes detected, so on an AVX512-BF16 CPU the layers are repacked on their first forward.
  Faster for small batches (benchmarks/nf4_cpu_kernel.py), with bf16 rounding in every matmul.

`check_canonical` is called before anything reads codes (merging, byte counts, training): a packed
layer there is a bug, reported with the layer's name rather than trained or saved wrongly.
"""

from __future__ import annotations

from torch import nn

from ..errors import MemtuneError

FLAG = "support_avx512bf16_for_cpu"  # bitsandbytes' per-layer switch (Linear4bit.__init__ sets it)


def is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ == "Linear4bit"


def linear4bit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_4bit(m)]


def cpu_supports_packed() -> bool:
    """What bitsandbytes detects: the CPU has AVX512-BF16 (its packed kernel is registered)."""
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def is_packed(layer: nn.Module) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


def set_cpu_layout(model: nn.Module, packed: bool = False) -> int:
    """Let bitsandbytes repack the model's 4-bit layers for its CPU inference kernel (`packed`) or
    never (canonical). Returns the number of 4-bit layers. A layer already packed cannot be made
    canonical exactly (its absmax was rounded to bf16), so that is refused."""
    layers = linear4bit_layers(model)
    if not packed:
        check_canonical(model, "keeping bitsandbytes' canonical 4-bit layout")
    allowed = packed and cpu_supports_packed()
    for _, layer in layers:
        setattr(layer, FLAG, allowed)
    return len(layers)


def check_canonical(model: nn.Module, doing: str) -> None:
    packed = [n for n, m in linear4bit_layers(model) if is_packed(m)]
    if packed:
        raise MemtuneError(f"{doing}: 4-bit layer '{packed[0]}' (and {len(packed) - 1} more) holds bitsandbytes' "
                           f"packed CPU inference layout, whose absmax constants were rounded to bf16; its codes "
                           f"are no longer quantize_4bit's. Rebuild the model with quantize.cpu_kernel=canonical")


def keep_quant_state_on_module(model: nn.Module) -> None:
    """Give every 4-bit layer its weight's `quant_state` on the layer itself as well. bitsandbytes'
    `Linear4bit.forward` restores a weight's quant_state from its module when the weight tensor was
    replaced; FSDP2 replaces it by the gathered shards on every forward (a Params4bit made without
    `module=` would then fail with "quant_state is required")."""
    for _, layer in linear4bit_layers(model):
        if getattr(layer, "quant_state", None) is None and getattr(layer.weight, "quant_state", None) is not None:
            layer.quant_state = layer.weight.quant_state
        if getattr(layer.weight, "module", None) is None:
            layer.weight.module = layer
