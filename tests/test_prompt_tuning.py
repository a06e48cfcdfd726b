"""Prompt Tuning: parity with PEFT (the oracle) in both directions, generation, init, training.

Also holds the helpers tests/test_prefix.py shares (PEFT pairs with copied weights, inputs)."""

import warnings

import peft
import pytest
import torch

from conftest import base_overrides, write_jsonl
from memtune.adapters import ADAPTERS, load_adapter
from memtune.adapters.prompt_tuning import PromptTuningConfig, tile
from memtune.adapters.virtual_tokens import disabled_virtual_tokens
from memtune.errors import ConfigError, MemtuneError
from memtune.evaluate import evaluate
from memtune.models import build_preset
from memtune.recipe import build_recipe
from memtune.train import train

warnings.filterwarnings("ignore", message=".*(position ids|Token type ids|inputs_embeds).*")
LABELS = ["neg", "pos"]
PEFT_TASK = {"causal-lm": "CAUSAL_LM", "classification": "SEQ_CLS"}
PAD = {"tiny-bert": 0}  # WordPiece [PAD]; the byte presets pad with 256


pytestmark = pytest.mark.usefixtures("one_thread")


def base(preset, task):
    return build_preset(preset, task, LABELS if task == "classification" else None).model


def attach(model, kind, config, task):
    method = ADAPTERS.get(kind)(config, task)
    method.attach(model)
    return method


def inputs(preset, seed=1):
    """(2, 9) ids; row 1 right-padded after 6 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[1, 6:] = PAD.get(preset, 256)
    return {"input_ids": ids, "attention_mask": mask}


def peft_pair(preset, task, kind, ours, theirs):
    """(memtune model, method, PEFT model) with the same adapter weights (PEFT's, copied across)."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(base(preset, task), theirs)
    m = base(preset, task)
    method = attach(m, kind, ours, task)
    peft_params = dict(pm.prompt_encoder["default"].named_parameters())
    with torch.no_grad():
        for name, p in method.encoder(m).named_parameters():
            p.copy_(peft_params[name])
        for name in method.saved_modules:  # a head different from the base's, in both models
            for pname, p in m.get_submodule(name).named_parameters():
                p.copy_(torch.randn_like(p))
                dict(pm.named_parameters())[f"base_model.{name}.modules_to_save.default.{pname}"].copy_(p)
    return m.eval(), method, pm.eval()


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def real_logits(logits, n, peft_prompt):
    """PEFT's prompt-tuned causal LM returns logits for the n virtual positions too; memtune's do not."""
    return logits[:, n:] if peft_prompt and logits.dim() == 3 else logits


CASES = [("tiny-llama", "causal-lm"), ("tiny-bert", "classification"), ("tiny-gpt2", "causal-lm"),
         ("tiny-opt", "causal-lm")]
N = 3


def configs(task):
    return PromptTuningConfig(num_virtual_tokens=N, init="random"), peft.PromptTuningConfig(
        task_type=PEFT_TASK[task], num_virtual_tokens=N)


# -- parity with PEFT ------------------------------------------------------------------------------


@pytest.mark.parametrize("preset, task", CASES)
def test_same_weights_same_logits_and_trainable_count_as_peft(preset, task):
    m, method, pm = peft_pair(preset, task, "prompt", *configs(task))
    x = inputs(preset)
    with torch.no_grad():
        ours, theirs = m(**x).logits, pm(**x).logits
    torch.testing.assert_close(ours, real_logits(theirs, N, True), atol=1e-5, rtol=0)
    # prompt n·d (+ the head in full for classification): exactly PEFT's trainable set
    assert trainable(m) == trainable(pm) == N * m.config.hidden_size + (
        sum(p.numel() for p in m.classifier.parameters()) if task == "classification" else 0)


@pytest.mark.parametrize("preset, task", CASES[:2])
def test_memtune_adapter_loads_in_peft_with_same_logits(tmp_path, preset, task):
    m, method, _ = peft_pair(preset, task, "prompt", *configs(task))
    out = method.save(m, tmp_path, preset)
    pm = peft.PeftModel.from_pretrained(base(preset, task), str(out)).eval()
    x = inputs(preset)
    with torch.no_grad():
        torch.testing.assert_close(m(**x).logits, real_logits(pm(**x).logits, N, True), atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset, task", CASES[:2])
def test_peft_adapter_loads_in_memtune_with_same_logits(tmp_path, preset, task):
    torch.manual_seed(0)
    pm = peft.get_peft_model(base(preset, task), configs(task)[1]).eval()
    if task == "classification":
        with torch.no_grad():
            pm.base_model.classifier.modules_to_save["default"].weight.normal_()
    pm.save_pretrained(tmp_path)
    m = base(preset, task)
    method = load_adapter(m, tmp_path, task)
    assert type(method).__name__ == "PromptTuning" and method.config.num_virtual_tokens == N
    x = inputs(preset)
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(**x).logits, real_logits(pm(**x).logits, N, True), atol=1e-5, rtol=0)


def test_saved_file_is_peft_layout(tmp_path):
    import json

    from safetensors.torch import load_file

    m = base("tiny-bert", "classification")
    method = attach(m, "prompt", PromptTuningConfig(num_virtual_tokens=5, init="random"), "classification")
    out = method.save(m, tmp_path, "tiny-bert")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "SEQ_CLS" and cfg["num_virtual_tokens"] == 5
    assert cfg["token_dim"] == 64 and cfg["modules_to_save"] == ["classifier"]
    shapes = {k: tuple(v.shape) for k, v in load_file(out / "adapter_model.safetensors").items()}
    assert shapes == {"prompt_embeddings": (5, 64), "base_model.classifier.weight": (2, 64),
                      "base_model.classifier.bias": (2,)}


# -- round trip, disable, detach ---------------------------------------------------------------------


@pytest.mark.parametrize("preset, task", CASES[:2])
def test_round_trip_disable_and_detach(tmp_path, preset, task):
    m = base(preset, task).eval()
    x = inputs(preset)
    with torch.no_grad():
        plain = m(**x).logits
    method = attach(m, "prompt", PromptTuningConfig(num_virtual_tokens=4, init="random"), task)
    m.eval()
    with torch.no_grad():
        adapted = m(**x).logits
        assert adapted.shape == plain.shape and not torch.allclose(adapted, plain, atol=1e-3)
        with disabled_virtual_tokens(m):
            torch.testing.assert_close(m(**x).logits, plain, atol=0, rtol=0)
        torch.testing.assert_close(m(**x).logits, adapted, atol=0, rtol=0)
    out = method.save(m, tmp_path, preset)
    m2 = base(preset, task)
    load_adapter(m2, out, task)
    with torch.no_grad():
        torch.testing.assert_close(m2.eval()(**x).logits, adapted, atol=0, rtol=0)
    method.detach(m)
    with torch.no_grad():
        torch.testing.assert_close(m(**x).logits, plain, atol=0, rtol=0)
    assert not any("prompt_encoder" in n for n, _ in m.named_parameters())


def test_merged_raises_clearly():
    m = base("tiny-llama", "causal-lm")
    method = attach(m, "prompt", PromptTuningConfig(num_virtual_tokens=2), "causal-lm")
    with pytest.raises(MemtuneError, match="cannot be merged"):
        method.merged(m)


# -- generation ------------------------------------------------------------------------------------


def greedy(model, ids, mask, use_cache, new=5):
    return model.generate(input_ids=ids, attention_mask=mask, use_cache=use_cache, max_new_tokens=new,
                          do_sample=False, pad_token_id=256)


def greedy_of_forward(model, seq, start):
    """The greedy continuation that `model`'s own full forward implies for an unpadded `seq` (B, T):
    the argmax at positions start-1 .. T-2, to compare with seq[:, start:]. PEFT's forward is the
    oracle, not its generate: under transformers 5.24 (`past_key_values` renamed `cache`), PEFT
    0.21's generate for prompt-learning methods no longer follows its own forward."""
    logits = model(input_ids=seq).logits[:, -seq.shape[1]:]  # PEFT's prompt tuning returns n + T positions
    return logits[:, start - 1:-1].argmax(-1)


def test_generation_with_cache_equals_without_and_equals_peft():
    m, _, pm = peft_pair("tiny-llama", "causal-lm", "prompt", *configs("causal-lm"))
    ids = torch.tensor([[5, 70, 80, 90, 100, 33], [7, 8, 9, 10, 11, 12]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        cached = greedy(m, ids, mask, True)
        assert torch.equal(cached, greedy(m, ids, mask, False))
        assert torch.equal(greedy_of_forward(pm, cached, ids.shape[1]), cached[:, ids.shape[1]:])
        with disabled_virtual_tokens(m):
            assert not torch.equal(cached, greedy(m, ids, mask, True))  # the prompt matters
        # left padding: virtual tokens take positions 0..n-1, real tokens count on from n
        ids[1, :2], mask[1, :2] = 256, 0
        assert torch.equal(greedy(m, ids, mask, True), greedy(m, ids, mask, False))


# -- initialization ----------------------------------------------------------------------------------


def test_init_vocab_and_random():
    m = base("tiny-llama", "causal-lm")
    torch.manual_seed(3)
    method = attach(m, "prompt", PromptTuningConfig(num_virtual_tokens=6, init="vocab"), "causal-lm")
    emb = m.get_input_embeddings().weight
    ids = method.describe()["init_token_ids"]
    assert len(ids) == 6
    torch.testing.assert_close(method.encoder(m).embedding.weight, emb[ids], atol=0, rtol=0)
    m2 = base("tiny-llama", "causal-lm")
    w = attach(m2, "prompt", PromptTuningConfig(num_virtual_tokens=50, init="random"), "causal-lm").encoder(m2)
    w = w.embedding.weight
    assert w.abs().max() <= 0.5 and w.std() > 0.2  # U(-0.5, 0.5)


@pytest.mark.parametrize("name,task,peft_task", [("tiny-llama", "causal-lm", "CAUSAL_LM"),
                                                  ("tiny-bert", "classification", "SEQ_CLS")])
def test_init_text_tiles_the_texts_tokens_like_peft(tmp_path, name, task, peft_task):
    from memtune.models import build_preset

    tok = build_preset(name, task, LABELS).tokenizer
    tok.save_pretrained(tmp_path / "tok")
    text = "abc"  # tiny-llama: 3 byte tokens; tiny-bert: [CLS] a b c [SEP] or fewer word pieces
    m = base(name, task)
    method = attach(m, "prompt", PromptTuningConfig(num_virtual_tokens=7, init="text", init_text=text), task)
    ids = tok(text)["input_ids"]  # special tokens included, as PEFT tokenizes
    assert method.describe()["init_token_ids"] == tile(ids, 7)
    assert method.describe()["init_tokenizer"] == name  # the model's own, by its name
    if name == "tiny-bert":
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    pm = peft.get_peft_model(base(name, task), peft.PromptTuningConfig(
        task_type=peft_task, num_virtual_tokens=7, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
        tokenizer_name_or_path=str(tmp_path / "tok")))
    torch.testing.assert_close(method.encoder(m).embedding.weight,
                               pm.prompt_encoder["default"].embedding.weight, atol=0, rtol=0)


# -- config errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["adapter.kind=prompt", "adapter.init=text"], "adapter.init_text: init=text needs"),
    (["adapter.kind=prompt", "adapter.init_text=hello"], "adapter.init_text: only used with init=text"),
    (["adapter.kind=prompt", "adapter.num_virtual_tokens=0"], "adapter.num_virtual_tokens: expected >= 1"),
    (["adapter.kind=prompt", "adapter.init=words"], "adapter.init: expected one of"),
    (["adapter.kind=prompt", "adapter.r=4"], "adapter.r: unknown key for adapter.kind 'prompt'"),
    (["adapter.kind=prompt", "tokentune.select=4"], "tokentune with adapter.kind=prompt"),
    (["adapter.kind=prompt", "attention.kind=s2"], "attention.kind=s2 with adapter.kind=prompt"),
    (["adapter.kind=prompt", "model=tiny-bert", "task=classification", "data.labels=[a,b]", "pooling=mean"],
     "pooling=mean with adapter.kind=prompt"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_recipe({}, overrides)


def test_adapter_path_of_another_kind_is_rejected(tmp_path):
    from memtune.pipeline import build_run

    m = base("tiny-llama", "causal-lm")
    out = attach(m, "prompt", PromptTuningConfig(num_virtual_tokens=2), "causal-lm").save(m, tmp_path, "tiny-llama")
    with pytest.raises(ConfigError, match="holds a PROMPT_TUNING adapter, but adapter.kind is 'prefix'"):
        build_run(build_recipe({}, ["adapter.kind=prefix", f"adapter.path={out}"]))


# -- the real training loop --------------------------------------------------------------------------


def text_file(tmp_path):
    return write_jsonl(tmp_path / "text.jsonl", [{"text": "the cat sat on the mat. " * 2}] * 8)


def cls_file(tmp_path):
    """12 positive / 4 negative: a random tiny BERT's [CLS] barely depends on the input, so what 20
    steps can learn is mostly the class balance (through the trained head)."""
    rows = ["text\tlabel"] + [f"good movie number {i}\tpositive" if i % 4 else f"bad film {i}\tnegative"
                              for i in range(16)]
    (tmp_path / "cls.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path / "cls.tsv"


def run_training(tmp_path, name, data, extra):
    common = [f"data.train={data}", f"data.eval={data}", "train.max_steps=20", "train.eval_at_start=true",
              "train.log_every=100", "train.measure_memory_steps=0"]
    out = tmp_path / name
    s = train(build_recipe({}, common + extra + base_overrides(out, **{"train.measure_memory_steps": 0})))
    return s, out


def test_training_lowers_loss_llama_causal_lm(tmp_path):
    s, out = run_training(tmp_path, "llama", text_file(tmp_path), [
        "model=tiny-llama", "train.batch_size=4", "adapter.kind=prompt", "adapter.num_virtual_tokens=4",
        "optimizer.lr=0.3"])
    assert s["params"]["trainable"] == 4 * 64
    assert s["eval"]["loss"] < s["eval_start"]["loss"] - 0.05
    assert s["adapter"]["init"] == "vocab" and len(s["adapter"]["init_token_ids"]) == 4
    # the run's adapter rebuilds through the pipeline (adapter.path) with the same result
    assert evaluate(str(out), [])["loss"] == pytest.approx(s["eval"]["loss"], rel=1e-5)


def test_training_lowers_loss_bert_classification(tmp_path):
    s, out = run_training(tmp_path, "bert", cls_file(tmp_path), [
        "model=tiny-bert", "task=classification", "train.batch_size=8", "adapter.kind=prompt",
        "adapter.num_virtual_tokens=4", "optimizer.lr=0.05"])
    assert s["params"]["trainable"] == 4 * 64 + 2 * 64 + 2  # prompt + head (classifier)
    assert s["eval"]["loss"] < s["eval_start"]["loss"] - 0.05
    assert evaluate(str(out), [])["loss"] == pytest.approx(s["eval"]["loss"], rel=1e-5)
