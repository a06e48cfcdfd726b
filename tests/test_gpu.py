"""CUDA paths: the trainer on a GPU, the allocator peak in summary.json, TokenTune and LoRA on CUDA.

Skipped where no CUDA device exists (CI); run on a lent GPU machine with `pytest tests/test_gpu.py`.
"""

import copy

import pytest
import torch

from conftest import ROOT, base_overrides
from memtune.gradient.tokentune import TokenTune, TokenTuneConfig, active
from memtune.models import build_preset
from memtune.recipe import load_recipe
from memtune.tasks import CausalLMTask
from memtune.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ALPACA = str(ROOT / "examples" / "data" / "alpaca.jsonl")
LLAMA = ["model=tiny-llama", f"data.train={ALPACA}", "train.max_steps=6", "train.batch_size=4",
         "optimizer.lr=3e-3", "train.device=cuda"]


@pytest.mark.parametrize("extra", [[], ["adapter.kind=lora", "adapter.r=4"], ["train.precision=bf16"],
                                   ["tokentune.select=0.5"]])
def test_trainer_on_cuda_reports_device_and_allocator_peak(tmp_path, extra):
    s = train(load_recipe(None, LLAMA + extra + base_overrides(tmp_path / "run")))
    assert s["device"].startswith("cuda")
    mem = s["memory_bytes"]
    assert mem["cuda_max_allocated"] >= mem["parameters"] + mem["gradients"]
    assert s["train"]["loss_last"] < s["train"]["loss_first"]


def test_cpu_and_cuda_runs_agree(tmp_path):
    """The same recipe on CPU and on CUDA: same first loss, and the tracker's categories agree."""
    cpu = train(load_recipe(None, LLAMA[:-1] + ["train.device=cpu"] + base_overrides(tmp_path / "cpu")))
    gpu = train(load_recipe(None, LLAMA + base_overrides(tmp_path / "gpu")))
    assert gpu["train"]["loss_first"] == pytest.approx(cpu["train"]["loss_first"], rel=1e-4)
    for k in ("parameters", "gradients", "optimizer"):
        # AdamW's step counters are CPU tensors on both devices; all else is the same bytes
        assert gpu["memory_bytes"][k] == cpu["memory_bytes"][k], k


def test_tokentune_forward_exact_on_cuda():
    m = build_preset("tiny-llama", "causal-lm").model.cuda().train()
    plain = copy.deepcopy(m)
    tt = TokenTune(TokenTuneConfig(select=0.3), m, m.config.pad_token_id, "causal-lm")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 250, (3, 40), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    batch = {k: v.cuda() for k, v in batch.items()}
    new, layout = tt.prepare(batch)
    with active(layout):
        out = m(**{k: new[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
    ref = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    # column j of the permuted batch holds original position index[:, j]
    ref_perm = torch.gather(ref, 1, layout.index[..., None].expand(-1, -1, ref.shape[-1]))
    torch.testing.assert_close(out[layout.valid], ref_perm[layout.valid], atol=1e-4, rtol=1e-4)
    task = CausalLMTask()
    with active(layout):
        loss, _ = task.loss_sum(m, new)
    (loss / task.count(new)).backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_qlora_with_paged_adamw_on_cuda(tmp_path):
    pytest.importorskip("bitsandbytes")
    s = train(load_recipe(None, LLAMA + ["quantize.kind=nf4", "adapter.kind=lora", "optimizer.paged=true"]
                          + base_overrides(tmp_path / "run")))
    assert s["device"].startswith("cuda") and s["memory_bytes"]["optimizer"] > 0


def test_qlora_over_a_checkpoint_quantized_while_loading_trains_on_cuda(tmp_path):
    pytest.importorskip("bitsandbytes")
    from memtune.storage.nf4 import is_4bit

    saved = tmp_path / "tiny-llama"
    loaded = build_preset("tiny-llama", "causal-lm")
    loaded.model.save_pretrained(saved)
    loaded.tokenizer.save_pretrained(saved)
    seen = []
    s = train(load_recipe(None, [f"model={saved}"] + LLAMA[1:] + ["quantize.kind=nf4", "adapter.kind=lora"]
                          + base_overrides(tmp_path / "run")),
              callbacks=[lambda e: seen.append([m.weight.device.type for m in e.run.model.modules() if is_4bit(m)])])
    assert s["device"].startswith("cuda") and s["train"]["loss_last"] < s["train"]["loss_first"]
    assert seen and set(seen[-1]) == {"cuda"} and len(seen[-1]) == 14


def test_gptq_on_cuda_gives_the_cpu_codes_and_trains_qalora(tmp_path):
    """`memtune quantize` on the GPU (H and the Cholesky factors on CUDA), then QA-LoRA over the folder."""
    from memtune.quantize import quantize_to_folder
    from memtune.storage.int4 import IntLinear, load_quantized

    base = ["model=tiny-llama", f"data.train={ALPACA}", "quantize.kind=int4", "quantize.method=gptq",
            "quantize.calibration_samples=16", "adapter.kind=head", "train.batch_size=4"]
    quantize_to_folder(load_recipe(None, base + ["train.device=cpu"]), tmp_path / "cpu")
    s = quantize_to_folder(load_recipe(None, base + ["train.device=cuda"]), tmp_path / "gpu")
    assert s["output_error_mean"]["gptq"] < s["output_error_mean"]["rtn"]
    cpu, gpu = load_quantized(tmp_path / "cpu"), load_quantized(tmp_path / "gpu")
    for (n, a), (_, b) in zip(cpu.named_modules(), gpu.named_modules()):
        if isinstance(a, IntLinear):  # float sums in another order: a rare code may flip at a tie
            assert (a.codes() == b.codes()).float().mean() > 0.99, n
    run = train(load_recipe(None, [f"model={tmp_path / 'gpu'}", f"data.train={ALPACA}", "quantize.kind=int4",
                                   "adapter.kind=qalora", "train.max_steps=4", "train.batch_size=4",
                                   "optimizer.lr=1e-2", "train.device=cuda"] + base_overrides(tmp_path / "run")))
    assert run["device"].startswith("cuda") and run["train"]["loss_last"] > 0
