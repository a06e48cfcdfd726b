"""Cross-entropy through a linear output head, a chunk of rows at a time: no (N, V) logits tensor.

For the N target positions of a causal-LM batch, with h (N, d) the LM head's inputs, W (V, d) and b its
weight and bias, y (N,) the targets:

    loss = sum_n [ logsumexp_v (h_n W^T + b)_v - (h_n W^T + b)_{y_n} ]
    dL/dz = softmax(z) - onehot(y)              z = h W^T + b, one chunk (c, V) at a time
    dL/dh = (dL/dz) W        dL/dW = (dL/dz)^T h        dL/db = sum_n dL/dz_n

The unfused computation holds the logits z (N, V), the log-softmax cross-entropy saves for backward
(N, V) and, in backward, their gradient (N, V): at vocab 32,000 and 2,048 targets that is 250 MiB
each, usually the largest tensors of a LoRA or QST step. Here the forward computes each chunk's
logits, its loss and, when gradients are wanted, its gradients right away (as Liger-Kernel's fused
linear cross-entropy does), so nothing of size (N, V) ever exists and no logits are recomputed: what
is kept for backward is dL/dh (N, d), plus dL/dW and dL/db when the head itself trains. Backward
only scales them by the incoming gradient (the loss is a scalar).

Why our own: the loss must be a sum with the target count beside it (gradient accumulation
normalizes over the accumulated batch, memtune.gradient.backprop), must run under MeZO's inference
mode and must keep each model's own dtypes; the peers' kernels are CUDA/Triton-only or mean-reduced.
Chunks hold `CHUNK_ELEMENTS` logits (32 MiB in fp32: 262 rows at V = 32,000) whatever V is. On 2 CPU
cores (N = 2,044, d = 1,024, V = 32,000, loss + backward) 65-row chunks took 3.0 s, 256 rows 2.0 s and
1,024 rows 1.6 s, against 2.0 s unfused. Logits are computed in the head's dtype (autocast applies)
and reduced in fp32, as the unfused path does.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

CHUNK_ELEMENTS = 2**23  # logits per chunk (32 MiB in fp32): rows = CHUNK_ELEMENTS // V


def chunk_rows(vocab: int, elements: int = CHUNK_ELEMENTS) -> int:
    return max(1, elements // max(vocab, 1))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, rows):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        for s in range(0, h.shape[0], rows):
            hc, yc = h[s:s + rows], targets[s:s + rows]  # (c, d), (c,)
            z = F.linear(hc, weight, bias).float()  # (c, V)
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            total += (lse - z.gather(1, yc[:, None])[:, 0]).sum()
            if want_h or want_w or want_b:
                g = z.sub_(lse[:, None]).exp_()  # softmax, in place (c, V)
                g[torch.arange(len(yc), device=g.device), yc] -= 1  # dL/dz
                if want_h:
                    grad_h[s:s + rows] = (g.to(weight.dtype) @ weight).to(h.dtype)  # (c, d)
                if want_w:
                    grad_w += g.T @ hc.float()  # (V, d)
                if want_b:
                    grad_b += g.sum(0)
        ctx.save_for_backward(*(t for t in (grad_h, grad_w, grad_b) if t is not None))
        ctx.have = (want_h, want_w, want_b)
        ctx.dtypes = (h.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_out).to(dtype) if have else None for have, dtype in zip(ctx.have, ctx.dtypes)]
        return (*grads, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Summed CE of (h W^T + b) against `targets`, in chunks of `rows` rows (default: chunk_rows(V)).
    h (N, d), weight (V, d), bias (V,) or None, targets (N,) class ids. Returns an fp32 scalar."""
    rows = rows or chunk_rows(weight.shape[0])
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, h.shape[0], rows):  # evaluation, MeZO: the loss alone, chunk by chunk
            z = F.linear(h[s:s + rows], weight, bias).float()
            total += F.cross_entropy(z, targets[s:s + rows], reduction="sum")
        return total
    return _LinearCrossEntropy.apply(h, weight, bias, targets, rows)
