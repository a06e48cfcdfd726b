"""GPTQ (Frantar et al., ICLR 2023, arXiv 2210.17323): group-wise INT quantization that corrects each
column's rounding error on the columns not yet quantized, using calibration inputs.

For a linear layer y = W x with W (d_out, d_in), the layer-wise objective over calibration inputs X
(d_in, N tokens) is  min_Q ||W X - Q X||_F^2,  whose Hessian in each output row is

    H = 2/N · X Xᵀ                                        (d_in, d_in), the same for every row

Rounding column i alone leaves an error e_i = (w_i - q_i) in every row; the optimal compensation
spreads it over the columns not yet quantized (Optimal Brain Surgeon). With U the upper Cholesky
factor of H⁻¹ (H⁻¹ = UᵀU) and columns taken left to right, the update after column i is

    W[:, j] -= (w_i - q_i) / U[i, i] · U[i, j]            for every j > i

(GPTQ's Cholesky form: the rows of U are the successive inverse Hessians with columns < i already
eliminated). Columns are processed in blocks of `block` and the updates to columns past the block are
applied once per block, as one matrix product ("lazy batch updates"; exactly the same result).

Groups: columns are quantized in the natural order (act-order off, as QA-LoRA requires, so a group is
still `group_size` consecutive inputs). A group's scale and zero are set, with int4.py's min/max rule,
from the group's weights as updated when the loop reaches its first column. The output is the same
(codes, scales, zeros) triple that int4.py's round-to-nearest produces, stored the same way: a GPTQ
model is a plain memtune INT model. With H diagonal (uncorrelated inputs) nothing is compensated and
GPTQ gives exactly round-to-nearest's codes.

`calibrate_and_quantize` collects H for every target layer from calibration batches, one transformer
block at a time: block k's layers see inputs computed through blocks 0..k-1 already quantized (so
later layers correct the error of earlier ones), and each pass stops at the end of block k.

Our own code, not a library's: the GPTQ packages (auto-gptq, gptqmodel) target CUDA kernels and
their own packed formats; memtune's INT layers need only the codes, and the algorithm is a Cholesky
factorization and a loop.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters.targets import set_submodule
from ..errors import ConfigError
from ..models import out_in_weight
from .int4 import IntLinear, dequantize_groups, group_params, quantize_groups


def gptq_groups(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int, damp: float = 0.01,
                block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (d_out, d_in), h (d_in, d_in) -> codes (d_out, d_in) uint8, scales and zeros (d_out, d_in/g) fp32.

    `damp`: fraction of the mean diagonal of H added to its diagonal (keeps H invertible)."""
    d_out, d_in = w.shape
    g, maxq = group_size, 2 ** bits - 1
    if d_in % g:
        raise ConfigError(f"quantize.group_size={g} does not divide a layer's {d_in} inputs")
    block = max(block // g, 1) * g  # whole groups per block: a group's columns are updated in one place
    W = w.detach().float().clone()  # (d_out, d_in), updated in place as columns are quantized
    H = h.detach().float().clone().to(W.device)
    dead = H.diagonal() == 0  # inputs that were always 0: any weight is right, pin them to 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # H⁻¹ = UᵀU
    codes = torch.empty(d_out, d_in, dtype=torch.uint8, device=W.device)
    scales = torch.empty(d_out, d_in // g, device=W.device)
    zeros = torch.empty(d_out, d_in // g, device=W.device)
    for b0 in range(0, d_in, block):
        b1 = min(b0 + block, d_in)
        Wb = W[:, b0:b1]  # (d_out, B) view: updated in place
        err = torch.empty_like(Wb)  # (d_out, B) scaled errors (w - q)/U[i, i]
        for i in range(b1 - b0):
            c = b0 + i
            if c % g == 0:
                s, z = group_params(Wb[:, i:i + g], bits)  # (d_out,)
                scales[:, c // g], zeros[:, c // g] = s, z
            s, z = scales[:, c // g], zeros[:, c // g]
            q = torch.clamp(torch.round(Wb[:, i] / s + z), 0, maxq)  # (d_out,)
            codes[:, c] = q.to(torch.uint8)
            e = (Wb[:, i] - (q - z) * s) / U[c, c]
            Wb[:, i + 1:] -= e[:, None] * U[c, c + 1:b1][None, :]  # within the block, column by column
            err[:, i] = e
        W[:, b1:] -= err @ U[b0:b1, b1:]  # (d_out, B) @ (B, d_in - b1): the block's update, at once
    return codes, scales, zeros


class _StopForward(Exception):
    """Raised at the end of the block being calibrated: later blocks need not run."""


def transformer_blocks(model: nn.Module, names: list[str]) -> list[tuple[str | None, list[str]]]:
    """Group target layers by the repeated block that holds them (an element of an nn.ModuleList),
    in module order: [(block name or None, [layer names])]. A layer outside any block is its own stage."""
    stages: list[tuple[str | None, list[str]]] = []
    for name in names:
        parts, block = name.split("."), None
        for k in range(1, len(parts)):
            parent = model.get_submodule(".".join(parts[:k - 1])) if k > 1 else model
            if isinstance(parent, nn.ModuleList):
                block = ".".join(parts[:k])
                break
        if block is not None and stages and stages[-1][0] == block:
            stages[-1][1].append(name)
        else:
            stages.append((block, [name]))
    return stages


@torch.no_grad()
def calibrate_and_quantize(model: nn.Module, names: list[str], batches: list[dict], forward,
                           bits: int, group_size: int, damp: float = 0.01) -> dict:
    """Replace each layer in `names` by an IntLinear with GPTQ codes from H collected on `batches`
    (each with an attention_mask; `forward(batch)` runs the model). Returns per-layer relative output errors on the calibration tokens:
    ||(Ŵ - W) X|| / ||W X||, for GPTQ and for round-to-nearest."""
    report = {}
    for block, stage in transformer_blocks(model, names):
        hess: dict[str, torch.Tensor] = {}
        tokens: dict[str, int] = {}
        mask: list[torch.Tensor] = []

        def collect(name):
            def hook(module, args):
                x = args[0]  # (B, T, d_in) or (N, d_in)
                m = mask[0]
                rows = x[m] if x.dim() == 3 and x.shape[:2] == m.shape else x.reshape(-1, x.shape[-1])
                rows = rows.float()  # (n, d_in), padding left out
                hess[name] = hess.get(name, 0) + rows.T @ rows
                tokens[name] = tokens.get(name, 0) + rows.shape[0]
            return hook

        hooks = [model.get_submodule(n).register_forward_pre_hook(collect(n)) for n in stage]
        if block is not None:
            def stop(module, args, output):
                raise _StopForward
            hooks.append(model.get_submodule(block).register_forward_hook(stop))
        try:
            for batch in batches:
                mask[:] = [batch["attention_mask"].bool()]
                try:
                    forward(batch)
                except _StopForward:
                    pass
        finally:
            for h in hooks:
                h.remove()
        for name in stage:
            if name not in hess:
                raise ConfigError(f"quantize.method=gptq: the calibration data never reached '{name}'")
            layer = model.get_submodule(name)
            w = out_in_weight(layer)  # (d_out, d_in)
            H = 2 * hess.pop(name) / tokens[name]  # (d_in, d_in)
            q, s, z = gptq_groups(w, H, bits, group_size, damp)
            report[name] = {"gptq": _output_error(w, q, s, z, H, group_size),
                            "rtn": _output_error(w, *quantize_groups(w, bits, group_size), H, group_size)}
            set_submodule(model, name, IntLinear.from_codes(layer.bias, q, s, z, bits))
    return report


def _output_error(w, q, s, z, H, g: int) -> float:
    """sqrt(tr(D H Dᵀ) / tr(W H Wᵀ)) with D = Ŵ - W: ||(Ŵ - W) X|| / ||W X|| over the calibration tokens."""
    w = w.float()
    d = dequantize_groups(q, s, z, g) - w
    return float(((d @ H) * d).sum().clamp_min(0).sqrt() / ((w @ H) * w).sum().clamp_min(1e-30).sqrt())
