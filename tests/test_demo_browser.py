"""The web demo driven in headless Chromium (Debian's chromium + chromium-driver, and selenium): upload an
image, ask two questions, generate four images with the guidance slider moved. Skipped where they are missing."""

import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("selenium")
pytest.importorskip("uvicorn")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("needs chromium and chromedriver (Debian: apt install chromium chromium-driver)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from demo_screenshots import drive, free_port  # noqa: E402

import uvicorn  # noqa: E402

from omnimamba.model import OmniMamba, preset  # noqa: E402
from omnimamba.serving.app import create_app  # noqa: E402
from omnimamba.tokenizer import TextTokenizer  # noqa: E402


@pytest.mark.slow
def test_a_user_chats_and_generates_in_the_browser(tmp_path):
    torch.manual_seed(0)
    OmniMamba(preset("shapes-tiny"), backend="reference").save_pretrained(tmp_path / "m", tokenizer=TextTokenizer.shapes())
    model = OmniMamba.from_pretrained(tmp_path / "m")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(model), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "x.png")
        seen = drive(f"http://127.0.0.1:{port}/", tmp_path / "x.png", tmp_path / "shots",
                     questions=("how many circles are there?", "what color is the square?"))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert seen["errors"] == [] and len(seen["answers"]) == 2 and all(a.strip() for a in seen["answers"])
    assert seen["images"] == 4 and seen["guidance"] == "2" and seen["status"].startswith("4 images in")
    for shot in ("chat.png", "generate.png"):
        assert Image.open(tmp_path / "shots" / shot).width == 1280  # the window the driver opened
