"""DyLoRA: truncated LoRA per step, evaluation at any rank, frozen-mode gradients, files (plain LoRA for
PEFT when truncated), and the rank schedule under backprop and MeZO."""

import json
import shutil

import peft
import pytest
import torch

from conftest import base_overrides, inputs, logits, randomize
from memtune.adapters import ADAPTERS, disabled_adapters, load_adapter
from memtune.adapters.dylora import DyLoraConfig, DyLoraLinear, sample_rank
from memtune.adapters.lora import LoraConfig
from memtune.errors import ConfigError
from memtune.models import build_preset
from memtune.recipe import load_recipe
from memtune.train import train


pytestmark = pytest.mark.usefixtures("one_thread")


def base(preset="tiny-llama", task="causal-lm"):
    return build_preset(preset, task, ["neg", "pos"] if task == "classification" else None).model


def attach(model, task="causal-lm", **kw):
    method = ADAPTERS.get("dylora")(DyLoraConfig(**{"r": 6, "alpha": 12.0, "targets": ["q_proj", "v_proj"], **kw}),
                                    task)
    method.attach(model)
    return method








@pytest.mark.parametrize("b", [1, 3, 6])
def test_eval_at_rank_b_is_lora_truncated_to_b_and_loads_in_peft(tmp_path, b):
    m = base()
    method = attach(m)
    randomize(m)
    method.set_rank(b)
    ours = logits(m)
    # a LoRA of rank b with A[:b], B[:, :b] and scale alpha / b
    lora = base()
    lm = ADAPTERS.get("lora")(LoraConfig(r=b, alpha=12.0, targets=["q_proj", "v_proj"]), "causal-lm")
    lm.attach(lora)
    src = dict(m.named_parameters())
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if n.endswith("lora_A.weight"):
                p.copy_(src[n][:b])
            elif n.endswith("lora_B.weight"):
                p.copy_(src[n][:, :b])
    torch.testing.assert_close(ours, logits(lora), atol=1e-6, rtol=0)
    # saved truncated, the file is a plain PEFT LoRA of rank b
    method.config.save_rank = b
    out = method.save(m, tmp_path, "tiny-llama")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == b and cfg["lora_alpha"] == 12.0
    pm = peft.PeftModel.from_pretrained(base(), str(out))
    torch.testing.assert_close(ours, logits(pm), atol=1e-6, rtol=0)


def test_ranks_differ_and_the_scale_follows_the_rank():
    m = base()
    method = attach(m)
    randomize(m)
    outs = []
    for b in (1, 2, 6):
        method.set_rank(b)
        outs.append(logits(m))
        assert m.model.layers[0].self_attn.q_proj.scaling == 12.0 / b
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


@pytest.mark.parametrize("mode, r_min", [("frozen", 1), ("all", 1), ("frozen", 3)])
def test_gradients_reach_only_the_trained_components(mode, r_min):
    torch.manual_seed(0)
    m = base()
    method = attach(m, mode=mode, r=5, r_min=r_min)
    randomize(m)  # B nonzero, so A receives gradients too
    m.train()
    method.before_step(m, 0, 10)
    assert method.ranks.step_rank == sample_rank(0, 0, r_min, 5)
    method.ranks.step_rank = b = 3  # a rank with components on both sides
    m(**inputs(), labels=inputs()["input_ids"]).loss.backward()
    layer = m.model.layers[0].self_attn.q_proj
    a_rows = layer.lora_A.weight.grad.abs().sum(1) > 0  # (r_max,)
    b_cols = layer.lora_B.weight.grad.abs().sum(0) > 0  # (r_max,)
    want = torch.zeros(5, dtype=torch.bool)
    if mode == "frozen" and b > r_min:
        want[b - 1] = True  # only the newest component, row b-1 of A and column b-1 of B
    else:
        want[:b] = True  # mode=all, or the smallest rank: all of its components train
    assert torch.equal(a_rows, want) and torch.equal(b_cols, want)
    method.after_update(m, 0, 10)
    assert method.ranks.step_rank is None and method.ranks.rank == 5


def test_rank_sampling_is_uniform_and_a_function_of_seed_and_step():
    draws = [sample_rank(0, s, 2, 5) for s in range(800)]
    assert draws == [sample_rank(0, s, 2, 5) for s in range(800)]
    assert draws != [sample_rank(1, s, 2, 5) for s in range(800)]
    counts = [draws.count(k) for k in range(2, 6)]
    assert sum(counts) == 800 and min(counts) > 160  # ~200 each
    torch.manual_seed(5)
    method = ADAPTERS.get("dylora")(DyLoraConfig(r=5, r_min=2), "causal-lm")
    assert method.seed == 5  # the run's seed (the trainer seeds torch before building the run)
    torch.manual_seed(9)
    resumed = ADAPTERS.get("dylora")(DyLoraConfig(r=5, r_min=2), "causal-lm")
    resumed.load_state_dict(method.state_dict())  # what a checkpoint keeps
    m = base()  # not attached: no layers to hold
    for step in (0, 7, 123):
        method.before_step(m, step, 200)
        resumed.before_step(m, step, 200)
        assert method.ranks.step_rank == resumed.ranks.step_rank == sample_rank(5, step, 2, 5)


def test_merge_at_the_eval_rank_equals_unmerged_and_unmerge_restores():
    m = base()
    w0 = {n: p.detach().clone() for n, p in m.named_parameters()}
    method = attach(m, targets=["all-linear"], rank=4)
    randomize(m)
    ref = logits(m)
    layers = [x for x in m.modules() if isinstance(x, DyLoraLinear)]
    for layer in layers:
        layer.merge()
    method.set_rank(2)  # changing the rank after merging changes nothing until unmerged
    torch.testing.assert_close(logits(m), ref, atol=1e-5, rtol=0)
    for layer in layers:
        layer.unmerge()
    for n, p in m.named_parameters():
        if "base_layer" in n:
            torch.testing.assert_close(p, w0[n.replace(".base_layer", "")], atol=1e-6, rtol=0)
    at2 = logits(m)
    merged = method.merged(m)
    assert not any(isinstance(x, DyLoraLinear) for x in merged.modules())
    torch.testing.assert_close(logits(merged), at2, atol=1e-5, rtol=0)


def test_disabled_adapter_is_the_base_model():
    plain = base()
    m = base()
    attach(m)
    randomize(m)
    with disabled_adapters(m):
        torch.testing.assert_close(logits(m), logits(plain))
    assert not torch.allclose(logits(m), logits(plain))


def test_save_load_round_trip_keeps_every_rank(tmp_path):
    m = base("tiny-bert", "classification")
    method = attach(m, "classification", targets=["query", "value"], r_min=2, mode="all", rank=5)
    randomize(m)
    out = method.save(m, tmp_path, "tiny-bert")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["r_min"], cfg["mode"], cfg["rank"]) == ("DYLORA", 6, 2, "all", 5)
    assert cfg["modules_to_save"] == ["classifier"]
    m2 = base("tiny-bert", "classification")
    loaded = load_adapter(m2, out, "classification")
    assert loaded.config.r_min == 2 and loaded.config.mode == "all"
    for b in (5, 2, 6):  # the file's rank first, then any other
        method.set_rank(b)
        loaded.set_rank(b)
        torch.testing.assert_close(logits(m2), logits(m), atol=0, rtol=0)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"adapter\.r_min: expected 1 <= r_min <= r \(r = 4\), got 5"):
        load_recipe(None, ["adapter.kind=dylora", "adapter.r=4", "adapter.r_min=5"])
    with pytest.raises(ConfigError, match=r"adapter\.r_min: expected 1 <= r_min"):
        load_recipe(None, ["adapter.kind=dylora", "adapter.r_min=0"])
    with pytest.raises(ConfigError, match=r"adapter\.rank: expected 0 \(= r\) or a rank in 1\.\.8"):
        load_recipe(None, ["adapter.kind=dylora", "adapter.rank=9"])
    with pytest.raises(ConfigError, match=r"adapter\.save_rank"):
        load_recipe(None, ["adapter.kind=dylora", "adapter.r=4", "adapter.save_rank=5"])
    with pytest.raises(ConfigError, match=r"adapter\.mode: expected one of 'frozen', 'all'"):
        load_recipe(None, ["adapter.kind=dylora", "adapter.mode=some"])
    with pytest.raises(ConfigError, match=r"adapter\.rslora: unknown key for adapter\.kind 'dylora'"):
        load_recipe(None, ["adapter.kind=dylora", "adapter.rslora=true"])


def _record_ranks(monkeypatch):
    """(rank, model.training) of every forward of the first DyLoRA layer that runs."""
    seen, first = [], []
    forward = DyLoraLinear.forward

    def spy(self, x):
        if not first:
            first.append(self)
        if self is first[0]:
            seen.append((self.ranks.rank, self.training))
        return forward(self, x)

    monkeypatch.setattr(DyLoraLinear, "forward", spy)
    return seen


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """20 backprop steps on tiny-llama; records the rank of every forward, with step boundaries."""
    tmp = tmp_path_factory.mktemp("dylora")
    data = tmp / "alpaca.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Repeat the word {w}.", "input": "", "output": f"{w} {w}"})
                            + "\n" for w in ["apple", "river", "stone", "cloud", "ember", "flute", "grape", "harp"]))
    mp = pytest.MonkeyPatch()
    seen = _record_ranks(mp)
    marks = []
    try:
        s = train(load_recipe(None, [
            "model=tiny-llama", f"data.train={data}", f"data.eval={data}", "train.batch_size=2",
            "adapter.kind=dylora", "adapter.r=8", "adapter.alpha=16", "adapter.mode=all", "optimizer.lr=1e-2",
            "train.max_steps=20", "train.eval_at_start=true", "train.schedule=constant", "train.seed=3",
        ] + base_overrides(tmp / "run", **{"train.measure_memory_steps": 0})),
            callbacks=[lambda e: marks.append(len(seen))])
    finally:
        mp.undo()
    return {"summary": s, "dir": tmp / "run", "seen": seen, "marks": marks, "data": data}


def test_training_lowers_the_loss_with_one_sampled_rank_per_step(llama_run):
    s, seen, marks = llama_run["summary"], llama_run["seen"], llama_run["marks"]
    assert s["eval"]["loss"] < s["eval_start"]["loss"] - 0.1
    assert s["adapter"]["r_max"] == 8 and s["adapter"]["rank_seed"] == 3
    evals, steps = seen[:marks[0] - 1], [seen[marks[0] - 1:marks[0]]]  # eval_at_start, then step 0's forward
    steps += [seen[a:b] for a, b in zip(marks, marks[1:])]
    assert len(evals) == 4 and all(r == 8 and not training for r, training in evals)  # 4 eval batches: rank r
    for step, forwards in enumerate(steps):
        assert forwards == [(sample_rank(3, step, 1, 8), True)]
    assert all(r == 8 for r, _ in seen[marks[-1]:])  # the final evaluation: rank r_max
    assert len({f[0][0] for f in steps}) > 3


def test_one_run_evaluates_at_several_ranks(llama_run, tmp_path, capsys):
    from memtune.cli import main
    from memtune.evaluate import evaluate, load_for_eval

    run_dir = str(llama_run["dir"])
    full = evaluate(run_dir, [])
    assert full["loss"] == pytest.approx(llama_run["summary"]["eval"]["loss"], abs=1e-5)
    assert main(["eval", run_dir, "adapter.rank=2"]) == 0
    at2 = json.loads(capsys.readouterr().out)
    at1 = evaluate(run_dir, ["adapter.rank=1"])
    assert len({round(x["loss"], 6) for x in (full, at2, at1)}) == 3
    with pytest.raises(ConfigError, match=r"adapter\.rank: expected 0 \(= r\) or a rank in 1\.\.8"):
        evaluate(run_dir, ["adapter.rank=9"])
    # saved truncated to rank 2: a plain LoRA file; PEFT reads it with the same logits, and a run
    # directory holding it evaluates as the rank-2 DyLoRA did
    run = load_for_eval(run_dir, ["adapter.rank=2", "adapter.save_rank=2"])
    out = run.method.save(run.model, tmp_path / "cut", "tiny-llama")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    pm = peft.PeftModel.from_pretrained(base(), str(out))
    torch.testing.assert_close(logits(run.model), logits(pm), atol=1e-6, rtol=0)
    cut_run = tmp_path / "cut_run"
    shutil.copytree(run_dir, cut_run)
    shutil.rmtree(cut_run / "adapter")
    shutil.copytree(out, cut_run / "adapter")
    assert evaluate(str(cut_run), [])["loss"] == pytest.approx(at2["loss"], abs=1e-5)


def test_classification_trains_the_head_and_evaluates_from_its_files(tmp_path, cls_file):
    from memtune.evaluate import evaluate

    s = train(load_recipe(None, [
        "model=tiny-bert", "task=classification", f"data.train={cls_file}", f"data.eval={cls_file}",
        "train.batch_size=8", "data.max_length=16", "adapter.kind=dylora", "adapter.r=4", "optimizer.lr=1e-2",
        "train.max_steps=20", "train.eval_at_start=true", "train.schedule=constant",
    ] + base_overrides(tmp_path / "run", **{"train.measure_memory_steps": 0})))
    assert s["eval"]["loss"] < s["eval_start"]["loss"] - 0.1
    assert s["adapter"]["modules_to_save"] == ["classifier"]
    assert evaluate(str(tmp_path / "run"), [])["loss"] == pytest.approx(s["eval"]["loss"], abs=1e-5)


def test_mezo_steps_keep_their_sampled_rank_across_forwards(tmp_path, cls_file, monkeypatch):
    seen = _record_ranks(monkeypatch)
    marks = []
    train(load_recipe(None, [
        "model=tiny-bert", "task=classification", f"data.train={cls_file}", "train.batch_size=8",
        "data.max_length=16", "adapter.kind=dylora", "adapter.r=4", "adapter.targets=[query]",
        "optimizer.kind=mezo", "optimizer.lr=1e-4", "optimizer.samples=2", "train.max_steps=3", "train.seed=4",
    ] + base_overrides(tmp_path / "run", **{"train.measure_memory_steps": 0})),
        callbacks=[lambda e: marks.append(len(seen))])
    bounds = [0] + marks
    for step in range(3):
        forwards = seen[bounds[step]:bounds[step + 1]]
        # 2 samples x (l+, l-), all in eval mode (MeZO's), all at the step's rank
        assert forwards == [(sample_rank(4, step, 1, 4), False)] * 4


@pytest.mark.parametrize("mode", ["frozen", "all"])
def test_a_zeroth_order_step_changes_only_the_components_it_trains(mode):
    m = base()
    method = attach(m, r=4, mode=mode)
    method.rule_uses_backprop = False  # what a zeroth-order rule sets
    layers = [x for x in m.modules() if isinstance(x, DyLoraLinear)]
    before = [(x.lora_A.weight.clone(), x.lora_B.weight.clone()) for x in layers]
    method.before_step(m, 5, 10)
    b = method.ranks.step_rank
    trained = [b - 1] if mode == "frozen" and b > 1 else list(range(b))
    with torch.no_grad():  # a zeroth-order update moves every entry
        for x in layers:
            x.lora_A.weight.add_(1.0)
            x.lora_B.weight.add_(1.0)
    method.after_update(m, 5, 10)
    assert method.ranks.step_rank is None
    for x, (a0, b0) in zip(layers, before):
        for i in range(4):
            moved = not torch.equal(x.lora_A.weight[i], a0[i])
            assert moved == (i in trained) and moved == (not torch.equal(x.lora_B.weight[:, i], b0[:, i])), i


def test_mezo_leaves_components_above_every_sampled_rank_untouched(tmp_path, cls_file):
    ranks = [sample_rank(2, step, 1, 4) for step in range(3)]
    assert max(ranks) == 2  # seed 2 samples 1, 2, 1
    train(load_recipe(None, [
        "model=tiny-bert", "task=classification", f"data.train={cls_file}", "train.batch_size=8",
        "data.max_length=16", "adapter.kind=dylora", "adapter.r=4", "adapter.mode=all", "optimizer.kind=mezo",
        "optimizer.lr=1e-2", "train.max_steps=3", "train.seed=2",
    ] + base_overrides(tmp_path / "run", **{"train.measure_memory_steps": 0})))
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    bs = [v for k, v in tensors.items() if k.endswith("lora_B.weight")]
    assert bs and all(torch.all(v[:, 2:] == 0) for v in bs)  # B starts at zero: never moved
    assert any(v[:, :2].abs().sum() > 0 for v in bs)  # the sampled components did
