"""The input boundary, property-based (hypothesis): arbitrary prompts, images, config values and command lines
give a result or one clear error (UserError, or argparse's usage error), never another exception, never a
hang (each example has a deadline)."""

import io
import json
from datetime import timedelta

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from omnimamba.cli import main
from omnimamba.data.formats import DataError, load_image
from omnimamba.errors import UserError
from omnimamba.inference import answer, generate_images, to_pixels
from omnimamba.model import OmniMamba, preset
from omnimamba.tokenizer import TextTokenizer
from omnimamba.training.config import load_train_config

TOK = TextTokenizer.shapes()
FAST = settings(max_examples=40, deadline=timedelta(seconds=30),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    OmniMamba(preset("shapes-tiny"), backend="reference").save_pretrained(path, tokenizer=TOK)
    Image.new("RGB", (20, 30), (10, 200, 10)).save(path / "image.png")
    return path


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = OmniMamba(preset("shapes-tiny"), backend="reference").eval()
    m.tokenizer = TOK
    return m


TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=300) | \
    st.sampled_from(["", " ", "\n\t", "\x00\x01\x1b[31m", "how many circles are there?" * 200, "ｈｏｗ 多少 🟥?"])


@FAST
@given(question=TEXT)
@example(question="")
@example(question="how many circles? " * 500)
def test_any_question_gets_an_answer_or_a_clear_error(model, question):
    image = np.full((64, 64, 3), 230, np.uint8)
    try:
        out = answer(model, TOK, image, question, max_new_tokens=3)
    except UserError:
        assert not question.strip()  # the only refusal: an empty question
        return
    assert isinstance(out, str)


@settings(max_examples=12, deadline=timedelta(seconds=60))
@given(prompt=TEXT)
@example(prompt="two red circles and a blue square left of a green triangle " * 3)
def test_any_prompt_gets_an_image_or_a_clear_error(model, prompt):
    try:
        (image,) = generate_images(model, TOK, [prompt], guidance_scale=2.0, seed=0)
    except UserError as e:
        assert "tokens" in str(e)  # too long for the model's caption slots
        return
    assert image.size == (64, 64)


MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I", "F", "I;16", "YCbCr", "HSV"]


@FAST
@given(mode=st.sampled_from(MODES), w=st.integers(1, 300), h=st.integers(1, 300), seed=st.integers(0, 2 ** 16),
       fmt=st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", None]), orientation=st.integers(1, 8))
def test_any_image_is_read_or_refused_clearly(tmp_path_factory, mode, w, h, seed, fmt, orientation):
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    if fmt is None:  # an in-memory PIL image
        source = im
    else:
        buf = io.BytesIO()
        exif = Image.Exif()
        exif[0x0112] = orientation
        try:
            im.save(buf, format=fmt, exif=exif.tobytes()) if fmt in ("JPEG", "PNG", "WEBP", "TIFF") else im.save(buf, format=fmt)
        except (OSError, ValueError, KeyError):
            return  # this format cannot hold this mode: nothing to read
        source = tmp_path_factory.mktemp("img") / f"x.{fmt.lower()}"
        source.write_bytes(buf.getvalue())
    pixels = to_pixels([source], 64)
    assert pixels.shape == (1, 3, 64, 64) and pixels.dtype == torch.float32 and 0 <= pixels.min() <= pixels.max() <= 1


def test_exif_orientation_turns_a_photo_upright(tmp_path):
    tall = np.zeros((40, 20, 3), np.uint8)
    tall[:10] = 255  # white top strip
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: shown turned 90 degrees clockwise
    Image.fromarray(tall).save(tmp_path / "r.jpg", exif=exif.tobytes(), quality=100)
    upright = to_pixels([tmp_path / "r.jpg"], 64)[0].mean(0)
    assert upright[:, -16:].mean() > 0.8 and upright[:, :16].mean() < 0.2  # the strip is now on the right


@pytest.mark.parametrize("size", [(1, 1), (8000, 8000)])
def test_extreme_image_sizes(tmp_path, size):
    Image.new("RGB", size, (200, 10, 10)).save(tmp_path / "x.png")
    assert to_pixels([tmp_path / "x.png"], 64).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n\x00\x00", b"GIF89a" + b"\xff" * 20])
def test_unreadable_image_files_are_one_clear_error(tmp_path, content):
    (tmp_path / "bad.png").write_bytes(content)
    with pytest.raises(UserError, match="bad.png: not a readable image"):
        to_pixels([tmp_path / "bad.png"], 64)


# --- config values and command lines ----------------------------------------------------------------------------
KEYS = ["stages.0.steps", "stages.0.lr", "stages.0.batch", "stages.0.name", "stages.1.warmup", "optim.grad_clip",
        "optim.betas", "run.out", "run.precision", "run.log_every", "run.eval_temperature", "data.source",
        "data.shapes.max_turns", "data.shapes.train_images", "model.preset", "model.overrides", "vq_train.steps",
        "vq_train.batch", "run.strategy", "model.overrides.backbone", "nonsense.key", "stages.9.lr"]
VALUES = st.one_of(st.integers(-5, 10 ** 9), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                   st.just("null"), st.just("[1, 2]"), st.just("{a: 1}"), st.just("[0, 0]"), st.booleans())


@FAST
@given(sets=st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_any_config_override_builds_a_config_or_names_the_field(tmp_path_factory, sets):
    overrides = [f"{k}={json.dumps(v) if isinstance(v, (bool, float)) else v}" for k, v in sets]
    try:
        load_train_config(None, overrides)
    except UserError:
        pass


ARGS = st.lists(st.one_of(st.sampled_from(["--n", "--guidance", "--temperature", "--top-k", "--top-p", "--seed",
                                           "--max-new-tokens", "--batch-size", "--image", "--model", "-1", "0",
                                           "1", "0.5", "1e9", "nan", "inf", "x", "", "--", "-", "MODEL", "IMAGE"]),
                          st.text(max_size=8)), max_size=6)


@settings(max_examples=30, deadline=timedelta(seconds=60),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(verb=st.sampled_from(["answer", "generate", "evaluate", "eval", "data", "plot", "guidance", "chat"]),
       args=ARGS)
def test_any_command_line_runs_or_fails_with_one_clear_line(tmp_path_factory, capsys, model_dir, verb, args):
    import contextlib

    # MODEL and IMAGE stand for a real model folder and image, so that some commands run to the end
    args = [str(model_dir) if a == "MODEL" else str(model_dir / "image.png") if a == "IMAGE" else a for a in args]
    # in an empty folder: the default model path (runs/quickstart/...) is absent, as on a fresh clone
    with contextlib.chdir(tmp_path_factory.mktemp("cli")):
        try:
            code = main([verb, *args])
        except SystemExit as e:  # argparse: a usage line and exit status 2
            assert e.code in (0, 2)
            return
    assert code in (0, 2)
    if code == 2:
        assert "error:" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_decompression_bomb_is_refused_by_name(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    # PIL refuses an image of more than twice MAX_IMAGE_PIXELS; lower the limit instead of writing gigapixels.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="bomb.png: image too large to read safely"):
        load_image(tmp_path / "bomb.png")
