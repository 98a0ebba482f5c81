"""Loading real Mamba-2 checkpoint layouts: transformers' Mamba2ForCausalLM and state-spaces' mamba_ssm format."""

import json

import pytest
import torch

from omnimamba.errors import UserError
from omnimamba.mamba2 import CheckpointError, Mamba2LM, preset

transformers = pytest.importorskip("transformers")


def perturb_(module, seed):
    # Random weights everywhere (norm weights, D, biases...) so no parameter can be ignored unnoticed.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    cfg = transformers.Mamba2Config(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2, head_dim=16,
        num_heads=8, n_groups=2, conv_kernel=4, chunk_size=8, tie_word_embeddings=False,
        residual_in_fp32=True, use_cache=True, pad_token_id=0, eos_token_id=2, bos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.Mamba2ForCausalLM(cfg).eval()
    perturb_(model, 0)
    path = tmp_path_factory.mktemp("hf_mamba2")
    model.save_pretrained(path)
    return path, model


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_transformers_checkpoint_gives_same_logits_and_tokens(hf_dir):
    path, hf = hf_dir
    ours = Mamba2LM.from_pretrained(path, backend="reference").eval()
    assert ours.config.ngroups == 2 and ours.config.padded_vocab_size == 300
    ids = torch.randint(3, 300, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expect = hf(ids).logits
        got = ours(ids)
    assert rel_err(got, expect) < 1e-4
    with torch.no_grad():
        hf_tokens = hf.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    our_tokens = ours.generate(ids, max_new_tokens=12, temperature=0)
    assert torch.equal(our_tokens, hf_tokens)


def test_state_spaces_checkpoint_roundtrip(tmp_path):
    # Written the way mamba_ssm stores its checkpoints: config.json + pytorch_model.bin, tied head omitted.
    cfg = preset("mamba2-tiny", ngroups=2, vocab_size=500, pad_vocab_size_multiple=16)
    torch.manual_seed(0)
    src = Mamba2LM(cfg, backend="reference").eval()
    perturb_(src, 1)
    raw = {
        "d_model": 64, "d_intermediate": 0, "n_layer": 2, "vocab_size": 500,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 32},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "pad_vocab_size_multiple": 16, "tie_embeddings": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    state = {k: v for k, v in src.state_dict().items() if k != "lm_head.weight"}
    torch.save(state, tmp_path / "pytorch_model.bin")
    loaded = Mamba2LM.from_pretrained(tmp_path, backend="reference").eval()
    assert loaded.config == cfg
    ids = torch.randint(0, 500, (2, 23))
    with torch.no_grad():
        assert rel_err(loaded(ids), src(ids)) < 1e-6
    assert torch.equal(loaded.generate(ids, 8, temperature=0), src.generate(ids, 8, temperature=0))
    # save_pretrained writes safetensors that load back identically
    loaded.save_pretrained(tmp_path / "resaved")
    assert (tmp_path / "resaved" / "model.safetensors").is_file()
    again = Mamba2LM.from_pretrained(tmp_path / "resaved", backend="reference").eval()
    for (k, a), (_, b) in zip(loaded.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_wrong_path(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        Mamba2LM.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json not found"):
        Mamba2LM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json: the Mamba-2 config is damaged or not JSON"):
        Mamba2LM.from_pretrained(tmp_path)


def test_config_that_does_not_match_weights(hf_dir, tmp_path):
    path, _ = hf_dir
    raw = json.loads((path / "config.json").read_text())
    raw["state_size"] = 32  # weights were saved with 16
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"shape mismatches .*in_proj.weight"):
        Mamba2LM.from_pretrained(tmp_path)
    raw["state_size"], raw["num_hidden_layers"] = 16, 3
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): backbone.layers.2"):
        Mamba2LM.from_pretrained(tmp_path)
    raw["num_hidden_layers"] = 1
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"unexpected keys \(\d+\): backbone.layers.1"):
        Mamba2LM.from_pretrained(tmp_path)


def test_no_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64, "n_layer": 2}))
    with pytest.raises(CheckpointError, match="no weights found"):
        Mamba2LM.from_pretrained(tmp_path)


def test_hybrid_checkpoint_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64, "n_layer": 2, "attn_layer_idx": [1]}))
    with pytest.raises(CheckpointError, match="hybrid"):
        Mamba2LM.from_pretrained(tmp_path)
