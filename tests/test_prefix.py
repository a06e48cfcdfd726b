"""Prefix Tuning (with the MLP reparameterization) and P-Tuning v2: parity with PEFT's PREFIX_TUNING
in both directions, the KV cache under generation, and training through the real loop."""

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

from memtune.adapters import load_adapter
from memtune.adapters.prefix import PrefixConfig, PTuningV2Config
from memtune.adapters.virtual_tokens import disabled_virtual_tokens
from memtune.errors import ConfigError, MemtuneError
from memtune.evaluate import evaluate
from memtune.recipe import build_recipe
from test_prompt_tuning import (PEFT_TASK, attach, base, cls_file, greedy, greedy_of_forward,  # noqa: F401
                                inputs, peft_pair, run_training, text_file, trainable)

pytestmark = pytest.mark.usefixtures("one_thread")

N, H = 3, 16
CASES = [("tiny-llama", "causal-lm"), ("tiny-bert", "classification"), ("tiny-gpt2", "causal-lm"),
         ("tiny-opt", "causal-lm")]


def configs(kind, task):
    """(memtune config, PEFT config) of the same method: `prefix` = PREFIX_TUNING with projection,
    `ptuning-v2` = PREFIX_TUNING without it."""
    if kind == "prefix":
        return PrefixConfig(num_virtual_tokens=N, encoder_hidden_size=H), peft.PrefixTuningConfig(
            task_type=PEFT_TASK[task], num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=H)
    return PTuningV2Config(num_virtual_tokens=N), peft.PrefixTuningConfig(task_type=PEFT_TASK[task],
                                                                          num_virtual_tokens=N)


def pair(preset, task, kind):
    return peft_pair(preset, task, kind, *configs(kind, task))


def logits(model, x):
    """Logits of memtune's model or of PEFT's; PEFT's prefix tuning refuses a model whose forward
    has no `past_key_values` argument (transformers 5.24 renamed it `cache`), so that oracle is
    skipped where PEFT cannot run it, never our side."""
    with torch.no_grad():
        try:
            return model(**x).logits
        except ValueError as e:
            if isinstance(model, peft.PeftModel) and "past key values" in str(e):
                pytest.skip(f"peft {peft.__version__} cannot run prefix tuning on "
                            f"{type(model.base_model).__name__} under transformers {transformers.__version__}: {e}")
            raise


KINDS = ["prefix", "ptuning-v2"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset, task", CASES)
def test_same_weights_same_logits_and_trainable_count_as_peft(preset, task, kind):
    m, method, pm = pair(preset, task, kind)
    x = inputs(preset)
    assert trainable(m) == trainable(pm)
    g = method.geometry  # GQA (tiny-llama: 2 of 4 heads cached): the prefix is L·2·d_kv wide, d_kv = 32
    kv = 32 if preset == "tiny-llama" else 64
    assert (g.num_layers, g.kv_dim) == (2, kv)
    width = 2 * 2 * kv
    head = sum(p.numel() for p in m.classifier.parameters()) if task == "classification" else 0
    expected = N * kv + kv * H + H + H * width + width if kind == "prefix" else N * width
    assert trainable(m) == expected + head
    torch.testing.assert_close(logits(m, x), logits(pm, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset, task", CASES[:2])
def test_memtune_adapter_loads_in_peft_with_same_logits(tmp_path, preset, task, kind):
    m, method, _ = pair(preset, task, kind)
    out = method.save(m, tmp_path, preset)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["prefix_projection"] == (kind == "prefix")
    # the MLP is dropped: the file holds the computed prefix P (n, L·2·d_kv), as PEFT saves it
    g = method.geometry
    assert load_file(out / "adapter_model.safetensors")["prompt_embeddings"].shape == (N, g.num_layers * 2 * g.kv_dim)
    pm = peft.PeftModel.from_pretrained(base(preset, task), str(out)).eval()
    x = inputs(preset)
    torch.testing.assert_close(logits(m, x), logits(pm, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("preset, task", CASES[:2])
def test_peft_adapter_loads_in_memtune_with_same_logits(tmp_path, preset, task, kind):
    torch.manual_seed(0)
    pm = peft.get_peft_model(base(preset, task), configs(kind, task)[1]).eval()
    pm.save_pretrained(tmp_path)
    m = base(preset, task)
    method = load_adapter(m, tmp_path, task)
    assert type(method).__name__ == "PrefixTuning" and method.config.kind == kind
    x = inputs(preset)
    torch.testing.assert_close(logits(m.eval(), x), logits(pm, x), atol=1e-5, rtol=0)
    # a loaded prefix is the parameter itself (no MLP), whatever the file was trained with
    assert [n for n, p in method.encoder(m).named_parameters()] == ["embedding.weight"]


@pytest.mark.parametrize("preset, task", CASES[:2])
def test_round_trip_disable_and_detach(tmp_path, preset, task):
    m = base(preset, task).eval()
    x = inputs(preset)
    plain = logits(m, x)
    method = attach(m, "prefix", PrefixConfig(num_virtual_tokens=4, encoder_hidden_size=8), task)
    adapted = logits(m.eval(), x)
    assert not torch.allclose(adapted, plain, atol=1e-3)
    with disabled_virtual_tokens(m):
        torch.testing.assert_close(logits(m, x), plain, atol=0, rtol=0)
    out = method.save(m, tmp_path, preset)
    m2 = base(preset, task)
    load_adapter(m2, out, task)
    torch.testing.assert_close(logits(m2.eval(), x), adapted, atol=1e-6, rtol=0)  # MLP output vs stored P
    m3 = base(preset, task)  # attached with its MLP, then loaded: P replaces the MLP
    method3 = attach(m3, "prefix", PrefixConfig(num_virtual_tokens=4, encoder_hidden_size=8), task)
    method3.load(m3, out)
    torch.testing.assert_close(logits(m3.eval(), x), adapted, atol=1e-6, rtol=0)
    assert not hasattr(method3.encoder(m3), "transform")
    method.detach(m)
    torch.testing.assert_close(logits(m, x), plain, atol=0, rtol=0)


def test_init_zero_gives_a_zero_prefix():
    """PEFT's init_weights="zero": a zero P, or a zero last MLP layer. (A zero prefix is not a no-op:
    its keys still take softmax weight.)"""
    for cfg in (PrefixConfig(num_virtual_tokens=2, encoder_hidden_size=4, init="zero"),
                PTuningV2Config(num_virtual_tokens=2, init="zero")):
        m = base("tiny-llama", "causal-lm")
        enc = attach(m, cfg.kind, cfg, "causal-lm").encoder(m)
        assert torch.count_nonzero(enc.prefix()) == 0


# -- generation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_generation_with_cache_equals_without_and_equals_peft(kind):
    m, _, pm = pair("tiny-llama", "causal-lm", kind)
    ids = torch.tensor([[5, 70, 80, 90, 100, 33], [7, 8, 9, 10, 11, 12]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        cached = greedy(m, ids, mask, True)
        assert torch.equal(cached, greedy(m, ids, mask, False))
        assert torch.equal(greedy_of_forward(pm, cached, ids.shape[1]), cached[:, ids.shape[1]:])
        with disabled_virtual_tokens(m):
            assert not torch.equal(cached, greedy(m, ids, mask, True))
        ids[1, :2], mask[1, :2] = 256, 0  # left padding
        assert torch.equal(greedy(m, ids, mask, True), greedy(m, ids, mask, False))


def test_cache_returned_by_a_forward_continues_decoding():
    m = base("tiny-llama", "causal-lm").eval()
    attach(m, "ptuning-v2", PTuningV2Config(num_virtual_tokens=3), "causal-lm")
    ids = torch.tensor([[5, 70, 80, 90, 100, 33]])
    with torch.no_grad():
        full = m(input_ids=ids).logits
        out = m(input_ids=ids[:, :5], use_cache=True)
        assert out.past_key_values.get_seq_length() == 3 + 5  # the prefix lives in the cache
        step = m(input_ids=ids[:, 5:], past_key_values=out.past_key_values).logits
        assert m(input_ids=ids, use_cache=False).past_key_values is None  # no cache handed back unasked
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=0)


# -- config errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["adapter.kind=prefix", "train.gradient_checkpointing=true"],
     "train.gradient_checkpointing with adapter.kind=prefix"),
    (["adapter.kind=ptuning-v2", "train.gradient_checkpointing=true"],
     "train.gradient_checkpointing with adapter.kind=ptuning-v2"),
    (["adapter.kind=ptuning-v2", "tokentune.select=4"], "tokentune with adapter.kind=ptuning-v2"),
    (["adapter.kind=prefix", "attention.kind=s2"], "attention.kind=s2 with adapter.kind=prefix"),
    (["adapter.kind=prefix", "adapter.dropout=1.5"], "adapter.dropout: expected 0 <= dropout < 1"),
    (["adapter.kind=prefix", "adapter.encoder_hidden_size=0"], "adapter.encoder_hidden_size: expected >= 1"),
    (["adapter.kind=ptuning-v2", "adapter.num_virtual_tokens=0"], "adapter.num_virtual_tokens: expected >= 1"),
    (["adapter.kind=prefix", "adapter.init=text"], "adapter.init: expected one of"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_recipe({}, overrides)


def test_defaults_follow_the_references():
    p, v2 = build_recipe({}, ["adapter.kind=prefix"]).adapter, build_recipe({}, ["adapter.kind=ptuning-v2"]).adapter
    assert (p.num_virtual_tokens, p.prefix_projection, p.encoder_hidden_size) == (10, True, 512)
    assert (v2.num_virtual_tokens, v2.prefix_projection) == (4, False)


def test_merged_raises_clearly():
    m = base("tiny-llama", "causal-lm")
    method = attach(m, "ptuning-v2", PTuningV2Config(), "causal-lm")
    with pytest.raises(MemtuneError, match="cannot be merged"):
        method.merged(m)


# -- the real training loop --------------------------------------------------------------------------


def test_training_lowers_loss_llama_prefix_with_projection(tmp_path):
    s, out = run_training(tmp_path, "llama", text_file(tmp_path), [
        "model=tiny-llama", "train.batch_size=4", "adapter.kind=prefix", "adapter.num_virtual_tokens=4",
        "adapter.encoder_hidden_size=32", "optimizer.lr=1e-2"])
    assert s["eval"]["loss"] < s["eval_start"]["loss"] - 0.1
    # trained through the MLP; the artifact holds P only and rebuilds through the pipeline
    assert set(load_file(out / "adapter" / "adapter_model.safetensors")) == {"prompt_embeddings"}
    assert evaluate(str(out), [])["loss"] == pytest.approx(s["eval"]["loss"], rel=1e-5)


def test_training_lowers_loss_bert_ptuning_v2(tmp_path):
    s, out = run_training(tmp_path, "bert", cls_file(tmp_path), [
        "model=tiny-bert", "task=classification", "train.batch_size=8", "adapter.kind=ptuning-v2",
        "optimizer.lr=0.05"])
    assert s["params"]["trainable"] == 4 * 2 * 2 * 64 + 2 * 64 + 2  # P (n, L·2·d) + head
    assert s["eval"]["loss"] < s["eval_start"]["loss"] - 0.05
    assert evaluate(str(out), [])["loss"] == pytest.approx(s["eval"]["loss"], rel=1e-5)


def test_resume_matches_uninterrupted_run(tmp_path):
    """The prefix (and its MLP) resume from checkpoints like any trainable tensor; dropout draws too."""
    from memtune.train import train

    class Crash(Exception):
        pass

    def crash_at_4(event):
        if event.step == 4:
            raise Crash()

    recipe = lambda out: build_recipe({}, [  # noqa: E731
        "model=tiny-llama", f"data.train={text_file(tmp_path)}", "train.batch_size=2", "train.max_steps=6",
        "train.save_every=3", "adapter.kind=prefix", "adapter.num_virtual_tokens=2", "adapter.encoder_hidden_size=8",
        "adapter.dropout=0.1", "optimizer.lr=1e-2", "train.progress=false", "train.measure_memory_steps=0",
        f"output_dir={tmp_path / out}"])
    full = train(recipe("full"))
    with pytest.raises(Crash):
        train(recipe("crashed"), callbacks=[crash_at_4])
    resumed = train(recipe("crashed"), resume=True)
    assert resumed["train"]["loss_last"] == full["train"]["loss_last"]
