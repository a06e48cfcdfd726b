"""AdaLoRA: the SVD-form layer, the regularizer, importance and the budget schedule against PEFT's
RankAllocator (the oracle), files in both directions, and real runs through the training loop."""

import json
import os
import shutil

import peft
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, base_overrides, inputs, logits, randomize
from memtune.adapters import ADAPTERS, disabled_adapters, load_adapter
from memtune.adapters.adalora import AdaLoraConfig, AdaLoraLinear, budget_schedule, keep_top
from memtune.errors import ConfigError, MemtuneError
from memtune.models import build_preset
from memtune.recipe import build_recipe
from memtune.train import train

ALPACA = str(ROOT / "examples" / "data" / "alpaca.jsonl")
SENT_TRAIN = str(ROOT / "src" / "memtune" / "demo_data" / "sentiment_train.tsv")
LLAMA = ["model=tiny-llama", f"data.train={ALPACA}", "train.batch_size=4", "optimizer.lr=3e-2"]
BERT = ["model=tiny-bert", "task=classification", f"data.train={SENT_TRAIN}", "train.batch_size=8",
        "optimizer.lr=5e-3", "data.max_length=32"]
ADA = ["adapter.kind=adalora", "adapter.init_r=4", "adapter.target_r=2"]

pytestmark = [  # PEFT warns on its own AdaLoRA files: rank_pattern keys name lora_E, pruned-away modules are 0-sized
    pytest.mark.filterwarnings("ignore:The following rank_pattern keys"),
    pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape"),
]

CASES = [  # preset, task, targets (memtune), targets (PEFT)
    ("tiny-llama", "causal-lm", ["all-linear"], "all-linear"),
    ("tiny-gpt2", "causal-lm", ["c_attn", "c_fc"], ["c_attn", "c_fc"]),
    ("tiny-bert", "classification", ["query", "value"], ["query", "value"]),
]


def base(preset, task):
    return build_preset(preset, task, ["neg", "pos"] if task == "classification" else None).model


def attach(model, task, **kw):
    method = ADAPTERS.get("adalora")(AdaLoraConfig(**kw), task)
    method.attach(model)
    return method


def peft_model(preset, task, targets, **kw):
    cfg = dict(task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM", init_r=4, target_r=2,
               lora_alpha=8, target_modules=targets, total_step=10, fan_in_fan_out=preset == "tiny-gpt2")
    return peft.get_peft_model(base(preset, task), peft.AdaLoraConfig(**{**cfg, **kw}))


def peft_name(name):
    """memtune's `<module>.lora_A` -> PEFT's in-memory `base_model.model.<module>.lora_A.default`."""
    if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_E"):
        return f"base_model.model.{name}.default"
    module, _, leaf = name.rpartition(".")  # modules_to_save: PEFT trains a copy
    return f"base_model.model.{module}.modules_to_save.default.{leaf}"


def copy_into_peft(m, pm):
    theirs = dict(pm.named_parameters())
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad:
                theirs[peft_name(n)].copy_(p)








# -- the layer and parity with PEFT -----------------------------------------------------------


def test_init_forward_math_and_scale():
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24)
    layer = AdaLoraLinear(lin, r=6, alpha=8.0)
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), lin(x))  # Λ = 0 at init
    assert layer.lora_E.shape == (6, 1) and layer.lora_A.shape == (6, 40) and layer.lora_B.shape == (24, 6)
    assert 0.01 < float(layer.lora_A.detach().std()) < 0.03 and 0.01 < float(layer.lora_B.detach().std()) < 0.03
    with torch.no_grad():
        layer.lora_E.normal_()
    expected = lin(x) + (8.0 / 6) * x @ (layer.lora_A * layer.lora_E).T @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)
    pruned = AdaLoraLinear(torch.nn.Linear(40, 24), r=2, alpha=8.0, init_r=6)  # a loaded, pruned layer
    assert float(pruned.ranknum) == 6.0  # the scale stays alpha / init_r


@pytest.mark.parametrize("preset, task, targets, peft_targets", CASES)
def test_trainable_count_and_logits_equal_peft(preset, task, targets, peft_targets):
    m = base(preset, task)
    attach(m, task, init_r=4, target_r=2, targets=targets)
    pm = peft_model(preset, task, peft_targets)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == \
        sum(p.numel() for p in pm.parameters() if p.requires_grad)
    randomize(m, scale=0.2)
    copy_into_peft(m, pm)
    torch.testing.assert_close(logits(m), logits(pm), atol=1e-5, rtol=0)


def test_orthogonal_regularizer_equals_peft():
    m = base("tiny-llama", "causal-lm")
    method = attach(m, "causal-lm", init_r=4, target_r=2, targets=["all-linear"], orth_reg_weight=0.3)
    pm = peft_model("tiny-llama", "causal-lm", "all-linear", orth_reg_weight=0.3)
    randomize(m, scale=0.2)
    copy_into_peft(m, pm)
    x = inputs()["input_ids"]
    reg = method.regularizer(m)
    # PEFT adds γ R inside forward whenever the model returns a loss
    torch.testing.assert_close(m(input_ids=x, labels=x).loss + reg, pm(input_ids=x, labels=x).loss)
    a = m.model.layers[0].self_attn.q_proj.lora_A
    assert reg.item() > 0 and torch.autograd.grad(reg, a)[0].abs().sum() > 0
    assert attach(base("tiny-llama", "causal-lm"), "causal-lm", orth_reg_weight=0.0).regularizer(m) is None


@pytest.mark.parametrize("tinit, tfinal, delta_t, total", [(0, 0, 1, 10), (2, 3, 2, 15), (5, 0, 3, 7)])
def test_budget_schedule_equals_peft(tinit, tfinal, delta_t, total):
    pm = peft_model("tiny-llama", "causal-lm", ["q_proj", "v_proj"], init_r=6, target_r=2,
                    tinit=tinit, tfinal=tfinal, deltaT=delta_t, total_step=total)
    ra = pm.base_model.rankallocator
    assert (ra.init_bgt, ra.target_bgt) == (24, 8)
    for t in range(total + 2):
        assert budget_schedule(t, 24, 8, tinit, tfinal, total, delta_t) == ra.budget_schedule(t), t


def test_importance_and_masks_follow_peft_step_by_step():
    """The same weights, batches and AdamW: after every step PEFT's update_and_allocate(t) and our
    after_update (the loop's hook) leave the same importance EMAs, budget, masks and λ."""
    total, delta_t, kw = 6, 2, dict(init_r=4, target_r=2, tinit=1, tfinal=2)  # t=2 prunes, 4 = T - t_f is final
    m = base("tiny-llama", "causal-lm")
    method = attach(m, "causal-lm", targets=["q_proj", "down_proj"], delta_t=delta_t, total_step=total, **kw)
    pm = peft_model("tiny-llama", "causal-lm", ["q_proj", "down_proj"], deltaT=delta_t,
                    total_step=total, **kw)
    copy_into_peft(m, pm)
    ours = [p for p in m.parameters() if p.requires_grad]
    opt_m, opt_p = (torch.optim.AdamW(ps, lr=2e-2) for ps in (ours, [p for p in pm.parameters() if p.requires_grad]))
    ra = pm.base_model.rankallocator
    for t in range(1, total + 1):
        x = inputs(seed=t)["input_ids"]
        method.before_step(m, t - 1, total)
        (m(input_ids=x, labels=x).loss + method.regularizer(m)).backward()
        pm(input_ids=x, labels=x).loss.backward()
        opt_m.step(), opt_p.step()
        method.after_update(m, t - 1, total)
        pm.base_model.update_and_allocate(t)
        for name in method.exp_avg_ipt:  # PEFT's allocator names parameters inside the HF model
            torch.testing.assert_close(method.exp_avg_ipt[name], ra.exp_avg_ipt[f"{name}.default"])
            torch.testing.assert_close(method.exp_avg_unc[name], ra.exp_avg_unc[f"{name}.default"])
        assert method.budget == ra.budget_schedule(t)[0]
        pattern = pm.peft_config["default"].rank_pattern
        assert (pattern is None) == (method.masks is None) == (t < 2), t
        if pattern:
            assert {k: v.tolist() for k, v in method.masks.items()} == \
                {k[: -len(".lora_E.default")]: v for k, v in pattern.items()}, t
        opt_m.zero_grad(), opt_p.zero_grad()
        torch.testing.assert_close(logits(m), logits(pm), atol=1e-5, rtol=0)
        m.train(), pm.train()
    assert method.budget == 2 * 4 and sum(int(k.sum()) for k in method.masks.values()) == 8
    assert method.exp_avg_ipt == {}  # scores are dropped once the mask is final


# -- files in both directions ----------------------------------------------------------------


def pruned(m, method, seed=0):
    """Random factors and a random mask at the target budget, as after a run."""
    randomize(m, seed, scale=0.2)
    g = torch.Generator().manual_seed(seed + 7)
    layers = method._layers
    scores = {n: torch.rand(lay.r, generator=g) for n, lay in layers.items()}
    method.masks = dict(zip(scores, keep_top(list(scores.values()), method.config.target_r * len(layers))))
    method._apply_masks(layers)


@pytest.mark.parametrize("preset, task, targets, peft_targets", CASES)
def test_memtune_adapter_loads_in_peft_with_pruned_ranks(tmp_path, preset, task, targets, peft_targets):
    m = base(preset, task)
    method = attach(m, task, init_r=4, target_r=2, targets=targets)
    pruned(m, method)
    out = method.save(m, tmp_path, preset)
    cfg = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert cfg["peft_type"] == "ADALORA" and all(len(v) == 4 for v in cfg["rank_pattern"].values())
    assert sum(v.shape[0] for k, v in tensors.items() if k.endswith("lora_E")) == 2 * len(method.targets)
    assert not any("ranknum" in k for k in tensors)
    pm = peft.PeftModel.from_pretrained(base(preset, task), str(out))
    torch.testing.assert_close(logits(m), logits(pm), atol=1e-5, rtol=0)
    m2 = base(preset, task)
    load_adapter(m2, out, task)  # and back into memtune, at the pruned ranks
    torch.testing.assert_close(logits(m2), logits(m), atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset, task, targets, peft_targets", CASES)
def test_peft_adapter_loads_in_memtune_with_same_logits(tmp_path, preset, task, targets, peft_targets):
    pm = peft_model(preset, task, peft_targets, tinit=0, tfinal=0, total_step=2)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-2)
    for t in (1, 2):  # a real PEFT run to its final allocation: a rank_pattern with pruned ranks
        x = inputs(seed=t)["input_ids"]
        kwargs = {"labels": torch.tensor([0, 1])} if task == "classification" else {"labels": x}
        pm(input_ids=x, **kwargs).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(t)
        opt.zero_grad()
    pm.save_pretrained(tmp_path / "peft")
    saved = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    assert sum(map(sum, saved.values())) == 2 * len(saved)
    m = base(preset, task)
    method = load_adapter(m, tmp_path / "peft", task)
    assert sum(lay.r for lay in method._layers.values()) == 2 * len(saved)
    torch.testing.assert_close(logits(m), logits(pm), atol=1e-5, rtol=0)


def test_merge_equals_unmerged_and_disabled_is_the_base():
    plain = logits(base("tiny-llama", "causal-lm"))
    m = base("tiny-llama", "causal-lm")
    method = attach(m, "causal-lm", init_r=4, target_r=2)
    pruned(m, method)
    ref = logits(m)
    assert not torch.allclose(ref, plain)
    with disabled_adapters(m):
        torch.testing.assert_close(logits(m), plain)
    merged = method.merged(m)
    assert not any(isinstance(x, AdaLoraLinear) for x in merged.modules())
    torch.testing.assert_close(logits(merged), ref, atol=1e-5, rtol=0)


# -- real runs through the loop ---------------------------------------------------------------

RUN = LLAMA + ADA + ["adapter.targets=[q_proj,v_proj]", "adapter.tinit=3", "adapter.tfinal=5", "adapter.delta_t=2",
                     "train.max_steps=20", "train.save_every=7", "train.measure_memory_steps=0"]


def run(tmp_path, name, overrides, **kw):
    return train(build_recipe({}, overrides + base_overrides(tmp_path / name)), **kw)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """20 steps (two epochs of the 40 examples): t_i = 3, pruning over steps 4-15 every 2nd step, final 5."""
    tmp = tmp_path_factory.mktemp("adalora")
    seen = []

    def record(ev):
        method = ev.run.method
        seen.append((method.budget, sum(int(k.sum()) for k in (method.masks or {}).values())))
        if ev.step == ev.total_steps:
            seen.append(logits(ev.run.model))

    summary = run(tmp, "full", RUN, callbacks=[record])
    return tmp, summary, seen


def test_budget_reaches_target_on_schedule_in_a_run(llama_run):
    tmp, s, seen = llama_run
    *steps, live = seen
    n = 4  # q_proj, v_proj in 2 layers
    expected = [budget_schedule(t, 4 * n, 2 * n, 3, 5, 20, 2) for t in range(1, 21)]
    assert [b for b, _ in steps] == [b for b, _ in expected]
    assert [b for b, _ in steps][:3] == [16] * 3 and [b for b, _ in steps][14:] == [8] * 6  # b(T) at T - t_f = 15
    first = next(t for t, (_, realloc) in enumerate(expected) if realloc)  # masks from the first reallocation on
    kept = [k for _, k in steps]
    assert kept[:first] == [0] * first and kept[14:] == [8] * 6
    assert all(k == b for (b, realloc), k in zip(expected, kept) if realloc)
    a = s["adapter"]
    assert a["budget"] == a["total_rank"] == 8 and a["total_step"] == 20 and sum(a["ranks"].values()) == 8
    out = tmp / "full" / "adapter"
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert sum(v.shape[0] for k, v in tensors.items() if k.endswith("lora_E")) == 2 * n
    pm = peft.PeftModel.from_pretrained(base("tiny-llama", "causal-lm"), str(out))
    torch.testing.assert_close(logits(pm), live, atol=1e-5, rtol=0)  # the saved, cut adapter is the trained model
    m = base("tiny-llama", "causal-lm")
    load_adapter(m, out, "causal-lm")
    torch.testing.assert_close(logits(m), live, atol=1e-5, rtol=0)


def test_twenty_steps_lower_the_loss(llama_run):
    tmp, s, _ = llama_run
    losses = [json.loads(ln)["loss"] for ln in open(tmp / "full" / "metrics.jsonl") if '"loss"' in ln]
    assert len(losses) == 20
    assert sum(losses[10:]) / 10 < sum(losses[:10]) / 10 - 0.05  # epoch 2 vs epoch 1, the same examples


def test_eval_and_merge_of_the_run(llama_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from memtune.evaluate import evaluate
    from memtune.merge import merge

    tmp, _, seen = llama_run
    assert evaluate(str(tmp / "full"), [f"data.eval={ALPACA}"])["loss"] > 0  # rebuilt at the saved, pruned ranks
    merged = AutoModelForCausalLM.from_pretrained(merge(str(tmp / "full"), str(tmp_path / "merged")))
    torch.testing.assert_close(logits(merged), seen[-1], atol=1e-5, rtol=0)


def test_resume_continues_exactly(llama_run):
    """Resume the run from its step-14 checkpoint (mid-pruning; step 15 allocates b(T) from the
    restored importance EMAs): the same final adapter, bit for bit."""
    tmp, full, _ = llama_run
    shutil.copytree(tmp / "full", tmp / "resumed")
    for done in ("adapter", "summary.json"):
        (shutil.rmtree if done == "adapter" else os.remove)(tmp / "resumed" / done)
    assert (tmp / "resumed" / "checkpoints" / "latest").read_text().strip() == "step-000014"
    resumed = run(tmp, "resumed", RUN, resume=True)
    assert resumed["train"]["loss_last"] == full["train"]["loss_last"]
    assert resumed["adapter"]["ranks"] == full["adapter"]["ranks"]
    a, b = (load_file(str(tmp / d / "adapter" / "adapter_model.safetensors")) for d in ("full", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_classification_trains_the_head_and_loads_in_peft(tmp_path):
    s = run(tmp_path, "bert", BERT + ADA + ["adapter.targets=[query,value]", "train.max_steps=3", "adapter.tfinal=1",
                                            "train.measure_memory_steps=0"])
    assert s["adapter"]["modules_to_save"] == ["classifier"] and s["adapter"]["total_rank"] == 2 * 4
    out = tmp_path / "bert" / "adapter"
    assert "base_model.model.classifier.weight" in load_file(str(out / "adapter_model.safetensors"))
    pm = peft.PeftModel.from_pretrained(base("tiny-bert", "classification"), str(out))
    m = base("tiny-bert", "classification")
    load_adapter(m, out, "classification")
    torch.testing.assert_close(logits(m), logits(pm), atol=1e-5, rtol=0)
    assert not torch.allclose(logits(m), logits(base("tiny-bert", "classification")))


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, needle", [
    (["adapter.target_r=6"], r"adapter.target_r: expected an average rank between 1 and init_r \(4\), got 6"),
    (["adapter.total_step=5", "adapter.tinit=3", "adapter.tfinal=2"],
     r"adapter.tinit \+ adapter.tfinal = 3 \+ 2 must be below the total steps T \(5"),
    (["adapter.beta1=1.0"], "adapter.beta1: expected 0 < beta1 < 1"),
    (["adapter.delta_t=0"], "adapter.delta_t: expected >= 1"),
    (["optimizer.kind=mezo"], "adapter.kind=adalora with optimizer.kind=mezo: the adapter reads gradients"),
])
def test_config_errors(tmp_path, extra, needle):
    with pytest.raises(ConfigError, match=needle):
        build_recipe({}, LLAMA + ADA + extra + base_overrides(tmp_path / "x"))


def test_schedule_without_a_pruning_phase_in_the_run_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"= 2 \+ 2 must be below the total steps T \(4, from the run's optimizer"):
        run(tmp_path, "x", LLAMA + ADA + ["train.max_steps=4", "adapter.tinit=2", "adapter.tfinal=2"])
    assert not (tmp_path / "x" / "adapter").exists()


def test_adapter_of_another_method_is_refused(tmp_path):
    m = base("tiny-llama", "causal-lm")
    method = ADAPTERS.get("lora")(ADAPTERS.config_class("lora")(r=2, targets=["q_proj"]), "causal-lm")
    method.attach(m)
    out = method.save(m, tmp_path, "tiny-llama")
    with pytest.raises(MemtuneError, match="holds a LORA adapter, but adapter.kind is 'adalora'"):
        run(tmp_path, "y", LLAMA + ADA + [f"adapter.path={out}", "train.max_steps=2"])
