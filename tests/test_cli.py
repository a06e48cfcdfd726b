"""The `memtune` command: train/eval/merge round trips and clear errors for bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, base_overrides, write_jsonl
from memtune.cli import main

ALPACA = str(ROOT / "examples" / "data" / "alpaca.jsonl")
ALPACA_EVAL = str(ROOT / "examples" / "data" / "alpaca_eval.jsonl")
SENT_TRAIN = str(ROOT / "src" / "memtune" / "demo_data" / "sentiment_train.tsv")
SENT_TEST = str(ROOT / "src" / "memtune" / "demo_data" / "sentiment_test.tsv")


def cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_train_eval_merge_round_trip(tmp_path, capsys, kind):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    code, stdout, err = cli(capsys, "train", "model=tiny-llama", f"data.train={ALPACA}", f"data.eval={ALPACA_EVAL}",
                            f"adapter.kind={kind}", "train.max_steps=3", "optimizer.lr=1e-2",
                            *base_overrides(out))
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    code, stdout, err = cli(capsys, "eval", out)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-6)
    code, stdout, err = cli(capsys, "eval", out, f"data.eval={ALPACA}")
    assert json.loads(stdout)["examples"] == 40
    # merged model: plain transformers, same logits as the trained run
    code, stdout, err = cli(capsys, "merge", out, "--to", tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    from memtune.evaluate import load_for_eval

    run = load_for_eval(str(out), [])
    run.model.eval()
    x = torch.randint(3, 250, (2, 9))
    torch.testing.assert_close(merged(input_ids=x).logits, run.model(input_ids=x).logits, atol=1e-5, rtol=0)
    assert "lora" not in json.dumps(list(merged.state_dict()))


def test_classification_eval_reports_accuracy(tmp_path, capsys):
    out = tmp_path / "cls"
    code, _, err = cli(capsys, "train", "model=tiny-bert", "task=classification", f"data.train={SENT_TRAIN}",
                       f"data.eval={SENT_TEST}", "adapter.kind=lora", "train.max_steps=2", *base_overrides(out))
    assert code == 0, err
    code, stdout, err = cli(capsys, "eval", out)
    res = json.loads(stdout)
    assert code == 0 and 0 <= res["accuracy"] <= 1 and res["examples"] == 80
    from transformers import AutoModelForSequenceClassification

    cli(capsys, "merge", out, "--to", tmp_path / "m")
    m = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert m.config.id2label == {0: "negative", 1: "positive"}


def test_eval_of_a_config_evaluates_the_base(tmp_path, capsys):
    code, stdout, err = cli(capsys, "eval", "model=tiny-llama", f"data.eval={ALPACA_EVAL}")
    assert code == 0, err
    assert json.loads(stdout)["loss"] > 4  # random init over a 261-token vocabulary: about ln(261)


BAD = [
    (["train", "adapter.kind=lora", "adapter.rr=3"], "adapter.rr: unknown key"),
    (["train", "train.batch_size=abc"], "train.batch_size: expected an integer, got 'abc'"),
    (["train", "data.train=/nonexistent/train.jsonl"], "/nonexistent/train.jsonl: data file not found"),
    (["train", "model=tiny-llama"], "data.train: no training data given"),
    (["train", "missing.yaml"], "missing.yaml: config file not found"),
    (["train", "model=/no/such/model", f"data.train={ALPACA}"], "model '/no/such/model'"),
    (["train", f"data.train={ALPACA}", "adapter.kind=lora", "adapter.targets=[nothing_here]"],
     "adapter.targets: ['nothing_here'] matches no module"),
    (["eval", "model=tiny-llama"], "data.eval: nothing to evaluate on"),
    (["train", "--resume", f"data.train={ALPACA}"], "--resume: no checkpoint"),
]


@pytest.mark.parametrize("args, needle", BAD)
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, needle):
    code, out, err = cli(capsys, *args, *([f"output_dir={tmp_path / 'o'}"] if args[0] == "train" else []))
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_data_rows_are_reported_with_file_and_line(tmp_path, capsys):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": oops}\n')
    code, _, err = cli(capsys, "train", f"data.train={bad_json}", f"output_dir={tmp_path / 'a'}")
    assert code == 2 and "bad.jsonl line 2: not valid JSON" in err
    labels = write_jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"},
                                                {"text": "c", "label": "meh"}])
    code, _, err = cli(capsys, "train", "model=tiny-bert", "task=classification", f"data.train={labels}",
                       "data.labels=[pos,neg]", f"output_dir={tmp_path / 'b'}")
    assert code == 2 and "l.jsonl line 3: unknown label 'meh'" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    code, _, err = cli(capsys, "train", f"data.train={empty}", f"output_dir={tmp_path / 'c'}")
    assert code == 2 and "empty.jsonl: no examples" in err
    missing_col = write_jsonl(tmp_path / "m.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "z"}])
    code, _, err = cli(capsys, "train", f"data.train={missing_col}", f"output_dir={tmp_path / 'd'}")
    assert code == 2 and "m.jsonl line 2: missing field 'output'" in err


def test_real_process_exit_code_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-m", "memtune", "train", "adapter.kind=lora", "adapter.r=x"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 2
    assert p.stderr.strip() == "memtune: error: adapter.r: expected an integer, got 'x'"


def test_merge_refuses_non_empty_target(tmp_path, capsys):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "f").write_text("x")
    code, _, err = cli(capsys, "merge", tmp_path, "--to", tmp_path / "t")
    assert code == 2 and "not empty" in err
