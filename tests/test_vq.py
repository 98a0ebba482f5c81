"""The LlamaGen VQ tokenizer: upstream layout, quantiser properties, errors."""

import json
from pathlib import Path

import pytest
import torch

from omnimamba.errors import UserError
from omnimamba.vision.vq import VQConfig, VQModel

# Names and shapes of LlamaGen's VQ_16 state dict, read off LlamaGen's own vq_model.py (the layout of
# the published vq_ds16_c2i.pt).
LLAMAGEN_VQ16 = json.loads((Path(__file__).parent / "data" / "llamagen_vq16_state_dict_shapes.json").read_text())


def test_llamagen_vq16_checkpoint_loads_key_for_key(tmp_path):
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=gen) * 0.02 for k, shape in LLAMAGEN_VQ16.items()}
    torch.save({"model": state}, tmp_path / "vq_ds16_c2i.pt")
    model = VQModel.from_llamagen(tmp_path / "vq_ds16_c2i.pt")
    assert model.config.num_tokens == 256 and model.config.codebook_size == 16384
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_wrong_checkpoint_is_named(tmp_path):
    state = {k: torch.zeros(shape) for k, shape in LLAMAGEN_VQ16.items()}
    del state["quant_conv.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="quant_conv.weight"):
        VQModel.from_llamagen(tmp_path / "bad.pt")
    with pytest.raises(UserError, match="not found"):
        VQModel.from_llamagen(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def tiny_vq():
    torch.manual_seed(0)
    return VQModel(VQConfig.shapes()).eval()  # 16 x 16 codes from 256


def test_tiny_round_trip_shapes(tiny_vq):
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    codes = tiny_vq.encode(images)
    assert codes.shape == (2, 256) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 256
    with torch.no_grad():
        out = tiny_vq.decode(codes)
    assert out.shape == (2, 3, 64, 64)
    rec, codes2, losses = tiny_vq(images)
    assert torch.equal(codes2.flatten(1), codes) and set(losses) == {"codebook", "commitment", "z"}


def test_codebook_vectors_quantise_to_themselves(tiny_vq):
    # The exact part of the round trip: a code's own (normalised) vector is its nearest neighbour.
    codes = torch.randint(0, 256, (3, 16, 16))
    z = tiny_vq.quantize.lookup(codes)
    _, again, _ = tiny_vq.quantize(z)
    assert torch.equal(again, codes)


def test_bad_images_and_codes(tiny_vq):
    with pytest.raises(UserError, match=r"\(batch, 3, 64, 64\)"):
        tiny_vq.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(UserError, match=r"\(batch, 3, 64, 64\)"):
        tiny_vq.encode(torch.rand(1, 1, 64, 64))
    with pytest.raises(UserError, match="codes must lie in 0..255"):
        tiny_vq.decode(torch.full((1, 256), 256))
    with pytest.raises(UserError, match=r"\(batch, 256\)"):
        tiny_vq.decode(torch.zeros(1, 63, dtype=torch.long))


def test_training_the_shapes_tokenizer_lowers_its_loss_and_keeps_codes_alive():
    from omnimamba.data.shapes import ShapesWorld
    from omnimamba.training.vq import train_vq

    torch.manual_seed(0)
    world = ShapesWorld(seed=0)
    vq = VQModel(VQConfig.shapes(ch=8, codebook_size=64))
    records = []
    result = train_vq(vq, lambda i: world.sample("train", i).image, 32, steps=40, lr=3e-3, batch=4,
                      progress=False, foreground_weight=10.0, record=lambda s, r: records.append((s, r)),
                      record_every=10)
    assert [s for s, _ in records] == [0, 10, 20, 30, 39]
    losses = [r["recon_loss"] for _, r in records]
    assert losses[-1] < 0.75 * losses[0] and result["final_recon_loss"] > 0
    images = torch.stack([torch.from_numpy(world.sample("train", i).image) for i in range(8)])
    codes = vq.encode(images.permute(0, 3, 1, 2).float() / 127.5 - 1)
    # dead-code restarts: without them a small codebook collapses onto a handful of codes
    assert len(codes.unique()) >= 16 and not vq.training
    # trained in channels-last layout on the CPU, handed back contiguous (safetensors stores nothing else)
    assert all(p.is_contiguous() for p in vq.parameters())


def test_split_restarts_move_rarely_used_codes_onto_the_worst_quantised_latents():
    from omnimamba.training.vq import restart_codes

    vq = VQModel(VQConfig.shapes(ch=8, codebook_size=4))  # l2-normalised codes of dimension 8
    table = vq.quantize.embedding.weight
    with torch.no_grad():
        table.copy_(torch.eye(8)[:4])
    # 99 latents on code 0 exactly (no quantisation error) and one far from every code
    far = torch.nn.functional.normalize(-torch.ones(1, 8), dim=-1)
    z = torch.cat([torch.eye(8)[:1].repeat(99, 1), far])
    usage = torch.tensor([99, 1, 0, 300])  # mean 100: codes 1 (rare) and 2 (dead) move, 0 and 3 stay
    before = table.detach().clone()
    gen = torch.Generator().manual_seed(0)
    assert restart_codes(vq, z, usage, gen, mode="split") == 2
    for k in (1, 2):  # both onto the far latent, the only one the codebook quantises badly
        assert torch.allclose(table[k], far[0], atol=0.05)
    torch.testing.assert_close(table[[0, 3]], before[[0, 3]])
    # "dead" moves only the unused code, onto a latent drawn uniformly (here almost surely one of the 99)
    with torch.no_grad():
        table.copy_(before)
    assert restart_codes(vq, z, usage, torch.Generator().manual_seed(0), mode="dead") == 1
    torch.testing.assert_close(table[[0, 1, 3]], before[[0, 1, 3]])
    with pytest.raises(UserError, match="vq_train.restart"):
        restart_codes(vq, z, usage, gen, mode="rare")


def test_channel_norm_is_a_layer_norm_at_each_position():
    from omnimamba.vision.vq import ChannelNorm

    norm = ChannelNorm(6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 6, 5, 7)
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), norm.weight, norm.bias, 1e-6).permute(0, 3, 1, 2)
    assert torch.allclose(norm(x), ref, atol=1e-6)
    # a position's output does not move when another position changes (GroupNorm's would)
    y = x.clone()
    y[:, :, 0, 0] += 5.0
    assert torch.equal(norm(x)[:, :, 1:], norm(y)[:, :, 1:])


def test_patch_encoder_codes_see_their_own_patch_only():
    torch.manual_seed(0)
    cfg = VQConfig.shapes().replace(encoder="patch", norm="channel", attention=False)
    vq = VQModel(cfg).eval()
    assert "attn" not in " ".join(k for k, _ in vq.named_parameters())
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    y = x.clone()
    y[:, :, 20:24, 8:12] = torch.rand(1, 3, 4, 4)  # patch (5, 2) of the 16 x 16 grid
    with torch.no_grad():
        zx, zy = (vq.quant_conv(vq.encoder(t)) for t in (x, y))
    changed = (zx - zy).abs().amax(1)[0] > 0
    assert changed[5, 2] and int(changed.sum()) == 1
    # equal patches get equal codes wherever they are
    flat = torch.zeros(1, 3, 64, 64)
    assert len(torch.unique(vq.encode(flat))) == 1
    # the decoder still turns codes back into images of the right shape
    assert vq.decode(vq.encode(x)).shape == x.shape


def test_bad_vq_architecture_values_are_named():
    with pytest.raises(ValueError, match="VQConfig.norm"):
        VQConfig.shapes().replace(norm="batch")
    with pytest.raises(ValueError, match="VQConfig.encoder"):
        VQConfig.shapes().replace(encoder="vit")


def test_a_tokenizer_trained_from_scratch_starts_from_its_seed_alone():
    """reinit_vq_: the initial weights depend on the seed and the config, not on what the global RNG drew before
    (a model of another shape); the global RNG is left where it was."""
    from omnimamba.training.vq import reinit_vq_

    cfg = VQConfig.shapes_local(ch=8, codebook_size=32, image_size=32)
    torch.manual_seed(1)
    a = VQModel(cfg)
    torch.manual_seed(2)
    torch.randn(1000)  # another backbone drew more numbers first
    b = VQModel(cfg)
    assert not torch.equal(a.quantize.embedding.weight, b.quantize.embedding.weight)
    state = torch.get_rng_state()
    reinit_vq_(a, 7), reinit_vq_(b, 7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)
    fresh = VQModel(cfg).state_dict()
    for name, value in fresh.items():
        assert torch.equal(a.state_dict()[name], value) and torch.equal(b.state_dict()[name], value), name
    reinit_vq_(b, 8)
    assert not torch.equal(a.quantize.embedding.weight, b.quantize.embedding.weight)
