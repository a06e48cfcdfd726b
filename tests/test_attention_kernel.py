"""attention.kind=eager: transformers' eager attention, for the model and for layers an adapter builds
from its config (QST's side network); same numbers as SDPA, more activations kept for backward."""

import pytest
import torch

from conftest import EXAMPLES, base_overrides, randomize
from memtune.errors import ConfigError
from memtune.pipeline import build_run
from memtune.recipe import build_recipe
from memtune.train import train

LM = ["model=tiny-llama", f"data.train={EXAMPLES / 'data' / 'text.jsonl'}", "data.max_length=32",
      "train.batch_size=4"]


def _run(*overrides):
    torch.manual_seed(0)  # the same base and adapter weights for both kernels
    run = build_run(build_recipe({}, list(overrides)))
    randomize(run.model, seed=1, add=True)  # QST's α = 1 start would hide the side network
    return run


BERT_QST = ["model=tiny-bert", "task=classification", "data.labels=[neg,pos]", "adapter.kind=qst",
            "quantize.kind=none"]


@pytest.mark.parametrize("adapter", [["adapter.kind=lora"], ["adapter.kind=qst", "quantize.kind=none"], [], BERT_QST])
def test_eager_gives_the_sdpa_logits_and_gradients(adapter):
    runs = {k: _run("model=tiny-llama", *adapter, f"attention.kind={k}") for k in ("dense", "eager")}
    assert runs["eager"].model.config._attn_implementation == "eager"
    assert runs["dense"].model.config._attn_implementation == "sdpa"
    if "adapter.kind=qst" in adapter:  # the side layers follow the backbone's kernel
        assert runs["eager"].model.qst_side.config._attn_implementation == "eager"
        assert runs["dense"].model.qst_side.config._attn_implementation == "sdpa"
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in one row: both kernels mask it
    out = {}
    for k, run in runs.items():
        run.model.train(False)
        logits = run.model(input_ids=ids, attention_mask=mask).logits
        if logits.dim() == 3:  # per token: padded queries attend to nothing, their outputs are undefined
            logits = logits[mask.bool()]
        logits.float().pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad}
        out[k] = logits.detach(), grads
    torch.testing.assert_close(out["eager"][0], out["dense"][0], rtol=1e-5, atol=1e-5)
    assert out["eager"][1].keys() == out["dense"][1].keys()
    for name, g in out["dense"][1].items():
        torch.testing.assert_close(out["eager"][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("adapter", [["adapter.kind=lora"], ["adapter.kind=qst"]])
def test_eager_keeps_the_attention_probabilities_for_backward(adapter, tmp_path):
    """The eager kernel saves softmax(QK^T) (fp32) for backward, (B, H, T, T) per attention layer that
    records gradients; SDPA does not. QST: only the side network's layers record any."""
    act = {}
    for k in ("dense", "eager"):
        s = train(build_recipe({}, LM + adapter + [f"attention.kind={k}", "train.max_steps=1"]
                               + base_overrides(tmp_path / k)))
        act[k] = s["memory_bytes"]["activations"]
    assert act["eager"] > act["dense"]


def test_tokentune_with_eager_is_refused():
    with pytest.raises(ConfigError, match="tokentune with attention.kind=eager"):
        build_recipe({}, ["model=tiny-llama", "attention.kind=eager", "tokentune.select=0.5"])


def test_unknown_attention_kind_names_the_choices():
    with pytest.raises(ConfigError, match="attention.kind"):
        build_recipe({}, ["model=tiny-llama", "attention.kind=flash"])
