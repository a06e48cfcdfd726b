import time

import pytest
import torch

from memtune.errors import ModelError
from memtune.models import PRESETS, TINY_PRESETS, build_preset, byte_tokenizer, head_modules, load_model


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_presets_are_fast_seeded_and_leave_global_rng_alone(name):
    task = "classification" if name == "tiny-bert" else "causal-lm"
    labels = ["a", "b"] if task == "classification" else None
    build_preset(name, task, labels)  # warm imports
    state = torch.get_rng_state()
    t0 = time.perf_counter()
    a = build_preset(name, task, labels).model
    assert time.perf_counter() - t0 < 1.0
    b = build_preset(name, task, labels).model
    assert torch.equal(torch.get_rng_state(), state)
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na


def test_tiny_llama_is_llama_shaped():
    m = build_preset("tiny-llama", "causal-lm").model
    assert m.config.num_key_value_heads < m.config.num_attention_heads  # GQA
    assert set(head_modules(m)) == {"lm_head"}


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "Grüße, 世界! <tab>\t"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_classification_head_is_found_structurally():
    for name, head in [("tiny-bert", "classifier"), ("tiny-llama", "score"), ("tiny-gpt2", "score")]:
        m = build_preset(name, "classification", ["x", "y"]).model
        assert set(head_modules(m)) == {head}


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ModelError, match="model './nope'"):
        load_model("./nope", "causal-lm")
    with pytest.raises(ModelError, match="needs label names"):
        load_model("tiny-bert", "classification", None)


@pytest.mark.slow
def test_pretrained_minilm_loads_offline():
    assert "minilm" in PRESETS
    loaded = load_model("minilm", "classification", ["neg", "pos"])
    assert sum(p.numel() for p in loaded.model.parameters()) == pytest.approx(22.7e6, rel=0.01)
    ids = loaded.tokenizer("a charming film")["input_ids"]
    assert ids[0] == loaded.tokenizer.cls_token_id
    emb = loaded.model.bert.embeddings.word_embeddings.weight
    assert emb.std() > 0.03  # pretrained, not the 0.02-std random init
