"""Chunked linear cross-entropy (memtune.linear_ce) equals the unchunked loss and gradients."""

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, base_overrides
from memtune.linear_ce import LowRankMix, chunk_rows, linear_cross_entropy, mix_cross_entropy
from memtune.recipe import load_recipe
from memtune.tasks import CausalLMTask, fused_head

ALPACA = str(ROOT / "examples" / "data" / "alpaca.jsonl")


def _reference(h, w, b, y):
    return F.cross_entropy(F.linear(h, w, b).float(), y, reduction="sum")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 7, 64, 1000])
def test_loss_and_every_gradient_equal_the_unchunked(bias, rows):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    b = torch.randn(300, generator=g, requires_grad=True) if bias else None
    y = torch.randint(0, 300, (50,), generator=g)
    got = linear_cross_entropy(h, w, b, y, rows=rows)
    (got * 0.5).backward()  # a scaled loss: backward multiplies by the incoming gradient
    grads = [t.grad.clone() for t in (h, w, b) if t is not None]
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    want = _reference(h, w, b, y)
    (want * 0.5).backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)
    for a, t in zip(grads, [t for t in (h, w, b) if t is not None]):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bias", [None, "frozen", "trained"])
@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_the_factored_mix_loss_equals_the_loss_of_the_materialized_mix(bias, rows):
    """h = a c + (1 - a) q P^T through a frozen head: loss and the gradients of q, P, a (and a trained
    bias) equal those of the same h formed and sent through linear_cross_entropy / F.cross_entropy."""
    g = torch.Generator().manual_seed(3)
    c = torch.randn(40, 16, generator=g)
    q = torch.randn(40, 4, generator=g, requires_grad=True)
    proj = torch.randn(16, 4, generator=g, requires_grad=True)
    alpha = torch.tensor([0.7], requires_grad=True)
    w = torch.randn(300, 16, generator=g)
    b = None if bias is None else torch.randn(300, generator=g).requires_grad_(bias == "trained")
    y = torch.randint(0, 300, (40,), generator=g)
    leaves = [t for t in (q, proj, alpha, b) if t is not None and t.requires_grad]
    got = mix_cross_entropy(LowRankMix(alpha, c, 1 - alpha, q, proj), w, b, y, rows=rows)
    (got * 0.5).backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    want = _reference(alpha * c + (1 - alpha) * q @ proj.t(), w, b, y)
    (want * 0.5).backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4)
    for a, t in zip(grads, leaves):
        torch.testing.assert_close(a, t.grad, rtol=1e-5, atol=1e-5)


def test_the_factored_mix_loss_in_bf16_matches_the_materialized_mix_within_bf16_tolerance():
    """A bf16 head: q M^T in bf16 (the addmm fast path is fp32's), reduced in fp32 like the plain loss."""
    g = torch.Generator().manual_seed(5)
    c = torch.randn(30, 16, generator=g).bfloat16()
    q = torch.randn(30, 4, generator=g).bfloat16().requires_grad_()
    proj = torch.randn(16, 4, generator=g).bfloat16().requires_grad_()
    alpha = torch.tensor([0.8], dtype=torch.bfloat16, requires_grad=True)
    w, y = torch.randn(200, 16, generator=g).bfloat16(), torch.randint(0, 200, (30,), generator=g)
    got = mix_cross_entropy(LowRankMix(alpha, c, 1 - alpha, q, proj), w, None, y, rows=7)
    got.backward()
    grads = [t.grad.float() for t in (q, proj, alpha)]
    want = _reference((alpha * c + (1 - alpha) * q @ proj.t()).float(), w.float(), None, y)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-1)
    leaves = [t.detach().float().requires_grad_() for t in (q, proj, alpha)]
    _reference(leaves[2] * c.float() + (1 - leaves[2]) * leaves[0] @ leaves[1].t(), w.float(), None, y).backward()
    for a, t in zip(grads, leaves):
        torch.testing.assert_close(a, t.grad, rtol=5e-2, atol=5e-2)


def test_the_factored_mix_loss_declines_what_it_cannot_factor():
    g = torch.Generator().manual_seed(4)
    c, q, proj = torch.randn(5, 8, generator=g), torch.randn(5, 2, generator=g), torch.randn(8, 2, generator=g)
    a = torch.ones(1, requires_grad=True)
    w, y = torch.randn(20, 8, generator=g), torch.randint(0, 20, (5,), generator=g)
    mix = LowRankMix(a, c, 1 - a, q, proj)
    assert mix_cross_entropy(mix, w.requires_grad_(), None, y) is None  # a trained head needs dL/dW = G^T h
    with torch.no_grad():
        assert mix_cross_entropy(mix, w.detach(), None, y) is None  # no gradient: the plain loss is as cheap
    assert mix_cross_entropy(LowRankMix(a, c.requires_grad_(), 1 - a, q, proj), w.detach(), None, y) is None


def test_a_frozen_head_gets_no_gradient_and_no_grad_mode_gives_the_loss():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 8, generator=g, requires_grad=True)
    w = torch.randn(40, 8, generator=g)
    y = torch.randint(0, 40, (9,), generator=g)
    linear_cross_entropy(h, w, None, y, rows=4).backward()
    assert w.grad is None and h.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, None, y, rows=4), _reference(h, w, None, y))
    with torch.inference_mode():
        torch.testing.assert_close(linear_cross_entropy(h, w, None, y, rows=4), _reference(h.detach(), w, None, y))


def test_bf16_within_bf16_tolerance():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(20, 32, generator=g).bfloat16().requires_grad_()
    w = torch.randn(100, 32, generator=g).bfloat16()
    y = torch.randint(0, 100, (20,), generator=g)
    got = linear_cross_entropy(h, w, None, y, rows=3)
    got.backward()
    gh = h.grad.clone()
    h.grad = None
    want = _reference(h, w, None, y)
    want.backward()
    assert h.grad.dtype == torch.bfloat16 == gh.dtype
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-1)
    torch.testing.assert_close(gh.float(), h.grad.float(), rtol=5e-2, atol=5e-2)


def test_chunks_hold_a_bounded_number_of_logits():
    assert chunk_rows(32000) == 262 and chunk_rows(10) == 2**23 // 10 and chunk_rows(10**9) == 1


def _assert_same_step(out: dict) -> None:
    """out[chunked] = (loss, {name: grad}): chunked and unchunked agree in the loss and every gradient."""
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-4)
    assert out[True][1].keys() == out[False][1].keys() and out[True][1]
    for n in out[True][1]:
        torch.testing.assert_close(out[True][1][n], out[False][1][n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("adapter", [["adapter.kind=full"], ["adapter.kind=lora", "adapter.r=4"],
                                     ["adapter.kind=prefix", "adapter.num_virtual_tokens=3"],
                                     ["adapter.kind=qst", "adapter.r=4", "quantize.kind=none"]])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
def test_a_causal_lm_step_is_the_same_with_and_without_chunks(preset, adapter):
    from memtune.data import collate
    from memtune.pipeline import build_run

    run = build_run(load_recipe(None, [f"model={preset}", f"data.train={ALPACA}"] + adapter))
    assert fused_head(run.model) is not None
    batch = collate(run.load_data(ALPACA, "train").examples[:4], run.tokenizer.pad_token_id)
    run.model.train()
    torch.manual_seed(0)
    out = {}
    for chunked in (True, False):
        run.model.zero_grad()
        torch.manual_seed(0)
        loss, _ = CausalLMTask(chunked=chunked).loss_sum(run.model, batch)
        loss.backward()
        out[chunked] = (loss.detach(), {n: p.grad.clone() for n, p in run.model.named_parameters()
                                        if p.grad is not None})
    _assert_same_step(out)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-opt"])
@pytest.mark.parametrize("select", [0.4, 1.0])  # 1.0: every token selected, the dense fallback
def test_tokentune_steps_through_chunks_and_equals_the_models_own_logits(preset, select):
    """TokenTune leaves a plain head unhooked, so its two-stream step (and its dense fallback) takes
    the chunked loss; loss and gradients equal the step over the model's own logits."""
    from memtune.data import collate
    from memtune.gradient.tokentune import TokenTune, TokenTuneConfig
    from memtune.pipeline import build_run

    run = build_run(load_recipe(None, [f"model={preset}", f"data.train={ALPACA}", "adapter.kind=lora",
                                       "adapter.r=4"]))
    tt = TokenTune(TokenTuneConfig(select=select), run.model, run.tokenizer.pad_token_id, "causal-lm")
    assert fused_head(run.model) is not None  # the head carries no TokenTune hook
    batch = collate(run.load_data(ALPACA, "train").examples[:4], run.tokenizer.pad_token_id)
    run.model.train()
    sel = tt.select(batch)
    out = {}
    for chunked in (True, False):
        run.model.zero_grad()
        task = tt.wrap(CausalLMTask(chunked=chunked))
        b = dict(batch)
        b[task.KEY] = None if select == 1.0 else tt.prepare(batch, sel)
        torch.manual_seed(0)  # the same dropout masks
        loss, _ = task.loss_sum(run.model, b)
        loss.backward()
        out[chunked] = (loss.detach(), {n: p.grad.clone() for n, p in run.model.named_parameters()
                                        if p.grad is not None})
    _assert_same_step(out)


def test_tokentune_training_takes_the_chunked_loss(tmp_path):
    from memtune.train import train

    seen = []
    s = train(load_recipe(None, ["model=tiny-llama", f"data.train={ALPACA}", "adapter.kind=lora", "adapter.r=4",
                                 "tokentune.select=0.5", "train.max_steps=2", "train.batch_size=4"]
                          + base_overrides(tmp_path / "run")),
              callbacks=[lambda e: seen.append(fused_head(e.run.model))])
    assert s["train"]["loss_last"] > 0
    assert len(seen) == 2 and all(f is not None for f in seen)


def test_the_step_peak_holds_no_full_logits(tmp_path):
    """tiny-llama with a 32,000-word vocabulary: (N, V) fp32 logits would be N x 125 KiB."""
    from memtune.data import collate
    from memtune.memory.tracker import MemoryTracker
    from memtune.pipeline import build_run

    peaks = {}
    for chunked in (True, False):
        run = build_run(load_recipe(None, ["model=tiny-llama", f"data.train={ALPACA}", "adapter.kind=lora"]))
        run.model.resize_token_embeddings(32000)
        run.model.get_input_embeddings().requires_grad_(False)  # new tensors: frozen again, as LoRA left them
        run.model.get_output_embeddings().requires_grad_(False)
        batch = collate(run.load_data(ALPACA, "train").examples[:8], run.tokenizer.pad_token_id)
        n = int((batch["labels"][:, 1:] != -100).sum())
        tracker = MemoryTracker(run.model)
        run.model.train()
        with tracker.measure(batch["input_ids"]):
            loss, _ = CausalLMTask(chunked=chunked).loss_sum(run.model, batch)
            loss.backward()
        peaks[chunked] = tracker.report()
        logits_bytes = n * 32000 * 4
    assert peaks[False].peak - peaks[True].peak > 2 * logits_bytes  # logits, log-softmax, their gradient
    assert peaks[False].activations - peaks[True].activations > 0.9 * logits_bytes  # no log-softmax (N, V) kept


def test_a_wrapped_model_runs_its_own_forward():
    # a peft.PeftModel forwards attribute lookups to the model it wraps (config, base_model_prefix,
    # get_output_embeddings), but its `.model` is the whole causal LM, not the body: it is not fused
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4))
    assert fused_head(base) is not None and fused_head(base)[0] is base.model
    wrapped = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj"]))
    assert fused_head(wrapped) is None and fused_head(wrapped.get_base_model()) is not None
    ids = torch.randint(0, 64, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    losses = [CausalLMTask().loss_sum(m, batch)[0] for m in (wrapped, wrapped.get_base_model())]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)
