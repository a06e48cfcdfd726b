"""GPTQ: the algorithm against the textbook OBS updates, its special cases, and `memtune quantize`
folders as the base of later runs (QA-LoRA over a GPTQ base)."""

import json

import pytest
import torch

from conftest import ROOT, base_overrides
from memtune.errors import ConfigError, MemtuneError
from memtune.models import build_preset, load_model
from memtune.quantize import quantize_to_folder
from memtune.recipe import load_recipe
from memtune.storage.gptq import _output_error, gptq_groups, transformer_blocks
from memtune.storage.int4 import IntLinear, group_params, quantize_groups

pytestmark = pytest.mark.usefixtures("one_thread")
ALPACA = str(ROOT / "examples" / "data" / "alpaca.jsonl")


def correlated_hessian(d_in: int, n: int = 2048, seed: int = 0) -> torch.Tensor:
    """H = 2/N X Xᵀ of inputs with correlated features and a few large ones (as in transformers)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) @ (torch.eye(d_in) + torch.randn(d_in, d_in, generator=g) / d_in ** 0.5)
    x[:, :4] *= 6
    return 2 * x.T @ x / n


def obs_reference(w, h, bits, g, damp=0.01):
    """GPTQ as the paper states it before its Cholesky reformulation: quantize column i, spread
    (w_i - q_i) / [H⁻¹]_ii · [H⁻¹]_i,j over later columns j, then eliminate i from H⁻¹ (Gaussian step)."""
    w, h = w.double().clone(), h.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    d_out, d_in = w.shape
    codes = torch.empty(d_out, d_in)
    for i in range(d_in):
        if i % g == 0:
            s, z = (t.double() for t in group_params(w[:, i:i + g].float(), bits))
        q = torch.clamp(torch.round(w[:, i] / s + z), 0, 2 ** bits - 1)
        codes[:, i] = q
        err = (w[:, i] - (q - z) * s) / hinv[i, i]
        w[:, i + 1:] -= err[:, None] * hinv[i, i + 1:][None, :]
        hinv = hinv - hinv[:, i:i + 1] @ hinv[i:i + 1, :] / hinv[i, i]
    return codes


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_uncorrelated_inputs_give_round_to_nearest_codes_exactly(bits):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(bits))
    h = torch.diag(torch.rand(128, generator=torch.Generator().manual_seed(9)) + 0.5)  # diagonal H
    q, s, z = gptq_groups(w, h, bits, 32)
    q0, s0, z0 = quantize_groups(w, bits, 32)
    assert torch.equal(q, q0) and torch.equal(s, s0) and torch.equal(z, z0)


def test_cholesky_form_and_lazy_blocks_match_the_obs_updates():
    w = torch.randn(12, 96, generator=torch.Generator().manual_seed(1))
    h = correlated_hessian(96)
    want = obs_reference(w, h, 4, 32)
    for block in (32, 64, 128):  # one group per block, several, the whole row
        q, _, _ = gptq_groups(w, h, 4, 32, block=block)
        agree = (q.float() == want).float().mean()
        assert agree > 0.995, (block, agree)  # float64 vs float32: a rare code flips at a rounding tie


def test_gptq_lowers_the_output_error_of_round_to_nearest():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    h = correlated_hessian(256)
    for bits in (4, 3, 2):
        gptq = _output_error(w, *gptq_groups(w, h, bits, 32), h, 32)
        rtn = _output_error(w, *quantize_groups(w, bits, 32), h, 32)
        assert gptq < 0.8 * rtn, (bits, gptq, rtn)


def test_inputs_that_are_always_zero_get_zero_weights():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    h = correlated_hessian(64)
    h[5, :] = h[:, 5] = 0  # input 5 never fires
    q, s, z = gptq_groups(w, h, 4, 32)
    deq = (q.float() - z.repeat_interleave(32, 1)) * s.repeat_interleave(32, 1)
    assert torch.isfinite(deq).all()
    assert deq[:, 5].abs().max() <= s[:, 0].max() / 2 + 1e-6  # the code nearest to 0


def test_layers_are_grouped_by_transformer_block():
    model = build_preset("tiny-llama", "causal-lm").model
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    stages = transformer_blocks(model, names)
    assert [b for b, _ in stages] == [f"model.layers.{i}" for i in range(model.config.num_hidden_layers)]
    assert sum(len(s) for _, s in stages) == len(names)


def quantize_llama(tmp_path, method="gptq", **extra):
    over = ["model=tiny-llama", f"data.train={ALPACA}", "quantize.kind=int4", f"quantize.method={method}",
            "quantize.calibration_samples=16", "adapter.kind=head", "train.batch_size=4"]
    return quantize_to_folder(load_recipe(None, over + [f"{k}={v}" for k, v in extra.items()]), tmp_path / "q")


def test_quantize_writes_a_folder_that_later_runs_train_over(tmp_path):
    from memtune.evaluate import load_for_eval
    from memtune.merge import merge
    from memtune.storage.int4 import load_quantized
    from memtune.train import train

    summary = quantize_llama(tmp_path)
    folder = tmp_path / "q"
    report = json.loads((folder / "quantize_report.json").read_text())
    assert summary["layers"] == len(report["per_layer"]) > 0
    assert summary["calibration"]["examples"] == 16 and summary["calibration"]["tokens"] > 0
    assert summary["output_error_mean"]["gptq"] < summary["output_error_mean"]["rtn"]
    # the same held-out examples (after the 16 calibration ones) measured for round-to-nearest
    rtn = quantize_to_folder(load_recipe(None, ["model=tiny-llama", f"data.train={ALPACA}", "quantize.kind=int4",
                                                "quantize.calibration_samples=16", "adapter.kind=head"]),
                             tmp_path / "rtn")
    assert rtn["held_out_examples"] == summary["held_out_examples"] > 0
    assert 0 < summary["held_out_hidden_error"] < rtn["held_out_hidden_error"]
    loaded = load_model(str(folder), "causal-lm")
    assert loaded.stored_as == "INT4 group 32 (gptq)"
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, IntLinear)}
    assert len(layers) == summary["layers"]
    codes = {n: m.qweight.clone() for n, m in layers.items()}

    run_dir = tmp_path / "run"
    train(load_recipe(None, [f"model={folder}", f"data.train={ALPACA}", "quantize.kind=int4", "adapter.kind=qalora",
                             "adapter.r=4", "train.max_steps=2", "train.batch_size=4", "optimizer.lr=1e-2"]
                      + base_overrides(run_dir)))
    run = load_for_eval(str(run_dir), [])
    assert run.storage.describe()["loaded_quantized"]
    for n, m in run.model.named_modules():  # the base is the folder's, untouched by training
        if isinstance(m, IntLinear):
            assert torch.equal(m.qweight, codes[n.replace(".base_layer", "")])
    ids = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = run.model.eval()(input_ids=ids).logits
    merge(str(run_dir), str(tmp_path / "merged"))
    with torch.no_grad():
        got = load_quantized(tmp_path / "merged")(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_a_quantized_causal_lm_loads_as_a_classifier_with_a_new_head(tmp_path):
    quantize_llama(tmp_path, method="rtn")
    torch.manual_seed(0)
    a = load_model(str(tmp_path / "q"), "classification", ["neg", "pos"]).model
    torch.manual_seed(0)
    b = load_model(str(tmp_path / "q"), "classification", ["neg", "pos"]).model
    assert a.score.weight.shape == (2, a.config.hidden_size) and a.score.weight.abs().sum() > 0
    assert torch.equal(a.score.weight, b.score.weight)  # drawn from the run's seed
    assert any(isinstance(m, IntLinear) for m in a.modules())


def test_quantized_folders_and_gptq_recipes_fail_clearly(tmp_path):
    from memtune.pipeline import build_run
    from memtune.storage import PlainConfig

    quantize_llama(tmp_path, method="rtn")
    folder = tmp_path / "q"
    with pytest.raises(ConfigError, match="quantize.kind=none: model .* is stored with quantize.kind=int4 "
                                          "\\(.*memtune_quantization.json\\)"):
        load_recipe(None, [f"model={folder}", "quantize.kind=none", "adapter.kind=lora"])
    with pytest.raises(ConfigError, match="quantize.bits=3: model .* is stored with quantize.bits=4"):
        load_recipe(None, [f"model={folder}", "quantize.kind=int4", "quantize.bits=3", "adapter.kind=lora"])
    with pytest.raises(ConfigError, match="stored quantized \\(INT4 group 32 \\(rtn\\)\\).*quantize.kind=int4"):
        recipe = load_recipe(None, [f"model={folder}", "adapter.kind=lora"])
        recipe.quantize = PlainConfig()  # a recipe changed in Python after it was read
        build_run(recipe)
    with pytest.raises(ConfigError, match="stored as INT4 group 32; the recipe asks for INT3 group 32"):
        recipe = load_recipe(None, [f"model={folder}", "adapter.kind=lora"])
        recipe.quantize.bits = 3
        build_run(recipe)
    with pytest.raises(ConfigError, match="memtune quantize"):
        build_run(load_recipe(None, ["model=tiny-llama", "quantize.kind=int4", "quantize.method=gptq",
                                     "adapter.kind=lora"]))
    with pytest.raises(ConfigError, match="calibration data"):
        quantize_to_folder(load_recipe(None, ["model=tiny-llama", "quantize.kind=int4", "quantize.method=gptq",
                                              "adapter.kind=head"]), tmp_path / "other")
    with pytest.raises(ConfigError, match="writes group-wise INT"):
        quantize_to_folder(load_recipe(None, ["model=tiny-llama", "quantize.kind=nf4", "adapter.kind=lora"]),
                           tmp_path / "other")
    with pytest.raises(MemtuneError, match="not an empty directory"):
        quantize_llama(tmp_path, method="rtn")
    with pytest.raises(ConfigError, match="quantize.damp"):
        load_recipe(None, ["quantize.kind=int4", "quantize.damp=1.5", "adapter.kind=lora"])


def test_cli_quantize(tmp_path, capsys):
    from memtune.cli import main

    rc = main(["quantize", "model=tiny-llama", f"data.train={ALPACA}", "quantize.method=gptq",
               "quantize.calibration_samples=8", "--to", str(tmp_path / "q")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "gptq" and out["bits"] == 4 and (tmp_path / "q" / "memtune_quantization.json").is_file()
    assert not list(tmp_path.glob(".q.partial"))
