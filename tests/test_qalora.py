"""QA-LoRA over a group-wise INT base: quantization, the pooled adapter, folding into the zero points,
saving and reloading the merged INT model, training."""

import pytest
import torch

from conftest import ROOT, base_overrides
from memtune.adapters import ADAPTERS
from memtune.adapters.qalora import QALoraConfig, QALoraLinear
from memtune.errors import ConfigError
from memtune.models import build_preset
from memtune.recipe import load_recipe
from memtune.storage import STORAGE
from memtune.storage.int4 import IntConfig, IntLinear, load_quantized, pack_codes, quantize_groups, unpack_codes
from memtune.train import train

ALPACA = str(ROOT / "examples" / "data" / "alpaca.jsonl")


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_group_quantization_round_trip_is_within_half_a_step(bits):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    q, scale, zero = quantize_groups(w, bits, 16)
    assert q.dtype == torch.uint8 and int(q.max()) <= 2 ** bits - 1 and scale.shape == (8, 4)
    deq = (q.float() - zero.repeat_interleave(16, 1)) * scale.repeat_interleave(16, 1)
    assert ((deq - w).abs() <= scale.repeat_interleave(16, 1) / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_codes_are_bit_packed_and_unpack_exactly(bits):
    q = torch.randint(0, 2 ** bits, (5, 64), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    packed = pack_codes(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), q)
    if bits == 4:  # two codes per byte, low nibble first
        assert torch.equal(packed, q[:, 0::2] | (q[:, 1::2] << 4))
    layer = IntLinear.from_weight(torch.randn(5, 64), None, bits, 32)
    assert layer.qweight.numel() == 5 * 64 * bits // 8


def test_int_linear_output_equals_dequantized_matmul():
    lin = torch.nn.Linear(64, 24)
    q = IntLinear.from_weight(lin.weight.data, lin.bias.data, 4, 32)
    x = torch.randn(3, 64)
    torch.testing.assert_close(q(x), x @ q.dequantized().T + lin.bias.data, atol=1e-5, rtol=1e-5)


def quantized_llama(group=32):
    m = build_preset("tiny-llama", "causal-lm").model
    STORAGE.get("int4")(IntConfig(bits=4, group_size=group)).apply(m)
    return m


def test_every_linear_but_the_head_is_quantized():
    m = quantized_llama()
    assert sum(isinstance(x, IntLinear) for x in m.modules()) == 14
    assert isinstance(m.lm_head, torch.nn.Linear)


def test_merge_into_zero_points_keeps_the_outputs_and_removes_the_adapter():
    m = quantized_llama().eval()
    method = ADAPTERS.get("qalora")(QALoraConfig(r=4, alpha=8), "causal-lm")
    method.attach(m)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ids = torch.randint(3, 250, (2, 10), generator=g)
    with torch.no_grad():
        before = m(input_ids=ids).logits
        merged = method.merged(m)
        after = merged(input_ids=ids).logits
    assert not any(isinstance(x, QALoraLinear) for x in merged.modules())
    assert sum(isinstance(x, IntLinear) for x in merged.modules()) == 14
    torch.testing.assert_close(after, before, atol=1e-4, rtol=0)


def test_qalora_pooled_update_equals_its_expanded_weight():
    base = IntLinear.from_weight(torch.randn(12, 64), None, 4, 16)
    layer = QALoraLinear(base, r=2, alpha=4)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 64)
    want = x @ (base.dequantized() + layer.delta_weight()).T
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    assert layer.lora_A.weight.shape == (2, 4)  # acts on d_in / group_size pooled inputs


def test_training_saving_merging_and_reloading_the_int_model(tmp_path):
    from memtune.evaluate import load_for_eval
    from memtune.merge import merge

    run_dir = tmp_path / "run"
    s = train(load_recipe(None, ["model=tiny-llama", f"data.train={ALPACA}", "quantize.kind=int4",
                                 "quantize.group_size=32", "adapter.kind=qalora", "adapter.r=4",
                                 "train.max_steps=3", "train.batch_size=4", "optimizer.lr=1e-2"]
                          + base_overrides(run_dir)))
    assert s["train"]["loss_last"] > 0
    run = load_for_eval(str(run_dir), [])
    trainable = [n for n, p in run.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = run.model.eval()(input_ids=ids).logits
    merge(str(run_dir), str(tmp_path / "merged"))
    reloaded = load_quantized(tmp_path / "merged")
    assert not any("lora" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_qalora_needs_an_int_base_and_a_dividing_group_size():
    with pytest.raises(ConfigError, match="group-quantized base"):
        ADAPTERS.get("qalora")(QALoraConfig(r=4), "causal-lm").attach(build_preset("tiny-llama", "causal-lm").model)
    with pytest.raises(ConfigError, match="does not divide"):
        STORAGE.get("int4")(IntConfig(group_size=48)).apply(build_preset("tiny-llama", "causal-lm").model)
    with pytest.raises(ConfigError, match="quantize.bits"):
        load_recipe(None, ["quantize.kind=int4", "quantize.bits=5", "adapter.kind=lora"])


def test_tokentune_over_qalora_hooks_the_quantized_projections():
    from memtune.gradient.tokentune import TokenTune, TokenTuneConfig

    m = quantized_llama()
    ADAPTERS.get("qalora")(QALoraConfig(r=4), "causal-lm").attach(m)
    tt = TokenTune(TokenTuneConfig(select=0.5), m, 0, "causal-lm")
    hooked = {n.rsplit(".", 1)[-1] for n, _ in tt.modules}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "mlp"} <= hooked


def test_int_linear_backward_matches_autograd_and_keeps_no_dequantized_weight():
    from memtune.memory.tracker import MemoryTracker

    q = IntLinear.from_weight(torch.randn(24, 64), torch.randn(24), 4, 32)
    x = torch.randn(3, 64, requires_grad=True)
    q(x).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (x2 @ q.dequantized().T + q.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    tracker = MemoryTracker(q)
    x3 = torch.randn(3, 64, requires_grad=True)
    with tracker.measure(x3):
        q(x3).sum().backward()
    assert tracker.report().activations == 0  # a linear output summed: nothing but the layer is needed
