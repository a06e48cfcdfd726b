"""Byte counts of the memory tracker, checked against numbers worked out by hand from shapes."""

from __future__ import annotations

import copy

import pytest
import torch

from memtune.memory import MemoryReport, MemoryTracker, measure_step

F32 = 4
LINEAR_PARAMS = (64 * 32 + 32) * F32  # weight + bias of nn.Linear(64, 32)
X_BYTES = 8 * 64 * F32                # the (8, 64) input
OUT_BYTES = 8 * 32 * F32              # the (8, 32) output
ADAMW_STEP = F32                      # AdamW keeps one 0-dim float32 `step` tensor per parameter


def _linear(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(64, 32)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3), torch.randn(8, 64)


def _train_step(model, opt, x):
    model(x).sum().backward()  # sum's backward saves no tensor, so only the Linear's saves count
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_linear_adamw_step_is_counted_exactly():
    model, opt, x = _linear()
    tracker = MemoryTracker(model, opt)
    with tracker.measure(x):
        _train_step(model, opt, x)
    r = tracker.report()
    assert isinstance(r, MemoryReport)
    assert r.parameters_trainable == r.parameters == LINEAR_PARAMS
    assert r.parameters_frozen == 0 and r.buffers == 0
    assert r.gradients == LINEAR_PARAMS  # sampled before zero_grad freed them
    assert r.optimizer == 2 * LINEAR_PARAMS + 2 * ADAMW_STEP  # exp_avg, exp_avg_sq; weight and bias steps
    # addmm(b, x, W.t()) saves x for W's grad; it would save W.t() for x's grad, but x needs none.
    assert r.activations == X_BYTES
    assert r.peak >= r.parameters + r.gradients + r.optimizer + X_BYTES
    assert r.cuda_max_allocated is None
    assert r.to_dict() == {"parameters": LINEAR_PARAMS, "parameters_trainable": LINEAR_PARAMS,
                           "parameters_frozen": 0, "buffers": 0, "gradients": LINEAR_PARAMS,
                           "optimizer": 2 * LINEAR_PARAMS + 2 * ADAMW_STEP, "activations": X_BYTES,
                           "peak": r.peak, "cuda_max_allocated": None}


def test_input_that_requires_grad_adds_only_a_weight_view():
    model, _, x = _linear()
    x.requires_grad_(True)
    # Now addmm also saves W.t(), a view of the weight's storage: a weight, not an activation.
    r = measure_step(model, lambda: model(x).sum().backward())
    assert r.activations == X_BYTES
    assert r.gradients == LINEAR_PARAMS  # x.grad is not a parameter gradient


def test_frozen_base_counts_only_the_trainable_head():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    model.register_buffer("scale", torch.ones(16))
    model[0].requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    x = torch.randn(8, 64)
    tracker = MemoryTracker(model, opt)
    with tracker.measure(x):
        _train_step(model, opt, x)
    r = tracker.report()
    head = (64 * 8 + 8) * F32
    assert r.parameters_trainable == head
    assert r.parameters_frozen == (64 * 64 + 64) * F32
    assert r.buffers == 16 * F32
    assert r.gradients == head
    assert r.optimizer == 2 * head + 2 * ADAMW_STEP
    # The frozen layer and ReLU see no input that needs grad, so nothing is saved there; the head
    # saves its (8, 64) input.
    assert r.activations == 8 * 64 * F32


def test_tied_storage_is_counted_once():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            flat = torch.zeros(100)
            self.a = torch.nn.Parameter(flat[:60])
            self.b = torch.nn.Parameter(flat[60:])

    r = measure_step(Tied(), lambda: None)
    assert r.parameters == 100 * F32


def test_measured_runs_are_repeatable():
    reports = []
    for _ in range(2):
        model, opt, x = _linear(seed=3)
        tracker = MemoryTracker(model, opt)
        with tracker.measure(x):
            _train_step(model, opt, x)
        reports.append(tracker.report().to_dict())
    assert reports[0] == reports[1]

    # Steps 2 and 3 of one run (optimizer state already allocated) measure the same.
    model, opt, x = _linear(seed=3)
    _train_step(model, opt, x)
    later = []
    for _ in range(2):
        tracker = MemoryTracker(model, opt)
        with tracker.measure(x):
            _train_step(model, opt, x)
        later.append(tracker.report().to_dict())
    assert later[0] == later[1]


def test_inference_mode_peak_is_exact():
    model, _, x = _linear()
    tracker = MemoryTracker(model)
    with tracker.measure(x):
        with torch.inference_mode():
            model(x)
    r = tracker.report()
    assert r.activations == 0 and r.gradients == 0 and r.optimizer == 0
    assert r.peak == LINEAR_PARAMS + X_BYTES + OUT_BYTES  # weights, input, output; W.t() is a view
    assert tracker.live_bytes() == 0  # outside a window


def test_live_bytes_follow_allocation_and_free():
    model, _, _ = _linear()
    tracker = MemoryTracker(model)
    with tracker.measure():
        base = tracker.live_bytes()
        assert base == LINEAR_PARAMS
        a = torch.empty(1000)
        assert tracker.live_bytes() == base + 1000 * F32
        del a
        assert tracker.live_bytes() == base
        b = torch.empty(10)
        b.resize_(500)  # a resize grows the same storage
        assert tracker.live_bytes() == base + 500 * F32
    assert tracker.report().peak == base + 1000 * F32


def test_gradient_accumulation_does_not_add_up_activations():
    model, _, x = _linear()
    micro = [x, torch.randn(8, 64)]  # distinct micro-batches, both alive for the whole step
    single = measure_step(model, lambda: model(micro[0]).sum().backward())

    def two_pairs():
        for xb in micro:
            model(xb).sum().backward()  # its backward releases what the forward saved

    model.zero_grad(set_to_none=True)
    accumulated = measure_step(model, two_pairs)
    assert single.activations == accumulated.activations == X_BYTES
    assert accumulated.gradients == LINEAR_PARAMS

    # Two graphs alive at once do hold both inputs for backward.
    outs: list[torch.Tensor] = []
    both = measure_step(model, lambda: outs.extend(model(xb) for xb in micro))
    assert both.activations == 2 * X_BYTES


def test_windows_accumulate_maxima():
    model, opt, x = _linear()
    tracker = MemoryTracker(model, opt)
    with tracker.measure(x):
        _train_step(model, opt, x)
    first = tracker.report()
    with tracker.measure(x):
        with torch.no_grad():
            model(x)
    assert tracker.report() == first
    with pytest.raises(RuntimeError):
        with tracker.measure():
            with tracker.measure():
                pass


def test_bf16_autocast_step():
    model, opt, x = _linear()
    tracker = MemoryTracker(model, opt)
    with tracker.measure(x):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        opt.step()
    r = tracker.report()
    # Autocast casts x to bf16 and addmm saves that copy (2 bytes an element); the fp32 x is not saved.
    assert r.activations == 8 * 64 * 2
    assert r.gradients == LINEAR_PARAMS  # grads are accumulated in the fp32 parameters' dtype
    assert r.optimizer == 2 * LINEAR_PARAMS + 2 * ADAMW_STEP


def _tiny_llama(checkpointing: bool):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    if checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    return model


def _llama_step(model, opt, batch):
    loss = model(**batch).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return loss.detach(), grads


def test_tiny_llama_step_unchanged_and_checkpointing_saves_less():
    base = _tiny_llama(checkpointing=False)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    plain = copy.deepcopy(base)
    loss_plain, grads_plain = _llama_step(plain, torch.optim.AdamW(plain.parameters()), batch)

    tracker = MemoryTracker(base)
    tracker.set_optimizer(torch.optim.AdamW(base.parameters()))
    with tracker.measure(batch):
        loss, grads = _llama_step(base, tracker.optimizer, batch)
    assert torch.equal(loss, loss_plain)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_plain))
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), plain.parameters()))
    full = tracker.report()
    n_params = sum(p.numel() for p in base.parameters()) * F32
    assert full.parameters_trainable == n_params
    assert full.buffers > 0  # rotary inv_freq
    assert full.gradients == n_params
    assert full.optimizer == 2 * n_params + len(list(base.parameters())) * ADAMW_STEP
    assert full.activations > 0
    assert full.peak >= full.parameters + full.gradients + full.optimizer

    ckpt_model = _tiny_llama(checkpointing=True)
    tracker = MemoryTracker(ckpt_model)
    with tracker.measure(batch):
        loss_ckpt, _ = _llama_step(ckpt_model, torch.optim.AdamW(ckpt_model.parameters()), batch)
    ckpt = tracker.report()
    assert 0 < ckpt.activations < full.activations
    assert torch.equal(loss_ckpt, loss_plain)


def test_tiny_llama_bf16_autocast_and_zeroth_order_forward():
    model = _tiny_llama(checkpointing=False)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    tracker = MemoryTracker(model)
    with tracker.measure(batch):
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
    r = tracker.report()
    assert r.activations > 0 and r.gradients == r.parameters

    model.zero_grad(set_to_none=True)
    forward_only = MemoryTracker(model)
    with forward_only.measure(batch):
        with torch.inference_mode():
            model(**batch)
    f = forward_only.report()
    assert f.activations == 0 and f.gradients == 0
    assert f.peak > f.parameters + f.buffers


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_reports_allocator_peak():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32).cuda()
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(8, 64, device="cuda")
    tracker = MemoryTracker(model, opt)
    with tracker.measure(x):
        _train_step(model, opt, x)
        torch.cuda.synchronize()
    r = tracker.report()
    assert r.gradients == LINEAR_PARAMS
    assert r.activations == X_BYTES
    # AdamW's `step` tensors live on the CPU unless capturable/fused.
    assert r.optimizer == 2 * LINEAR_PARAMS + 2 * ADAMW_STEP
    assert r.cuda_max_allocated is not None
    assert r.cuda_max_allocated >= r.parameters + r.gradients + 2 * LINEAR_PARAMS
