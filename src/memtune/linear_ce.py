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


def _chunk_logits(hc, weight, bias):
    """z = hc W^T + b (c, V), a fresh fp32 tensor this code may overwrite in place: computed in the head's
    dtype (autocast applies) and upcast, as the unfused path does. (A reused out= buffer was 6% faster on
    the CPU, but `memtune plan` counts bytes for an out= matmul on fake tensors that the run does not hold.)"""
    return F.linear(hc, weight, bias).float()


def _exp_shifted(z, yc):
    """In place: z (c, V) -> e = exp(z - m) with m the row max. Returns (e, sum_v e (c, 1), lse - z_y (c,)),
    lse = m + log sum e. One exp per logit and no (c, V) temporary (torch.logsumexp makes one)."""
    zy = z.gather(1, yc[:, None])  # (c, 1), taken before z is overwritten
    m = z.amax(1, keepdim=True)  # (c, 1)
    e = z.sub_(m).exp_()
    total = e.sum(1, keepdim=True)  # (c, 1)
    return e, total, (m + total.log() - zy)[:, 0]


class _LinearCrossEntropy(torch.autograd.Function):
    """dL/dz = e / S - onehot(y) is never formed: the 1/S row scale goes on the (c, d) side of each
    matmul and the onehot term is an index_add of (c, d) rows, so after the exp no pass touches (c, V).

        dL/dh = (e W) / S - W_y        dL/dW = e^T (h / S) - scatter_y(h)        dL/db = e^T (1/S) - count_y
    """

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
            e, norm, loss = _exp_shifted(_chunk_logits(hc, weight, bias), yc)
            total += loss.sum()
            inv = norm.reciprocal()  # (c, 1)
            if want_h:
                gh = e.to(weight.dtype) @ weight  # (c, d)
                gh = gh.float().mul_(inv).sub_(weight[yc].float())
                grad_h[s:s + rows] = gh.to(h.dtype)
            if want_w:
                hf = hc.float()
                grad_w.addmm_(e.t(), hf * inv).index_add_(0, yc, hf, alpha=-1)  # (V, d)
            if want_b:
                grad_b.add_(e.t() @ inv[:, 0]).index_add_(0, yc, torch.ones_like(yc, dtype=grad_b.dtype),
                                                          alpha=-1)
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
            total += _exp_shifted(_chunk_logits(h[s:s + rows], weight, bias), targets[s:s + rows])[2].sum()
        return total
    return _LinearCrossEntropy.apply(h, weight, bias, targets, rows)
