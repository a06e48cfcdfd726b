"""The training loop end to end on tiny models: outputs, accumulation, resume, atomic checkpoints."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, base_overrides
from memtune.data import collate
from memtune.errors import MemtuneError
from memtune.gradient.backprop import accumulate_gradients
from memtune.models import build_preset
from memtune.recipe import load_recipe
from memtune.tasks import CausalLMTask
from memtune.train import train

ALPACA = str(ROOT / "examples" / "data" / "alpaca.jsonl")
ALPACA_EVAL = str(ROOT / "examples" / "data" / "alpaca_eval.jsonl")
SENT_TRAIN = str(ROOT / "src" / "memtune" / "demo_data" / "sentiment_train.tsv")
SENT_TEST = str(ROOT / "src" / "memtune" / "demo_data" / "sentiment_test.tsv")

LLAMA = ["model=tiny-llama", f"data.train={ALPACA}", f"data.eval={ALPACA_EVAL}", "train.max_steps=4",
         "train.batch_size=4", "optimizer.lr=1e-3"]
BERT = ["model=tiny-bert", "task=classification", f"data.train={SENT_TRAIN}", f"data.eval={SENT_TEST}",
        "train.max_steps=4", "train.batch_size=8", "optimizer.lr=1e-3", "data.max_length=32"]
LORA_LLAMA = ["adapter.kind=lora", "adapter.r=4", "adapter.targets=[q_proj,v_proj]"]
LORA_BERT = ["adapter.kind=lora", "adapter.r=4", "adapter.targets=[query,value]"]


def run(tmp_path, name, overrides, **kw):
    return train(load_recipe(None, overrides + base_overrides(tmp_path / name)), **kw)


@pytest.fixture(scope="module")
def four_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    return {
        "llama-full": run(tmp, "llama-full", LLAMA), "llama-lora": run(tmp, "llama-lora", LLAMA + LORA_LLAMA),
        "bert-full": run(tmp, "bert-full", BERT), "bert-lora": run(tmp, "bert-lora", BERT + LORA_BERT),
    }


@pytest.mark.parametrize("name", ["llama-full", "llama-lora", "bert-full", "bert-lora"])
def test_summary_is_complete(four_runs, name):
    s = four_runs[name]
    out = s["recipe"]["output_dir"]
    assert s["params"]["total"] > s["params"]["trainable"] > 0 or name.endswith("full")
    mem = s["memory_bytes"]
    for k in ("parameters", "gradients", "optimizer", "activations", "peak"):
        assert isinstance(mem[k], int) and mem[k] > 0, k
    assert mem["peak"] >= mem["parameters"] + mem["gradients"]
    t = s["train"]
    assert t["steps"] == 4 and t["tokens_per_second"] > 0 and t["seconds"] > 0
    assert t["loss_first"] > 0 and t["loss_last"] > 0
    assert s["eval"]["loss"] > 0
    if name.startswith("bert"):
        assert 0 <= s["eval"]["accuracy"] <= 1
    assert s["device"] == "cpu"
    on_disk = json.loads(open(os.path.join(out, "summary.json")).read())
    assert on_disk["train"] == t
    rows = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert any("eval_loss" in r for r in rows)
    assert os.path.getsize(os.path.join(out, "loss.png")) > 1000
    artifact = "model" if name.endswith("full") else "adapter"
    assert os.path.isdir(os.path.join(out, artifact)) and s["adapter"]["artifact"] == artifact


@pytest.mark.parametrize("model", ["llama", "bert"])
def test_lora_gradient_and_optimizer_bytes_below_5_percent_of_full(four_runs, model):
    full, lora = four_runs[f"{model}-full"]["memory_bytes"], four_runs[f"{model}-lora"]["memory_bytes"]
    assert lora["gradients"] < 0.05 * full["gradients"]
    assert lora["optimizer"] < 0.05 * full["optimizer"]
    assert lora["parameters"] >= full["parameters"]  # the frozen base is still there
    assert lora["peak"] < full["peak"]


def test_loss_decreases_with_training(tmp_path):
    s = run(tmp_path, "r", LLAMA + ["train.max_steps=15", "optimizer.lr=3e-3"])
    assert s["train"]["loss_last"] < s["train"]["loss_first"] - 0.5


def test_grad_accumulation_normalizes_over_all_targets():
    """Two micro-batches with different target counts give the gradient of their concatenation."""
    torch.manual_seed(0)
    model = build_preset("tiny-llama", "causal-lm").model
    task = CausalLMTask()
    ex = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (5, 17, 9, 30)]
    ctx = contextlib.nullcontext

    def grads(batches):
        model.zero_grad()
        total, n = accumulate_gradients(model, task, batches, ctx)
        return total / n, [p.grad.clone() for p in model.parameters()]

    loss_a, ga = grads([collate(ex[:1], 0), collate(ex[1:], 0)])
    loss_b, gb = grads([collate(ex, 0)])
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # a per-micro-batch mean would weight the 4-target batch like the 53-target one: not equal
    model.zero_grad()
    for b in (collate(ex[:1], 0), collate(ex[1:], 0)):
        s, _ = task.loss_sum(model, b)
        (s / task.count(b) / 2).backward()
    assert not torch.allclose(model.model.embed_tokens.weight.grad, gb[0], atol=1e-6)


class Crash(Exception):
    pass


def crash_at(step):
    def cb(event):
        if event.step == step:
            raise Crash()
    return cb


@pytest.mark.parametrize("adapter", [[], LORA_LLAMA + ["adapter.dropout=0.1"]])
def test_resume_matches_uninterrupted_run(tmp_path, adapter):
    recipe = LLAMA + adapter + ["train.max_steps=8", "train.save_every=3", "train.grad_accum=2",
                                "train.batch_size=2", "train.schedule=cosine", "train.warmup_steps=2"]
    full = run(tmp_path, "full", recipe)
    with pytest.raises(Crash):
        run(tmp_path, "crashed", recipe, callbacks=[crash_at(5)])
    assert (tmp_path / "crashed" / "checkpoints" / "step-000003").is_dir()
    with pytest.raises(MemtuneError, match="pass --resume"):
        run(tmp_path, "crashed", recipe)
    resumed = run(tmp_path, "crashed", recipe, resume=True)
    assert resumed["train"]["loss_last"] == full["train"]["loss_last"]
    assert resumed["train"]["steps"] == 8
    losses = lambda d: [json.loads(ln)["loss"] for ln in open(d / "metrics.jsonl") if '"loss"' in ln]  # noqa: E731
    assert losses(tmp_path / "crashed") == losses(tmp_path / "full")


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(MemtuneError, match="--resume: no checkpoint"):
        run(tmp_path, "none", LLAMA, resume=True)


def test_crash_while_checkpointing_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import memtune.checkpoint as ck

    recipe = LLAMA + ["train.max_steps=8", "train.save_every=2"]
    real = ck.save_file
    calls = {"n": 0}

    def flaky(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint dies half-written
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError("disk full")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", flaky)
    with pytest.raises(OSError):
        run(tmp_path, "r", recipe)
    latest = ck.latest_checkpoint(tmp_path / "r")
    assert latest.name == "step-000002"
    monkeypatch.setattr(ck, "save_file", real)
    resumed = run(tmp_path, "r", recipe, resume=True)
    reference = run(tmp_path, "ref", recipe)
    assert resumed["train"]["loss_last"] == reference["train"]["loss_last"]


def test_killed_process_resumes_to_the_same_loss(tmp_path):
    """A real SIGKILL after a checkpoint: the resumed run ends where an uninterrupted one does."""
    recipe = LLAMA + ["train.max_steps=40", "train.save_every=2", "train.batch_size=2"]
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "memtune", "train", *recipe, *base_overrides(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "checkpoints" / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "summary.json").exists():
        pytest.skip("the run finished before it could be killed")
    resumed = run(tmp_path, "killed", recipe, resume=True)
    reference = run(tmp_path, "reference", recipe)
    assert resumed["train"]["loss_last"] == reference["train"]["loss_last"]


def test_bf16_autocast_and_gradient_checkpointing_run(tmp_path):
    s = run(tmp_path, "bf16", LLAMA + LORA_LLAMA + ["train.precision=bf16", "train.gradient_checkpointing=true"])
    assert s["train"]["steps"] == 4 and s["train"]["loss_last"] > 0
    plain = run(tmp_path, "plain", LLAMA + LORA_LLAMA)
    ckpt = run(tmp_path, "ckpt", LLAMA + LORA_LLAMA + ["train.gradient_checkpointing=true"])
    assert ckpt["memory_bytes"]["activations"] < plain["memory_bytes"]["activations"]
    assert ckpt["train"]["loss_last"] == pytest.approx(plain["train"]["loss_last"], rel=1e-5)


def test_tensorboard_logs(tmp_path):
    pytest.importorskip("tensorboard")
    run(tmp_path, "tb", LLAMA + ["train.tensorboard=true"])
    assert any((tmp_path / "tb" / "tensorboard").iterdir())
