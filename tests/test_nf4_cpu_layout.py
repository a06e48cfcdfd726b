"""NF4 layers keep bitsandbytes' canonical layout on every CPU (memtune.storage.bnb_layout).

bitsandbytes repacks a Linear4bit for its AVX512-BF16 inference kernel on CPUs that have the
instruction set. These tests make every machine behave as such a CPU does, by forcing the flag
bitsandbytes reads when it builds a layer (`bitsandbytes.nn.modules.has_avx512bf16`), and watch its
conversion function, so the packed path is exercised whichever CPU CI runs on."""

import json

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402
import bitsandbytes.nn.modules as bnb_modules  # noqa: E402

from conftest import ROOT, base_overrides  # noqa: E402
from memtune.errors import ConfigError, MemtuneError  # noqa: E402
from memtune.models import build_preset  # noqa: E402
from memtune.recipe import load_recipe  # noqa: E402
from memtune.storage.bnb_layout import FLAG, cpu_supports_packed, is_packed  # noqa: E402
from memtune.storage.nf4 import is_4bit  # noqa: E402
from memtune.train import train  # noqa: E402

ALPACA = str(ROOT / "examples" / "data" / "alpaca.jsonl")
ALPACA_EVAL = str(ROOT / "examples" / "data" / "alpaca_eval.jsonl")
SENTIMENT = ROOT / "src" / "memtune" / "demo_data"


@pytest.fixture
def avx512bf16_cpu(monkeypatch):
    """Every Linear4bit built from here on believes the CPU has AVX512-BF16; the conversion to the
    packed layout is recorded (and still performed, as bitsandbytes would)."""
    calls = []
    real = bnb_modules._convert_weight_packed_for_cpu

    def spy(weight, state, *a, **k):
        calls.append(tuple(weight.shape))
        return real(weight, state, *a, **k)

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", spy)
    return calls


def _layer():
    lin = bnb.nn.Linear4bit(64, 64, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4", blocksize=64)
    return lin.to("cpu")


class _Stop(Exception):
    pass


def test_the_forced_flag_reproduces_bitsandbytes_repacking_in_eval(monkeypatch):
    """The premise of the other tests: with the flag forced, an eval-mode, no-grad forward of a plain
    bitsandbytes layer reaches its packed-layout conversion (on any CPU); in train mode it does not."""
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    reached = []

    def stop(weight, state, *a, **k):  # stop before the AVX512-BF16 kernel, which this CPU may lack
        reached.append(True)
        raise _Stop

    monkeypatch.setattr(bnb_modules, "_convert_weight_packed_for_cpu", stop)
    lin = _layer()
    assert getattr(lin, FLAG) is True
    with torch.no_grad():
        lin.train()(torch.randn(2, 64))
        assert not reached
        with pytest.raises(_Stop):
            lin.eval()(torch.randn(2, 64))
    assert reached == [True]


def test_without_the_flag_bitsandbytes_never_repacks(monkeypatch):
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: False)
    lin = _layer().eval()
    with torch.no_grad():
        lin(torch.randn(2, 64))
    assert not is_packed(lin)


def _reference_quantization(preset="tiny-llama", task="causal-lm"):
    """bitsandbytes' own quantize_4bit of every linear weight outside the head, from the preset."""
    m = build_preset(preset, task).model
    return {n: BF.quantize_4bit(mod.weight.detach().contiguous(), blocksize=64, compress_statistics=True,
                                quant_type="nf4")
            for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n not in ("lm_head", "score")}


def _assert_codes_are_bitsandbytes(model, reference):
    seen = 0
    for name, layer in model.named_modules():
        if not is_4bit(layer):
            continue
        key = name.removesuffix(".base_layer")
        codes, state = reference[key]
        got = layer.weight.quant_state
        assert not is_packed(layer), name
        assert torch.equal(layer.weight.data, codes), name
        assert torch.equal(got.absmax, state.absmax) and torch.equal(got.offset, state.offset), name
        assert torch.equal(got.state2.absmax, state.state2.absmax), name
        seen += 1
    assert seen == len(reference)


@pytest.mark.parametrize("extra", [[], ["optimizer.kind=mezo", "optimizer.lr=1e-3"], ["tokentune.select=0.5"]],
                         ids=["adamw", "mezo", "tokentune"])
def test_eval_train_eval_merge_on_an_avx512bf16_cpu(tmp_path, avx512bf16_cpu, extra):
    from transformers import AutoModelForCausalLM

    from memtune.evaluate import load_for_eval
    from memtune.merge import merge

    run_dir = tmp_path / "run"
    kept = {}
    s = train(load_recipe(None, ["model=tiny-llama", f"data.train={ALPACA}", f"data.eval={ALPACA_EVAL}",
                                 "quantize.kind=nf4", "adapter.kind=lora", "adapter.r=4", "train.max_steps=3",
                                 "train.batch_size=4", "optimizer.lr=1e-2", "train.eval_at_start=true",
                                 "train.eval_every=1"] + extra + base_overrides(run_dir)),
              callbacks=[lambda e: kept.setdefault("run", e.run)])
    assert avx512bf16_cpu == []  # eval before, between and after the steps never repacked a layer
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in line]
    assert len(evals) >= 4 and all(e["eval_loss"] > 0 for e in evals)
    assert s["train"]["loss_last"] > 0
    _assert_codes_are_bitsandbytes(kept["run"].model, _reference_quantization())

    adapted = load_for_eval(str(run_dir), []).model.eval()
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
    assert avx512bf16_cpu == []
    _assert_codes_are_bitsandbytes(adapted, _reference_quantization())
    merge(str(run_dir), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_classifier_init_and_eval_on_an_encoder_never_repack(tmp_path, avx512bf16_cpu):
    """BERT under QLoRA: the centroid head runs eval-mode forwards before the first step."""
    s = train(load_recipe(None, ["model=tiny-bert", "task=classification",
                                 f"data.train={SENTIMENT / 'sentiment_train.tsv'}",
                                 f"data.eval={SENTIMENT / 'sentiment_test.tsv'}", "quantize.kind=nf4",
                                 "adapter.kind=lora", "train.max_steps=2", "train.eval_at_start=true",
                                 "pooling=mean", "classifier_init.examples_per_class=4"]
                      + base_overrides(tmp_path / "run")))
    assert avx512bf16_cpu == [] and "accuracy" in s["eval"]


def test_packed_kernel_is_refused_for_training(tmp_path):
    with pytest.raises(ConfigError, match="quantize.cpu_kernel=packed: .*inference only"):
        train(load_recipe(None, ["model=tiny-llama", f"data.train={ALPACA}", "quantize.kind=nf4",
                                 "adapter.kind=lora", "quantize.cpu_kernel=packed", "train.max_steps=1"]
                          + base_overrides(tmp_path / "run")))


def test_a_packed_layer_is_never_read_as_codes(avx512bf16_cpu):
    from memtune.storage import STORAGE
    from memtune.storage.nf4 import NF4Config, quantized_bytes

    storage = STORAGE.get("nf4")(NF4Config())
    m = build_preset("tiny-llama", "causal-lm").model
    storage.apply(m)
    q = m.model.layers[0].self_attn.q_proj
    q.weight.data, q.weight.quant_state = BF._convert_weight_packed_for_cpu(q.weight.data, q.weight.quant_state)
    with pytest.raises(MemtuneError, match="model.layers.0.self_attn.q_proj.*packed CPU inference layout"):
        quantized_bytes(m)
    with pytest.raises(MemtuneError, match="dequantizing the NF4 base: 4-bit layer 'model.layers.0.self_attn"):
        storage.dequantize(m)


@pytest.mark.skipif(not cpu_supports_packed(), reason="this CPU has no AVX512-BF16: bitsandbytes has no packed "
                                                      "kernel to run (the layout itself is tested above)")
def test_eval_with_the_packed_kernel_matches_canonical_to_bf16(tmp_path):
    from memtune.evaluate import evaluate, load_for_eval

    run_dir = tmp_path / "run"
    train(load_recipe(None, ["model=tiny-llama", f"data.train={ALPACA}", "quantize.kind=nf4", "adapter.kind=lora",
                             "adapter.r=4", "train.max_steps=2", "train.batch_size=4"] + base_overrides(run_dir)))
    canonical = evaluate(str(run_dir), [f"data.eval={ALPACA_EVAL}"])
    packed = evaluate(str(run_dir), [f"data.eval={ALPACA_EVAL}", "quantize.cpu_kernel=packed"])
    assert abs(packed["loss"] - canonical["loss"]) < 1e-2 * canonical["loss"]
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    out = {}
    for kernel in ("canonical", "packed"):
        model = load_for_eval(str(run_dir), [f"quantize.cpu_kernel={kernel}"]).model.eval()
        with torch.no_grad():
            out[kernel] = model(input_ids=ids).logits
        assert all(is_packed(m) == (kernel == "packed") for m in model.modules() if is_4bit(m))
    diff = (out["packed"] - out["canonical"]).abs().max()
    assert 0 < diff < 2e-2 * out["canonical"].abs().max()  # the bf16 kernel ran, to bf16 rounding
