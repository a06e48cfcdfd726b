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

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn import functional as F
from torch.utils.weak import WeakIdKeyDictionary

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


def _grad_rows(e, inv, w, yc):
    """G w = (e w) / S - w_y (c, k) for G = dL/dz of a chunk, without forming G; w (V, k). fp32."""
    return (e.to(w.dtype) @ w).float().mul_(inv).sub_(w[yc].float())


def _add_grad_bias(grad_bias, e, inv, yc):
    """grad_bias += sum_n G_n = e^T (1/S) - count_y (V,)."""
    grad_bias.add_(e.t() @ inv[:, 0]).index_add_(0, yc, torch.ones_like(yc, dtype=grad_bias.dtype), alpha=-1)


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
                grad_h[s:s + rows] = _grad_rows(e, inv, weight, yc).to(h.dtype)  # (c, d)
            if want_w:
                hf = hc.float()
                grad_w.addmm_(e.t(), hf * inv).index_add_(0, yc, hf, alpha=-1)  # (V, d)
            if want_b:
                _add_grad_bias(grad_b, e, inv, yc)
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


# -- a head input that is a frozen stream plus a low-rank trainable one (QST's α-mix) -----------------------
#
#     h = a c + b q P^T        c (N, d) frozen, q (N, k) and P (d, k) trainable, a and b scalars (a = α, b = 1 - α)
#     z = h W^T + bias = a (c W^T) + b (q M^T) + bias,    M = W P (V, k), formed once by autograd (dP = W^T dM)
#
# With G = dL/dz = e / S - onehot(y), only k-wide products are needed:
#
#     dL/dq = b G M        dL/dM = b G^T q        dL/da = <G, c W^T>        dL/db = <G, q M^T> = <G M, q>
#
# so the (N, V) x (V, d) product G W that dL/dh costs (as much as the head's forward) is never formed:
# a QST step spends one head matmul per chunk (c W^T) instead of two. Each chunk holds two (rows, V)
# tensors (c W^T is kept for dL/da) of chunk_rows(V) rows: halving the rows to keep CHUNK_ELEMENTS in
# all made the c W^T matmuls 1.6x slower on 2 CPU cores (131 against 262 rows at d = 1,024, V = 32,000).


@dataclass
class LowRankMix:
    """h = a c + b q P^T (see above). c (..., d), q (..., k), proj P (d, k), a and b one-element tensors."""

    a: torch.Tensor
    c: torch.Tensor
    b: torch.Tensor
    q: torch.Tensor
    proj: torch.Tensor

    def rows(self, pick: Callable[[torch.Tensor], torch.Tensor]) -> "LowRankMix":
        """The same mix over picked rows: `pick` maps (B, T, .) -> (N, .), applied to c and q alike."""
        return LowRankMix(self.a, pick(self.c), self.b, pick(self.q), self.proj)


_MIXES = WeakIdKeyDictionary()  # hidden-state tensor -> its LowRankMix, for as long as the tensor lives


def declare_mix(h: torch.Tensor, mix: LowRankMix) -> None:
    """Record that `h` (as its producer computed it) equals `mix`, for a loss that can use the factors."""
    _MIXES[h] = mix


def mix_of(h: torch.Tensor) -> LowRankMix | None:
    """The declared mix of `h`, or of the tensor `h` is a same-layout view of (GPT-2's ln_f(h).view(shape))."""
    mix = _MIXES.get(h)
    base = h._base
    if mix is None and base is not None and (base.shape, base.stride(), base.storage_offset()) == (
            h.shape, h.stride(), h.storage_offset()):
        mix = _MIXES.get(base)
    return mix


class _MixLinearCrossEntropy(torch.autograd.Function):
    """The summed CE of (a c + b q P^T) W^T + bias, M = W P given; gradients for q, M, a, b and bias."""

    @staticmethod
    def forward(ctx, c, q, m, a, b, weight, bias, targets, rows):
        want_bias = bias is not None and ctx.needs_input_grad[6]
        total = torch.zeros((), dtype=torch.float32, device=c.device)
        af, bf = float(a), float(b)  # one-element tensors -> the scalars addmm and the scalings take
        grad_q = torch.empty_like(q)
        grad_m = torch.zeros(m.shape, dtype=torch.float32, device=m.device)  # (V, k)
        grad_a = torch.zeros((), dtype=torch.float32, device=c.device)
        grad_b = torch.zeros((), dtype=torch.float32, device=c.device)
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
        for s in range(0, c.shape[0], rows):
            cc, qc, yc = c[s:s + rows], q[s:s + rows], targets[s:s + rows]  # (r, d), (r, k), (r,)
            zc = _chunk_logits(cc.to(weight.dtype), weight, None)  # c W^T (r, V), kept for dL/da
            if m.dtype == torch.float32:  # a c W^T + b q M^T in one addmm (no pass over (r, V) to scale and add)
                z = torch.addmm(zc, qc.float(), m.t(), beta=af, alpha=bf)
            else:  # q M^T in the head's dtype, as the unfused path computes logits
                z = _chunk_logits(qc.to(m.dtype), m, None).mul_(bf).add_(zc, alpha=af)
            if bias is not None:
                z.add_(bias.float())
            e, norm, loss = _exp_shifted(z, yc)
            total += loss.sum()
            inv = norm.reciprocal()  # (r, 1)
            gq = _grad_rows(e, inv, m, yc)  # G M (r, k)
            grad_q[s:s + rows] = (gq * bf).to(q.dtype)
            qf = qc.float()
            grad_b += (gq * qf).sum()  # <G M, q>
            grad_a -= zc.gather(1, yc[:, None]).sum()  # <G, c W^T> = sum (e / S) (c W^T) - (c W^T)_y
            grad_a += (torch.linalg.vecdot(zc, e) * inv[:, 0]).sum()
            grad_m.addmm_(e.t(), qf * (inv * bf)).index_add_(0, yc, qf * bf, alpha=-1)  # b G^T q (V, k)
            if want_bias:
                _add_grad_bias(grad_bias, e, inv, yc)
        ctx.save_for_backward(grad_q, grad_m, grad_a, grad_b, *([grad_bias] if want_bias else []))
        ctx.meta = (want_bias, m.dtype, a.shape, a.dtype, b.shape, b.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        want_bias, m_dtype, a_shape, a_dtype, b_shape, b_dtype, bias_dtype = ctx.meta
        gq, gm, ga, gb, *gbias = ctx.saved_tensors
        return (None, gq * grad_out.to(gq.dtype), (gm * grad_out).to(m_dtype),
                (ga * grad_out).reshape(a_shape).to(a_dtype), (gb * grad_out).reshape(b_shape).to(b_dtype), None,
                (gbias[0] * grad_out).to(bias_dtype) if want_bias else None, None, None)


def mix_applies(mix: LowRankMix, weight: torch.Tensor) -> bool:
    """Whether mix_cross_entropy can use the factors: a gradient is wanted (without one the plain loss is as
    cheap), the head is frozen (a trained head needs dL/dW = G^T h) and c needs no gradient of its own."""
    return torch.is_grad_enabled() and not weight.requires_grad and not mix.c.requires_grad


def mix_cross_entropy(mix: LowRankMix, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                      rows: int | None = None) -> torch.Tensor | None:
    """linear_cross_entropy of h = `mix` through a frozen head, from the factors; None where the factored
    form does not apply (`mix_applies`)."""
    if not mix_applies(mix, weight):
        return None
    rows = rows or chunk_rows(weight.shape[0])
    m = weight @ mix.proj.to(weight.dtype)  # M = W P (V, k)
    return _MixLinearCrossEntropy.apply(mix.c, mix.q, m, mix.a, mix.b, weight, bias, targets, rows)
