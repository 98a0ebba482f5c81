"""Drive the web demo in headless Chromium as a user would and screenshot it: upload an image, ask two questions
(the answer streams in), then generate images with the guidance slider moved. Needs Debian's `chromium` and
`chromium-driver` and `pip install selenium`.

    python scripts/demo_screenshots.py [--model DIR] [--out docs/demo]

Starts `omnimamba serve` on a free loopback port, writes chat.png and generate.png, stops the server.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def drive(url: str, image: Path, out: Path, questions=("how many shapes are there?", "what color is the triangle?"),
          prompt: str = "a red square", timeout: float = 120) -> dict:
    """Use the page at `url`; returns what the user saw (answers, number of images) and writes the screenshots."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        opts.add_argument(arg)
    browser = webdriver.Chrome(options=opts)
    wait = WebDriverWait(browser, timeout)
    out.mkdir(parents=True, exist_ok=True)
    try:
        browser.get(url)
        browser.find_element(By.ID, "image").send_keys(str(image.resolve()))
        wait.until(lambda b: b.find_element(By.ID, "preview").get_attribute("src").startswith("data:image"))
        answers = []
        for q in questions:
            box = browser.find_element(By.ID, "question")
            box.send_keys(q)
            box.send_keys(Keys.ENTER)
            wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#log .a")) == len(answers) + 1
                       and b.find_element(By.ID, "ask").is_enabled())
            answers.append(browser.find_elements(By.CSS_SELECTOR, "#log .a")[-1].text)
        errors = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#log .err")]
        browser.save_screenshot(str(out / "chat.png"))

        prompt_box = browser.find_element(By.ID, "prompt")
        prompt_box.clear()
        prompt_box.send_keys(prompt)
        browser.execute_script("const g = document.getElementById('guidance'); g.value = 2; "
                               "g.dispatchEvent(new Event('input'));")
        browser.find_element(By.ID, "go").click()
        wait.until(lambda b: b.find_element(By.ID, "status").text.endswith(" s")
                   or "err" in b.find_element(By.ID, "status").get_attribute("class"))
        wait.until(lambda b: b.execute_script(
            "return [...document.querySelectorAll('#grid img')].every(i => i.complete && i.naturalWidth > 0)"))
        n_images = len(browser.find_elements(By.CSS_SELECTOR, "#grid img"))
        status = browser.find_element(By.ID, "status").text
        guidance = browser.find_element(By.ID, "guidance-value").text
        browser.save_screenshot(str(out / "generate.png"))
    finally:
        browser.quit()
    return {"answers": answers, "errors": errors, "images": n_images, "status": status, "guidance": guidance}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/quickstart/stage2-unified")
    ap.add_argument("--out", default="docs/demo")
    args = ap.parse_args()
    import urllib.request

    from omnimamba.data.shapes import ShapesWorld
    from PIL import Image

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "omnimamba.cli", "demo", "--model", args.model,
                               "--port", str(port), "--device", "cpu"])
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        with tempfile.TemporaryDirectory() as tmp:
            image = Path(tmp) / "scene.png"
            Image.fromarray(ShapesWorld(seed=0).sample("test", 3).image).resize((256, 256), Image.NEAREST).save(image)
            seen = drive(f"http://127.0.0.1:{port}/", image, Path(args.out))
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(seen)


if __name__ == "__main__":
    main()
