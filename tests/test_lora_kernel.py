"""The fused LoRA node equals the module path (PEFT's arithmetic) in output and every gradient."""

import copy

import pytest
import torch
from torch import nn

from memtune.adapters.lora import LoraLinear
from memtune.adapters.lora_kernel import fusable, fused_lora


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
def test_fused_equals_module_path(bias, input_grad):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(12, 7, bias=bias), r=3, alpha=6.0)
    for p in layer.base_layer.parameters():
        p.requires_grad_(False)
    nn.init.normal_(layer.lora_B.weight)
    ref = copy.deepcopy(layer)
    ref.lora_dropout = nn.Dropout(0.0)  # not Identity: takes the module path
    x = torch.randn(2, 5, 12, requires_grad=input_grad)
    x_ref = x.detach().clone().requires_grad_(input_grad)
    assert fusable(layer, x) and not fusable(ref, x_ref)
    g = torch.randn(2, 5, 7)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_FusedLoraBackward"  # LoraLinear takes the fused node
    (out * g).sum().backward()
    (ref(x_ref) * g).sum().backward()
    torch.testing.assert_close(fused_lora(layer, x), ref(x_ref))
    torch.testing.assert_close(layer.lora_A.weight.grad, ref.lora_A.weight.grad)
    torch.testing.assert_close(layer.lora_B.weight.grad, ref.lora_B.weight.grad)
    if input_grad:
        torch.testing.assert_close(x.grad, x_ref.grad)


def test_planning_takes_the_same_path_as_the_run():
    """Under `memtune plan` the weights are fake parameters; the plan must see the fused node the run uses."""
    from memtune.memory.planning import planning, settle

    with planning():
        layer = LoraLinear(nn.Linear(12, 7, device="meta"), r=3, alpha=6.0)  # how a planned model is built
        layer.base_layer.requires_grad_(False)
        settle(layer)
        assert type(layer.base_layer.weight) is not nn.Parameter  # a fake tensor marked as a parameter
        out = layer(torch.randn(2, 5, 12))
        assert type(out.grad_fn).__name__ == "_FusedLoraBackward"
