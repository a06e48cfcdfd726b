"""TokenTune (Simoulin et al., EMNLP 2024): backprop through a random subset of tokens.

Each training example's tokens are split into a selected set S (k tokens, drawn uniformly per
example per step; BOS/[CLS] and, for causal LMs, the last token always in S) and the rest U. The
forward is exact (same outputs as the dense model), but only S carries gradient:

    per-token modules (norms, Q/K/V/O, MLPs, LM head):  f(x_S) with grad,  f(x_U) under no_grad
    attention:  out_S = softmax(Q_S [K_U; K_S]^T / sqrt(d) + M_S) [V_U; V_S]    (K_U, V_U constants)
                out_U = the same for Q_U, under no_grad
    loss:       on S positions only

so autograd keeps O(|S|) activations per layer plus the U keys/values, instead of O(L).

How it is built (one mechanism for Llama/Mistral, OPT, GPT-2 and BERT, from the models' own modules):

* The batch is permuted so each example reads [U | S] (causal LMs; the last real token then stays
  rightmost) or [S | U] (encoders; [CLS] stays first), each stream padded to the batch maximum.
  Every token keeps its original position id, and a 4D mask built from the original positions
  (causal where the model is causal) replaces the model's own, so the permutation changes nothing.
* Forward hooks (the `nn.Module` hook API, no module replacement, so parameter names do not
  change) on every maximal per-token module split its (B, W, ...) inputs at the stream boundary,
  run the S part normally and the U part under no_grad, and concatenate.
* A registered transformers attention function ("memtune_tokentune") computes S queries and U
  queries separately (the latter under no_grad). Outside TokenTune's training forward it defers to
  the model's configured implementation, so evaluation uses the full, unmodified model.

Labels: causal-LM targets are moved with their tokens (column j+1 holds the next-token target of
the token in column j, as the loss's one-step shift expects) and exist only for S tokens.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data import IGNORE
from ..errors import ConfigError
from ..tasks import Task

ATTN_NAME = "memtune_tokentune"
SAMPLE_SEED = "sample_seed"  # batch key: (B,) int64 per-example seeds, set by the trainer


@dataclass
class TokenTuneConfig:
    """`tokentune:` section (absent = every token carries gradient)."""

    select: float = 16  # > 1: tokens per example (an integer count); <= 1: fraction of each example's tokens
    always_first: bool = True  # BOS / [CLS] always selected
    always_last: bool | None = None  # last real token always selected; None = yes for causal LMs
    # rebuild the selected rows' attention (mask, softmax) in backward instead of keeping it: saves
    # B*k*L mask bytes plus the S outputs per layer, costs one more S-row attention forward
    recompute_attention: bool = True

    def check(self, prefix: str) -> None:
        if self.select <= 0:
            raise ConfigError(f"{prefix}.select: expected a count > 1 or a fraction in (0, 1], got {self.select}")
        if self.select > 1 and not float(self.select).is_integer():
            raise ConfigError(f"{prefix}.select: a count must be an integer, got {self.select}")


# ------------------------------------------------------------------------------------------------
# Selection


def select_tokens(attention_mask: torch.Tensor, select: float, always_first: bool, always_last: bool,
                  generator: torch.Generator | None = None, seeds: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) bool mask of selected positions; padding is never selected.

    Per example with L real tokens: n = min(L, k) for a count k, max(1, floor(p * L)) for a
    fraction p; the always-selected tokens count towards n; the rest are drawn uniformly without
    replacement from the remaining real positions. `seeds` (B,): each example's draw from its own
    generator (the trainer's per-example `sample_seed`), so an example's selection does not depend on
    the batch, padding or rank it is in; otherwise one (B, T) draw from `generator`.
    """
    valid = attention_mask.bool()
    lengths = valid.sum(1)  # (B,)
    B, T = valid.shape
    sel = torch.zeros(B, T, dtype=torch.bool, device=valid.device)
    if seeds is not None:
        scores = torch.zeros(B, T)
        for b, L in enumerate(lengths.tolist()):
            scores[b, :L] = torch.rand(L, generator=torch.Generator().manual_seed(int(seeds[b])))
        scores = scores.to(valid.device)
    else:
        scores = torch.rand(B, T, generator=generator, device="cpu").to(valid.device)
    for b in range(B):
        L = int(lengths[b])
        if L == 0:
            continue
        n = min(L, int(select)) if select > 1 else max(1, math.floor(select * L))
        forced = ([0] if always_first else []) + ([L - 1] if always_last and L > 1 else [])
        forced = sorted(set(forced))[:max(n, 1)]
        sel[b, forced] = True
        rest = n - len(forced)
        if rest > 0:
            s = scores[b, :L].clone()
            s[forced] = -1.0  # never re-draw a forced position
            sel[b, s.topk(rest).indices] = True
    return sel


# ------------------------------------------------------------------------------------------------
# Layout: the permuted batch


@dataclass
class Layout:
    """Where each column of the permuted batch comes from.

    index (B, W): original position of each column (0 for padding columns); valid (B, W);
    grad_slice / const_slice: the column ranges of S and U; causal: keys after a query (in the
    original order) are masked.
    """

    index: torch.Tensor
    valid: torch.Tensor
    grad_slice: slice
    const_slice: slice
    grad_first: bool
    causal: bool
    recompute_attention: bool = True
    _last_split: tuple | None = None  # per-forward cache, see split()

    @property
    def width(self) -> int:
        return self.index.shape[1]

    def allowed(self, rows: slice) -> torch.Tensor:
        """(B, 1, R, W) bool, True = query column q (in `rows`) may attend to key column k.

        Key k must be a real token and, when causal, not after q in the original order. Padding
        queries see themselves, so no row is fully masked (their outputs are never used).
        """
        pos, ok = self.index, self.valid
        q_pos = pos[:, rows]  # (B, R)
        allowed = ok[:, None, :].expand(-1, q_pos.shape[1], -1)  # (B, R, W)
        if self.causal:
            allowed = allowed & (pos[:, None, :] <= q_pos[:, :, None])
        cols = torch.arange(self.width, device=pos.device)[rows]  # (R,)
        own = cols[:, None] == torch.arange(self.width, device=pos.device)[None, :]  # (R, W)
        allowed = allowed | (own[None] & ~ok[:, rows, None])
        return allowed[:, None]

    def additive_mask(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """allowed(rows) as an additive (B, 1, R, W) mask: 0 where allowed, -inf elsewhere."""
        return torch.zeros((), dtype=dtype, device=self.index.device).masked_fill(~self.allowed(rows), float("-inf"))

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, W, ...) -> the S and U columns, contiguous (GPT-2's Conv1D views its input).

        Consecutive calls on the same tensor (Q, K and V projections of one hidden state) share one
        copy, so autograd keeps one saved input instead of three.
        """
        last = self._last_split
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2], last[3]
        g, c = x[:, self.grad_slice].contiguous(), x[:, self.const_slice].contiguous()
        self._last_split = (x, x._version, g, c)
        return g, c

    def merge(self, grad_part: torch.Tensor, const_part: torch.Tensor, dim: int = 1) -> torch.Tensor:
        parts = (grad_part, const_part) if self.grad_first else (const_part, grad_part)
        return torch.cat(parts, dim=dim)


def _streams(sel: torch.Tensor, valid: torch.Tensor, causal: bool) -> Layout:
    """Columns [S | U] (encoders) or [U | S] (causal), each stream right-padded to its batch maximum.

    Causal layouts get one extra pad column after S, so the last selected token's target has a slot
    after the loss's one-step shift.
    """
    grad_first, extra = not causal, 1 if causal else 0
    B, T = sel.shape
    s_idx = [torch.nonzero(sel[b] & valid[b]).flatten() for b in range(B)]
    u_idx = [torch.nonzero(~sel[b] & valid[b]).flatten() for b in range(B)]
    ws = max(int(x.numel()) for x in s_idx)
    wu = max(int(x.numel()) for x in u_idx)
    width = ws + wu + extra
    index = torch.zeros(B, width, dtype=torch.long, device=sel.device)
    ok = torch.zeros(B, width, dtype=torch.bool, device=sel.device)
    s0, u0 = (0, ws) if grad_first else (wu, 0)
    for b in range(B):
        index[b, s0:s0 + s_idx[b].numel()] = s_idx[b]
        ok[b, s0:s0 + s_idx[b].numel()] = True
        index[b, u0:u0 + u_idx[b].numel()] = u_idx[b]
        ok[b, u0:u0 + u_idx[b].numel()] = True
    grad_slice = slice(s0, s0 + ws)
    const_slice = slice(u0, u0 + wu)
    if not grad_first:  # the extra columns sit after S and belong to the gradient stream
        grad_slice = slice(s0, width)
    return Layout(index, ok, grad_slice, const_slice, grad_first, causal)


def permute_batch(batch: dict, sel: torch.Tensor, causal: bool, pad_id: int) -> tuple[dict, Layout]:
    """The batch reordered into streams, with original positions and a 4D mask built from them."""
    valid = batch["attention_mask"].bool()
    # causal: one extra column so the last selected token's target has a slot after the shift
    layout = _streams(sel, valid, causal)
    idx, ok = layout.index, layout.valid
    gather = lambda t, fill: torch.where(ok, torch.gather(t, 1, idx), torch.full_like(idx, fill))  # noqa: E731
    out = {"input_ids": gather(batch["input_ids"], pad_id), "position_ids": torch.where(ok, idx, 0)}
    if "token_type_ids" in batch:
        out["token_type_ids"] = gather(batch["token_type_ids"], 0)
    out["attention_mask"] = layout.allowed(slice(0, layout.width))  # (B, 1, W, W) bool, True = attend
    if "labels" in batch:
        # target of the token in column j = labels[pos_j + 1]; stored at column j + 1 for the loss's shift
        labels = batch["labels"]
        nxt = torch.clamp(idx + 1, max=labels.shape[1] - 1)
        target = torch.where(ok & (idx + 1 < labels.shape[1]), torch.gather(labels, 1, nxt), IGNORE)
        in_grad = torch.zeros_like(ok)
        in_grad[:, layout.grad_slice] = True
        target = torch.where(in_grad & ok, target, IGNORE)
        shifted = torch.full_like(target, IGNORE)
        shifted[:, 1:] = target[:, :-1]
        out["labels"] = shifted
    if "label" in batch:
        out["label"] = batch["label"]
    return out, layout


# ------------------------------------------------------------------------------------------------
# The active layout, per-token hooks and the attention function


class _State:
    layout: Layout | None = None
    fallback: dict[int, str] = {}  # id(config) -> the model's own attention implementation


_STATE = _State()


def active_valid() -> torch.Tensor | None:
    """(B, W) real-token mask of the permuted streams being run, or None outside a two-stream forward
    (what a pooler over the sequence needs; memtune.pooling)."""
    return _STATE.layout.valid if _STATE.layout is not None else None


@contextlib.contextmanager
def active(layout: Layout):
    prev, _STATE.layout = _STATE.layout, layout
    try:
        yield
    finally:
        _STATE.layout = prev
        layout._last_split = None  # drop the per-forward cache


PER_TOKEN_LEAVES = (nn.Linear, nn.LayerNorm, nn.Dropout, nn.Identity)


def _is_attention(m: nn.Module) -> bool:
    return "Attention" in type(m).__name__


def _is_per_token(m: nn.Module) -> bool:
    """Modules that act on each token independently (so U and S can be computed apart)."""
    if _is_attention(m) or isinstance(m, nn.Embedding):
        return False
    children = list(m.children())
    if children:
        return all(_is_per_token(c) for c in children)
    name = type(m).__name__
    return (isinstance(m, PER_TOKEN_LEAVES) or name == "Conv1D" or name.endswith("RMSNorm")
            or getattr(m, "is_quantized_linear", False)
            or type(m).__module__ in ("transformers.activations", "torch.nn.modules.activation"))


def per_token_modules(model: nn.Module, head: nn.Module | None) -> list[tuple[str, nn.Module]]:
    """Maximal per-token modules of the backbone (poolers excluded: they read one token), plus `head`."""
    found: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, m: nn.Module) -> None:
        for name, child in m.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if child is head or "pooler" in name:
                continue
            if _is_per_token(child):
                found.append((full, child))
            else:
                walk(full, child)

    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, model)
    walk(prefix if backbone is not model else "", backbone)
    if head is not None:
        found.append(("head", head))
    return found


def _split(x, layout: Layout):
    if isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[1] == layout.width:
        return layout.split(x)
    return x, x


def _pre_hook(module, args, kwargs):
    layout = _STATE.layout
    if layout is None:
        return None
    pairs = [_split(a, layout) for a in args]
    kpairs = {k: _split(v, layout) for k, v in kwargs.items()}
    if not any(g is not c for g, c in pairs + list(kpairs.values())):
        module._tokentune_const = None
        return None
    module._tokentune_const = ([c for _, c in pairs], {k: c for k, (_, c) in kpairs.items()})
    return tuple(g for g, _ in pairs), {k: g for k, (g, _) in kpairs.items()}


def _post_hook(module, args, kwargs, output):
    const = getattr(module, "_tokentune_const", None)
    if const is None:
        return None
    module._tokentune_const = None
    with torch.no_grad():
        out_const = module.forward(*const[0], **const[1])
    return _STATE.layout.merge(output, out_const, dim=1)


def tokentune_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    """query (B, H, W, D); key/value (B, Hkv, W, D) -> (B, W, H, D), None."""
    layout = _STATE.layout
    if layout is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        name = _STATE.fallback.get(id(module.config), "sdpa")
        return ALL_ATTENTION_FUNCTIONS[name](module, query, key, value, attention_mask, dropout=dropout,
                                             scaling=scaling, **kwargs)
    # The mask comes from the layout (the same one permute_batch gave the model), built per call.
    gqa = query.shape[1] != key.shape[1]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: slice) -> torch.Tensor:
        mask = layout.additive_mask(rows, q.dtype)  # (B, 1, R, W)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                              enable_gqa=gqa)

    # a contiguous copy of the S rows: a view would keep the whole (B, H, W, D) query alive for backward
    q_grad = query[:, :, layout.grad_slice].contiguous()
    if layout.recompute_attention:
        # keep only q_S, K, V; the mask, output and softmax statistics are rebuilt in backward
        out_grad = checkpoint(attend, q_grad, key, value, layout.grad_slice, use_reentrant=False)
    else:
        out_grad = attend(q_grad, key, value, layout.grad_slice)
    with torch.no_grad():
        out_const = attend(query[:, :, layout.const_slice], key, value, layout.const_slice)
    return layout.merge(out_grad, out_const, dim=2).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ATTN_NAME not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(ATTN_NAME, tokentune_attention)
        # outside a TokenTune forward the model builds its usual (sdpa-style) mask
        ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


# ------------------------------------------------------------------------------------------------
# The recipe piece


class TokenTune:
    """Installs the two-stream forward on a model and wraps a task so training uses it."""

    def __init__(self, config: TokenTuneConfig, model: nn.Module, pad_id: int, task_name: str) -> None:
        self.config = config
        self.model = model
        self.pad_id = pad_id
        self.causal = any(getattr(m, "is_causal", False) for m in model.modules() if _is_attention(m))
        self.always_last = self.causal if config.always_last is None else config.always_last
        head = model.get_output_embeddings() if task_name == "causal-lm" else None
        self.modules = per_token_modules(model, head)
        _register_attention()
        impl = model.config._attn_implementation
        _STATE.fallback[id(model.config)] = "sdpa" if impl in (None, "eager", ATTN_NAME) else impl
        model.set_attn_implementation(ATTN_NAME)
        self.handles = []
        for _, m in self.modules:
            self.handles.append(m.register_forward_pre_hook(_pre_hook, with_kwargs=True))
            self.handles.append(m.register_forward_hook(_post_hook, with_kwargs=True))

    def select(self, batch: dict) -> torch.Tensor:
        return select_tokens(batch["attention_mask"], self.config.select, self.config.always_first,
                             self.always_last, seeds=batch.get(SAMPLE_SEED))

    def prepare(self, batch: dict, sel: torch.Tensor | None = None) -> tuple[dict, Layout]:
        new_batch, layout = permute_batch(batch, self.select(batch) if sel is None else sel, self.causal, self.pad_id)
        layout.recompute_attention = self.config.recompute_attention
        return new_batch, layout

    def wrap(self, task: Task) -> Task:
        return TokenTuneTask(task, self)

    def describe(self) -> dict:
        c = self.config
        return {"select": int(c.select) if c.select > 1 else c.select,
                "mode": "count" if c.select > 1 else "fraction", "always_first": c.always_first,
                "always_last": self.always_last, "recompute_attention": c.recompute_attention, "layout": "[U|S]" if self.causal else "[S|U]",
                "per_token_modules": len(self.modules)}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.model.set_attn_implementation(_STATE.fallback.get(id(self.model.config), "sdpa"))


class TokenTuneTask(Task):
    """A task whose training forward runs the two streams; evaluation (model.eval()) is unchanged."""

    KEY = "_tokentune"

    def __init__(self, task: Task, tt: TokenTune) -> None:
        self.task, self.tt = task, tt
        self.name = task.name
        self.eval_stats = task.eval_stats

    def _prepared(self, batch: dict) -> tuple[dict, Layout] | None:
        if not self.tt.model.training:
            return None
        if self.KEY not in batch:  # selection is drawn once per micro-batch, shared by count and loss
            batch[self.KEY] = self.tt.prepare(batch)
        return batch[self.KEY]

    def count(self, batch: dict) -> int:
        prepared = self._prepared(batch)
        return self.task.count(prepared[0] if prepared else batch)

    def tokens(self, batch: dict) -> int:
        return self.task.tokens({k: v for k, v in batch.items() if k != self.KEY})

    def loss_sum(self, model: nn.Module, batch: dict):
        prepared = self._prepared(batch)
        if prepared is None:
            return self.task.loss_sum(model, batch)
        new_batch, layout = prepared
        with active(layout):
            return self.task.loss_sum(model, new_batch)

    def finish_eval(self, total: float, count: int, stats: dict) -> dict:
        return self.task.finish_eval(total, count, stats)
