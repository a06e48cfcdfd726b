"""LoRA's base and low-rank matmuls as one autograd node: y = x W^T + b + s (x A^T) B^T.

Shapes: x (N, d_in) (leading dims flattened), W (d_out, d_in) frozen, A (r, d_in), B (d_out, r).

    forward:   y = addmm(b, x, W^T)        u^T = A x^T (r, N)      y += s u B^T   (in place, one addmm)
    backward:  du^T = s B^T dy^T (r, N)    dB = s (u^T dy)^T       dA = du^T x
               dx = dy W  (+)=  du A        (in place, one addmm; skipped when x needs no gradient)

The skinny products are taken with the rank as the leading (row) dimension: u^T = A x^T rather than
u = x A^T, du^T = B^T dy^T rather than du = dy B, and dB as (u^T dy)^T rather than dy^T u. Same FLOPs,
but CPU BLAS runs an (r, N) output at 3x the rate of an (N, r) one (measured at N=1024, r=8, d=512-1408,
fp32: one Llama layer's 7 adapters cost 15.1-19.2 ms over the frozen base's matmuls in the (N, r) layout,
11.9-15.9 ms in this one). The saved tensor has the same size either way.

Why our own: composed from nn.Linear modules (ours before, PEFT's now), the same step runs five more
full-size elementwise passes: the scaled update s*v and the sum y + s*v (each (N, d_out)) in the
forward; dy*s (N, d_out) and the sum of the two input gradients (N, d_in) in the backward; plus the
(N, d_out) update tensor itself. Folding s and the sums into the matmuls' alpha/beta removes them;
the saved tensors are the same (x, u and the weights), so memory does not change. Exact up to
floating-point rounding (the equality tests hold it to PEFT's output and gradients).

Used by `LoraLinear` when the base is a plain nn.Linear or GPT-2 Conv1D (no hooks of its own) whose
weight, the adapter and the input share one dtype, outside autocast, without dropout, and with
gradients enabled; anything else (quantized bases, mixed dtypes, autocast, dropout) takes the
module path, which is PEFT's arithmetic. Sharded (DTensor) weights take the module path too; under
`memtune plan` the weights are fake tensors marked as parameters and take this path, as the run does.
"""

from __future__ import annotations

import torch
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None


class _FusedLora(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        x2 = x.reshape(-1, x.shape[-1])  # (N, d_in)
        y = torch.mm(x2, weight.t()) if bias is None else torch.addmm(bias, x2, weight.t())  # (N, d_out)
        ut = torch.mm(lora_a, x2.t())  # (r, N): the skinny product in the layout BLAS runs fastest
        y.addmm_(ut.t(), lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, ut, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, ut, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, d_out)
        dut = torch.mm(lora_b.t(), dy2.t()).mul_(s)  # (r, N)
        grad_a = torch.mm(dut, x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[3] else None  # (r, d_in)
        grad_b = torch.mm(ut, dy2).mul_(s).t() if ctx.needs_input_grad[4] else None  # (d_out, r)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dy2, weight).addmm_(dut.t(), lora_a).view(x.shape)  # (N, d_in)
        return dx, None, None, grad_a, grad_b, None


def fusable(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether `layer` (a LoraLinear) can run this input through the fused node."""
    base = layer.base_layer
    if type(base) is not nn.Linear and not layer.fan_in_fan_out:
        return False
    if base._forward_hooks or base._forward_pre_hooks or not isinstance(layer.lora_dropout, nn.Identity):
        return False
    w, a = base.weight, layer.lora_A.weight
    if w.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return False
    return (x.dtype == w.dtype == a.dtype and torch.is_grad_enabled()
            and not torch.is_autocast_enabled(x.device.type) and not _sharded(w) and not _sharded(a))


def _sharded(t: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def fused_lora(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (..., d_in) -> (..., d_out): the base layer plus s B A x, as one autograd node."""
    base = layer.base_layer
    weight = base.weight.t() if layer.fan_in_fan_out else base.weight  # (d_out, d_in)
    return _FusedLora.apply(x, weight, base.bias, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
