"""The decode-step runner off the GPU: eager calls, the runner pool's bounds, and the clear error for graphs
on the CPU (graph replay itself is tested on the GPU, tests/test_decode_gpu.py)."""

import pytest
import torch

from omnimamba.decoding import PrefillGraphs, StepRunner, StepRunnerPool, graphs_enabled
from omnimamba.mamba2 import Mamba2Cache, preset


def test_eager_runner_calls_the_step_and_leaves_the_cache_alone():
    cache = Mamba2Cache.empty(preset("mamba2-tiny"), 2)
    cache.ssm.fill_(3.0)
    runner = StepRunner(lambda t: t * 2, cache, (torch.zeros(2),), use_graph=False)
    assert not runner.graphed
    assert torch.equal(runner(torch.tensor([1.0, 2.0])), torch.tensor([2.0, 4.0]))
    assert (cache.ssm == 3.0).all()


def test_pool_keeps_the_most_recently_used_runners():
    pool = StepRunnerPool(max_size=2)
    built = []

    def build(name):
        built.append(name)
        return name

    for key in ("a", "b", "a", "c", "a", "b"):
        pool.get((key,), lambda k=key: build(k))
    # 'a' was used again before 'c' arrived, so 'b' went first; 'b' had to be built again.
    assert built == ["a", "b", "c", "b"] and len(pool) == 2


def test_prefill_graphs_run_a_first_sighting_eagerly_and_remember_the_last_lengths():
    cache = Mamba2Cache.empty(preset("mamba2-tiny"), 1)
    graphs = PrefillGraphs(max_size=2)
    calls = []

    def prefill(x, mask):
        calls.append(x.size(1))
        return x[:, -1]

    for length in (3, 4, 5):
        x = torch.full((1, length, 2), float(length))
        assert torch.equal(graphs(prefill, cache, x, torch.ones(1, length)), x[:, -1])
    assert calls == [3, 4, 5] and len(graphs) == 0  # each ran eagerly, none captured yet
    assert [k[0][1] for k in graphs._graphs] == [4, 5]  # length 3, the least recently seen, was dropped
    runner = StepRunner(lambda t: t, cache, (torch.zeros(1),), use_graph=False)
    assert runner._prefills is None and len(runner.prefills) == 0  # made on first use only


def test_graphs_default_off_on_cpu_and_refused_when_forced():
    module = torch.nn.Linear(2, 2).eval()
    assert graphs_enabled(None, module, torch.device("cpu")) is False
    assert graphs_enabled(False, module, torch.device("cpu")) is False
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model"):
        graphs_enabled(True, module, torch.device("cpu"))
    assert graphs_enabled(None, module.train(), torch.device("cuda")) is False


def test_the_backbone_demo_trains_and_its_cached_decode_equals_the_full_forward(capsys, monkeypatch):
    """`omnimamba backbone-demo` on a few steps: the loss falls, prefill + step-by-step decode with the cache
    equals a full forward pass, and the cache's size is that of 64 sequences' conv and SSM states."""
    from omnimamba import demo
    from omnimamba.cli import main

    results, train = [], demo.backbone_demo

    def recorded(**kwargs):  # what the command trained, kept for the checks below
        results.append(train(**kwargs))
        return results[-1]

    monkeypatch.setattr(demo, "backbone_demo", recorded)
    assert main(["backbone-demo", "--steps", "20"]) == 0
    (r,) = results
    assert r["steps"] == 20 and r["last_loss"] < r["first_loss"]
    assert r["decode_vs_forward_rel_error"] < 1e-5
    c = preset("mamba2-tiny")
    conv_dim = c.d_inner + 2 * c.ngroups * c.d_state
    assert r["cache_bytes"] == 64 * c.n_layer * 4 * (conv_dim * c.d_conv + c.nheads * c.headdim * c.d_state)
    assert "greedy continuation accuracy" in capsys.readouterr().out
