"""The QST side network and how it runs beside a frozen backbone (Zhang et al., ACL 2024, §3).

    h_f0 = the input of backbone layer 1 (embeddings)          s_0 = D_0(h_f0)
    h_fi = backbone layer i (h_f{i-1})    no gradient            s_i = g_i( (1 - β_i) ⊙ D_i(h_fi) + β_i ⊙ s_{i-1} )
    h    = α ⊙ h_fN + (1 - α) ⊙ U(norm(s_N))                   -> the backbone's own LM head / classifier

    backbone layer  f_1 ──> f_2 ──> ... ──> f_N ──> (final norm) ──┐
                     │D_1    │D_2            │D_N                  α-mix ──> head
    D_0(h_f0) ──> g_1 ──> g_2 ──> ... ──> g_N ──> norm ──> U ──────┘

g_i: the backbone's own layer class at width d/r (side/arch.py), HF-initialized at random (nothing is
copied from the backbone). D_i: a downsampler (side/downsample.py). β_i = σ(γ_i) per channel, γ_i = 0
(β = 0.5: the paper's zero-initialised gate, per channel as in the reference code). U: Linear(d/r -> d).
α starts at exactly 1, so at step 0 the model's output *equals* the backbone's (the paper's
convention; the reference code's σ(1) = 0.731 does not). Only the side network, D, γ, U and α train.
α is one scalar (`mix="scalar"`, the paper's equation) or one weight per channel (`"channel"`, the
reference code's `lm_head_z`, shape (d,)). A scalar α keeps h a frozen stream plus a low-rank one,
h = α h_fN + (1 - α) U q, which the chunked causal-LM loss uses to skip dL/dh = G W (memtune.linear_ce:
the head's second (N, V) x (V, d) matmul, as costly as its forward); a per-channel α needs it for dL/dα.

How it runs: hooks, registered here and removed by `remove()`; the backbone's modules are unchanged.
A pre-hook on backbone layer 1 computes s_0 and turns gradients off, so the backbone layers record no
graph and save nothing for backward; a hook after each layer i runs side step i with gradients back on
(each h_fi is consumed as it is produced; what the side keeps for backward is D_i's input, one
(B, T, d) tensor per layer, and its own 1/r-wide activations); the hook on the mixing point (the final
norm, or the last layer for post-LN encoders) returns h and restores the caller's gradient mode (also
after an exception, through a hook on the body that always runs). Side layers get the backbone
layer's own arguments (mask, positions, cache position), with RoPE recomputed at the side's head dim
and the side's own KV cache: one `DynamicCache` per backbone cache object, so generation caches both.
"""

from __future__ import annotations

import inspect
import weakref

import torch
from torch import nn

from ..linear_ce import LowRankMix, declare_mix
from .arch import MIN_HEAD_DIM, Family, backbone_layers, mix_module, side_config
from .downsample import downsampler

CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, value):
    return (value, *out[1:]) if isinstance(out, tuple) else value


class SideNetwork(nn.Module):
    """The trainable part of QST: side layers g_i, downsamplers D_0..D_N, gates γ, norm, U and α."""

    def __init__(self, backbone: nn.Module, fam: Family, r: int, downsample: str, rank: int,
                 mix: str = "scalar", min_head_dim: int = MIN_HEAD_DIM) -> None:
        super().__init__()
        cfg = backbone.config
        d = getattr(cfg, fam.hidden)
        self.config = side_config(cfg, r, fam, min_head_dim)
        ds = getattr(self.config, fam.hidden)
        layers = backbone_layers(backbone, fam)
        n = len(layers)
        self.layers = nn.ModuleList(type(layer)(self.config, layer_idx=i) for i, layer in enumerate(layers))
        self.down = nn.ModuleList(downsampler(downsample, d, ds, rank) for _ in range(n + 1))
        self.gates = nn.Parameter(torch.zeros(n, ds))  # γ_i; β_i = σ(γ_i)
        final = mix_module(backbone, fam)
        eps = getattr(final, "variance_epsilon", getattr(final, "eps", 1e-5))
        self.norm = type(final)(ds, eps=eps) if final is not None else nn.Identity()
        self.up = nn.Linear(ds, d, bias=False)  # U
        self.alpha = nn.Parameter(torch.ones(1 if mix == "scalar" else d))  # α = 1: the backbone's output exactly
        self.rotary = None
        if fam.rotary is not None:
            rotary = backbone.base_model.get_submodule(fam.rotary)
            self.rotary = type(rotary)(config=self.config)
        for module in (self.layers, self.norm):
            module.apply(backbone._init_weights)  # transformers' own random init for these classes

    def gate(self, i: int, backbone_h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """(1 - β_i) ⊙ D_{i+1}(h_fi) + β_i ⊙ s, β_i = σ(γ_i). h (B, T, d), s (B, T, d/r)."""
        beta = torch.sigmoid(self.gates[i])  # (d/r,)
        return (1 - beta) * self.down[i + 1](backbone_h.to(beta.dtype)) + beta * s

    def mix(self, backbone_h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """α ⊙ h_fN + (1 - α) ⊙ U(norm(s_N)), in the backbone's dtype. (B, T, d)

        With a scalar α the result is declared to memtune.linear_ce as a·c + b·q U^T (c = h_fN, q =
        norm(s_N), a = α, b = 1 - α), so a causal-LM loss through a frozen head can skip dL/dh."""
        q = self.norm(s)  # (B, T, d/r)
        a = self.alpha
        h_f = backbone_h.to(a.dtype)
        h = (a * h_f + (1 - a) * self.up(q)).to(backbone_h.dtype)
        if a.numel() == 1 and torch.is_grad_enabled() and not h_f.requires_grad:
            declare_mix(h, LowRankMix(a, backbone_h, 1 - a, q, self.up.weight))
        return h


class SideRunner:
    """Runs a SideNetwork beside `backbone` through hooks (see the module docstring)."""

    def __init__(self, backbone: nn.Module, side: SideNetwork, fam: Family) -> None:
        self.side = side
        layers = backbone_layers(backbone, fam)
        self.n = len(layers)
        self._sig = inspect.signature(layers[0].forward)
        self._caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._active = False
        self._grad = True
        self._s: torch.Tensor | None = None
        self._kwargs: dict = {}
        mix = mix_module(backbone, fam)
        h = [layers[0].register_forward_pre_hook(self._begin, with_kwargs=True)]
        for i, layer in enumerate(layers):
            h.append(layer.register_forward_hook(self._after_layer(i, last_mixes=mix is None)))
        if mix is not None:
            h.append(mix.register_forward_hook(self._mix_hook))
        h.append(backbone.base_model.register_forward_hook(self._end_always, always_call=True))
        self.handles = h

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    # -- one forward -------------------------------------------------------------------------
    def _begin(self, layer, args, kwargs):
        bound = self._sig.bind(*args, **kwargs)
        named = {}
        for name, value in bound.arguments.items():
            if self._sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)  # **kwargs the layer forwards (e.g. cache_position)
            else:
                named[name] = value
        first = next(iter(self._sig.parameters))
        h0 = named.pop(first)  # (B, T, d): the embeddings as the first layer sees them
        for key in CACHE_ARGS:
            if named.get(key) is not None:
                named[key] = self._side_cache(named[key])
        self._grad = torch.is_grad_enabled()
        s0 = self.side.down[0](h0.to(self.side.alpha.dtype))  # (B, T, d/r)
        if self.side.rotary is not None:  # RoPE at the side's head dim, for the same positions
            pos = named.get("position_ids")
            if pos is None:
                start = named["cache"].get_seq_length() if named.get("cache") is not None else 0
                pos = torch.arange(start, start + h0.shape[1], device=h0.device)[None]
            named["position_embeddings"] = self.side.rotary(s0, pos)
        self._s, self._kwargs, self._active = s0, named, True
        torch.set_grad_enabled(False)  # the backbone records no graph

    def _side_cache(self, backbone_cache):
        from transformers import DynamicCache

        side = self._caches.get(backbone_cache)
        if side is None:
            side = self._caches[backbone_cache] = DynamicCache()
        return side

    def _after_layer(self, i: int, last_mixes: bool):
        def hook(layer, args, out):
            if not self._active:
                return None
            h = _first(out)
            with torch.set_grad_enabled(self._grad):
                self._s = _first(self.side.layers[i](self.side.gate(i, h, self._s), **self._kwargs))
            return _replace_first(out, self._finish(h)) if last_mixes and i == self.n - 1 else None

        return hook

    def _mix_hook(self, module, args, out):
        return _replace_first(out, self._finish(_first(out))) if self._active else None

    def _finish(self, h: torch.Tensor) -> torch.Tensor:
        """The mixed output h, with the caller's gradient mode restored (the backbone is done)."""
        with torch.set_grad_enabled(self._grad):
            mixed = self.side.mix(h, self._s)
        self._end()
        return mixed

    def _end(self) -> None:
        torch.set_grad_enabled(self._grad)
        self._active, self._s, self._kwargs = False, None, {}

    def _end_always(self, module, args, out):
        if self._active:  # the mixing point never ran (an exception): restore the caller's mode
            self._end()
        return None
