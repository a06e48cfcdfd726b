"""VeRA: the shared random pair, math, files, and parity with PEFT (the oracle) in both directions."""

import json

import peft
import pytest
import torch
from torch import nn

from conftest import base_overrides, logits, randomize
from memtune.adapters import ADAPTERS, load_adapter
from memtune.adapters.vera import VeraConfig, VeraLinear, VeraProjections, draw_projections
from memtune.errors import ConfigError, ModelError
from memtune.models import build_preset
from memtune.recipe import load_recipe
from memtune.train import train


pytestmark = pytest.mark.usefixtures("one_thread")


CASES = [  # preset, task, targets (memtune), targets (PEFT)
    ("tiny-llama", "causal-lm", ["q_proj", "up_proj"], ["q_proj", "up_proj"]),
    ("tiny-llama", "causal-lm", ["all-linear"], "all-linear"),
    ("tiny-gpt2", "causal-lm", ["c_attn", "c_fc"], ["c_attn", "c_fc"]),
    ("tiny-bert", "classification", ["all-linear"], "all-linear"),
]


def base(preset="tiny-llama", task="causal-lm"):
    return build_preset(preset, task, ["neg", "pos"] if task == "classification" else None).model


def attach(model, task="causal-lm", **kw):
    method = ADAPTERS.get("vera")(VeraConfig(**{"r": 8, **kw}), task)
    method.attach(model)
    return method


def peft_model(preset, task, targets, **kw):
    cfg = peft.VeraConfig(task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM", target_modules=targets,
                          **{"r": 8, **kw})
    return peft.get_peft_model(base(preset, task), cfg)








@pytest.mark.parametrize("preset, task, targets, peft_targets", CASES)
def test_same_config_and_weights_give_peft_logits_and_trainable_count(preset, task, targets, peft_targets):
    m = base(preset, task)
    method = attach(m, task, targets=targets, projection_prng_key=3)
    pm = peft_model(preset, task, peft_targets, projection_prng_key=3)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == \
        sum(p.numel() for p in pm.parameters() if p.requires_grad)
    # the shared pair, drawn from the seed, is PEFT's bit for bit
    assert torch.equal(method.projections.vera_A, pm.base_model.vera_A["default"])
    assert torch.equal(method.projections.vera_B, pm.base_model.vera_B["default"])
    torch.testing.assert_close(logits(m), logits(pm), atol=0, rtol=0)  # b = 0: both are the base
    randomize(m)
    theirs = dict(pm.named_parameters())
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith(("vera_lambda_b", "vera_lambda_d")):
                theirs[f"base_model.model.{n}.default"].copy_(p)
            elif p.requires_grad:  # the head (modules_to_save)
                theirs[f"base_model.model.{n.replace('.', '.modules_to_save.default.', 1)}"].copy_(p)
    torch.testing.assert_close(logits(m), logits(pm), atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset, task, targets, peft_targets", CASES)
@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT warns that save_projection=False relies on the seed
def test_memtune_adapter_loads_in_peft_with_same_logits(tmp_path, preset, task, targets, peft_targets,
                                                        save_projection):
    m = base(preset, task)
    method = attach(m, task, targets=targets, save_projection=save_projection, projection_prng_key=7)
    randomize(m)
    out = method.save(m, tmp_path, preset)
    pm = peft.PeftModel.from_pretrained(base(preset, task), str(out))
    torch.testing.assert_close(logits(m), logits(pm), atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset, task, targets, peft_targets", CASES)
@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT warns that save_projection=False relies on the seed
def test_peft_adapter_loads_in_memtune_with_same_logits(tmp_path, preset, task, targets, peft_targets,
                                                        save_projection):
    pm = peft_model(preset, task, peft_targets, save_projection=save_projection, projection_prng_key=11,
                    d_initial=0.05)
    randomize(pm, seed=3)
    pm.save_pretrained(tmp_path / "peft")
    m = base(preset, task)
    method = load_adapter(m, tmp_path / "peft", task)
    assert method.config.projection_prng_key == 11 and method.config.save_projection is save_projection
    torch.testing.assert_close(logits(m), logits(pm), atol=1e-6, rtol=0)


def test_forward_math_init_and_slicing():
    a, b = draw_projections(4, 16, 12, key=0)
    shared = VeraProjections(a, b)
    lin = nn.Linear(10, 6)
    layer = VeraLinear(lin, shared, d_initial=0.1)
    x = torch.randn(3, 10)
    torch.testing.assert_close(layer(x), lin(x))  # b = 0 at init
    assert torch.equal(layer.vera_lambda_d.data, torch.full((4,), 0.1)) and layer.vera_lambda_b.shape == (6,)
    nn.init.normal_(layer.vera_lambda_b)
    want = lin(x) + layer.vera_lambda_b * ((layer.vera_lambda_d * (x @ a[:, :10].T)) @ b[:6].T)
    torch.testing.assert_close(layer(x), want)
    torch.testing.assert_close(layer.delta_weight(), torch.diag(layer.vera_lambda_b) @ b[:6] @
                               torch.diag(layer.vera_lambda_d) @ a[:, :10])
    bound = (6 / 16) ** 0.5  # Kaiming uniform, gain sqrt(2): sqrt(6 / fan_in), fan_in = A's second dim
    assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    assert b.abs().max() <= (6 / 4) ** 0.5


def test_one_shared_pair_sized_to_the_largest_layer():
    m = base()
    method = attach(m, targets=["all-linear"], r=16)
    layers = [x for x in m.modules() if isinstance(x, VeraLinear)]
    assert len(layers) == 14 and len({id(x.projections) for x in layers}) == 1
    assert tuple(method.projections.vera_A.shape) == (16, 128)  # max d_in (down_proj)
    assert tuple(method.projections.vera_B.shape) == (128, 16)  # max d_out (gate/up_proj)
    assert sum(1 for _ in m.buffers() if _.shape == (16, 128)) == 1  # one copy, not one per layer
    assert not any("vera_A" in k for k in m.state_dict())  # files store the pair once, not the model state


def test_merge_equals_unmerged_and_unmerge_restores():
    m = base("tiny-gpt2")  # Conv1D weights are (d_in, d_out)
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    method = attach(m, targets=["all-linear"])
    randomize(m)
    ref = logits(m)
    layers = [x for x in m.modules() if isinstance(x, VeraLinear)]
    for layer in layers:
        layer.merge()
    torch.testing.assert_close(logits(m), ref, atol=1e-5, rtol=0)
    for layer in layers:
        layer.unmerge()
    for n, p in m.named_parameters():
        if "base_layer" in n:
            torch.testing.assert_close(p, w0[n.replace(".base_layer", "")], atol=1e-6, rtol=0)
    merged = method.merged(m)
    assert not any(isinstance(x, VeraLinear) for x in merged.modules())
    assert not any("vera" in n for n, _ in merged.named_buffers())
    torch.testing.assert_close(logits(merged), ref, atol=1e-5, rtol=0)


def test_disabled_adapter_is_the_base_model():
    plain = base()
    m = base()
    attach(m, targets=["all-linear"])
    randomize(m)
    layers = [x for x in m.modules() if isinstance(x, VeraLinear)]
    for layer in layers:
        layer.disabled = True
    torch.testing.assert_close(logits(m), logits(plain))
    for layer in layers:
        layer.disabled = False
    assert not torch.allclose(logits(m), logits(plain))


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_load_round_trip(tmp_path, save_projection):
    m = base("tiny-bert", "classification")
    method = attach(m, "classification", targets=["query", "value"], save_projection=save_projection)
    randomize(m)
    out = method.save(m, tmp_path, "tiny-bert")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VERA" and cfg["save_projection"] is save_projection
    assert cfg["modules_to_save"] == ["classifier"]
    from safetensors.torch import load_file

    keys = set(load_file(str(out / "adapter_model.safetensors")))
    assert ("base_model.vera_A" in keys) is save_projection
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.vera_lambda_b" in keys
    m2 = base("tiny-bert", "classification")
    load_adapter(m2, out, "classification")
    torch.testing.assert_close(logits(m2), logits(m), atol=0, rtol=0)
    other = base("tiny-bert", "classification")
    fewer = attach(other, "classification", targets=["query"], save_projection=save_projection)
    with pytest.raises(ModelError, match="does not fit the model: 0 tensors missing .* 4 unexpected"):
        fewer.load(other, out)

def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"adapter\.r: expected a rank >= 1"):
        load_recipe(None, ["adapter.kind=vera", "adapter.r=0"])
    with pytest.raises(ConfigError, match=r"adapter\.dropout"):
        load_recipe(None, ["adapter.kind=vera", "adapter.dropout=1.5"])
    with pytest.raises(ConfigError, match=r"adapter\.alpha: unknown key for adapter\.kind 'vera'"):
        load_recipe(None, ["adapter.kind=vera", "adapter.alpha=16"])
    with pytest.raises(ConfigError, match=r"adapter\.save_projection: expected true or false"):
        load_recipe(None, ["adapter.kind=vera", "adapter.save_projection=maybe"])


@pytest.mark.parametrize("model", ["llama", "bert"])
def test_training_lowers_the_loss_and_the_run_evaluates_from_its_files(tmp_path, alpaca_file, cls_file, model):
    from memtune.evaluate import evaluate

    if model == "llama":
        over = ["model=tiny-llama", f"data.train={alpaca_file}", f"data.eval={alpaca_file}", "train.batch_size=2",
                "adapter.targets=all-linear", "optimizer.lr=2e-2"]
    else:
        over = ["model=tiny-bert", "task=classification", f"data.train={cls_file}", f"data.eval={cls_file}",
                "train.batch_size=8", "data.max_length=16", "adapter.targets=all-linear", "optimizer.lr=5e-2"]
    over += ["adapter.kind=vera", "adapter.r=16", "train.max_steps=20", "train.eval_at_start=true",
             "train.schedule=constant", "adapter.save_projection=false"]
    s = train(load_recipe(None, over + base_overrides(tmp_path / "run", **{"train.measure_memory_steps": 0})))
    assert s["eval"]["loss"] < s["eval_start"]["loss"] - 0.1
    assert s["adapter"]["kind"] == "vera" and s["adapter"]["projections"]["A"][0] == 16
    again = evaluate(str(tmp_path / "run"), [])
    assert again["loss"] == pytest.approx(s["eval"]["loss"], abs=1e-5)
