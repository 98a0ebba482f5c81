"""Understanding encoders: fused timm ViTs (Prismatic-style), local weights, the tiny encoder, errors."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from omnimamba.errors import UserError
from omnimamba.vision.understanding import (CLIP_224, DINOSIGLIP_384, FusedMLPProjector, TimmEncoder,
                                            UnderstandingConfig, build_understanding_encoder)

PAIR = ("vit_tiny_patch16_224", "vit_small_patch16_224")  # small stand-ins for DINOv2 + SigLIP


def test_fused_features_concatenate_channels_of_the_same_patches():
    torch.manual_seed(0)
    enc = TimmEncoder(UnderstandingConfig(backbones=PAIR, image_size=64)).eval()
    images = torch.rand(2, 3, 64, 64)
    feats = enc(images)
    assert feats.shape == (2, 16, 192 + 384) and enc.feature_dim == 576 and enc.num_patches == 16
    # the first 192 channels are the first ViT's second-to-last block, on its own normalisation
    first = enc.encoders[0]
    x = (images - 0.5) / 0.5
    expect = first.get_intermediate_layers(x, n=[len(first.blocks) - 2])[0]
    torch.testing.assert_close(feats[..., :192], expect)


def test_local_weights_load(tmp_path):
    torch.manual_seed(1)
    src = timm.create_model(PAIR[0], pretrained=False, num_classes=0, img_size=64).eval()
    save_file(src.state_dict(), str(tmp_path / "vit.safetensors"))
    enc = TimmEncoder(UnderstandingConfig(backbones=PAIR[:1], weights=(str(tmp_path / "vit.safetensors"),),
                                          image_size=64)).eval()
    for k, v in src.state_dict().items():
        assert torch.equal(enc.encoders[0].state_dict()[k], v)
    with pytest.raises(UserError, match="not found"):
        TimmEncoder(UnderstandingConfig(backbones=PAIR[:1], weights=(str(tmp_path / "nope.pt"),), image_size=64))
    wrong = timm.create_model(PAIR[1], pretrained=False, num_classes=0, img_size=64)
    save_file(wrong.state_dict(), str(tmp_path / "wrong.safetensors"))
    with pytest.raises(UserError, match="does not match timm model"):
        TimmEncoder(UnderstandingConfig(backbones=PAIR[:1], weights=(str(tmp_path / "wrong.safetensors"),),
                                        image_size=64))


def test_paper_encoders_have_the_published_grids():
    with torch.device("meta"):
        dinosiglip = TimmEncoder(UnderstandingConfig(backbones=DINOSIGLIP_384, image_size=384))
        clip = TimmEncoder(UnderstandingConfig(backbones=CLIP_224, image_size=224))
    assert (dinosiglip.num_patches, dinosiglip.feature_dim) == (729, 1024 + 1152)
    assert (clip.num_patches, clip.feature_dim) == (256, 1024)


def test_tiny_encoder_and_projector_shapes():
    enc = build_understanding_encoder(UnderstandingConfig(kind="tiny", image_size=64, tiny_width=32))
    feats = enc(torch.rand(3, 3, 64, 64))
    assert feats.shape == (3, 64, 32)
    proj = FusedMLPProjector(32, 48)
    assert proj(feats).shape == (3, 64, 48)
    assert [type(m).__name__ for m in proj.projector] == ["Linear", "GELU", "Linear", "GELU", "Linear"]


def test_errors_name_the_problem():
    with pytest.raises(UserError, match="unknown encoder 'vit_nonexistent'"):
        TimmEncoder(UnderstandingConfig(backbones=("vit_nonexistent",), image_size=64))
    enc = build_understanding_encoder(UnderstandingConfig(kind="tiny", image_size=64))
    with pytest.raises(UserError, match="takes 64x64 images, got 32x32"):
        enc(torch.rand(1, 3, 32, 32))
    with pytest.raises(UserError, match="RGB images"):
        enc(torch.rand(1, 4, 64, 64))
    with pytest.raises(UserError, match="kind must be 'timm', 'tiny' or 'vq-encoder'"):
        UnderstandingConfig(kind="resnet")
    with pytest.raises(UserError, match="one path"):
        UnderstandingConfig(backbones=PAIR, weights=("a",))


def test_spatial_merge_concatenates_each_block_of_neighbouring_patches():
    from omnimamba.vision.understanding import merge_patches

    g, c = 4, 3
    feats = torch.arange(g * g * c, dtype=torch.float32).reshape(1, g * g, c)  # patch p holds p*c .. p*c+2
    merged = merge_patches(feats, 2)
    assert merged.shape == (1, 4, 4 * c)
    # merged patch 1 is the top-right 2x2 block: patches (0,2), (0,3), (1,2), (1,3) = 2, 3, 6, 7
    expect = torch.cat([feats[0, p] for p in (2, 3, 6, 7)])
    assert torch.equal(merged[0, 1], expect)
    assert torch.equal(merge_patches(feats, 1), feats)
    with pytest.raises(UserError, match="spatial_merge 3"):
        merge_patches(feats, 3)
    with pytest.raises(UserError, match="spatial_merge must be >= 1"):
        UnderstandingConfig(spatial_merge=0)
