"""The HTTP API and its continuous batcher: answers under concurrency equal the answers given alone; the
endpoints, streaming, and errors that are one 4xx with a message while the server keeps serving."""

import base64
import io
import json
import threading

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from omnimamba.inference import answer, prompt_ids, to_pixels  # noqa: E402
from omnimamba.model import OmniMamba, preset  # noqa: E402
from omnimamba.serving.app import create_app  # noqa: E402
from omnimamba.serving.batcher import TextBatcher, TextRequest  # noqa: E402
from omnimamba.tokenizer import TextTokenizer  # noqa: E402
from helpers.serving import submit_concurrently  # noqa: E402

QUESTIONS = ["how many circles are there?", "what color is the square?", "is there a red triangle in the image?",
             "where is the blue circle relative to the green square?", "describe the image.", "how many shapes are there?"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model")
    OmniMamba(preset("shapes-tiny"), backend="reference").save_pretrained(path, tokenizer=TextTokenizer.shapes())
    return OmniMamba.from_pretrained(path).eval()


def image(k: int) -> np.ndarray:
    return np.random.default_rng(k).integers(0, 255, (64, 64, 3), dtype=np.uint8)


def data_url(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_concurrent_requests_get_the_answers_they_get_alone(model):
    tok = model.tokenizer
    jobs = [(image(k), QUESTIONS[k % len(QUESTIONS)], 2 + (k * 5) % 11) for k in range(32)]
    alone = [answer(model, tok, im, q, max_new_tokens=n) for im, q, n in jobs]
    batcher = TextBatcher(model, max_batch=5)  # fewer rows than requests: they must join and leave
    try:
        reqs = [TextRequest(pixels=to_pixels([im], 64), ids=prompt_ids(tok, q), max_tokens=n) for im, q, n in jobs]
        together = [tok.decode(tokens).strip() for tokens in submit_concurrently(batcher, reqs)]
    finally:
        batcher.close()
    assert together == alone
    assert all(r.finish_reason in ("stop", "length") for r in reqs)
    assert batcher.requests_total == 32 and batcher.batch_size == 0


def test_a_cancelled_request_leaves_and_the_others_finish(model):
    tok = model.tokenizer
    batcher = TextBatcher(model, max_batch=4)
    try:
        keep = [TextRequest(pixels=to_pixels([image(k)], 64), ids=prompt_ids(tok, QUESTIONS[k]), max_tokens=6)
                for k in range(3)]
        gone = TextRequest(pixels=to_pixels([image(9)], 64), ids=prompt_ids(tok, QUESTIONS[0]), max_tokens=500)
        gone.cancel()
        for r in [gone, *keep]:
            batcher.submit(r)
        assert list(gone) == [] and gone.finish_reason == "cancelled"
        assert [tok.decode(list(r)).strip() for r in keep] == [
            answer(model, tok, image(k), QUESTIONS[k], max_new_tokens=6) for k in range(3)]
    finally:
        batcher.close()


@pytest.fixture(scope="module")
def client(model):
    with TestClient(create_app(model, max_batch=8, max_prompt_tokens=200)) as c:
        yield c


def chat_body(k=0, **extra):
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image(k))}},
                                                       {"type": "text", "text": QUESTIONS[k]}]}],
            "max_tokens": 8, **extra}


def test_chat_completion_and_its_stream(client, model):
    expected = answer(model, model.tokenizer, image(1), QUESTIONS[1], max_new_tokens=8)
    r = client.post("/v1/chat/completions", json=chat_body(1))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == expected
    assert body["choices"][0]["finish_reason"] in ("stop", "length") and body["usage"]["completion_tokens"] <= 8

    with client.stream("POST", "/v1/chat/completions", json=chat_body(1, stream=True)) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_image_generation(client):
    r = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 0, "guidance": 2.0})
    assert r.status_code == 200, r.text
    pics = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in r.json()["data"]]
    assert [p.size for p in pics] == [(64, 64), (64, 64)]
    again = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 0, "guidance": 2.0})
    assert again.json()["data"] == r.json()["data"]  # seeded: the same images


@pytest.mark.parametrize("change, message", [
    (lambda b: b["messages"][0]["content"][0]["image_url"].update(url="data:image/png;base64,@@@"), "does not decode"),
    (lambda b: b["messages"][0]["content"][0]["image_url"].update(
        url="data:image/png;base64," + base64.b64encode(b"not an image").decode()), "not a readable image"),
    (lambda b: b["messages"][0]["content"][0]["image_url"].update(url="http://example.com/x.png"), "base64 data URL"),
    (lambda b: b["messages"][0]["content"].pop(0), "needs an image"),
    (lambda b: b["messages"][0]["content"][1].update(text="how many circles? " * 100), "tokens long"),
    (lambda b: b.update(max_tokens=0), "max_tokens must be >= 1"),
    (lambda b: b.update(temperature=-1), "temperature must be >= 0"),
    (lambda b: b.update(top_p=0), "top_p must be > 0"),
    (lambda b: b.update(seed="x"), "seed must be an integer"),
    (lambda b: b.update(messages=[]), "non-empty list"),
])
def test_bad_requests_are_one_400_and_the_server_keeps_serving(client, change, message):
    body = chat_body(2)
    change(body)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    assert client.post("/v1/chat/completions", json=chat_body(2)).status_code == 200
    assert client.post("/v1/chat/completions", content=b"{not json").status_code == 400
    assert client.post("/v1/images/generations", json={"prompt": "", "n": 1}).status_code == 400
    assert client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 99}).status_code == 400


def test_health_and_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/chat/completions", json=chat_body(3))
    text = client.get("/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["omnimamba_chat_requests_total"] >= 1 and values["omnimamba_queue_length"] == 0
    assert 'omnimamba_chat_latency_seconds{quantile="0.99"}' in values


def test_a_full_queue_is_429_with_retry_after(model):
    with TestClient(create_app(model, max_queue=0)) as c:
        r = c.post("/v1/chat/completions", json=chat_body(0))
    assert r.status_code == 429 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"]


def test_the_demo_page_is_served_and_names_its_controls(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for control in ('id="image"', 'id="question"', 'id="ask"', 'id="prompt"', 'id="guidance"', 'id="go"', 'id="grid"'):
        assert control in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere


def test_an_answer_past_the_request_timeout_is_504_and_its_row_is_freed(model):
    app = create_app(model, request_timeout=0.0)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=chat_body(0))
        assert r.status_code == 504 and "request_timeout" in r.json()["error"]["message"]
        with c.stream("POST", "/v1/chat/completions", json=chat_body(0, stream=True)) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "timeout"
        batcher = app.state.batcher
        for _ in range(200):  # the cancelled rows leave at the batcher's next step
            if batcher.batch_size == 0 and batcher.queue_length == 0:
                break
            threading.Event().wait(0.05)
        assert batcher.batch_size == 0 and batcher.queue_length == 0


def test_concurrent_images_equal_the_images_made_alone(model):
    from omnimamba.inference import generate_images
    from omnimamba.sequence import t2i_prefix
    from omnimamba.serving.images import ImageBatcher, ImageRequest

    tok = model.tokenizer
    jobs = [("a red circle", 3.0, 0), ("two blue squares", 1.0, 1), ("a green triangle", 2.0, 2),
            ("a yellow circle left of a purple square", 3.0, 3), ("an orange square", 5.0, 4)]
    alone = [np.asarray(generate_images(model, tok, [p], guidance_scale=g, seed=s)[0]) for p, g, s in jobs]
    batcher = ImageBatcher(model, max_batch=2)  # fewer slots than images: they join and leave
    try:
        reqs = []
        for p, g, s in jobs:
            ids, cap = t2i_prefix(tok, p, model.config.max_caption_tokens)
            reqs.append(batcher.submit(ImageRequest(ids, cap, n=1, guidance=g, seed=s)))
        together = [np.asarray(r.result(timeout=600)[0]) for r in reqs]
        two = batcher.submit(ImageRequest(*t2i_prefix(tok, jobs[0][0], model.config.max_caption_tokens), n=2,
                                          guidance=3.0, seed=0)).result(timeout=600)
    finally:
        batcher.close()
    for a, b in zip(together, alone):
        assert np.array_equal(a, b)
    # Image k of a request has seed s + k: the same codes as alone; decoding two images in one VQ batch may
    # round a pixel differently.
    assert np.abs(np.asarray(two[0]).astype(int) - alone[0]).max() <= 1
    assert batcher.requests_total == 6 and batcher.batch_size == 0


def test_image_generation_streams_its_progress(client):
    body = {"prompt": "a red circle", "n": 2, "seed": 0, "guidance": 2.0}
    with client.stream("POST", "/v1/images/generations", json={**body, "stream": True}) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    msgs = [json.loads(e) for e in events[:-1]]
    progress = [m["progress"] for m in msgs]
    assert progress == sorted(progress) and progress[-1] == 1.0 and all(0 <= p <= 1 for p in progress)
    assert msgs[-1]["data"] == client.post("/v1/images/generations", json=body).json()["data"]


def test_closing_the_batcher_ends_every_request_it_holds(model):
    tok = model.tokenizer
    batcher = TextBatcher(model, max_batch=1)
    reqs = [batcher.submit(TextRequest(pixels=to_pixels([image(k)], 64), ids=prompt_ids(tok, QUESTIONS[k]),
                                       max_tokens=10_000)) for k in range(3)]  # one decoding, two waiting
    batcher.close()
    for r in reqs:  # each request ends (an unreleased one would raise queue.Empty here)
        while r.tokens.get(timeout=30) is not None:
            pass
    assert reqs[-1].finish_reason == "cancelled" and batcher.batch_size == 0 and batcher.queue_length == 0
