"""Reliability: training killed anywhere resumes to the same weights and logs; damaged files give one clear
error; a full disk or read-only folder is reported, never taken for a good file."""

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omnimamba.cli import main
from omnimamba.errors import UserError
from omnimamba.fileio import MANIFEST, verify_manifest
from omnimamba.training.checkpoint import list_checkpoints, newest_intact

HELPER = Path(__file__).parent / "helpers" / "train_process.py"
STAGES = [{"name": "stage1-t2i", "steps": 3, "lr": 0.005, "batch": [0, 2]},
          {"name": "stage2-unified", "steps": 5, "lr": 0.005, "warmup": 1, "batch": [2, 2]}]
# Where a run can die: every failpoint of the trainer and checkpoint writer, and how often each is reached
# in the run above (8 steps; checkpoints every 2 steps and at each stage's end: 5; 2 stages).
SITES = {"step": 8, "checkpoint-model-written": 5, "checkpoint-files-written": 5,
         "checkpoint-manifest-written": 5, "checkpoint-renamed": 5, "stage-saved": 2}
TRIALS = 24


def crash_config(out: Path) -> dict:
    return {"model": {"preset": "shapes-tiny"},
            "data": {"shapes": {"train_images": 16, "max_turns": 2}},
            "stages": STAGES,
            "run": {"out": str(out), "eval_images": 0, "eval_prompts": 0, "progress": False, "log_every": 1,
                    "ckpt_every": 2, "tensorboard": False}}


def run_process(out: Path, resume: bool = False, failpoint: str | None = None) -> int:
    cfg = out.parent / f"{out.name}.json"
    cfg.write_text(json.dumps(crash_config(out)))
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    env.pop("OMNIMAMBA_FAILPOINT", None)
    if failpoint:
        env["OMNIMAMBA_FAILPOINT"] = failpoint
    cmd = [sys.executable, str(HELPER), str(cfg)] + (["--resume"] if resume else [])
    return subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode


def log_keys(out: Path) -> list:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["stage"], r["step"], "eval" if any(k.startswith("eval_") for k in r) else "train") for r in rows]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("crash") / "reference"
    assert run_process(out) == 0
    return out


@pytest.mark.slow
def test_killed_anywhere_then_resumed_equals_the_run_that_never_stopped(tmp_path, reference):
    """TRIALS seeded trials: kill the trainer at a random failpoint (mid-step, between a checkpoint's files,
    before and after its rename, after a stage's save), in one trial of four also truncate the newest
    checkpoint's weights, then resume; the final weights must equal the uninterrupted run's bit for bit and
    the metrics log must hold every record once, in order."""
    want = load_file(str(reference / "stage2-unified" / "model.safetensors"))
    want_log = log_keys(reference)
    assert len(want_log) == len(set(want_log)) == 8  # a record per step (no evaluations configured)
    rng = np.random.default_rng(2026)
    kinds = list(SITES)
    died_at = []
    for trial in range(TRIALS):
        site = kinds[trial % len(kinds)]  # every site, several times each
        n = int(rng.integers(1, SITES[site] + 1))
        out = tmp_path / f"trial{trial}"
        assert run_process(out, failpoint=f"{site}:{n}") == 137, (site, n)
        died_at.append((site, n))
        if trial % 4 == 3:
            ckpts = list_checkpoints(out / "checkpoints")
            if ckpts:
                weights = ckpts[-1] / "model.safetensors"
                weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
                assert verify_manifest(ckpts[-1])
        assert run_process(out, resume=True) == 0, (site, n)
        got = load_file(str(out / "stage2-unified" / "model.safetensors"))
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), (site, n, k)
        assert log_keys(out) == want_log, (site, n)
        shutil.rmtree(out)  # ~55 MB a trial: CI machines' disks are small
    assert len(set(died_at)) >= 15


def test_resume_skips_a_damaged_checkpoint_and_says_why(tmp_path):
    from omnimamba.training.config import config_from_dict
    from omnimamba.training.loop import Trainer

    cfg = config_from_dict(crash_config(tmp_path / "run"))
    Trainer(cfg, log=lambda *a: None).run()
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(ckpts) == 2 and all((c / MANIFEST).is_file() for c in ckpts)
    (ckpts[-1] / "model.safetensors").write_bytes(b"")
    said = []
    assert newest_intact(tmp_path / "run" / "checkpoints", said.append) == ckpts[0]
    assert ckpts[-1].name in said[0] and "model.safetensors" in said[0] and "bytes" in said[0]
    (ckpts[0] / "state.json").write_text("{}")  # altered after its manifest was written
    said.clear()
    assert newest_intact(tmp_path / "run" / "checkpoints", said.append) is None and len(said) == 2


def test_resume_cuts_the_logs_back_to_the_checkpoint(tmp_path):
    from omnimamba.training.config import config_from_dict
    from omnimamba.training.loop import Trainer

    cfg = config_from_dict(crash_config(tmp_path / "run"))
    trainer = Trainer(cfg, log=lambda *a: None)
    rows = [{"stage": "vq-tokenizer", "step": 0, "recon_loss": 1.0},
            {"stage": "stage1-t2i", "step": 2, "loss": 1.0}, {"stage": "stage1-t2i", "step": 2, "eval_t2i": 0.1},
            {"stage": "stage2-unified", "step": 1, "loss": 1.0}, {"stage": "stage2-unified", "step": 1, "eval_mmu": 0.5},
            {"stage": "stage2-unified", "step": 2, "loss": 1.0}, {"stage": "stage2-unified", "step": 3, "loss": 1.0}]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "sta')
    trainer._cut_logs({"stage_index": 1, "step": 1})
    kept = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # no trained tokenizer here, so its records go; stage 1 whole; stage 2 up to step 1 without its evaluation
    assert kept == rows[1:4]
    trainer._cut_logs(None)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""


# --- damaged files, one loader at a time ----------------------------------------------------------------------
DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "garbage": lambda b: bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
    "foreign": lambda b: b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved model folder, a VQ folder, a Mamba-2 folder (safetensors and .bin), encoder weights."""
    from omnimamba.mamba2 import Mamba2LM, preset
    from omnimamba.model import OmniMamba
    from omnimamba.model import preset as omni_preset
    from omnimamba.tokenizer import TextTokenizer
    from omnimamba.training.vq import save_vq

    root = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    model = OmniMamba(omni_preset("shapes-tiny"), backend="reference")
    model.save_pretrained(root / "model", tokenizer=TextTokenizer.shapes())
    save_vq(model.vq, root / "vq")
    torch.save({"model": model.vq.state_dict()}, root / "vq.pt")
    lm = Mamba2LM(preset("mamba2-tiny"), backend="reference")
    lm.save_pretrained(root / "mamba2")
    (root / "mamba2-bin").mkdir()
    (root / "mamba2-bin" / "config.json").write_text((root / "mamba2" / "config.json").read_text())
    torch.save(lm.state_dict(), root / "mamba2-bin" / "pytorch_model.bin")
    return root


def loaders(root: Path):
    """(file to damage, load) for every loader of the project."""
    from omnimamba.mamba2 import Mamba2LM
    from omnimamba.model import OmniMamba
    from omnimamba.tokenizer import TextTokenizer
    from omnimamba.training.config import load_train_config
    from omnimamba.training.vq import load_vq
    from omnimamba.vision.understanding import TimmEncoder, UnderstandingConfig

    def encoder(path):
        return TimmEncoder(UnderstandingConfig(backbones=("vit_tiny_patch16_224",), weights=(str(path),), image_size=64))

    return {
        "model weights": (root / "model" / "model.safetensors", lambda: OmniMamba.from_pretrained(root / "model")),
        "model config": (root / "model" / "config.json", lambda: OmniMamba.from_pretrained(root / "model")),
        "tokenizer": (root / "model" / "tokenizer.json", lambda: TextTokenizer.from_file(root / "model")),
        "vq folder": (root / "vq" / "model.safetensors", lambda: load_vq(root / "vq")),
        "vq config": (root / "vq" / "config.json", lambda: load_vq(root / "vq")),
        "llamagen vq": (root / "vq.pt", lambda: load_vq(root / "vq.pt")),
        "mamba2 safetensors": (root / "mamba2" / "model.safetensors", lambda: Mamba2LM.from_pretrained(root / "mamba2")),
        "mamba2 config": (root / "mamba2" / "config.json", lambda: Mamba2LM.from_pretrained(root / "mamba2")),
        "mamba2 bin": (root / "mamba2-bin" / "pytorch_model.bin", lambda: Mamba2LM.from_pretrained(root / "mamba2-bin")),
        "encoder .safetensors": (root / "enc.safetensors", lambda: encoder(root / "enc.safetensors")),
        "encoder .pt": (root / "enc.pt", lambda: encoder(root / "enc.pt")),
        "train config yaml": (root / "c.yaml", lambda: load_train_config(root / "c.yaml")),
        "train config toml": (root / "c.toml", lambda: load_train_config(root / "c.toml")),
    }


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("loader", ["model weights", "model config", "tokenizer", "vq folder", "vq config",
                                    "llamagen vq", "mamba2 safetensors", "mamba2 config", "mamba2 bin",
                                    "encoder .safetensors", "encoder .pt", "train config yaml", "train config toml"])
def test_a_damaged_file_is_one_clear_error(saved, tmp_path, loader, damage):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(saved, root)
    (root / "enc.safetensors").write_bytes(b"")  # placeholders: the damage below is what they hold
    (root / "enc.pt").write_bytes(b"")
    (root / "c.yaml").write_text("model: {preset: shapes-tiny}\n")
    (root / "c.toml").write_text('[run]\nout = "x"\n')
    path, load = loaders(root)[loader]
    original = path.read_bytes()
    path.write_bytes(DAMAGE[damage](original))
    if damage == "empty" and loader.startswith("train config"):
        load()  # an empty config file is a valid one: every field has its default
        return
    with pytest.raises(UserError) as err:
        load()
    message = str(err.value)
    assert path.name in message or path.parent.name in message, message
    # without the manifest (a folder written elsewhere) the reader itself names the damage
    manifest = path.parent / MANIFEST
    if manifest.is_file():
        manifest.unlink()
        with pytest.raises(UserError, match=path.name.replace(".", r"\.")):
            load()


def test_damaged_model_folder_on_the_command_line_is_one_line(saved, tmp_path, capsys):
    import shutil

    shutil.copytree(saved / "model", tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    png = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(png)
    assert main(["answer", "--model", str(tmp_path / "model"), "--image", str(png), "how many circles?"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fails verification" in err and "model.safetensors" in err


# --- full disk, read-only folder -----------------------------------------------------------------------------------
def test_a_full_disk_during_a_checkpoint_is_reported_and_never_taken_for_a_checkpoint(tmp_path, monkeypatch):
    import omnimamba.training.checkpoint as ckpt
    from omnimamba.training.config import config_from_dict
    from omnimamba.training.loop import Trainer

    real = ckpt.save_file
    calls = {"n": 0}

    def full_disk(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the second checkpoint's weights
            real(tensors, path, *a, **k)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    cfg = config_from_dict(crash_config(tmp_path / "run"))
    with pytest.raises(UserError, match="cannot write the checkpoint .*No space left on device"):
        Trainer(cfg, log=lambda *a: None).run()
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [c.name for c in ckpts] == ["ckpt-00-00000001"]  # the half-written one kept its temporary name
    assert newest_intact(tmp_path / "run" / "checkpoints", lambda *a: None) == ckpts[0]


def test_a_read_only_output_folder_when_generating_is_one_line(saved, tmp_path, monkeypatch, capsys):
    from PIL import Image

    def denied(self, fp, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Image.Image, "save", denied)
    assert main(["generate", "a red circle", "--model", str(saved / "model"), "--n", "1",
                 "--out", str(tmp_path / "gen")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("omnimamba generate: error: cannot write") and "Permission denied" in last
    assert not list((tmp_path / "gen").glob("image-*.png"))
