"""LongLoRA: S2-Attn against an explicit block-mask reference, dense inference, RoPE position
interpolation against transformers' own linear scaling, LoRA+ files (PEFT loads them), the loop."""

import json

import peft
import pytest
import torch
import transformers
from transformers import AttentionInterface

from conftest import ROOT, base_overrides, randomize
from memtune.adapters import ADAPTERS
from memtune.adapters.longlora import LongLoraConfig
from memtune.attention import s2 as s2_module
from memtune.attention.s2 import ATTN_NAME, enable_s2, s2_attention
from memtune.errors import ConfigError, ModelError
from memtune.models import build_preset
from memtune.pipeline import build_run
from memtune.recipe import build_recipe
from memtune.train import train

TEXT = str(ROOT / "examples" / "data" / "text.jsonl")


# ------------------------------------------------------------------------------------------------
# The reference: dense N x N attention with S2's block pattern as an explicit mask (test only)


def block_mask(n: int, g: int, shifted: bool) -> torch.Tensor:
    """(N, N) bool: j <= i and i, j in the same group; shifted groups are [0, g//2), [g//2, g//2 + g), ..."""
    pos = torch.arange(n)
    group = (pos + g - g // 2) // g if shifted else pos // g
    return (pos[None, :] <= pos[:, None]) & (group[:, None] == group[None, :])


def reference_s2(q, k, v, g, scale):
    """q (B, H, N, d), k/v (B, Hkv, N, d) -> (B, N, H, d); heads [H//2, H) use the shifted blocks."""
    h, n = q.shape[1], q.shape[2]
    k, v = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // v.shape[1], 1)
    masks = torch.stack([block_mask(n, g, shifted=i >= h // 2) for i in range(h)])  # (H, N, N)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~masks, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """A transformers attention function computing `reference_s2` (right padding needs no mask)."""
    return reference_s2(query, key, value, int(query.shape[2] * 0.25), scaling), None


AttentionInterface.register("test_s2_reference", reference_attention)


def llama(task="causal-lm"):
    return build_preset("tiny-llama", task, ["neg", "pos"] if task == "classification" else None).model


def right_padded(b=2, n=23, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (b, n), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, n - 6:] = 0  # the last row is right-padded
    return {"input_ids": ids, "attention_mask": mask}


def longlora(model, task="causal-lm", **kw):
    method = ADAPTERS.get("longlora")(LongLoraConfig(**kw), task)
    torch.manual_seed(0)  # LoRA's A is drawn from the global generator
    method.attach(model)
    return method




def scaled_llama(scale):
    """tiny-llama's weights under transformers' own linear RoPE scaling (the oracle for rope_scale)."""
    base = llama()
    cfg = transformers.LlamaConfig(**{**base.config.to_dict(), "rope_parameters": {
        **base.config.rope_parameters, "rope_type": "linear", "factor": scale}})
    ref = transformers.LlamaForCausalLM(cfg)
    ref.load_state_dict(base.state_dict())
    return ref


# ------------------------------------------------------------------------------------------------
# S2-Attn


@pytest.mark.parametrize("b, h, hkv, n, g", [
    (2, 4, 2, 16, 4),   # GQA, N divisible by g
    (1, 4, 4, 13, 4),   # N not divisible: a short last group
    (2, 6, 3, 20, 5),   # odd g and odd Hkv (key/value heads repeated)
    (2, 8, 1, 17, 4),   # multi-query
    (1, 3, 3, 12, 4),   # odd head count: heads [1, 3) shifted
    (1, 1, 1, 9, 3),    # one head: it is the shifted half
    (2, 2, 2, 5, 4),    # shorter than g + g//2: edge segments only
])
def test_s2_equals_block_mask_reference_forward_and_gradient(b, h, hkv, n, g):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, heads, n, 8, generator=gen, dtype=torch.float64, requires_grad=True)
               for heads in (h, hkv, hkv))
    ref = reference_s2(q, k, v, g, 0.3)
    grad_out = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    expected = torch.autograd.grad(ref, (q, k, v), grad_out)
    for recompute in (True, False):  # backward recomputing the groups, or keeping SDPA's own tensors
        out = s2_attention(q, k, v, g, 0.3, recompute=recompute)
        torch.testing.assert_close(out, ref)
        for a, r in zip(torch.autograd.grad(out, (q, k, v), grad_out), expected):
            torch.testing.assert_close(a, r)


def test_recomputing_backward_keeps_the_forward_autocast():
    """Under bf16 autocast the projections give bf16 values and RoPE fp32 queries/keys; backward
    recomputes the groups under the same autocast, so it matches keeping SDPA's own tensors."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 4, 24, 8, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(2, 4, 24, 8, generator=gen).bfloat16().requires_grad_()
    grads = []
    for recompute in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = s2_attention(q, k, v, 6, None, recompute=recompute)
        grads.append(torch.autograd.grad(out.float().square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def test_s2_never_builds_a_sequence_by_sequence_tensor():
    n, g = 64, 16
    seen = []

    class Shapes(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            seen.extend(t.shape for t in (out if isinstance(out, (tuple, list)) else [out])
                        if isinstance(t, torch.Tensor))
            return out

    q, k, v = (torch.randn(1, 4, n, 8, requires_grad=True) for _ in range(3))
    with Shapes():
        s2_attention(q, k, v, g, None).sum().backward()
    assert max(t.numel() for t in seen) <= 4 * n * 8 + 4 * (n + g) * 8  # inputs and outputs only
    assert not any(len(s) >= 2 and s[-1] == n and s[-2] == n for s in seen)


def test_model_training_forward_equals_reference_with_right_padding():
    """tiny-llama in training mode: S2 through the attention interface equals the block-mask reference
    at every real token (right padding), in the loss and in every gradient."""
    batch = right_padded()
    real = batch["attention_mask"].bool()
    models = []
    for impl in (None, "test_s2_reference"):
        m = llama().train()
        longlora(m, rope_scale=2.0)
        randomize(m, add=True)
        if impl:
            m.set_attn_implementation(impl)
        out = m(**batch)
        loss = out.logits[real].float().logsumexp(-1).sum()
        loss.backward()
        models.append((m, out.logits[real]))
    (m, ours), (r, ref) = models
    assert m.config._attn_implementation == ATTN_NAME
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    for (name, p), (_, q) in zip(m.named_parameters(), r.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=2e-5, rtol=1e-4, msg=name)
    # and it is not dense attention
    dense = llama().train()
    longlora(dense, rope_scale=2.0, attention="dense")
    randomize(dense, add=True)
    assert not torch.allclose(dense(**batch).logits[real], ours, atol=1e-3)


def test_inference_is_dense_attention():
    batch = right_padded()
    real = batch["attention_mask"].bool()
    s2, plain = llama(), llama()
    enable_s2(s2, 0.25)
    s2.eval(), plain.eval()
    torch.testing.assert_close(s2(**batch).logits[real], plain(**batch).logits[real])
    s2.train(), plain.train()
    with torch.no_grad():  # training mode but no gradient recorded (MeZO, generate): dense
        torch.testing.assert_close(s2(**batch).logits[real], plain(**batch).logits[real])
    s2.eval(), plain.eval()
    prompt = batch["input_ids"][:1, :12]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(s2.generate(prompt, **kw), plain.generate(prompt, **kw))  # with a KV cache
    left = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"].flip(1)}
    torch.testing.assert_close(s2(**left).logits[left["attention_mask"].bool()],
                               plain(**left).logits[left["attention_mask"].bool()])


def test_left_padding_is_rejected_in_training():
    m = llama().train()
    enable_s2(m, 0.25)
    batch = right_padded()
    batch["attention_mask"] = batch["attention_mask"].flip(1)
    with pytest.raises(ConfigError, match="right"):
        m(**batch)


def test_bidirectional_attention_is_rejected():
    bert = build_preset("tiny-bert", "classification", ["neg", "pos"]).model
    with pytest.raises(ConfigError, match="bidirectional"):
        enable_s2(bert, 0.25)
    with pytest.raises(ConfigError, match="causal"):
        longlora(bert, "classification", targets=["query", "value"])
    method = longlora(bert, "classification", targets=["query", "value"], attention="dense")  # LoRA+ only
    assert "bert.embeddings.word_embeddings" in method.saved_modules and "classifier" in method.saved_modules


# ------------------------------------------------------------------------------------------------
# Position interpolation, LoRA+, files


def test_rope_scale_is_transformers_linear_interpolation():
    m = llama()
    longlora(m, rope_scale=4.0, attention="dense")  # B = 0: the adapted model is the scaled base
    assert m.config.rope_parameters["rope_type"] == "linear" and m.config.rope_parameters["factor"] == 4.0
    ref, plain = scaled_llama(4.0).eval(), llama().eval()
    m.eval()
    ids = right_padded(1, 40)["input_ids"]
    torch.testing.assert_close(m(ids).logits, ref(ids).logits)
    assert not torch.allclose(m(ids).logits, plain(ids).logits, atol=1e-4)
    # interpolation: position 4 t under the scaled rotary embedding is position t of the plain one
    x = torch.zeros(1, 1, 64)
    cos_s, sin_s = m.model.rotary_emb(x, torch.tensor([[0, 4, 8, 36]]))
    cos_p, sin_p = plain.model.rotary_emb(x, torch.tensor([[0, 1, 2, 9]]))
    torch.testing.assert_close((cos_s, sin_s), (cos_p, sin_p))


def test_trainable_set_is_lora_on_qkvo_plus_embeddings_and_norms():
    m = llama()
    method = longlora(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in method.targets} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert "model.embed_tokens.weight" in trainable and "model.norm.weight" in trainable
    assert "model.layers.1.post_attention_layernorm.weight" in trainable
    assert not any("mlp" in n for n in trainable) and "lm_head.weight" not in trainable
    assert sum("lora_A" in n for n in trainable) == 8
    cls = llama("classification")
    method = longlora(cls, "classification")  # a causal classifier: S2 applies, the new head trains too
    assert "score" in method.saved_modules and "model.embed_tokens" in method.saved_modules
    batch = right_padded()
    cls.train()(**batch, labels=torch.tensor([0, 1])).loss.backward()
    assert cls.score.weight.grad is not None


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = {**right_padded(), "labels": right_padded()["input_ids"]}
    grads = []
    for checkpointing in ("false", "true"):
        torch.manual_seed(0)  # the same LoRA A in both runs
        run = build_run(build_recipe({}, ["model=tiny-llama", "adapter.kind=longlora",
                                          f"train.gradient_checkpointing={checkpointing}"]))
        run.model.train()
        run.model(**batch).loss.backward()
        grads.append({n: p.grad for n, p in run.model.named_parameters() if p.requires_grad})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_saved_adapter_round_trips_and_peft_loads_it(tmp_path):
    recipe = build_recipe({}, ["model=tiny-llama", "adapter.kind=longlora", "adapter.rope_scale=2"])
    run = build_run(recipe)
    randomize(run.model, add=True)
    out = run.method.save(run.model, tmp_path, "tiny-llama")
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and "model.embed_tokens" in saved["modules_to_save"]
    assert json.loads((out / "longlora.json").read_text())["rope_parameters"]["factor"] == 2.0
    batch = right_padded()
    real = batch["attention_mask"].bool()
    run.model.eval()
    ours = run.model(**batch).logits[real]

    again = build_run(build_recipe({}, ["model=tiny-llama", "adapter.kind=longlora"]), adapter_path=out)
    assert again.recipe.adapter.rope_scale == 2.0 and again.model.config._attn_implementation == ATTN_NAME
    again.model.eval()
    torch.testing.assert_close(again.model(**batch).logits[real], ours)

    pm = peft.PeftModel.from_pretrained(scaled_llama(2.0), str(out)).eval()  # the base with the same RoPE
    torch.testing.assert_close(pm(**batch).logits[real], ours, atol=1e-5, rtol=0)


def test_merged_equals_unmerged_and_reloads_in_plain_transformers(tmp_path):
    m = llama()
    method = longlora(m, rope_scale=2.0)
    randomize(m, add=True)
    m.eval()
    batch = right_padded()
    real = batch["attention_mask"].bool()
    ref = m(**batch).logits[real]
    merged = method.merged(m)
    assert merged.config._attn_implementation == "sdpa"
    torch.testing.assert_close(merged(**batch).logits[real], ref, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.rope_parameters["factor"] == 2.0
    torch.testing.assert_close(back(**batch).logits[real], ref, atol=1e-5, rtol=0)


def test_disabled_adapter_is_the_base_model_with_the_same_rope():
    """LoRA branches off; what trains in full (embedding, norms) keeps its trained values, as for every
    method (tests/test_conformance.py), and the RoPE scaling stays."""
    m = llama()
    method = longlora(m, rope_scale=2.0)
    randomize(m, add=True)  # LoRA, embeddings and norms all moved
    m.eval()
    ids = right_padded()["input_ids"]
    before = m(ids).logits
    base = scaled_llama(2.0).eval()
    trained = {n: p for n, p in m.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in base.named_parameters():
            if n in trained:
                p.copy_(trained[n])
    with method.disabled(m):
        torch.testing.assert_close(m(ids).logits, base(ids).logits)
    torch.testing.assert_close(m(ids).logits, before)  # LoRA is back
    assert not torch.allclose(before, base(ids).logits, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# Recipes: the loop, the attention axis, errors


def test_training_through_the_loop_lowers_the_loss_with_s2(tmp_path, monkeypatch):
    calls = []
    real_s2 = s2_module.s2_attention
    monkeypatch.setattr(s2_module, "s2_attention", lambda *a, **k: calls.append(a[3]) or real_s2(*a, **k))
    o = ["model=tiny-llama", f"data.train={TEXT}", "train.max_steps=20", "train.batch_size=4",
         "optimizer.lr=1e-2", "adapter.kind=longlora", "adapter.rope_scale=2"]
    s = train(build_recipe({}, o + base_overrides(tmp_path / "run")))
    assert s["train"]["loss_last"] < s["train"]["loss_first"] - 0.3, s["train"]
    assert calls and all(g >= 2 for g in calls)  # S2 ran in the training forwards
    assert (tmp_path / "run" / "adapter" / "longlora.json").is_file()


def test_attention_axis_with_lora_and_full_fine_tuning():
    for adapter in (["adapter.kind=lora", "adapter.r=4"], []):
        run = build_run(build_recipe({}, ["model=tiny-llama", "attention.kind=s2", "attention.group_ratio=0.5"]
                                     + adapter))
        assert run.model.config._attn_implementation == ATTN_NAME
        attn = run.model.model.layers[0].self_attn
        assert attn.s2_group_ratio == 0.5
    dense = build_run(build_recipe({}, ["model=tiny-llama", "attention.kind=dense"]))
    assert dense.model.config._attn_implementation != ATTN_NAME


@pytest.mark.parametrize("overrides, match", [
    (["adapter.kind=longlora", "adapter.trainable=[embed,bias]"], "adapter.trainable: unknown entry 'bias'"),
    (["adapter.kind=longlora", "adapter.rope_scale=0.5"], "adapter.rope_scale: expected a factor >= 1"),
    (["adapter.kind=longlora", "adapter.group_ratio=1.5"], "adapter.group_ratio: expected a fraction"),
    (["adapter.kind=longlora", "adapter.attention=sparse"], "adapter.attention: expected one of"),
    (["attention.kind=s2", "attention.group_ratio=0"], "attention.group_ratio: expected a fraction"),
    (["adapter.kind=longlora", "attention.kind=s2"], "sets its attention itself"),
    (["attention.kind=s2", "tokentune.select=0.5"], "tokentune with attention.kind=s2"),
    (["adapter.kind=longlora", "optimizer.kind=mezo"], "adapter.attention=dense"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
        build_recipe({}, overrides)


def test_model_errors():
    gpt2 = build_preset("tiny-gpt2", "causal-lm").model
    with pytest.raises(ConfigError, match="rotary position embedding"):
        longlora(gpt2, targets=["c_attn"], rope_scale=2.0)
    m = llama()
    longlora(m, rope_scale=2.0, attention="dense")
    other = llama()
    with pytest.raises(ConfigError, match="already uses rope_type='linear'"):
        other.config.rope_parameters = {**m.config.rope_parameters}
        longlora(other, rope_scale=4.0)
    with pytest.raises(ModelError, match="longlora.json"):
        ADAPTERS.get("longlora").config_from_file({"peft_type": "LORA", "target_modules": ["q_proj"]}, ROOT)


def test_load_adapter_on_a_longlora_folder_is_longlora_and_a_lora_recipe_reads_it_as_lora(tmp_path):
    from memtune.adapters import method_for_saved
    from memtune.adapters.longlora import LongLoraMethod
    from memtune.adapters.lora import LoraMethod
    from memtune.models import build_preset

    model = build_preset("tiny-llama", "causal-lm").model
    method = LongLoraMethod(LongLoraConfig(r=2, rope_scale=2.0), "causal-lm")
    method.attach(model)
    path = method.save(model, tmp_path, "tiny-llama")
    found = method_for_saved(path, "causal-lm")
    assert isinstance(found, LongLoraMethod) and found.config.rope_scale == 2.0
    r = build_recipe({}, ["model=tiny-llama", "adapter.kind=lora", f"adapter.path={path}"])
    run = build_run(r)
    assert type(run.method) is LoraMethod
