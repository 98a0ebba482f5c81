"""Training configs: the paper's defaults, overrides, and bad values failing before any work."""

import pytest

from omnimamba.errors import UserError
from omnimamba.training.config import PAPER_STAGES, StageConfig, TrainConfig, load_train_config


def test_defaults_are_the_papers():
    cfg = TrainConfig()
    assert [(s.name, s.lr, s.warmup, s.steps, s.batch) for s in cfg.stages] == [
        ("stage1-mmu", 1e-3, 100, 5_000, (256, 0)),
        ("stage1-t2i", 8e-4, 1_000, 100_000, (0, 720)),
        ("stage2-unified", 1e-4, 0, 150_000, (3, 48)),
    ]
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.weight_decay == 0 and cfg.optim.grad_clip == 1.0
    assert cfg.model.preset == "omnimamba-1.3b"


def test_cosine_schedule_with_warmup():
    s = StageConfig("stage2-unified", steps=110, lr=1.0, warmup=10, batch=(1, 1))
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(1.0) and s.lr_at(60) == pytest.approx(0.5)
    assert s.lr_at(110) == pytest.approx(0.0, abs=1e-12)


def test_yaml_file_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {preset: shapes-tiny}\nstages:\n  - {name: stage1-mmu, steps: 5, "
                                     "lr: 0.01, batch: [4, 0]}\n")
    cfg = load_train_config(tmp_path / "c.yaml", ["stages.0.steps=7", "optim.grad_clip=0.5", "run.out=x"])
    assert cfg.stages[0].steps == 7 and cfg.optim.grad_clip == 0.5 and cfg.run.out == "x"
    # overriding a stage field without a stages list starts from the paper's stages
    cfg = load_train_config(None, ["stages.2.lr=3e-5"])
    assert cfg.stages[2].lr == 3e-5 and cfg.stages[0] == PAPER_STAGES[0]
    (tmp_path / "c.toml").write_text('[run]\nout = "t"\n[optim]\ngrad_clip = 2.0\n')
    assert load_train_config(tmp_path / "c.toml").optim.grad_clip == 2.0


@pytest.mark.parametrize("override,message", [
    ("stages.0.name=stage3", "unknown stage 'stage3'"),
    ("stages.0.lr=-1e-4", "lr must be > 0"),
    ("stages.2.batch=[0, 0]", "not both 0"),
    ("stages.0.batch=[4, 4]", "trains one task"),
    ("model.mamba2=/no/such/dir", "model.mamba2: path does not exist"),
    ("data.llava=/no/such.json", "data.llava: path does not exist"),
    ("optim.lrr=1", r"unknown field\(s\) \['lrr'\]"),
    ("run.precision=fp8", "run.precision"),
    ("stages.0.steps=0", "steps must be >= 1"),
    ("vq_train.restart=rare", "vq_train.restart must be one of dead, split"),
])
def test_bad_values_fail_before_any_work(override, message):
    with pytest.raises(UserError, match=message):
        load_train_config(None, [override])


def test_missing_config_file_and_bad_syntax(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_train_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="cannot parse"):
        load_train_config(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="KEY=VALUE"):
        load_train_config(None, ["stages"])


def test_quickstart_config_equals_the_shipped_yaml():
    from pathlib import Path

    from omnimamba.quickstart import QUICKSTART
    from omnimamba.training.config import config_from_dict

    shipped = load_train_config(Path(__file__).parent.parent / "configs" / "shapes-tiny.yaml")
    assert shipped == config_from_dict(QUICKSTART)


def test_the_gpu_recipe_config_loads_and_its_model_builds():
    """configs/shapes-gpu.yaml (no test trains it) passes the config checks, and its preset with its overrides
    makes the model the README describes: 512 wide, 8 layers, 512 learned MMU positions, 256 codes per image."""
    from pathlib import Path

    from omnimamba.training.loop import _preset_with

    cfg = load_train_config(Path(__file__).parent.parent / "configs" / "shapes-gpu.yaml")
    model = _preset_with(cfg.model.preset, cfg.model.overrides)
    shape = (model.backbone.d_model, model.backbone.n_layer, model.mmu_positions, model.image_tokens)
    assert shape == (512, 8, 512, 256)
    assert [s.name for s in cfg.stages] == ["stage1-mmu", "stage1-t2i", "stage2-unified"]


def test_model_overrides_reach_the_sub_configs():
    from omnimamba.training.loop import _preset_with

    cfg = _preset_with("shapes-tiny", {"backbone": {"d_model": 96, "n_layer": 3}, "vq": {"codebook_size": 256},
                                       "understanding": {"spatial_merge": 2}, "caption_dropout": 0.2})
    assert (cfg.backbone.d_model, cfg.backbone.n_layer, cfg.vq.codebook_size) == (96, 3, 256)
    assert cfg.understanding.spatial_merge == 2 and cfg.caption_dropout == 0.2
    assert cfg.backbone.vocab_size == _preset_with("shapes-tiny", {}).backbone.vocab_size  # untouched fields stay
    with pytest.raises(UserError, match=r"model.overrides.backbone: unknown field\(s\) \['width'\]"):
        _preset_with("shapes-tiny", {"backbone": {"width": 3}})
    with pytest.raises(UserError, match=r"model.overrides: unknown field\(s\) \['nope'\]"):
        _preset_with("shapes-tiny", {"nope": 1})
    with pytest.raises(UserError, match="model.overrides.vq"):
        _preset_with("shapes-tiny", {"vq": {"codebook_size": -1}})


def test_shapes_models_follow_the_worlds_image_size(tmp_path):
    """A Shapes model reads and writes images of data.shapes.image_size: one code per 4 x 4 pixels, 2 x 2 codes
    merged for understanding, and a conv one row of codes and one code wide; a size off that grid is refused."""
    import json

    import torch

    from omnimamba.training.config import config_from_dict
    from omnimamba.training.loop import Trainer, _preset_with

    default = _preset_with("shapes-tiny", {})
    assert (default.vq.image_size, default.image_tokens, default.backbone.d_conv) == (64, 256, 17)
    cfg = _preset_with("shapes-tiny", {"image_size": 48})
    assert (cfg.vq.image_size, cfg.understanding.image_size, cfg.understanding.vq.image_size) == (48, 48, 48)
    assert (cfg.image_tokens, cfg.backbone.d_conv) == (144, 13)
    for bad in (44, 24):
        with pytest.raises(UserError, match="multiple of 8"):
            _preset_with("shapes-tiny", {"image_size": bad})
    trainer = Trainer(config_from_dict({
        "model": {"preset": "shapes-tiny"}, "data": {"shapes": {"image_size": 48, "train_images": 8}},
        "stages": [{"name": "stage2-unified", "steps": 1, "lr": 1e-3, "batch": [2, 2]}],
        "run": {"out": str(tmp_path), "eval_images": 1, "eval_prompts": 1, "progress": False, "tensorboard": False}}),
        log=lambda *a, **k: None)
    assert trainer.model.image_positions == 36 and trainer.model.config.image_tokens == 144
    trainer.run()
    evaluation = json.loads(next((tmp_path / "eval").glob("*.json")).read_text())
    assert evaluation["mmu"]["n"] > 0 and evaluation["t2i"]["n"] == 1  # answered and drew at 48 px
    assert torch.isfinite(torch.tensor([r["loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl")
                                                                .read_text().splitlines()) if "loss" in r])).all()
