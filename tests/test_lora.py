"""LoRA: math, and parity with PEFT (the oracle) in both directions."""

import math

import peft
import pytest
import torch
from torch import nn

from conftest import inputs, randomize
from memtune.adapters import ADAPTERS, LoraLinear, disabled_adapters, load_adapter
from memtune.adapters.lora import LoraConfig
from memtune.errors import ConfigError, ModelError
from memtune.models import build_preset

CASES = [  # preset, task, targets (memtune), targets (PEFT)
    ("tiny-llama", "causal-lm", ["all-linear"], "all-linear"),
    ("tiny-llama", "causal-lm", ["q_proj", "v_proj"], ["q_proj", "v_proj"]),
    ("tiny-opt", "causal-lm", ["all-linear"], "all-linear"),
    ("tiny-gpt2", "causal-lm", ["c_attn", "c_fc"], ["c_attn", "c_fc"]),
    ("tiny-bert", "classification", ["all-linear"], "all-linear"),
    ("tiny-llama", "classification", ["q_proj", "v_proj"], ["q_proj", "v_proj"]),
]


def base(preset, task):
    return build_preset(preset, task, ["neg", "pos"] if task == "classification" else None).model


def attach(model, task, **kw):
    method = ADAPTERS.get("lora")(LoraConfig(**kw), task)
    method.attach(model)
    return method






def peft_task(task):
    return "SEQ_CLS" if task == "classification" else "CAUSAL_LM"


@pytest.mark.parametrize("preset, task, targets, peft_targets", CASES)
@pytest.mark.parametrize("rslora", [False, True])
def test_trainable_count_equals_peft(preset, task, targets, peft_targets, rslora):
    m = base(preset, task)
    attach(m, task, r=4, alpha=8, targets=targets, rslora=rslora)
    ours = sum(p.numel() for p in m.parameters() if p.requires_grad)
    pm = peft.get_peft_model(base(preset, task), peft.LoraConfig(task_type=peft_task(task), r=4, lora_alpha=8,
                                                                target_modules=peft_targets, use_rslora=rslora))
    theirs = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert ours == theirs


@pytest.mark.parametrize("preset, task, targets, peft_targets", CASES)
def test_memtune_adapter_loads_in_peft_with_same_logits(tmp_path, preset, task, targets, peft_targets):
    m = base(preset, task)
    method = attach(m, task, r=4, alpha=8, targets=targets, rslora=True)
    randomize(m)
    out = method.save(m, tmp_path, preset)
    pm = peft.PeftModel.from_pretrained(base(preset, task), str(out))
    m.eval(), pm.eval()
    torch.testing.assert_close(m(**inputs()).logits, pm(**inputs()).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset, task, targets, peft_targets", CASES)
def test_peft_adapter_loads_in_memtune_with_same_logits(tmp_path, preset, task, targets, peft_targets):
    torch.manual_seed(0)
    cfg = peft.LoraConfig(task_type=peft_task(task), r=4, lora_alpha=16, target_modules=peft_targets,
                          rank_pattern={"v_proj": 2} if "v_proj" in peft_targets else {})
    pm = peft.get_peft_model(base(preset, task), cfg)
    randomize(pm, seed=3)
    pm.save_pretrained(tmp_path / "peft")
    m = base(preset, task)
    load_adapter(m, tmp_path / "peft", task)
    m.eval(), pm.eval()
    torch.testing.assert_close(m(**inputs()).logits, pm(**inputs()).logits, atol=1e-5, rtol=0)


def test_forward_math_and_init():
    torch.manual_seed(0)
    lin = nn.Linear(12, 6)
    layer = LoraLinear(lin, r=3, alpha=6.0)
    x = torch.randn(4, 12)
    torch.testing.assert_close(layer(x), lin(x))  # B = 0 at init
    assert torch.count_nonzero(layer.lora_A.weight) == 3 * 12
    bound = math.sqrt(6 / ((1 + 5) * 12))  # kaiming_uniform(a=sqrt(5)) bound = sqrt(6 / ((1 + a^2) fan_in))
    assert layer.lora_A.weight.abs().max() <= bound
    nn.init.normal_(layer.lora_B.weight)
    expected = lin(x) + (6.0 / 3) * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    torch.testing.assert_close(layer(x), expected)
    rs = LoraLinear(nn.Linear(12, 6), r=4, alpha=6.0, rslora=True)
    assert rs.scaling == pytest.approx(6.0 / 2)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_merge_equals_unmerged_and_unmerge_restores(preset):
    m = base(preset, "causal-lm")
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    method = attach(m, "causal-lm", r=4, alpha=8, targets=["all-linear"])
    randomize(m)
    m.eval()
    ref = m(**inputs()).logits
    layers = [mod for mod in m.modules() if isinstance(mod, LoraLinear)]
    for layer in layers:
        layer.merge()
    torch.testing.assert_close(m(**inputs()).logits, ref, atol=1e-5, rtol=0)
    for layer in layers:
        layer.unmerge()
    for n, p in m.named_parameters():
        if "base_layer" in n:
            torch.testing.assert_close(p, w0[n.replace(".base_layer", "")], atol=1e-6, rtol=0)
    merged = method.merged(m)
    assert not any(isinstance(mod, LoraLinear) for mod in merged.modules())
    torch.testing.assert_close(merged(**inputs()).logits, ref, atol=1e-5, rtol=0)


def test_disabled_adapter_is_the_base_model():
    plain = base("tiny-llama", "causal-lm").eval()
    m = base("tiny-llama", "causal-lm")
    attach(m, "causal-lm", r=4, alpha=8, targets=["all-linear"])
    randomize(m)
    m.eval()
    with disabled_adapters(m):
        torch.testing.assert_close(m(**inputs()).logits, plain(**inputs()).logits)
    assert not torch.allclose(m(**inputs()).logits, plain(**inputs()).logits)


def test_output_head_is_never_a_target():
    m = base("tiny-llama", "causal-lm")
    method = attach(m, "causal-lm", r=2, alpha=2, targets=["all-linear"])
    assert "lm_head" not in method.targets and isinstance(m.lm_head, nn.Linear)
    with pytest.raises(ConfigError, match="is an output head"):
        attach(base("tiny-llama", "causal-lm"), "causal-lm", targets=["lm_head"])


def test_targets_that_match_nothing_or_non_linear():
    with pytest.raises(ConfigError, match=r"\['qproj'\] matches no module of LlamaForCausalLM .*q_proj"):
        attach(base("tiny-llama", "causal-lm"), "causal-lm", targets=["qproj"])
    with pytest.raises(ConfigError, match="is a LlamaAttention, not a linear layer"):
        attach(base("tiny-llama", "causal-lm"), "causal-lm", targets=["self_attn"])


def test_adapter_that_does_not_fit(tmp_path):
    m = base("tiny-llama", "causal-lm")
    method = attach(m, "causal-lm", r=4, alpha=8, targets=["q_proj"])
    out = method.save(m, tmp_path, "tiny-llama")
    other = base("tiny-opt", "causal-lm")
    with pytest.raises(ConfigError, match="matches no module of OPTForCausalLM"):
        load_adapter(other, out, "causal-lm")
    with pytest.raises(ModelError, match="not an adapter directory"):
        load_adapter(other, tmp_path, "causal-lm")
