"""MeZO: exact restore after the perturbations, z identical across its uses, the update rule, an unbiased
gradient estimate on a quadratic, only trainable tensors touched, variants, objectives, trajectory replay."""

import contextlib
import copy

import pytest
import torch
from torch import nn

from conftest import ROOT, base_overrides
from memtune.adapters import ADAPTERS
from memtune.adapters.lora import LoraConfig
from memtune.errors import ConfigError
from memtune.gradient.mezo import Mezo, MezoConfig, full_z, macro_f1, replay
from memtune.models import build_preset
from memtune.recipe import TrainConfig, load_recipe
from memtune.tasks import CausalLMTask, ClassificationTask
from memtune.train import train

ALPACA = str(ROOT / "examples" / "data" / "alpaca.jsonl")
SENT_TRAIN = str(ROOT / "src" / "memtune" / "demo_data" / "sentiment_train.tsv")
SENT_TEST = str(ROOT / "src" / "memtune" / "demo_data" / "sentiment_test.tsv")


# ------------------------------------------------------------------------------------------------
# A quadratic: L(theta) = 0.5 (theta - c)^T H (theta - c), gradient H (theta - c)


class Quadratic(nn.Module):
    def __init__(self, d=12, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.randn(d, generator=g))
        a = torch.randn(d, d, generator=g)
        self.register_buffer("H", a @ a.T / d + torch.eye(d))
        self.register_buffer("c", torch.randn(d, generator=g))

    def loss(self):
        r = self.theta - self.c
        return 0.5 * r @ self.H @ r

    def grad(self):
        return self.H @ (self.theta.detach() - self.c)


class QuadTask:
    name = "quadratic"

    def loss_sum(self, model, batch):
        return model.loss(), {}

    def count(self, batch):
        return 1

    def tokens(self, batch):
        return 1


def rule_for(model, task=None, steps=100, train_cfg=None, **cfg):
    c = MezoConfig(**cfg)
    c.check("optimizer")
    return Mezo(c, model, task or QuadTask(), train_cfg or TrainConfig(schedule="constant"), steps,
                contextlib.nullcontext)


def test_perturbation_sequence_restores_parameters_in_fp32():
    m = build_preset("tiny-llama", "causal-lm").model
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    rule = rule_for(m, CausalLMTask(), eps=1e-3, chunk=1000)  # chunk < largest tensor: sliced z
    seed = rule.step_seed(0, 0)
    rule.perturb(seed, +1.0)
    rule.perturb(seed, -2.0)
    rule.perturb(seed, +1.0)
    f32 = torch.finfo(torch.float32).eps
    for k, (n, p) in enumerate(m.named_parameters()):
        z = full_z(p, seed, k, 1000)
        bound = 4 * f32 * (before[n].abs() + 1e-3 * z.abs())  # a few roundings of |theta| + eps |z|
        assert ((p.detach() - before[n]).abs() <= bound).all(), n


def test_z_is_identical_in_every_use_and_the_step_is_minus_lr_g_z():
    m = Quadratic()
    rule = rule_for(m, lr=0.01, eps=1e-3, chunk=5)
    theta0 = m.theta.detach().clone()
    seed = rule.step_seed(0, 0)
    z = full_z(m.theta, seed, 0, 5)
    torch.testing.assert_close(full_z(m.theta, seed, 0, 5), z, rtol=0, atol=0)  # regenerated: same bits
    # l+ and l- are the losses at theta +- eps z with this very z
    with torch.no_grad():
        m.theta.copy_(theta0 + 1e-3 * z)
        l_plus = float(m.loss())
        m.theta.copy_(theta0 - 1e-3 * z)
        l_minus = float(m.loss())
        m.theta.copy_(theta0)
    stats = rule.step([{}])
    assert stats.loss == pytest.approx(l_plus, rel=1e-6)
    g = stats.projected_grad
    assert g == pytest.approx((l_plus - l_minus) / 2e-3, rel=1e-3)
    torch.testing.assert_close(m.theta.detach(), theta0 - 0.01 * g * z, atol=1e-6, rtol=0)


def test_mean_of_single_seed_estimates_approaches_the_gradient():
    m = Quadratic(d=10)
    rule = rule_for(m, eps=1e-4)
    true = m.grad()
    total = torch.zeros_like(true)
    n = 3000
    for i in range(n):
        seed = rule.step_seed(i, 0)
        g, _ = rule.estimate({}, seed)
        total += g * full_z(m.theta, seed, 0, rule.config.chunk)
    est = total / n
    cos = float(torch.nn.functional.cosine_similarity(est, true, dim=0))
    assert cos > 0.9, cos


def test_n_spsa_applies_each_seed_with_lr_over_n():
    m = Quadratic()
    m2 = copy.deepcopy(m)  # before any round trip: restores are exact only up to rounding
    rule = rule_for(m, lr=0.01, samples=3)
    theta0 = m.theta.detach().clone()
    gs = []
    for j in range(3):
        g, _ = rule.estimate({}, rule.step_seed(0, j))
        gs.append(g)
    rule2 = rule_for(m2, lr=0.01, samples=3)
    rule2.step([{}])
    expect = theta0 - sum(0.01 / 3 * g * full_z(m.theta, rule.step_seed(0, j), 0, rule.config.chunk)
                          for j, g in enumerate(gs))
    torch.testing.assert_close(m2.theta.detach(), expect, atol=1e-6, rtol=0)


def test_weight_decay_skips_vectors():
    lin = nn.Linear(4, 3)
    task = QuadTask()
    lin.loss = lambda: (lin.weight.sum() + lin.bias.sum()) * 0.0  # zero loss: only decay moves weights
    rule = rule_for(lin, task, lr=0.1, weight_decay=0.5)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    rule.step([{}])
    torch.testing.assert_close(lin.weight.detach(), w0 * (1 - 0.05))
    torch.testing.assert_close(lin.bias.detach(), b0)


@pytest.mark.parametrize("variant", ["momentum", "adam"])
def test_recomputed_state_equals_dense_state_within_the_window(variant):
    a, b = Quadratic(), Quadratic()
    ra = rule_for(a, lr=0.01, variant=variant, state="recompute", history=10, samples=2)
    rb = rule_for(b, lr=0.01, variant=variant, state="dense", samples=2)
    for _ in range(6):
        ra.step([{}])
        rb.step([{}])
    torch.testing.assert_close(a.theta.detach(), b.theta.detach(), atol=1e-6, rtol=1e-5)
    assert rb.optimizer is not None and ra.optimizer is None  # dense buffers are optimizer state


def test_mezo_on_a_quadratic_descends():
    for variant in ("sgd", "momentum", "adam"):
        m = Quadratic()
        start = float(m.loss().detach())
        rule = rule_for(m, lr=0.02 if variant != "adam" else 0.01, variant=variant, eps=1e-3)
        for _ in range(300):
            rule.step([{}])
        assert float(m.loss().detach()) < 0.5 * start, variant


def test_lora_base_weights_bit_identical_after_training():
    m = build_preset("tiny-llama", "causal-lm").model
    ADAPTERS.get("lora")(LoraConfig(r=4, alpha=8, targets=["all-linear"]), "causal-lm").attach(m)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    rule = rule_for(m, CausalLMTask(), lr=1e-2, eps=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (2, 16), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    for _ in range(3):
        rule.step([batch])
    changed = [n for n, p in m.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_mezo_over_virtual_tokens_moves_only_them_and_lowers_the_loss(kind):
    """MeZO-prefix (the paper's MeZO with prefix tuning) is a recipe: adapter.kind=prefix + optimizer.kind=mezo."""
    from memtune.recipe import build_recipe

    cfg = build_recipe({}, [f"adapter.kind={kind}", "adapter.num_virtual_tokens=4"]).adapter
    m = build_preset("tiny-llama", "causal-lm").model
    ADAPTERS.get(kind)(cfg, "causal-lm").attach(m)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    rule = rule_for(m, CausalLMTask(), steps=40, lr=5e-2, eps=1e-2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (2, 16), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    losses = [rule.step([batch]).loss for _ in range(40)]
    changed = {n for n, p in m.named_parameters() if not torch.equal(p.detach(), before[n])}
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable and all("prompt_encoder" in n for n in trainable)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5


@pytest.mark.parametrize("variant,fuse", [("sgd", True), ("sgd", False), ("momentum", True), ("adam", True)])
def test_replaying_a_trajectory_reproduces_the_trained_weights(tmp_path, variant, fuse):
    m = build_preset("tiny-llama", "causal-lm").model
    fresh = copy.deepcopy(m)
    rule = rule_for(m, CausalLMTask(), steps=5, train_cfg=TrainConfig(schedule="linear", warmup_steps=1, seed=3),
                    lr=1e-2, eps=1e-2, variant=variant, samples=2, trajectory=True, chunk=4096, fuse_update=fuse)
    assert rule.fused == (fuse and variant == "sgd")
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids = torch.randint(3, 250, (2, 12), generator=g)
        rule.step([{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}])
    files = rule.save_artifacts(tmp_path)
    assert files["trajectory_bytes"] < 100_000
    assert replay(fresh, tmp_path) == 5
    for (n, p), q in zip(m.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("samples,wd", [(1, 0.1), (2, 0.0)])
def test_fused_restore_and_update_equals_the_unfused_step_with_one_z_draw_fewer(monkeypatch, samples, wd):
    """theta2 (1 - a) + (eps (1 - a) - lr/n g) z is the restore followed by the update, in exact math."""
    import memtune.gradient.mezo as mezo_mod

    lin_f, lin_u = nn.Linear(16, 8), nn.Linear(16, 8)
    lin_u.load_state_dict(lin_f.state_dict())
    x = torch.randn(4, 16)

    class LinTask(QuadTask):
        def loss_sum(self, model, batch):
            return (model(x) ** 2).mean(), {}

    draws = {"n": 0}
    real = mezo_mod.z_slices

    def counted(p, seed, index, chunk):
        if index == 0:
            draws["n"] += 1
        yield from real(p, seed, index, chunk)

    monkeypatch.setattr(mezo_mod, "z_slices", counted)
    counts = []
    for lin, fuse in ((lin_f, True), (lin_u, False)):
        rule = rule_for(lin, LinTask(), lr=0.05, eps=1e-2, samples=samples, weight_decay=wd, fuse_update=fuse)
        assert rule.fused == fuse
        draws["n"] = 0
        for _ in range(3):
            rule.step([{}])
        counts.append(draws["n"])
    assert counts == [3 * (4 * samples - 1), 3 * 4 * samples]  # 4 draws per seed, one fewer per step fused
    for a, b in zip(lin_f.parameters(), lin_u.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert rule_for(nn.Linear(2, 2), samples=2, weight_decay=0.1).fused is False  # reorders decayed updates


def test_replay_rejects_a_different_model(tmp_path):
    m = Quadratic()
    rule = rule_for(m, trajectory=True)
    rule.step([{}])
    rule.save_artifacts(tmp_path)
    with pytest.raises(ConfigError, match="trainable parameters differ"):
        replay(Quadratic(d=5), tmp_path)
    with pytest.raises(ConfigError, match="no MeZO trajectory"):
        replay(m, tmp_path / "nowhere")


def neg_first_logit(outputs, batch):
    """A user objective for the test below: any callable (outputs, batch) -> scalar."""
    return -float(outputs.logits[:, 0].mean())


def test_objectives_accuracy_f1_and_callable():
    m = build_preset("tiny-bert", "classification", ["neg", "pos"]).model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (8, 10), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "label": torch.tensor([0, 1] * 4)}
    with torch.no_grad():
        pred = m(input_ids=ids, attention_mask=batch["attention_mask"]).logits.argmax(-1)
        first = float(m(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, 0].mean())
    task = ClassificationTask()
    acc = rule_for(m, task, objective="accuracy").loss(batch)
    assert acc == pytest.approx(-float((pred == batch["label"]).float().mean()))
    f1 = rule_for(m, task, objective="f1").loss(batch)
    assert f1 == pytest.approx(-macro_f1(pred, batch["label"], 2))
    custom = rule_for(m, task, objective=f"{__name__}:neg_first_logit").loss(batch)
    assert custom == pytest.approx(-first, rel=1e-5)


def test_macro_f1_by_hand():
    pred, gold = torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 1, 1, 0])
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp0 fn1 -> 0.8; class 2: tp0 fp1 fn0 -> 0
    assert macro_f1(pred, gold, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_bad_configurations_fail_with_reasons(tmp_path):
    base = ["model=tiny-llama", f"data.train={ALPACA}", "optimizer.kind=mezo"]
    with pytest.raises(ConfigError, match="grad_accum"):
        load_recipe(None, base + ["train.grad_accum=2"])
    with pytest.raises(ConfigError, match="does not backpropagate"):
        load_recipe(None, base + ["tokentune.select=8"])
    with pytest.raises(ConfigError, match="optimizer.objective"):
        load_recipe(None, base + ["optimizer.objective=bleu"])
    with pytest.raises(ConfigError, match="optimizer.eps"):
        load_recipe(None, base + ["optimizer.eps=0"])
    with pytest.raises(ConfigError, match="classification"):
        load_recipe(None, base + ["optimizer.objective=accuracy"])
    with pytest.raises(ConfigError, match="cannot import"):
        train(load_recipe(None, base + ["optimizer.objective=nosuchmodule:f", "train.max_steps=1"]
                          + base_overrides(tmp_path / "r2")))


@pytest.mark.parametrize("extra", [[], ["adapter.kind=lora", "adapter.r=4", "optimizer.lr=1e-3"]])
def test_training_run_has_no_gradients_optimizer_state_or_saved_activations(tmp_path, extra):
    s = train(load_recipe(None, ["model=tiny-bert", "task=classification", f"data.train={SENT_TRAIN}",
                                 f"data.eval={SENT_TEST}", "optimizer.kind=mezo", "optimizer.lr=1e-5",
                                 "optimizer.trajectory=true", "train.max_steps=4", "train.batch_size=8",
                                 "data.max_length=32"] + extra + base_overrides(tmp_path / "run")))
    mem = s["memory_bytes"]
    assert mem["gradients"] == 0 and mem["optimizer"] == 0 and mem["activations"] == 0
    assert s["gradient"]["rule"] == "mezo" and s["gradient"]["trajectory"] == "trajectory.safetensors"
    assert (tmp_path / "run" / "trajectory.safetensors").is_file()
    assert "accuracy" in s["eval"]


def test_resume_continues_the_same_trajectory(tmp_path):
    common = ["model=tiny-llama", f"data.train={ALPACA}", "optimizer.kind=mezo", "optimizer.lr=1e-3",
              "optimizer.variant=momentum", "train.batch_size=4", "train.max_steps=6"]
    full = train(load_recipe(None, common + base_overrides(tmp_path / "a")))
    # the same run killed after step 4 (checkpoint at step 3), then resumed to step 6
    part = common + ["train.save_every=3"] + base_overrides(tmp_path / "c")
    with pytest.raises(_Stop):
        train(load_recipe(None, part), callbacks=[_stop_after(4)])
    resumed = train(load_recipe(None, part), resume=True)
    assert resumed["train"]["loss_last"] == pytest.approx(full["train"]["loss_last"], rel=1e-6)


class _Stop(Exception):
    pass


def _stop_after(n):
    def cb(event):
        if event.step >= n:
            raise _Stop()
    return cb


@pytest.mark.parametrize("extra", [["adapter.kind=lora", "adapter.r=4"], [],
                                   ["adapter.kind=dylora", "adapter.r=4", "adapter.mode=all"]])
def test_replay_command_rebuilds_the_trained_artifact(tmp_path, extra):
    from safetensors.torch import load_file

    from memtune.cli import main

    run_dir = tmp_path / "run"
    train(load_recipe(None, ["model=tiny-llama", f"data.train={ALPACA}", "optimizer.kind=mezo",
                             "optimizer.lr=1e-3", "optimizer.trajectory=true", "train.max_steps=4",
                             "train.batch_size=4"] + extra + base_overrides(run_dir)))
    assert main(["replay", str(run_dir), "--to", str(tmp_path / "replayed")]) == 0
    sub = "adapter/adapter_model.safetensors" if extra else "model/model.safetensors"
    a, b = load_file(str(run_dir / sub)), load_file(str(tmp_path / "replayed" / sub))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert main(["replay", str(run_dir), "--to", str(tmp_path / "replayed")]) == 2  # not empty: refused


@pytest.mark.parametrize("objective", ["ce", "accuracy"])
def test_mezo_trains_a_prompt_classifier_through_its_label_word_scores(tmp_path, objective):
    s = train(load_recipe(ROOT / "examples" / "tiny-llama-sentiment-prompt-mezo-lora.yaml",
                          [f"optimizer.objective={objective}", "train.max_steps=3", "optimizer.trajectory=false"]
                          + base_overrides(tmp_path / "run")))
    assert s["gradient"]["rule"] == "mezo" and s["gradient"]["objective"] == objective
    assert s["memory_bytes"]["gradients"] == 0 and "accuracy" in s["eval"]
