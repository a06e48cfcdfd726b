"""QST (adapter.kind=qst): a side network beside a frozen backbone that runs without gradient."""

import json

import pytest
import torch

from conftest import ROOT, base_overrides
from memtune.adapters.qst import SIDE, QSTConfig, QSTMethod
from memtune.adapters.virtual_tokens import cache_kwarg
from memtune.errors import ConfigError, MemtuneError
from memtune.models import build_preset
from memtune.recipe import load_recipe
from memtune.side.arch import FAMILIES, family_of, side_config
from memtune.side.downsample import KINDS
from memtune.train import train

ALPACA = str(ROOT / "examples" / "data" / "alpaca.jsonl")
ALPACA_EVAL = str(ROOT / "examples" / "data" / "alpaca_eval.jsonl")
DEMO = ROOT / "src" / "memtune" / "demo_data"
IDS = torch.randint(3, 250, (2, 11), generator=torch.Generator().manual_seed(0))
CASES = [("tiny-llama", "causal-lm"), ("tiny-opt", "causal-lm"), ("tiny-gpt2", "causal-lm"),
         ("tiny-bert", "classification"), ("tiny-llama", "classification")]
LLAMA = ["model=tiny-llama", f"data.train={ALPACA}", f"data.eval={ALPACA_EVAL}", "adapter.kind=qst", "adapter.r=4",
         "train.max_steps=4", "train.batch_size=4", "optimizer.lr=1e-2"]
pytestmark = pytest.mark.usefixtures("one_thread")


def _model(preset, task, quantize=None):
    m = build_preset(preset, task, ["neg", "pos"] if task == "classification" else None).model
    if quantize:
        from memtune.storage import STORAGE

        STORAGE.get(quantize)(STORAGE.config_class(quantize)()).apply(m)
    return m


def _logits(m, ids=IDS):
    m.eval()
    with torch.no_grad():
        return m(input_ids=ids).logits


def _randomize_side(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.get_submodule(SIDE).parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("preset,task", CASES)
def test_step0_output_is_the_backbones_exactly(preset, task, quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    m = _model(preset, task, quantize)
    want = _logits(m)
    QSTMethod(QSTConfig(r=4), task).attach(m)
    assert torch.equal(_logits(m), want)
    _randomize_side(m)  # the side stream really is mixed in once α moves
    assert not torch.allclose(_logits(m), want)


@pytest.mark.parametrize("preset,task", CASES)
def test_only_the_side_network_and_a_new_head_get_gradients(preset, task):
    m = _model(preset, task)
    method = QSTMethod(QSTConfig(r=4), task)
    method.attach(m)
    _randomize_side(m)
    m.train()
    m(input_ids=IDS).logits.float().pow(2).mean().backward()
    assert torch.is_grad_enabled()  # the hooks restored the caller's mode
    got = {n for n, p in m.named_parameters() if p.grad is not None}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert got == trainable and all(n.startswith(SIDE) or n.split(".")[0] in method.saved_modules for n in got)
    side = {n for n in got if n.startswith(SIDE)}
    assert {f"{SIDE}.alpha", f"{SIDE}.gates", f"{SIDE}.up.weight"} <= side
    assert any(".layers." in n for n in side) and any(".down." in n for n in side)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-opt", "tiny-gpt2"])
def test_the_factored_head_loss_gives_the_gradients_of_the_models_own_logits(preset):
    """A scalar α: the chunked causal-LM loss takes the mix's factors (no dL/dh through the head) and
    gets the loss and every side gradient of the model's own logits; a per-channel α takes the plain path."""
    from memtune import linear_ce
    from memtune.tasks import CausalLMTask

    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    for mix in ("scalar", "channel"):
        m = _model(preset, "causal-lm")
        QSTMethod(QSTConfig(r=4, mix=mix), "causal-lm").attach(m)
        _randomize_side(m)
        m.eval()  # no dropout (GPT-2's): both losses from the same forward; gradients stay on
        grads, losses = [], []
        for chunked in (True, False):
            calls = []
            real = linear_ce._MixLinearCrossEntropy.apply
            linear_ce._MixLinearCrossEntropy.apply = lambda *a: calls.append(1) or real(*a)
            try:
                loss, _ = CausalLMTask(chunked=chunked).loss_sum(m, batch)
            finally:
                linear_ce._MixLinearCrossEntropy.apply = real
            assert bool(calls) == (chunked and mix == "scalar")
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
            m.zero_grad(set_to_none=True)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-4)
        assert grads[0].keys() == grads[1].keys() and f"{SIDE}.alpha" in grads[0]
        for name in grads[0]:
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_backbone_layers_save_nothing_for_backward():
    """Tensors saved for backward while a backbone layer itself runs: none. (Side steps run in hooks
    after each layer; the flag is cleared before them.)"""
    m = _model("tiny-llama", "causal-lm")
    QSTMethod(QSTConfig(r=4), "causal-lm").attach(m)
    _randomize_side(m)
    inside, saved = {"on": False}, {"backbone": 0, "side": 0}
    for layer in m.model.layers:
        layer.register_forward_pre_hook(lambda *a: inside.__setitem__("on", True))
        layer.register_forward_hook(lambda *a: inside.__setitem__("on", False), prepend=True)

    def pack(t):
        saved["backbone" if inside["on"] else "side"] += t.numel()
        return t

    m.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(input_ids=IDS).logits.sum().backward()
    assert saved["backbone"] == 0 and saved["side"] > 0


def test_an_exception_in_the_backbone_restores_the_gradient_mode():
    m = _model("tiny-llama", "causal-lm")
    QSTMethod(QSTConfig(r=4), "causal-lm").attach(m)
    with pytest.raises(IndexError):
        m(input_ids=torch.tensor([[100000]]))  # outside the vocabulary
    assert torch.is_grad_enabled()


def test_side_config_scales_width_and_keeps_heads_that_divide_it():
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=8)
    side = side_config(cfg, 16, FAMILIES["llama"])  # head dims >= 16 (MIN_HEAD_DIM): 16 heads of 16
    assert (side.hidden_size, side.intermediate_size, side.num_attention_heads, side.num_key_value_heads,
            side.head_dim) == (256, 688, 16, 8, 16)
    ref = side_config(cfg, 16, FAMILIES["llama"], min_head_dim=8)  # the reference code's 32 heads of 8
    assert (ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim) == (32, 8, 8)
    narrow = side_config(cfg, 64, FAMILIES["llama"])  # width 64: 4 heads of 16, not 32 of 2
    assert (narrow.hidden_size, narrow.num_attention_heads, narrow.num_key_value_heads, narrow.head_dim) == \
        (64, 4, 4, 16)
    from transformers import BertConfig

    minilm = BertConfig(hidden_size=384, intermediate_size=1536, num_attention_heads=12)
    assert [side_config(minilm, r, FAMILIES["bert"]).num_attention_heads for r in (4, 8, 16, 64)] == [6, 3, 1, 1]
    assert [side_config(minilm, r, FAMILIES["bert"], 8).num_attention_heads for r in (4, 8, 16, 64)] == [12, 6, 3, 1]
    with pytest.raises(ConfigError, match="adapter.r=3: does not divide the backbone's hidden size 4096"):
        side_config(cfg, 3, FAMILIES["llama"])


def test_trainable_share_on_llama2_7b_is_about_the_papers():
    """LLaMA-2-7B's shape on the meta device (no weights): 0.43% trainable at r = 16 (paper: ~0.4%)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
        QSTMethod(QSTConfig(r=16), "causal-lm").attach(m)
    total = sum(p.numel() for p in m.parameters())
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert 0.0040 < trainable / total < 0.0046, trainable / total


@pytest.mark.parametrize("kind", KINDS)
def test_every_downsampler_trains_and_starts_at_the_backbone(kind):
    m = _model("tiny-llama", "causal-lm")
    want = _logits(m)
    QSTMethod(QSTConfig(r=4, downsample=kind, rank=8), "causal-lm").attach(m)
    assert torch.equal(_logits(m), want)
    down = m.get_submodule(SIDE).down
    weights = sum(p.numel() for p in down.parameters())
    assert (weights == 0) == (kind in ("maxpool", "avgpool"))
    assert down[0](torch.randn(3, 64)).shape == (3, 16)


def test_train_saves_a_qst_adapter_that_loads_and_evaluates_the_same(tmp_path, capsys):
    from memtune.cli import main
    from memtune.evaluate import evaluate, load_for_eval

    kept = {}
    s = train(load_recipe(None, LLAMA + base_overrides(tmp_path / "run")),
              callbacks=[lambda e: kept.setdefault("run", e.run)])
    assert s["recipe"]["quantize"]["kind"] == "nf4"  # QST's default base: the paper's 4-bit backbone
    cfg = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "QST" and cfg["r"] == 4 and cfg["downsample"] == "adapter"
    assert (cfg["mix"], cfg["min_head_dim"], cfg["side_heads"]) == ("scalar", 16, 1)  # width 16: one head of 16
    old = {k: v for k, v in cfg.items() if k not in ("mix", "min_head_dim")}  # a file from before those keys
    read = QSTMethod.config_from_file(old, tmp_path)
    assert (read.mix, read.min_head_dim) == ("channel", 8)  # what such files were trained with
    trained = _logits(kept["run"].model)
    loaded = load_for_eval(str(tmp_path / "run"), [])
    assert torch.equal(_logits(loaded.model), trained)
    assert not torch.equal(loaded.model.get_submodule(SIDE).alpha.detach(), torch.ones(1))  # it moved
    assert evaluate(str(tmp_path / "run"), [])["loss"] == s["eval"]["loss"]
    # adapter.path into a fresh recipe
    again = load_for_eval(None, LLAMA + [f"adapter.path={tmp_path / 'run' / 'adapter'}"])
    assert torch.equal(_logits(again.model), trained)
    with pytest.raises(MemtuneError, match="nothing to fold"):
        from memtune.merge import merge

        merge(str(tmp_path / "run"), str(tmp_path / "merged"))
    capsys.readouterr()
    assert main(["merge", str(tmp_path / "run"), "--to", str(tmp_path / "m2")]) == 2
    assert "a QST run trains a side network" in capsys.readouterr().err


def test_nf4_codes_are_bit_identical_and_memory_is_the_side_networks(tmp_path):
    from memtune.pipeline import build_run
    from memtune.storage.nf4 import is_4bit

    fresh = build_run(load_recipe(None, LLAMA)).model  # the same preset, quantized the same way
    codes = {n: m.weight.data.clone() for n, m in fresh.named_modules() if is_4bit(m)}
    kept = {}
    s = train(load_recipe(None, LLAMA + base_overrides(tmp_path / "run")),
              callbacks=[lambda e: kept.setdefault("run", e.run)])
    model = kept["run"].model
    after = {n: m.weight.data for n, m in model.named_modules() if is_4bit(m)}
    assert len(after) == 14 and all(torch.equal(codes[n], after[n]) for n in after)
    side_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    mem = s["memory_bytes"]
    assert mem["parameters_trainable"] == mem["gradients"] == side_bytes
    assert mem["optimizer"] >= 2 * side_bytes  # AdamW: m and v (plus step counters)
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.startswith(SIDE))


def test_resume_after_a_crash_ends_at_the_same_loss(tmp_path):
    class Crash(Exception):
        pass

    def crash(event):
        if event.step == 3:
            raise Crash()

    recipe = LLAMA + ["train.max_steps=6", "train.save_every=2", "quantize.kind=none"]
    full = train(load_recipe(None, recipe + base_overrides(tmp_path / "full")))
    with pytest.raises(Crash):
        train(load_recipe(None, recipe + base_overrides(tmp_path / "crashed")), callbacks=[crash])
    resumed = train(load_recipe(None, recipe + base_overrides(tmp_path / "crashed")), resume=True)
    assert resumed["train"]["loss_last"] == full["train"]["loss_last"] and resumed["train"]["steps"] == 6


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-opt", "tiny-gpt2"])
def test_generation_with_the_cache_equals_without(preset):
    m = _model(preset, "causal-lm")
    QSTMethod(QSTConfig(r=4), "causal-lm").attach(m)
    _randomize_side(m, seed=3)
    m.eval()
    prompt = IDS[:1, :6]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = m.generate(prompt, use_cache=True, **kw)
        uncached = m.generate(prompt, use_cache=False, **kw)
    assert cached.shape[1] == 14 and torch.equal(cached, uncached)
    name = cache_kwarg(m.base_model)  # `cache` from transformers 5.24, `past_key_values` before
    with torch.no_grad():  # the last step's logits too, not only the argmax
        a = m(input_ids=cached[:, :-1]).logits[:, -1]
        out = m(input_ids=cached[:, :-2], use_cache=True)
        b = m(input_ids=cached[:, -2:-1], **{name: out.past_key_values}, use_cache=True).logits[:, -1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_classification_over_nf4_bert_with_mean_pooling_and_centroids_learns(tmp_path):
    s = train(load_recipe(None, ["model=tiny-bert", "task=classification", f"data.train={DEMO / 'sentiment_train.tsv'}",
                                 f"data.eval={DEMO / 'sentiment_test.tsv'}", "adapter.kind=qst", "adapter.r=4",
                                 "pooling=mean", "classifier_init.examples_per_class=8", "train.max_steps=3",
                                 "train.eval_at_start=true"] + base_overrides(tmp_path / "run")))
    assert s["recipe"]["quantize"]["kind"] == "nf4" and "accuracy" in s["eval"]
    assert s["params"]["trainable"] < 0.5 * s["params"]["total"]


@pytest.mark.parametrize("extra", [["quantize.kind=int4"], ["quantize.kind=none", "quantize.dtype=bf16"],
                                   ["optimizer.kind=mezo", "optimizer.lr=1e-3"]])
def test_qst_composes_with_other_bases_and_mezo(tmp_path, extra):
    kept = {}
    s = train(load_recipe(None, LLAMA + extra + ["train.max_steps=2"] + base_overrides(tmp_path / "run")),
              callbacks=[lambda e: kept.setdefault("run", e.run)])
    assert s["train"]["steps"] == 2 and s["memory_bytes"]["gradients"] in (0, s["memory_bytes"]["parameters_trainable"])
    side = kept["run"].model.get_submodule(SIDE)
    assert not torch.equal(side.alpha.detach(), torch.ones_like(side.alpha))  # α moved: the side stream trains
    assert all(n.startswith(SIDE) for n, p in kept["run"].model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("extra,match", [
    (["tokentune.select=0.5"], "tokentune with adapter.kind=qst: TokenTune selects which backbone tokens"),
    (["train.gradient_checkpointing=true"], "train.gradient_checkpointing with adapter.kind=qst"),
    (["attention.kind=s2"], "attention.kind=s2 with adapter.kind=qst"),
])
def test_combinations_without_meaning_are_refused_when_read(extra, match):
    with pytest.raises(ConfigError, match=match + ".*runs the backbone without gradient"):
        load_recipe(None, LLAMA + extra)


def test_nf4_is_the_default_base_only_when_no_storage_is_named():
    assert load_recipe(None, LLAMA).quantize.kind == "nf4"
    assert load_recipe(None, LLAMA + ["quantize.kind=none"]).quantize.kind == "none"
    plain_bf16 = load_recipe(None, LLAMA + ["quantize.dtype=bf16"]).quantize
    assert (plain_bf16.kind, plain_bf16.dtype) == ("none", "bf16")


def test_unsupported_architecture_is_named():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    m = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=64))
    with pytest.raises(ConfigError, match="no side network for model type 'gpt_neox'"):
        family_of(m)
