"""Task-specific LoRA: exact identity at init, exact merge/unmerge, one route per call, no gradient elsewhere."""

import pytest
import torch

from omnimamba.lora import TaskLoRALinear, add_task_lora
from omnimamba.mamba2 import Mamba2LM, preset


def make_layer(seed=0):
    torch.manual_seed(seed)
    return TaskLoRALinear(16, 24, bias=True, rank=4, alpha=8)


def test_fresh_routes_equal_the_base_layer_exactly():
    layer = make_layer()
    x = torch.randn(3, 5, 16)
    base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    for task in ("mmu", "t2i", None):
        assert torch.equal(layer(x, task=task), base)


def test_route_formula_and_only_the_active_route_runs():
    layer = make_layer()
    with torch.no_grad():
        for t in ("mmu", "t2i"):
            layer.lora_B[t].weight.normal_()
    x = torch.randn(2, 16)
    expect = x @ layer.weight.T + layer.bias + 2.0 * (x @ layer.lora_A["mmu"].weight.T) @ layer.lora_B["mmu"].weight.T
    out = layer(x, task="mmu")
    torch.testing.assert_close(out, expect)
    out.sum().backward()
    assert layer.lora_A["mmu"].weight.grad is not None and layer.lora_B["mmu"].weight.grad is not None
    assert layer.lora_A["t2i"].weight.grad is None and layer.lora_B["t2i"].weight.grad is None


def test_merge_then_unmerge_restores_bit_for_bit():
    layer = make_layer()
    with torch.no_grad():
        layer.lora_B["t2i"].weight.normal_()
    original = layer.weight.detach().clone()
    x = torch.randn(4, 16)
    unmerged_out = layer(x, task="t2i")
    layer.merge("t2i")
    assert not torch.equal(layer.weight, original)
    torch.testing.assert_close(layer(x, task="t2i"), unmerged_out, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x, task="mmu")
    layer.unmerge()
    assert torch.equal(layer.weight, original)


def test_unknown_task_and_bad_rank():
    layer = make_layer()
    with pytest.raises(ValueError, match="unknown task 'vqa'"):
        layer(torch.randn(1, 16), task="vqa")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        TaskLoRALinear(4, 4, rank=0)


def test_backbone_with_fresh_lora_equals_base_model():
    torch.manual_seed(0)
    lm = Mamba2LM(preset("mamba2-tiny"), backend="reference").eval()
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        before = lm(ids)
        assert add_task_lora(lm.backbone, rank=8) == 2
        # keys of the base weights are unchanged, so upstream checkpoints still load
        assert "backbone.layers.0.mixer.in_proj.weight" in lm.state_dict()
        assert "backbone.layers.0.mixer.in_proj.lora_A.mmu.weight" in lm.state_dict()
        hidden = lm.backbone(lm.backbone.embedding(ids), task="t2i")
    assert torch.equal(lm.lm_head(hidden), before)
