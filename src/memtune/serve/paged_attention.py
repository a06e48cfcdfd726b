"""Attention over the page pool, plugged in through transformers' attention-function registry.

The engine runs the HF model unchanged on a packed batch (1, T): every sequence's new tokens one after
another, with their true positions in `position_ids` (so RoPE is right). The model computes q, k, v
and calls the registered function "memtune_paged" with the step's `PagedStep` (passed as a forward
kwarg, which transformers hands to the attention function). Per layer it

  1. writes the new keys / values into their pages:   page = table[pos // page_tokens], slot = pos % page_tokens
  2. attends each sequence's queries to its cached keys (positions 0 .. pos):
       decode (one new token): all such sequences in one SDPA call over their pages, gathered whole by
                               page table (B, pages) and masked past each length (a page gather is
                               about 3x cheaper on CPU than gathering token by token)
       prefill (many tokens):  one SDPA call per sequence, causal with the offset of its cached prefix

Inputs from the model: query (1, H, T, hd), key / value (1, kv_heads, T, hd) after RoPE; returns
(1, T, H, hd) as every transformers attention function does. No transformers mask is built for a
registered function outside its mask registry, so none is read here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .pool import PagePool

NAME = "memtune_paged"


@dataclass
class PagedStep:
    pool: PagePool
    write_page: torch.Tensor  # (T,) long: the page of each new token
    write_slot: torch.Tensor  # (T,) long: its slot in the page
    prefills: list[tuple[int, int, torch.Tensor, int]]  # (start, end, its pages (n_pages,), length) per sequence
    decode_rows: torch.Tensor | None  # (B,) rows of the decode tokens in the packed batch
    decode_pages: torch.Tensor | None  # (B, n_pages) page tables, padded with page 0
    decode_mask: torch.Tensor | None  # (B, 1, 1, n_pages * page_tokens) True where a position is real


def paged_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                    scaling: float | None = None, dropout: float = 0.0, memtune_step: PagedStep | None = None,
                    **kwargs) -> tuple[torch.Tensor, None]:
    step = memtune_step
    if step is None:
        raise RuntimeError("memtune_paged attention runs only inside the serving engine's forward")
    k_pages, v_pages = step.pool.layer_kv(module.layer_idx)  # (P, page_tokens, kv_heads, hd) each
    k_new, v_new = key[0].transpose(0, 1), value[0].transpose(0, 1)  # (T, kv_heads, hd)
    k_pages[step.write_page, step.write_slot] = k_new.to(k_pages.dtype)
    v_pages[step.write_page, step.write_slot] = v_new.to(v_pages.dtype)
    q = query[0]  # (H, T, hd)
    out = torch.empty(q.shape[1], q.shape[0], q.shape[2], dtype=q.dtype, device=q.device)  # (T, H, hd)
    gqa = q.shape[0] != key.shape[1]
    kvh, hd = k_pages.shape[2], k_pages.shape[3]
    for start, end, pages, length in step.prefills:
        keys = k_pages[pages].view(-1, kvh, hd)[:length].transpose(0, 1).unsqueeze(0)  # (1, kv_heads, L, hd)
        vals = v_pages[pages].view(-1, kvh, hd)[:length].transpose(0, 1).unsqueeze(0)
        n = end - start
        qs = q[:, start:end].unsqueeze(0)  # (1, H, n, hd)
        if n == length:  # no cached prefix: plain causal
            o = F.scaled_dot_product_attention(qs, keys.to(q.dtype), vals.to(q.dtype), is_causal=True,
                                               scale=scaling, enable_gqa=gqa)
        else:  # query i sits at position length - n + i and sees positions <= it
            pos_q = torch.arange(length - n, length, device=q.device)[:, None]
            mask = torch.arange(length, device=q.device)[None, :] <= pos_q  # (n, L)
            o = F.scaled_dot_product_attention(qs, keys.to(q.dtype), vals.to(q.dtype), attn_mask=mask,
                                               scale=scaling, enable_gqa=gqa)
        out[start:end] = o[0].transpose(0, 1)
    if step.decode_rows is not None:
        b = step.decode_pages.shape[0]
        keys = k_pages[step.decode_pages].view(b, -1, kvh, hd).transpose(1, 2)  # (B, kv_heads, Lmax, hd)
        vals = v_pages[step.decode_pages].view(b, -1, kvh, hd).transpose(1, 2)
        qd = q[:, step.decode_rows].transpose(0, 1).unsqueeze(2)  # (B, H, 1, hd)
        o = F.scaled_dot_product_attention(qd, keys.to(q.dtype), vals.to(q.dtype), attn_mask=step.decode_mask,
                                           scale=scaling, enable_gqa=gqa)  # (B, H, 1, hd)
        out[step.decode_rows] = o[:, :, 0]
    return out.unsqueeze(0), None


def register() -> str:
    """Register the function under NAME (idempotent) and return the name for set_attn_implementation."""
    AttentionInterface.register(NAME, paged_attention)
    return NAME
