"""A folder that records how it is stored loads as what it is (memtune.stored)."""

import json

import pytest

from conftest import ROOT, base_overrides
from memtune.cli import main
from memtune.errors import ConfigError
from memtune.evaluate import evaluate
from memtune.merge import merge
from memtune.recipe import load_recipe
from memtune.train import train

DEMO = ROOT / "src" / "memtune" / "demo_data"
TRAIN, TEST = str(DEMO / "sentiment_train.tsv"), str(DEMO / "sentiment_test.tsv")
ALPACA = str(ROOT / "examples" / "data" / "alpaca.jsonl")
CLS = ["model=tiny-bert", "task=classification", f"data.train={TRAIN}", f"data.eval={TEST}", "train.max_steps=3",
       "train.batch_size=8"]


def _eval_cli(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_merged_qalora_classifier_evaluates_with_model_and_data_only(tmp_path, capsys):
    run = tmp_path / "run"
    train(load_recipe(None, CLS + ["quantize.kind=int4", "quantize.group_size=16", "adapter.kind=qalora",
                                   "pooling=mean", "optimizer.lr=1e-2"] + base_overrides(run)))
    merge(str(run), str(tmp_path / "merged"))
    got = _eval_cli(capsys, f"model={tmp_path / 'merged'}", f"data.eval={TEST}")
    want = evaluate(str(run), [])
    assert got["accuracy"] == want["accuracy"] and got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    r = load_recipe(None, [f"model={tmp_path / 'merged'}"])  # what the folder filled in
    assert (r.quantize.kind, r.quantize.bits, r.quantize.group_size) == ("int4", 4, 16)
    assert (r.task, r.data.labels, r.pooling, r.adapter.kind) == ("classification", ["negative", "positive"], "mean",
                                                                  "none")


def test_a_requantized_nf4_merge_evaluates_as_nf4(tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "run"
    train(load_recipe(None, CLS + ["quantize.kind=nf4", "adapter.kind=lora"] + base_overrides(run)))
    assert main(["merge", str(run), "--to", str(tmp_path / "q"), "--requantize", "nf4"]) == 0
    r = load_recipe(None, [f"model={tmp_path / 'q'}"])
    assert (r.quantize.kind, r.quantize.double_quant, r.quantize.compute_dtype) == ("nf4", True, "fp32")
    got = _eval_cli(capsys, f"model={tmp_path / 'q'}", f"data.eval={TEST}")
    want = evaluate(str(run), [])
    assert got["examples"] == want["examples"] and got["loss"] == pytest.approx(want["loss"], rel=1e-2)


def test_a_merged_float_model_keeps_its_task_and_labels_as_defaults(tmp_path, capsys):
    run = tmp_path / "run"
    train(load_recipe(None, CLS + ["adapter.kind=lora", "data.labels=[negative,positive]"] + base_overrides(run)))
    merge(str(run), str(tmp_path / "merged"))
    got = _eval_cli(capsys, f"model={tmp_path / 'merged'}", f"data.eval={TEST}")
    assert got["accuracy"] == evaluate(str(run), [])["accuracy"]
    # what the model was used for is a default, not a fact: another task may be set
    assert load_recipe(None, [f"model={tmp_path / 'merged'}", "data.labels=[a,b,c]"]).data.labels == ["a", "b", "c"]
    assert load_recipe(None, [f"model={tmp_path / 'merged'}"]).adapter.kind == "full"  # float: trains as usual


def test_contradicting_storage_settings_name_both_values_and_the_file(tmp_path):
    from memtune.quantize import quantize_to_folder

    folder = tmp_path / "q"
    quantize_to_folder(load_recipe(None, ["model=tiny-llama", "quantize.kind=int4", "quantize.group_size=16",
                                          "adapter.kind=none"]), folder)
    for key, given, stored in [("quantize.kind", "nf4", "int4"), ("quantize.group_size", "32", "16"),
                               ("quantize.bits", "3", "4")]:
        extra = [] if key == "quantize.kind" else ["quantize.kind=int4"]
        with pytest.raises(ConfigError, match=f"{key}={given}: model '{folder}' is stored with {key}={stored} "
                                              f"\\({folder}/memtune_quantization.json\\); drop {key}"):
            load_recipe(None, [f"model={folder}", f"{key}={given}", *extra])
    same = load_recipe(None, [f"model={folder}", "quantize.kind=int4", "quantize.group_size=16"])
    assert same.quantize.group_size == 16  # the same value, given again, is fine


def test_training_over_a_stored_folder_reads_its_storage_and_needs_an_adapter(tmp_path):
    from memtune.quantize import quantize_to_folder

    folder = tmp_path / "q"
    quantize_to_folder(load_recipe(None, ["model=tiny-llama", "quantize.kind=int4", "quantize.group_size=16",
                                          "adapter.kind=none"]), folder)
    s = train(load_recipe(None, [f"model={folder}", "adapter.kind=qalora", "adapter.r=4", f"data.train={ALPACA}",
                                 "train.max_steps=2", "train.batch_size=4"] + base_overrides(tmp_path / "run")))
    assert s["recipe"]["quantize"]["group_size"] == 16 and s["train"]["steps"] == 2
    with pytest.raises(ConfigError, match="adapter.kind=none: the recipe leaves no trainable parameter"):
        train(load_recipe(None, [f"model={folder}", f"data.train={ALPACA}", "train.max_steps=1"]
                          + base_overrides(tmp_path / "run2")))


def test_a_broken_record_is_named(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "memtune_quantization.json").write_text("{not json")
    with pytest.raises(Exception, match="memtune_quantization.json: cannot read it as JSON"):
        load_recipe(None, [f"model={folder}"])
    (folder / "memtune_quantization.json").write_text('{"layers": {"a": {"bits": 4}}}')
    with pytest.raises(Exception, match="memtune_quantization.json: not a memtune quantization file"):
        load_recipe(None, [f"model={folder}"])
