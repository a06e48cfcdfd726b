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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data import IGNORE
from ..errors import ConfigError, ModelError
from ..tasks import Task, fused_head

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
    if seeds is not None:
        scores = torch.zeros(B, T)
        for b, L in enumerate(lengths.tolist()):  # one generator per example: its own seed, its own draw
            scores[b, :L] = torch.rand(L, generator=torch.Generator().manual_seed(int(seeds[b])))
        scores = scores.to(valid.device)
    else:
        scores = torch.rand(B, T, generator=generator, device="cpu").to(valid.device)
    # n (B,): the number selected; float64 so floor(p * L) is Python's
    n = lengths.clamp(max=int(select)) if select > 1 else (lengths.double() * select).floor().long().clamp(min=1)
    n = torch.where(lengths > 0, n, 0)
    # one ranking per row, all rows at once: forced tokens on top (first above last, so n = 1 keeps
    # the first), then the uniform scores, then everything outside [0, L)
    pos = torch.arange(T, device=valid.device)
    inside = pos[None, :] < lengths[:, None]  # (B, T)
    scores = torch.where(inside, scores, -1.0)
    if always_last:
        scores = torch.where((pos[None, :] == lengths[:, None] - 1) & (lengths[:, None] > 1), 2.0, scores)
    if always_first:
        scores[:, 0] = torch.where(lengths > 0, 3.0, scores[:, 0])
    order = scores.argsort(dim=1, descending=True, stable=True)  # (B, T)
    rank = torch.empty_like(order).scatter_(1, order, pos.expand(B, T).contiguous())
    return rank < n[:, None]


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
    _last_split: tuple | None = None  # per-forward caches, see split() and merge()
    _last_merge: tuple | None = None
    length: int = 0  # T, the original batch's sequence length
    _masks: dict | None = None  # (rows, dtype) -> attention blocks, see attention_blocks()
    _inverse: torch.Tensor | None = None  # (B, T), see to_positions()
    attention_calls: int = 0  # layers whose attention ran through tokentune_attention in this forward

    @property
    def width(self) -> int:
        return self.index.shape[1]

    def _present(self) -> torch.Tensor:
        """(B, T) bool: original position p holds a real token. An example of padding only gets p = 0,
        so no query row is ever fully masked."""
        B, T = self.index.shape[0], self.length
        where = torch.where(self.valid, self.index, T)
        present = torch.zeros(B, T + 1, dtype=torch.bool, device=self.index.device).scatter_(1, where, True)[:, :T]
        present[~present.any(1), 0] = True
        return present

    def to_positions(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, D) in layout columns -> (B, H, T, D) in original positions (padding positions read
        column 0; they are masked as keys). Attention reads keys and values in this order, where
        the keys a block of queries can see are a prefix (attention_blocks)."""
        if self._inverse is None:
            B, T = self.index.shape[0], self.length
            cols = torch.arange(self.width, device=self.index.device).expand(B, -1)
            where = torch.where(self.valid, self.index, T)
            inv = torch.zeros(B, T + 1, dtype=torch.long, device=self.index.device).scatter_(1, where, cols)
            self._inverse = inv[:, :T]  # (B, T): the column of each original position
        # advanced indexing, not gather: gather's backward keeps its whole input alive, indexing's keeps
        # only the (B, T) indices
        rows = torch.arange(x.shape[0], device=x.device)[:, None]  # (B, 1)
        return x.transpose(1, 2)[rows, self._inverse].transpose(1, 2).contiguous()  # (B, T, H, D) -> (B, H, T, D)

    def attention_blocks(self, rows: slice) -> list[tuple[slice, int, torch.Tensor]]:
        """The attention of query columns `rows` as blocks of rows, each over only the keys it can see.

        Keys are in original position order (to_positions), so a block of queries whose latest
        position is P (over the batch) sees keys [0, P] only: a prefix, read as a view. Splitting R
        causal rows into n blocks computes about (n+1)/(2n) of the R x T scores instead of all of
        them (profile, tiny-llama 512x4, 25%: attention computing every key for every query was 40%
        of the step; SDPA's CPU and GPU kernels skip masked blocks only for is_causal, which a
        subset of queries cannot use). Each block: (query rows relative to `rows`, number of keys,
        bool mask (B, 1, r or 1, keys), True = may attend).

        Built once per forward and shared by every layer (profile: rebuilding the masks per layer and
        again in each recomputation was 13% of the step); kept as bool (a byte per score; the float
        form SDPA takes is made per call, one block at a time). The S rows' blocks are kept for the
        backward's recomputation, the U rows' are dropped when the forward ends (release_forward).
        """
        key = (rows.start, rows.stop)
        self._masks = self._masks if self._masks is not None else {}
        if key in self._masks:
            return self._masks[key]
        present = self._present()  # (B, T)
        R, T = rows.stop - rows.start, self.length
        if not self.causal:  # every query sees every real key: one row, broadcast
            self._masks[key] = [(slice(0, R), T, present[:, None, None, :])]
            return self._masks[key]
        n = max(1, min(8, R // 64))
        # padding queries stand at position 0, which is always present: no row is ever empty
        q_pos = torch.where(self.valid[:, rows], self.index[:, rows], 0)  # (B, R)
        p = torch.arange(T, device=self.index.device)
        blocks = []
        for i in range(n):
            r0, r1 = i * R // n, (i + 1) * R // n
            keys = int(q_pos[:, r0:r1].max()) + 1
            causal = p[None, None, None, :keys] <= q_pos[:, None, r0:r1, None]  # (B, 1, r, keys)
            blocks.append((slice(r0, r1), keys, causal & present[:, None, None, :keys]))
        self._masks[key] = blocks
        return blocks

    def release_forward(self) -> None:
        """Drop what only the forward needs: the split/merge caches and the U rows' masks."""
        self._last_split = self._last_merge = None
        grad = (self.grad_slice.start, self.grad_slice.stop)
        self._masks = {k: v for k, v in (self._masks or {}).items() if k[:2] == grad}

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, W, ...) -> the S and U columns, contiguous (GPT-2's Conv1D views its input).

        Consecutive calls on the same tensor (Q, K and V projections of one hidden state) share one
        copy, so autograd keeps one saved input instead of three.

        The output of the last merge() (or a same-shaped view of it, as (B, W, H, D) -> (B, W, H*D))
        splits back into the parts it was made of, without a copy: a per-token module's output that
        feeds the next per-token module (norm -> Q/K/V, attention -> O, norm -> MLP) is never
        re-sliced. Gradients are the same: the merged tensor was only their concatenation.
        """
        last = self._last_split
        if last is not None and last[0] is x and last[1] == x._version:
            return last[2], last[3]
        merged = self._last_merge
        if (merged is not None and merged[1] == x._version and x.data_ptr() == merged[0].data_ptr()
                and x.dtype == merged[0].dtype and x.numel() == merged[0].numel()
                and x.shape[:2] == merged[0].shape[:2] and x.is_contiguous()):
            rest = x.shape[2:]
            g, c = (merged[2].reshape(*merged[2].shape[:2], *rest), merged[3].reshape(*merged[3].shape[:2], *rest))
        else:
            g, c = x[:, self.grad_slice].contiguous(), x[:, self.const_slice].contiguous()
        self._last_split = (x, x._version, g, c)
        return g, c

    def merge(self, grad_part: torch.Tensor, const_part: torch.Tensor) -> torch.Tensor:
        """(B, Ws, ...) and (B, Wu, ...) -> (B, W, ...) in the layout's column order."""
        parts = (grad_part, const_part) if self.grad_first else (const_part, grad_part)
        out = torch.cat(parts, dim=1)
        self._last_merge = (out, out._version, grad_part, const_part)
        return out


def _streams(sel: torch.Tensor, valid: torch.Tensor, causal: bool) -> Layout:
    """Columns [S | U] (encoders) or [U | S] (causal), each stream right-padded to its batch maximum.

    Causal layouts get one extra pad column after S, so the last selected token's target has a slot
    after the loss's one-step shift.
    """
    grad_first, extra = not causal, 1 if causal else 0
    in_s, in_u = sel & valid, ~sel & valid  # (B, T)

    def packed(members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) bool -> each row's member positions in ascending order, left-packed, (B, w) index and
        (B, w) validity, w = the batch's largest count. A stable sort on 'not a member' does it."""
        counts = members.sum(1)
        w = int(counts.max()) if members.numel() else 0
        order = (~members).to(torch.uint8).argsort(dim=1, stable=True)[:, :w]
        ok = torch.arange(w, device=members.device)[None, :] < counts[:, None]
        return torch.where(ok, order, 0), ok

    (s_index, s_ok), (u_index, u_ok) = packed(in_s), packed(in_u)
    ws, wu = s_index.shape[1], u_index.shape[1]
    pad = torch.zeros(sel.shape[0], extra, dtype=torch.long, device=sel.device)
    if grad_first:  # [S | U]
        index, ok = torch.cat([s_index, u_index], 1), torch.cat([s_ok, u_ok], 1)
        grad_slice, const_slice = slice(0, ws), slice(ws, ws + wu)
    else:  # [U | S | extra]: the extra columns belong to the gradient stream
        index, ok = torch.cat([u_index, s_index, pad], 1), torch.cat([u_ok, s_ok, pad.bool()], 1)
        grad_slice, const_slice = slice(wu, wu + ws + extra), slice(0, wu)
    return Layout(index, ok, grad_slice, const_slice, grad_first, causal, length=sel.shape[1])


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
    # (B, 1, W, W), an expanded view of the real-token columns: transformers passes a 4D mask through
    # untouched, and TokenTune's attention function builds its own (attention_blocks); the forward
    # checks that every attention layer went through it (TokenTuneTask.loss_sum)
    out["attention_mask"] = ok[:, None, None, :].expand(-1, 1, layout.width, -1)
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
        layout.release_forward()


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
    return _STATE.layout.merge(output, out_const)


def tokentune_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                        scaling: float | None = None, **kwargs):
    """query (B, H, W, D); key/value (B, Hkv, W, D) -> (B, W, H, D), None."""
    layout = _STATE.layout
    if layout is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        name = _STATE.fallback.get(id(module.config), "sdpa")
        return ALL_ATTENTION_FUNCTIONS[name](module, query, key, value, attention_mask, dropout=dropout,
                                             scaling=scaling, **kwargs)
    # the masks come from the layout (the model's own attention_mask is a stand-in, see permute_batch)
    layout.attention_calls += 1
    gqa = query.shape[1] != key.shape[1]

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: slice) -> torch.Tensor:
        """q (B, H, R, D) for query columns `rows`; k, v (B, Hkv, T, D) in original positions."""
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        outs = [F.scaled_dot_product_attention(q[:, :, q_rows], k[:, :, :keys], v[:, :, :keys],
                                               attn_mask=torch.where(allowed, zero, float("-inf")),  # (B, 1, r, keys)
                                               dropout_p=dropout, scale=scaling, enable_gqa=gqa)
                for q_rows, keys, allowed in layout.attention_blocks(rows)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, H, R, D)

    key, value = layout.to_positions(key), layout.to_positions(value)  # (B, Hkv, T, D)

    # a contiguous copy of the S rows: a view would keep the whole (B, H, W, D) query alive for backward
    q_grad = query[:, :, layout.grad_slice].contiguous()
    if layout.recompute_attention:
        # keep only q_S, K, V; the mask, output and softmax statistics are rebuilt in backward
        out_grad = checkpoint(attend, q_grad, key, value, layout.grad_slice, use_reentrant=False)
    else:
        out_grad = attend(q_grad, key, value, layout.grad_slice)
    with torch.no_grad():
        out_const = attend(query[:, :, layout.const_slice], key, value, layout.const_slice)
    # merged as (B, W, H, D): the cat writes the transposed layout the caller wants, no extra copy
    return layout.merge(out_grad.transpose(1, 2), out_const.transpose(1, 2)), None


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
        # A plain LM head (fused_head) is left unhooked: the causal-LM loss reads only the target columns,
        # all in S (memtune.linear_ce on their hidden states, or transformers' logits_to_keep from the first
        # S column), so the head never sees U; a hook would also keep chunked CE off (fused_head refuses
        # a hooked head), which cost the dense fallback (100% selected) the full logits (profile, tiny-llama
        # 512x4: 20.7 vs 18.7 MiB activations, 1.32x the dense step). Other heads (adapted, quantized) are split.
        head = None
        if task_name == "causal-lm" and fused_head(model) is None:
            head = model.get_output_embeddings()
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
                "always_last": self.always_last, "recompute_attention": c.recompute_attention,
                "layout": "[U|S]" if self.causal else "[S|U]",
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
        """The two-stream batch and its layout; None in evaluation, and when every real token is
        selected (100%, or sequences no longer than k): that is plain backprop, exactly, and runs as
        plain backprop, without the streams' splits, merges and masked attention."""
        if not self.tt.model.training:
            return None
        if self.KEY not in batch:  # selection is drawn once per micro-batch, shared by count and loss
            sel = self.tt.select(batch)
            dense = bool((sel | ~batch["attention_mask"].bool()).all())
            batch[self.KEY] = None if dense else self.tt.prepare(batch, sel)
        return batch[self.KEY]

    def count(self, batch: dict) -> int:
        prepared = self._prepared(batch)
        return self.task.count(prepared[0] if prepared else batch)

    def tokens(self, batch: dict) -> int:
        return self.task.tokens({k: v for k, v in batch.items() if k != self.KEY})

    def loss_sum(self, model: nn.Module, batch: dict):
        prepared = self._prepared(batch)
        if prepared is None:
            return self.task.loss_sum(model, {k: v for k, v in batch.items() if k != self.KEY})
        new_batch, layout = prepared
        layout.attention_calls = 0
        with active(layout):
            out = self.task.loss_sum(model, new_batch)
        if layout.attention_calls == 0:
            raise ModelError(f"tokentune: {type(model).__name__} ran its attention outside transformers' attention "
                             f"interface, so the two-stream forward cannot apply; train it without tokentune")
        return out

    def finish_eval(self, total: float, count: int, stats: dict) -> dict:
        return self.task.finish_eval(total, count, stats)
