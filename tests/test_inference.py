"""Inference API and CLI: streaming equals non-streaming, batched equals one by one, seeds, PNGs, errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from omnimamba.cli import main
from omnimamba.data.shapes import ShapesWorld
from omnimamba.errors import UserError
from omnimamba.model import OmniMamba, preset
from omnimamba.sequence import pad_left, t2i_prefix
from omnimamba.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = OmniMamba(preset("shapes-tiny"), backend="reference").eval()
    with torch.no_grad():  # sharpen the random model so greedy answers are long and varied
        model.lm_head.weight.mul_(30)
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path, tokenizer=TextTokenizer.shapes())
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return OmniMamba.from_pretrained(model_dir, backend="reference")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "shapes.png"
    Image.fromarray(ShapesWorld().sample("test", 0).image).save(path)
    return path


def test_streaming_equals_non_streaming(model, image_file):
    q = "how many circles are there?"
    full = model.answer(image_file, q, max_new_tokens=10)
    pieces = list(model.answer(image_file, q, max_new_tokens=10, stream=True))
    assert len(pieces) >= 2 and "".join(pieces) == full and full


def test_batched_answers_equal_one_by_one(model, image_file):
    world = ShapesWorld()
    images = [world.sample("test", i).image for i in range(3)]
    questions = ["how many circles are there?", "what color is the square?", "describe the image in detail."]
    batched = model.answer(images, questions, max_new_tokens=8)
    assert batched == [model.answer(im, q, max_new_tokens=8) for im, q in zip(images, questions)]


def test_batched_images_equal_one_by_one_greedy(model):
    prompts = ["a red circle", "two blue squares and a green triangle", "a purple square left of a red circle"]
    batched = model.generate_images(prompts, temperature=0.0, guidance_scale=3.0)
    single = [model.generate_images(p, temperature=0.0, guidance_scale=3.0)[0] for p in prompts]
    # identical codes; the VQ decoder's float sums depend on the batch size, so a pixel may round differently
    for a, b in zip(batched, single):
        assert np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max() <= 1
    assert batched[0].size == (64, 64)
    tok = model.tokenizer
    pre = [t2i_prefix(tok, p, 24) for p in prompts]
    ids, mask = pad_left([c[0] for c in pre], tok.special.eot)
    cap, _ = pad_left([c[1] for c in pre], False)
    codes = model.generate_image_codes(ids, mask, cap.bool(), guidance_scale=3.0, temperature=0.0)
    for i, (pid, pcap) in enumerate(pre):
        one = model.generate_image_codes(torch.tensor([pid]), torch.ones(1, len(pid), dtype=torch.long),
                                         torch.tensor([pcap]), guidance_scale=3.0, temperature=0.0)
        assert torch.equal(codes[i], one[0])


def test_seeds(model):
    a = model.generate_images("a red circle", seed=3)[0]
    b = model.generate_images("a red circle", seed=3)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
    varied = {np.asarray(model.generate_images("a red circle", seed=None)[0]).tobytes() for _ in range(3)}
    assert len(varied) > 1


def test_chat_history_changes_the_prompt(model, image_file):
    plain = model.answer(image_file, "what color is it?", max_new_tokens=6)
    with_history = model.answer(image_file, "what color is it?", max_new_tokens=6,
                                history=[("how many circles are there?", "two")])
    assert isinstance(plain, str) and isinstance(with_history, str)


def test_cli_answer_generate_chat(model_dir, image_file, tmp_path, capsys, monkeypatch):
    assert main(["answer", "--model", str(model_dir), "--image", str(image_file), "how many circles?",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", "--model", str(model_dir), "a red circle", "--n", "2", "--out", str(tmp_path / "g")]) == 0
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["grid.png", "image-000.png", "image-001.png"]
    assert "wrote 2 image(s)" in capsys.readouterr().out
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("how many circles?\nwhat color is it?\n"))
    assert main(["chat", "--model", str(model_dir), "--image", str(image_file), "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


@pytest.mark.parametrize("argv,message", [
    (["answer", "--image", "{bad}", "q"], "not a readable image"),
    (["answer", "--image", "{missing}", "q"], "image file not found"),
    (["generate", "red " * 40], "this model accepts at most 24"),
])
def test_cli_user_errors_are_one_line(model_dir, tmp_path, capsys, argv, message):
    (tmp_path / "bad.png").write_text("text, not an image")
    argv = [a.format(bad=tmp_path / "bad.png", missing=tmp_path / "none.png") for a in argv]
    assert main(argv + ["--model", str(model_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [["generate", "x", "--guidance", "-1"], ["generate", "x", "--n", "0"]])
def test_cli_rejects_bad_numbers(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "must be >=" in capsys.readouterr().err


def test_api_errors(model):
    with pytest.raises(UserError, match="guidance_scale must be >= 0"):
        model.generate_images("a red circle", guidance_scale=-0.5)
    with pytest.raises(UserError, match="one image per question"):
        model.answer([np.zeros((64, 64, 3), np.uint8)], ["a", "b"])
    with pytest.raises(UserError, match=r"\(H, W, 3\)"):
        model.answer(np.zeros((64, 64), np.uint8), "q")


def test_decode_state_dtype_is_bf16_on_a_gpu_and_float32_elsewhere_by_default(model):
    assert model.decode_state_dtype == "auto"
    assert model.state_dtype_on("cuda") is torch.bfloat16 and model.state_dtype_on(torch.device("cuda", 1)) is torch.bfloat16
    assert model.state_dtype_on("cpu") is None  # float32: the cache's own default
    with model._decoder("text", 2, torch.device("cpu"), False) as runner:
        assert runner.cache.ssm.dtype == torch.float32
    model.decode_state_dtype = torch.bfloat16  # asked for explicitly: any device
    try:
        assert model.state_dtype_on("cpu") is torch.bfloat16
        with model._decoder("text", 2, torch.device("cpu"), False) as runner:
            assert runner.cache.ssm.dtype == torch.bfloat16
        assert model.allocate_cache(2).ssm.dtype == torch.bfloat16  # the servers' caches follow it too
        model.decode_state_dtype = "bf16"
        with pytest.raises(ValueError, match="decode_state_dtype must be 'auto', None or a torch dtype"):
            model.state_dtype_on("cpu")
    finally:
        model.decode_state_dtype = "auto"
