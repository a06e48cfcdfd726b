"""NF4 base storage (QLoRA): bitsandbytes parity, what is quantized, training over it, merging."""


import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from conftest import ROOT, base_overrides  # noqa: E402
from memtune.errors import ConfigError  # noqa: E402
from memtune.models import build_preset  # noqa: E402
from memtune.recipe import load_recipe  # noqa: E402
from memtune.storage import STORAGE  # noqa: E402
from memtune.storage.nf4 import NF4Config, is_4bit, quantized_bytes  # noqa: E402
from memtune.train import train  # noqa: E402

ALPACA = str(ROOT / "examples" / "data" / "alpaca.jsonl")


def quantize(model, double_quant=True):
    STORAGE.get("nf4")(NF4Config(double_quant=double_quant)).apply(model)
    return model


@pytest.mark.parametrize("double_quant", [True, False])
def test_codes_and_dequantized_weights_equal_bitsandbytes(double_quant):
    m = build_preset("tiny-llama", "causal-lm").model
    originals = {n: mod.weight.detach().clone() for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    quantize(m, double_quant)
    checked = 0
    for name, w in originals.items():
        q = m.get_submodule(name)
        if name == "lm_head":
            assert not is_4bit(q) and torch.equal(q.weight, w)  # the head keeps its dtype
            continue
        assert is_4bit(q)
        packed, state = BF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        assert torch.equal(q.weight.data, packed), name
        torch.testing.assert_close(BF.dequantize_4bit(q.weight.data, q.weight.quant_state),
                                   BF.dequantize_4bit(packed, state), rtol=0, atol=0)
        assert q.weight.quant_state.nested == double_quant
        checked += 1
    assert checked == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert m.model.embed_tokens.weight.dtype == torch.float32  # embeddings and norms untouched
    assert m.model.norm.weight.dtype == torch.float32


def test_quantized_linear_output_equals_dequantized_matmul():
    m = quantize(build_preset("tiny-llama", "causal-lm").model)
    q = m.model.layers[0].mlp.up_proj
    x = torch.randn(5, q.in_features)
    w = BF.dequantize_4bit(q.weight.data, q.weight.quant_state)  # (out, in)
    torch.testing.assert_close(q(x), x @ w.T, atol=1e-5, rtol=1e-5)


def test_gpt2_conv1d_is_quantized_through_its_transpose():
    m = build_preset("tiny-gpt2", "causal-lm").model
    conv = m.transformer.h[0].attn.c_attn
    x = torch.randn(2, 3, conv.weight.shape[0])
    want = conv(x)
    quantize(m)
    q = m.transformer.h[0].attn.c_attn
    w = BF.dequantize_4bit(q.weight.data, q.weight.quant_state)
    torch.testing.assert_close(q(x), x @ w.T + q.bias, atol=1e-5, rtol=1e-5)
    # the fp32 layer up to 4-bit rounding (a wrong transpose would give an unrelated output)
    assert float((q(x) - want).norm() / want.norm()) < 0.2


def test_bytes_per_weight_with_double_quant_is_about_4_127_bits():
    from transformers import LlamaConfig, LlamaForCausalLM

    m = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=4))
    quantize(m)
    total, params = quantized_bytes(m)
    assert total / params <= 0.53  # 4.127 bits = 0.516 B/param (+ the per-256-block fp32 scales)


@pytest.mark.parametrize("extra", [[], ["tokentune.select=0.5"], ["optimizer.kind=mezo", "optimizer.lr=1e-3"]])
def test_qlora_trains_only_the_adapter_and_leaves_codes_bit_identical(tmp_path, extra):
    from memtune.pipeline import build_run

    common = ["model=tiny-llama", f"data.train={ALPACA}", "quantize.kind=nf4", "adapter.kind=lora", "adapter.r=4",
              "train.max_steps=3", "train.batch_size=4", "optimizer.lr=1e-2"] + extra
    ref = build_run(load_recipe(None, common))
    codes = {n: m.weight.data.clone() for n, m in ref.model.named_modules() if is_4bit(m)}
    s = train(load_recipe(None, common + base_overrides(tmp_path / "run")), callbacks=[_keep_run])
    model = _keep_run.run.model
    after = {n: m.weight.data for n, m in model.named_modules() if is_4bit(m)}
    assert len(after) == 14 and after.keys() == codes.keys()
    assert all(torch.equal(codes[n], after[n]) for n in after)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert s["train"]["loss_last"] > 0 and s["memory_bytes"]["parameters_frozen"] > 0


def _keep_run(event):
    _keep_run.run = event.run


def test_qlora_merge_equals_the_adapter_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from memtune.evaluate import load_for_eval
    from memtune.merge import merge

    run_dir = tmp_path / "run"
    train(load_recipe(None, ["model=tiny-llama", f"data.train={ALPACA}", "quantize.kind=nf4", "adapter.kind=lora",
                             "adapter.r=4", "train.max_steps=3", "train.batch_size=4", "optimizer.lr=1e-2"]
                      + base_overrides(run_dir)))
    adapted = load_for_eval(str(run_dir), []).model.eval()
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
    merge(str(run_dir), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_requantized_nf4_merge_loads_as_4bit_in_transformers_and_reports_its_error(tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    from memtune.cli import main
    from memtune.evaluate import load_for_eval

    run_dir = tmp_path / "run"
    train(load_recipe(None, ["model=tiny-llama", f"data.train={ALPACA}", f"data.eval={ALPACA}", "quantize.kind=nf4",
                             "adapter.kind=lora", "adapter.r=4", "train.max_steps=3", "train.batch_size=4",
                             "optimizer.lr=1e-2"] + base_overrides(run_dir)))
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = load_for_eval(str(run_dir), []).model.eval()(input_ids=ids).logits
    capsys.readouterr()
    assert main(["merge", str(run_dir), "--to", str(tmp_path / "q"), "--requantize", "nf4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((tmp_path / "q" / "requantize_report.json").read_text())
    assert printed["weight_error_mean"] == report["weight_error_mean"] and report["layers"] == 14  # 2 x 7 linears
    assert 0 < report["weight_error_mean"] <= report["weight_error_max"] < 0.2  # NF4 rounding, not garbage
    assert report["update_error_mean"] > 0 and report["probe_logits_max_abs_change"] > 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert is_4bit(loaded.model.layers[0].self_attn.q_proj)
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    # lossy: close to the exact merge, but not equal to it
    assert 0 < (got - exact).abs().max() < 0.5 * exact.abs().max()


def test_requantize_is_refused_for_qalora_which_merges_into_int(tmp_path):
    from memtune.errors import MemtuneError
    from memtune.merge import merge

    run_dir = tmp_path / "run"
    train(load_recipe(None, ["model=tiny-llama", f"data.train={ALPACA}", "quantize.kind=int4",
                             "adapter.kind=qalora", "adapter.r=4", "train.max_steps=1", "train.batch_size=4"]
                      + base_overrides(run_dir)))
    with pytest.raises(MemtuneError, match="already merges into its own quantized base"):
        merge(str(run_dir), str(tmp_path / "q"), requantize="nf4")


def test_full_fine_tuning_over_a_4bit_base_is_rejected():
    with pytest.raises(ConfigError, match="quantized base is frozen"):
        load_recipe(None, ["model=tiny-llama", "quantize.kind=nf4", "adapter.kind=full"])


def test_tracker_counts_codes_and_their_constants_as_frozen_parameters():
    from memtune.memory.tracker import MemoryTracker

    m = quantize(build_preset("tiny-llama", "causal-lm").model).requires_grad_(False)
    tensors = list(m.parameters())
    for mod in m.modules():
        if is_4bit(mod):
            st = mod.weight.quant_state
            tensors += [st.absmax, st.code, st.offset, st.state2.absmax, st.state2.code]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    tracker = MemoryTracker(m)
    ids = torch.randint(3, 250, (1, 8))
    with tracker.measure(ids), torch.no_grad():
        m(input_ids=ids)
    assert tracker.report().parameters_frozen == sum(storages.values())


def test_paged_adamw_on_cpu_says_so_and_uses_ordinary_adamw(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        s = train(load_recipe(None, ["model=tiny-llama", f"data.train={ALPACA}", "quantize.kind=nf4",
                                     "adapter.kind=lora", "optimizer.paged=true", "train.max_steps=2",
                                     "train.batch_size=4", "train.device=cpu"] + base_overrides(tmp_path / "r")))
    assert "nothing to page" in caplog.text
    assert s["memory_bytes"]["optimizer"] > 0
