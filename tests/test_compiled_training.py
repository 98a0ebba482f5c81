"""Compiled training blocks (`Mamba2Backbone.compile_blocks`, run.compile): torch.compile'd blocks give the
eager blocks' outputs and gradients, with checkpointing too, in one graph per block signature (no graph
breaks), and only where gradients flow. On the CPU (reference kernels, inductor's C++ backend, one shape: a
second shape would recompile with dynamic shapes, minutes on two cores); tests/test_ops_gpu.py repeats it on
the fla backend."""

import pytest
import torch
from torch._dynamo.utils import counters

from omnimamba.errors import UserError
from omnimamba.mamba2 import Mamba2Config, Mamba2LM
from omnimamba.ops import reference
from omnimamba.ops.compiled import causal_conv
from omnimamba.ops.reference import causal_conv as reference_conv
from omnimamba.training.config import config_from_dict


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = Mamba2Config(d_model=64, n_layer=3, vocab_size=100, d_state=16, headdim=16, chunk_size=16)
    return Mamba2LM(cfg, backend="reference").train()


def loss_and_grads(model, ids):
    model.zero_grad()
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_the_compiled_conv_is_the_reference_conv():
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 9, 6, generator=gen), torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    for length in (9, 2):  # shorter than the kernel: the state holds zero padding
        got, want = causal_conv(x[:, :length], w, b), reference_conv(x[:, :length], w, b)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_compiled_blocks_give_the_eager_gradients_in_one_graph_per_signature():
    torch._dynamo.reset()
    counters.clear()
    ids = torch.randint(0, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    eager = tiny()
    loss, grads = loss_and_grads(eager, ids)
    model = tiny()
    model.backbone.compile_blocks()
    for checkpointing in (False, True):
        model.backbone.gradient_checkpointing = checkpointing
        got, got_grads = loss_and_grads(model, ids)
        torch.testing.assert_close(got, loss, rtol=1e-5, atol=0)
        for name, g in grads.items():
            err = (got_grads[name] - g).norm() / g.norm().clamp(min=1e-12)
            assert err < 1e-4, (name, checkpointing, float(err))
    # the first block (no residual yet) and the others: two graphs for three blocks, none broken, and the
    # recomputation of the checkpointed run found them in the cache
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    with torch.no_grad():  # inference stays eager (and would not compile anything new)
        torch.testing.assert_close(model(ids), eager(ids), rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2


def test_compile_with_fsdp_is_refused_with_the_way_out():
    with pytest.raises(UserError, match="strategy ddp, or compile: false"):
        config_from_dict({"run": {"compile": True, "strategy": "fsdp"}})


def test_compiled_blocks_on_a_gpu_need_the_fla_backend(monkeypatch):
    """On a GPU the compiled blocks run fla's scan (its gradients checked in tests/test_ops_gpu.py); the
    reference kernels there are refused by name (inductor cannot generate their scan), at compile_blocks and
    again at the first compiled forward if the model moved to a GPU since. On a CPU an fla model compiles
    with the reference scan."""
    from omnimamba.mamba2.model import Mamba2Backbone

    fla = Mamba2LM(Mamba2Config(d_model=64, n_layer=1, vocab_size=100, d_state=16, headdim=16), backend="fla")
    fla.backbone.compile_blocks()
    assert fla.backbone._training_kernels().ssd_chunked is reference.ssd_chunked  # a CPU model: no Triton
    reference_model = Mamba2LM(Mamba2Config(d_model=64, n_layer=1, vocab_size=100, d_state=16, headdim=16),
                               backend="reference")
    reference_model.backbone.compile_blocks()  # on the CPU
    monkeypatch.setattr(Mamba2Backbone, "_on_gpu", lambda self: True)
    with pytest.raises(UserError, match="run.backend: auto .*run.compile: false"):
        reference_model.backbone._training_kernels()
    with pytest.raises(UserError, match="need the fla backend on a GPU"):
        Mamba2LM(Mamba2Config(d_model=64, n_layer=1, vocab_size=100, d_state=16, headdim=16),
                 backend="reference").backbone.compile_blocks()
    fla.backbone.compile_blocks()
    assert fla.backbone.compiled
