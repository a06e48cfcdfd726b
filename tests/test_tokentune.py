"""TokenTune: exact forward, gradients equal to backprop (all selected) and to an independent
detach-at-every-layer reference (subset selected), selection rules, recipe composition."""

import copy

import pytest
import torch

from conftest import ROOT, base_overrides
from memtune.adapters import ADAPTERS
from memtune.adapters.lora import LoraConfig
from memtune.data import IGNORE
from memtune.errors import ConfigError
from memtune.gradient.tokentune import TokenTune, TokenTuneConfig, select_tokens
from memtune.models import build_preset
from memtune.recipe import load_recipe
from memtune.tasks import CausalLMTask, ClassificationTask
from memtune.train import train

ARCHS = [("tiny-llama", "causal-lm"), ("tiny-opt", "causal-lm"), ("tiny-gpt2", "causal-lm"),
         ("tiny-bert", "classification"), ("tiny-llama", "classification"), ("tiny-bert", "causal-lm")]
# where each architecture computes keys and values (GPT-2 fuses q, k, v into c_attn)
KV_MODULES = {"llama": ("k_proj", "v_proj"), "opt": ("k_proj", "v_proj"), "gpt2": ("c_attn",),
              "bert": ("key", "value")}


def model_for(name, task, lora=False):
    m = build_preset(name, task, ["neg", "pos"] if task == "classification" else None).model
    for mod in m.modules():  # exactness checks need a deterministic training-mode forward
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    if lora:
        ADAPTERS.get("lora")(LoraConfig(r=4, alpha=8, targets=["all-linear"]), task).attach(m)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m.train()


def batch_for(model, task, seed=0, length=14):
    g = torch.Generator().manual_seed(seed)
    pad = model.config.pad_token_id
    ids = torch.randint(3, 250, (3, length), generator=g)
    am = torch.ones_like(ids)
    am[1, length * 5 // 7:] = 0
    am[2, length * 3 // 7:] = 0
    ids[am == 0] = pad
    if task == "classification":
        return {"input_ids": ids, "attention_mask": am, "label": torch.tensor([0, 1, 1])}
    labels = torch.where(am.bool(), ids, IGNORE)
    labels[0, :3] = IGNORE  # a prompt without loss
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


def task_obj(task):
    return ClassificationTask() if task == "classification" else CausalLMTask()


def install(m, task, select=0.5, recompute_attention=True):
    return TokenTune(TokenTuneConfig(select=select, recompute_attention=recompute_attention), m,
                     m.config.pad_token_id, task)


@pytest.mark.parametrize("name, task", ARCHS)
def test_forward_logits_equal_plain_model(name, task):
    m = model_for(name, task)
    plain = copy.deepcopy(m)
    tt = install(m, task)
    batch = batch_for(m, task)
    new, layout = tt.prepare(batch)
    from memtune.gradient.tokentune import active
    from memtune.tasks import model_inputs

    with active(layout):
        out = m(**model_inputs(new)).logits
    ref = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if task == "classification":
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    else:
        valid = layout.valid
        for b in range(3):
            cols = torch.nonzero(valid[b]).flatten()
            torch.testing.assert_close(out[b, cols], ref[b, layout.index[b, cols]], atol=1e-5, rtol=0)


def grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name, task", ARCHS)
@pytest.mark.parametrize("lora", [False, True])
def test_all_selected_gradients_equal_backprop(name, task, lora):
    m = model_for(name, task, lora)
    plain = copy.deepcopy(m)
    t = task_obj(task)
    tt = install(m, task, select=1.0)
    batch = batch_for(m, task)
    wrapped = tt.wrap(t)
    assert wrapped._prepared(dict(batch)) is None  # nothing unselected: it runs as plain backprop
    (wrapped.loss_sum(m, dict(batch))[0] / wrapped.count(dict(batch))).backward()
    (t.loss_sum(plain, batch)[0] / t.count(batch)).backward()
    g, ref = grads(m), grads(plain)
    for n in ref:
        torch.testing.assert_close(g[n], ref[n], atol=1e-5, rtol=1e-4, msg=n)


def reference_loss(model, task, batch, sel):
    """Independent reference: a plain forward in which every layer's output (and the embeddings)
    at unselected positions are detached, and so are the unselected keys and values; the loss is
    taken at the selected positions only."""
    keep = sel[..., None]

    def detach_unselected(module, inputs, output):
        if isinstance(output, tuple):
            return (torch.where(keep, output[0], output[0].detach()),) + tuple(output[1:])
        return torch.where(keep, output, output.detach())

    arch = model.config.model_type
    handles = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        is_layer = name.rsplit(".", 1)[0].endswith(("layers", ".h", "layer")) and leaf.isdigit()
        if is_layer or leaf in KV_MODULES[arch] or mod is model.get_input_embeddings():
            handles.append(mod.register_forward_hook(detach_unselected))
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        for h in handles:
            h.remove()
    if task == "classification":
        return torch.nn.functional.cross_entropy(out, batch["label"], reduction="sum"), batch["label"].numel()
    labels = batch["labels"][:, 1:]
    on = (labels != IGNORE) & sel[:, :-1]
    return torch.nn.functional.cross_entropy(out[:, :-1][on], labels[on], reduction="sum"), int(on.sum())


@pytest.mark.parametrize("name, task", ARCHS)
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("length", [14, 420])  # 420: >= 128 rows per stream, attention in blocks of rows
def test_subset_gradients_equal_detached_reference(name, task, recompute, length):
    m = model_for(name, task)
    plain = copy.deepcopy(m)
    t = task_obj(task)
    tt = install(m, task, select=0.4, recompute_attention=recompute)
    batch = batch_for(m, task, seed=1, length=length)
    sel = tt.select(batch)
    assert 0 < int(sel.sum()) < int(batch["attention_mask"].sum())
    new, layout = tt.prepare(batch, sel)
    from memtune.gradient.tokentune import active

    with active(layout):
        loss, _ = t.loss_sum(m, new)
    n = t.count(new)
    (loss / n).backward()
    ref_loss, ref_n = reference_loss(plain, task, batch, sel)
    assert n == ref_n
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    (ref_loss / ref_n).backward()
    g, ref = grads(m), grads(plain)
    for k in ref:
        torch.testing.assert_close(g[k], ref[k], atol=1e-5, rtol=1e-4, msg=k)


def test_selection_respects_k_always_selected_and_padding():
    am = torch.ones(4, 40, dtype=torch.long)
    am[1, 25:] = 0
    am[2, 5:] = 0
    am[3, 1:] = 0
    for _ in range(20):
        sel = select_tokens(am, 16, always_first=True, always_last=True)
        assert sel[0].sum() == 16 and sel[1].sum() == 16 and sel[2].sum() == 5 and sel[3].sum() == 1
        assert not (sel & ~am.bool()).any()  # padding never selected
        assert sel[:, 0].all() and sel[0, 39] and sel[1, 24] and sel[2, 4]
    frac = select_tokens(am, 0.25, always_first=True, always_last=False)
    assert frac[0].sum() == 10 and frac[1].sum() == 6 and frac[2].sum() == 1 and frac[3].sum() == 1
    # uniform: over many draws every non-forced position gets picked
    hits = sum(select_tokens(am[:1], 4, True, True).int() for _ in range(200))
    assert (hits[0, 1:39] > 0).all()


def test_padding_and_unselected_positions_never_enter_the_loss():
    m = model_for("tiny-llama", "causal-lm")
    tt = install(m, "causal-lm", select=4)
    batch = batch_for(m, "causal-lm")
    sel = tt.select(batch)
    new, layout = tt.prepare(batch, sel)
    targets = new["labels"][:, 1:] != IGNORE
    # targets sit only on valid selected-stream columns, and their count is what the plain labels give there
    cols = torch.zeros_like(layout.valid)
    cols[:, layout.grad_slice] = True
    assert not (targets & ~(layout.valid & cols)[:, :-1]).any()
    expected = ((batch["labels"][:, 1:] != IGNORE) & sel[:, :-1]).sum()
    assert targets.sum() == expected


def test_combination_with_zeroth_order_or_checkpointing_is_rejected():
    with pytest.raises(ConfigError, match="tokentune with train.gradient_checkpointing"):
        load_recipe(None, ["tokentune.select=16", "train.gradient_checkpointing=true"])
    with pytest.raises(ConfigError, match="tokentune.select: a count must be an integer"):
        load_recipe(None, ["tokentune.select=2.5"])
    assert load_recipe(None, ["tokentune.select=0.25"]).tokentune.select == 0.25
    assert load_recipe(None, ["tokentune=null"]).tokentune is None


@pytest.mark.parametrize("adapter", [[], ["adapter.kind=lora", "adapter.r=4"]])
def test_recipe_run_reports_selection_and_saves_plain_artifacts(tmp_path, adapter):
    alpaca = str(ROOT / "examples" / "data" / "alpaca.jsonl")
    common = ["model=tiny-llama", f"data.train={alpaca}", "train.max_steps=3", "train.batch_size=4"] + adapter
    s = train(load_recipe(None, common + ["tokentune.select=0.25"] + base_overrides(tmp_path / "tt")))
    plain = train(load_recipe(None, common + base_overrides(tmp_path / "plain")))
    assert s["gradient"]["tokentune"]["select"] == 0.25 and s["gradient"]["tokentune"]["layout"] == "[U|S]"
    assert s["memory_bytes"]["activations"] < 0.5 * plain["memory_bytes"]["activations"]
    assert s["train"]["steps"] == 3
    cfg = (tmp_path / "tt" / ("adapter/adapter_config.json" if adapter else "model/config.json")).read_text()
    assert "memtune_tokentune" not in cfg


def test_mean_pooling_sees_real_tokens_under_the_two_stream_forward():
    """pooling=mean: TokenTune hands the model a (B, 1, W, W) attention mask; the pooler averages the
    real tokens of the permuted streams, so the logits equal the plain model's."""
    from memtune.gradient.tokentune import active
    from memtune.pooling import use_mean_pooling
    from memtune.tasks import model_inputs

    m = model_for("tiny-bert", "classification")
    plain = copy.deepcopy(m)
    use_mean_pooling(m)
    use_mean_pooling(plain)  # (its own hooks: a deep copy's would feed the original's pooler)
    tt = install(m, "classification", select=0.5)
    batch = batch_for(m, "classification")
    new, layout = tt.prepare(batch)
    assert new["attention_mask"].dim() == 4
    with active(layout):
        out = m(**model_inputs(new)).logits
    ref = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_two_streams_run_unless_every_real_token_is_selected():
    m = model_for("tiny-llama", "causal-lm")
    batch = batch_for(m, "causal-lm")  # lengths 14, 10, 6
    for select, dense in ((14, True), (13, False), (1.0, True), (0.99, False)):
        wrapped = install(m, "causal-lm", select=select).wrap(task_obj("causal-lm"))
        assert (wrapped._prepared(dict(batch)) is None) == dense, select


def test_a_merged_output_splits_back_into_its_parts_without_a_copy():
    from memtune.gradient.tokentune import _streams

    sel = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    layout = _streams(sel, torch.ones_like(sel), causal=True)
    g = torch.randn(2, layout.grad_slice.stop - layout.grad_slice.start, 3, 2, requires_grad=True)
    c = torch.randn(2, layout.const_slice.stop - layout.const_slice.start, 3, 2)
    merged = layout.merge(g, c)
    g2, c2 = layout.split(merged.view(2, layout.width, 6))  # (B, W, H, D) seen as (B, W, H*D)
    assert g2.data_ptr() == g.data_ptr() and c2.data_ptr() == c.data_ptr()
    torch.testing.assert_close(g2, merged[:, layout.grad_slice].reshape(g2.shape))
    layout._last_split = None
    merged.add_(1.0)  # changed in place since the merge: sliced afresh
    g3, _ = layout.split(merged.view(2, layout.width, 6))
    assert g3.data_ptr() != g.data_ptr()
    torch.testing.assert_close(g3, (g + 1.0).reshape(g3.shape))
