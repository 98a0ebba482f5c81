"""The Mamba-2 LM: shapes, prefill + decode against one full forward, padding, constant-size cache, errors."""

import pytest
import torch

from omnimamba.mamba2 import Mamba2Cache, Mamba2LM, PRESETS, preset


def test_presets_have_published_shapes():
    assert (PRESETS["mamba2-1.3b"].d_model, PRESETS["mamba2-1.3b"].n_layer) == (2048, 48)
    assert PRESETS["mamba2-1.3b"].nheads == 64 and PRESETS["mamba2-1.3b"].padded_vocab_size == 50288
    assert (PRESETS["mamba2-2.7b"].d_model, PRESETS["mamba2-2.7b"].n_layer) == (2560, 64)


def test_parameter_layout_is_state_spaces(tiny_model):
    keys = set(tiny_model.state_dict())
    for name in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                 "out_proj.weight"):
        assert f"backbone.layers.1.mixer.{name}" in keys
    assert {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight",
            "backbone.layers.0.norm.weight"} <= keys
    c = tiny_model.config
    assert tiny_model.backbone.layers[0].mixer.in_proj.weight.shape == (2 * c.d_inner + 2 * c.ngroups * c.d_state
                                                                        + c.nheads, c.d_model)


def test_forward_shape(tiny_model):
    ids = torch.randint(0, 512, (3, 21))
    assert tiny_model(ids).shape == (3, 21, tiny_model.config.padded_vocab_size)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_prefill_then_decode_equals_full_forward(tiny_config, dtype, tol):
    torch.manual_seed(0)
    model = Mamba2LM(tiny_config, backend="reference").to(dtype).eval()
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(2)
        assert cache.ssm.dtype == torch.promote_types(dtype, torch.float32)
        logits = [model(ids[:, :11], cache=cache)]
        assert cache.seqlen_offset == 11
        logits += [model.step(ids[:, t], cache)[:, None] for t in range(11, 30)]
    stitched = torch.cat(logits, dim=1)
    assert ((stitched - full).norm() / full.norm()).item() < tol


def test_a_bf16_state_cache_decodes_close_to_the_float32_one(tiny_config):
    """The optional bf16 SSM state (half the state traffic) rounds only when stored: 20 decode steps stay
    within bf16's rounding of the float32-state logits."""
    torch.manual_seed(0)
    model = Mamba2LM(tiny_config, backend="reference").eval()
    ids = torch.randint(0, 512, (2, 31))
    out = {}
    with torch.no_grad():
        for ssm_dtype in (torch.float32, torch.bfloat16):
            cache = model.allocate_cache(2, ssm_dtype=ssm_dtype)
            assert cache.ssm.dtype == ssm_dtype
            logits = [model(ids[:, :11], cache=cache)]
            logits += [model.step(ids[:, t], cache)[:, None] for t in range(11, 31)]
            out[ssm_dtype] = torch.cat(logits, 1)
    err = ((out[torch.bfloat16] - out[torch.float32]).norm() / out[torch.float32].norm()).item()
    assert 0 < err < 1e-2


def test_chunked_prefill_resumes_from_cache(tiny_model):
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        full = tiny_model(ids)
        cache = tiny_model.allocate_cache(2)
        parts = [tiny_model(ids[:, a:b], cache=cache) for a, b in ((0, 13), (13, 14), (14, 40))]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


def test_left_padding_with_mask_equals_unpadded(tiny_model):
    ids = torch.randint(1, 512, (1, 9))
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 9)], dim=1)
    with torch.no_grad():
        c1, c2 = tiny_model.allocate_cache(1), tiny_model.allocate_cache(1)
        a = tiny_model(ids, cache=c1)
        b = tiny_model(padded, cache=c2, attention_mask=mask)
        torch.testing.assert_close(b[:, 5:], a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c2.ssm, c1.ssm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(c2.conv, c1.conv, rtol=1e-5, atol=1e-5)


def test_cache_bytes_do_not_grow_with_position(tiny_model):
    cache = tiny_model.allocate_cache(1)
    token = torch.tensor([3])
    sizes = {}
    with torch.no_grad():
        for pos in range(1, 10_001):
            tiny_model.step(token, cache)
            if pos in (10, 10_000):
                sizes[pos] = cache.nbytes
    c = tiny_model.config
    expected = c.n_layer * (c.conv_dim * c.d_conv * 4 + c.nheads * c.headdim * c.d_state * 4)
    assert sizes[10] == sizes[10_000] == expected
    assert cache.seqlen_offset == 10_000


def test_tied_head_shares_embedding():
    model = Mamba2LM(preset("mamba2-tiny"))
    assert model.lm_head.weight is model.backbone.embedding.weight


def test_bad_inputs_raise_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="token id 512 is out of range for a vocabulary of 512"):
        tiny_model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="token id -1 is out of range"):
        tiny_model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="input_ids is empty"):
        tiny_model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids is empty"):
        tiny_model.generate(torch.zeros(2, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"shape \(batch, length\)"):
        tiny_model(torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="integer tensor"):
        tiny_model(torch.zeros(1, 3))


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="Mamba2Config.d_state must be a positive integer"):
        preset("mamba2-tiny", d_state=0)
    with pytest.raises(ValueError, match="not a multiple of headdim"):
        preset("mamba2-tiny", headdim=48)
    with pytest.raises(ValueError, match="unknown Mamba-2 preset"):
        preset("mamba2-9b")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Mamba2Cache.empty(preset("mamba2-tiny"), 0)
