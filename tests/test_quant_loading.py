"""Quantizing while a checkpoint is read: the layers, codes and outputs equal quantizing the loaded
full-precision model, heads stay float, and a merge of such a run saves a plain model."""

import pytest
import torch

pytest.importorskip("bitsandbytes")

from conftest import ROOT, base_overrides  # noqa: E402
from memtune.models import build_preset, head_modules, load_model  # noqa: E402
from memtune.recipe import load_recipe  # noqa: E402
from memtune.storage import STORAGE  # noqa: E402
from memtune.storage.nf4 import NF4Config, is_4bit  # noqa: E402
from memtune.train import train  # noqa: E402

ALPACA = str(ROOT / "examples" / "data" / "alpaca.jsonl")


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    loaded = build_preset("tiny-llama", "causal-lm")
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


def nf4():
    return STORAGE.get("nf4")(NF4Config(double_quant=True))


@pytest.mark.parametrize("model,task,labels", [("saved", "causal-lm", None), ("minilm", "classification", ["n", "p"])])
def test_quantized_while_loading_equals_quantizing_the_loaded_model(saved_llama, model, task, labels):
    name = str(saved_llama) if model == "saved" else model
    storage = nf4()
    torch.manual_seed(0)  # a new classification head is drawn from the global RNG
    streamed = load_model(name, task, labels, quantize=storage.load_kwargs).model
    torch.manual_seed(0)
    after = load_model(name, task, labels).model
    assert not any(is_4bit(m) for m in after.modules())
    nf4().apply(after)
    storage.apply(streamed)  # keeps what loading converted
    names = [n for n, m in after.named_modules() if is_4bit(m)]
    assert names == [n for n, m in streamed.named_modules() if is_4bit(m)] and len(names) >= 12
    assert storage.count == len(names)
    for n in names:
        a, b = after.get_submodule(n).weight, streamed.get_submodule(n).weight
        assert torch.equal(a.data, b.data), n  # the same packed codes
        assert torch.equal(a.quant_state.absmax, b.quant_state.absmax) and a.quant_state.nested == b.quant_state.nested
    for head in head_modules(streamed):
        assert not any(is_4bit(m) for m in streamed.get_submodule(head).modules())
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(streamed.eval()(input_ids=ids).logits, after.eval()(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_merge_of_a_run_quantized_while_loading_saves_a_plain_model(saved_llama, tmp_path):
    import json

    from memtune.merge import merge

    run_dir = tmp_path / "run"
    train(load_recipe(None, [f"model={saved_llama}", f"data.train={ALPACA}", "quantize.kind=nf4", "adapter.kind=lora",
                             "adapter.r=4", "train.max_steps=2", "train.batch_size=4"] + base_overrides(run_dir)))
    merge(str(run_dir), str(tmp_path / "merged"))
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any(is_4bit(m) for m in merged.modules())
