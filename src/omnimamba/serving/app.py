"""The HTTP API (FastAPI): OpenAI-style chat completions over the continuous batcher, image generation,
health and Prometheus metrics. `omnimamba serve --model DIR` runs it under uvicorn.

    POST /v1/chat/completions   messages with one image (an image_url content part, base64 data URL);
                                max_tokens, temperature, top_p, seed; stream: true gives server-sent events
    POST /v1/images/generations prompt, n, guidance, seed -> b64_json PNGs; stream: true sends progress events
                                first
    GET  /health, GET /metrics
    GET  /                      the web demo (serving/demo.py)
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import UserError
from .batcher import LoopQueue, QueueFull, TextBatcher, TextRequest
from .images import ImageBatcher, ImageRequest

MAX_IMAGES_PER_REQUEST = 16
DISCONNECT_CHECK_S = 0.25  # how often a handler asks whether its client went away


class BadRequest(Exception):
    pass


def _decode_image(url: str):
    from PIL import Image, UnidentifiedImageError

    if not isinstance(url, str) or not url.startswith("data:image/") or ";base64," not in url:
        raise BadRequest("image_url.url must be a base64 data URL (data:image/png;base64,...); "
                         "remote URLs are not fetched")
    try:
        raw = base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("image_url.url: the base64 payload does not decode") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise BadRequest(f"image_url.url: not a readable image ({e})") from None


def parse_chat(body: dict) -> tuple[object, str, list[tuple[str, str]]]:
    """(image, question, history) from OpenAI chat messages: the conversation's one image, the last user
    message's text, and the earlier (user, assistant) turns."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    image, turns, pending = None, [], None
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise BadRequest(f"messages[{k}] must be an object with role system, user or assistant")
        content = m.get("content", "")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise BadRequest(f"messages[{k}].content must be a string or a list of content parts")
        text = []
        for p in parts:
            if not isinstance(p, dict):
                raise BadRequest(f"messages[{k}].content: each part must be an object")
            if p.get("type") == "text":
                text.append(str(p.get("text", "")))
            elif p.get("type") == "image_url":
                if image is not None:
                    raise BadRequest("give one image per conversation")
                image = _decode_image((p.get("image_url") or {}).get("url"))
            else:
                raise BadRequest(f"messages[{k}].content: unknown part type {p.get('type')!r}")
        text = " ".join(t for t in text if t.strip())
        if m["role"] == "user":
            pending = text
        elif m["role"] == "assistant" and pending is not None:
            turns.append((pending, text))
            pending = None
    if image is None:
        raise BadRequest("the conversation needs an image (an image_url content part)")
    if not pending or not pending.strip():
        raise BadRequest("the last message must be a user message with a question")
    return image, pending, turns


def _number(body: dict, key: str, default, kind, lo=None, hi=None, lo_open=False):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise BadRequest(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    value = kind(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise BadRequest(f"{key} must be finite")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise BadRequest(f"{key} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise BadRequest(f"{key} must be <= {hi}, got {value}")
    return value


def create_app(model, max_batch: int = 32, max_queue: int = 256, max_tokens_limit: int = 512,
               max_prompt_tokens: int = 2048, request_timeout: float = 300.0, use_cuda_graph: bool | None = None):
    from ..inference import TextPieces, null_prefix, prompt_ids, to_pixels
    from ..sequence import t2i_prefix

    model.eval()
    lock = threading.Lock()
    batcher = TextBatcher(model, max_batch=max_batch, max_queue=max_queue, lock=lock, use_cuda_graph=use_cuda_graph)
    image_batcher = ImageBatcher(model, max_batch=max_batch, max_queue=max_queue, lock=lock,
                                 use_cuda_graph=use_cuda_graph)
    tokenizer = model.tokenizer
    # the same unconditional row for every guided image request (`omnimamba serve` requires a tokenizer)
    null = null_prefix(model, tokenizer) if tokenizer is not None else None
    size = model.config.understanding.image_size
    name = "omnimamba"
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()
        image_batcher.close()

    app = FastAPI(title="omnimamba", lifespan=lifespan)
    app.state.batcher, app.state.image_batcher = batcher, image_batcher
    images_total = [0]

    def error(status: int, message: str, headers=None):
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error" if status < 500
                                       else "server_error"}}, status_code=status, headers=headers)

    @app.exception_handler(BadRequest)
    async def _bad_request(request, exc):
        return error(400, str(exc))

    @app.exception_handler(UserError)
    async def _user_error(request, exc):
        return error(400, str(exc))

    @app.exception_handler(QueueFull)
    async def _queue_full(request, exc):
        return error(429, f"server busy: {exc}", headers={"Retry-After": "1"})

    @app.get("/", response_class=HTMLResponse)
    def demo_page():
        from .demo import PAGE

        return PAGE

    @app.get("/health")
    def health():
        return {"status": "ok", "model": name}

    @app.get("/metrics")
    def metrics():
        lat = sorted(batcher.latencies)

        def q(p):
            return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else 0.0
        lines = [
            "# TYPE omnimamba_queue_length gauge", f"omnimamba_queue_length {batcher.queue_length}",
            "# TYPE omnimamba_batch_size gauge", f"omnimamba_batch_size {batcher.batch_size}",
            "# TYPE omnimamba_generated_tokens_total counter", f"omnimamba_generated_tokens_total {batcher.tokens_total}",
            "# TYPE omnimamba_chat_requests_total counter", f"omnimamba_chat_requests_total {batcher.requests_total}",
            "# TYPE omnimamba_decode_steps_total counter", f"omnimamba_decode_steps_total {batcher.steps_total}",
            "# TYPE omnimamba_images_total counter", f"omnimamba_images_total {images_total[0]}",
            "# TYPE omnimamba_image_batch_size gauge", f"omnimamba_image_batch_size {image_batcher.batch_size}",
            "# TYPE omnimamba_image_queue_length gauge", f"omnimamba_image_queue_length {image_batcher.queue_length}",
            "# TYPE omnimamba_chat_latency_seconds summary",
            f'omnimamba_chat_latency_seconds{{quantile="0.5"}} {q(0.5):.6f}',
            f'omnimamba_chat_latency_seconds{{quantile="0.99"}} {q(0.99):.6f}',
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    async def _json(request: Request) -> dict:
        try:
            body = await request.json()
        except Exception:
            raise BadRequest("the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _json(request)
        image, question, history = parse_chat(body)
        ids = prompt_ids(tokenizer, question, history)
        if len(ids) > max_prompt_tokens:
            raise BadRequest(f"the conversation is {len(ids)} tokens long; the limit is {max_prompt_tokens}")
        loop = asyncio.get_running_loop()
        # decoding and resizing a photo takes milliseconds: not on the event loop, which serves everyone
        pixels = await loop.run_in_executor(None, to_pixels, [image], size)
        tokens = LoopQueue(loop)
        req = TextRequest(pixels=pixels, ids=ids, tokens=tokens,
                          max_tokens=_number(body, "max_tokens", 64, int, 1, max_tokens_limit),
                          temperature=_number(body, "temperature", 0.0, float, 0.0, 10.0),
                          top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0, lo_open=True),
                          seed=_number(body, "seed", None, int, 0, 2 ** 63 - 1))
        batcher.submit(req)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        done, timed_out = object(), object()
        checked = [time.perf_counter()]

        async def next_token():
            """The next token, `done` at the end, `timed_out` once the request has run request_timeout seconds
            (then it is cancelled: the batcher drops its row at the next step)."""
            left = request_timeout - (time.perf_counter() - req.submitted)
            try:
                item = await tokens.get(max(left, 0))
            except asyncio.TimeoutError:
                req.cancel()
                return timed_out
            if isinstance(item, BaseException):
                raise item
            return done if item is None else item

        async def gone() -> bool:
            """Whether the client went away; asked at most every DISCONNECT_CHECK_S (each ask is a receive)."""
            if time.perf_counter() - checked[0] < DISCONNECT_CHECK_S:
                return False
            checked[0] = time.perf_counter()
            return await request.is_disconnected()

        if body.get("stream"):
            async def events():
                def chunk(delta, finish=None):
                    return "data: " + _dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                                              "model": name, "choices": [{"index": 0, "delta": delta,
                                                                          "finish_reason": finish}]}) + "\n\n"
                answer = TextPieces(tokenizer)
                try:
                    yield chunk({"role": "assistant"})
                    while True:
                        if await gone():
                            return
                        token = await next_token()
                        if token is done or token is timed_out:
                            break
                        piece = answer.push(token)
                        if piece:
                            yield chunk({"content": piece})
                    yield chunk({}, "timeout" if token is timed_out else req.finish_reason or "stop")
                    yield "data: [DONE]\n\n"
                finally:
                    req.cancel()
            return StreamingResponse(events(), media_type="text/event-stream")

        answer = []
        try:
            while True:
                token = await next_token()
                if token is timed_out:
                    return error(504, f"the answer took longer than {request_timeout:g} s (request_timeout)")
                if token is done or await gone():  # nobody to answer: free the row
                    break
                answer.append(token)
        finally:
            req.cancel()
        text = tokenizer.decode(answer).strip()
        return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": req.finish_reason or "stop"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": req.n_generated,
                          "total_tokens": len(ids) + req.n_generated}}

    @app.post("/v1/images/generations")
    async def images(request: Request):
        body = await _json(request)
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("prompt must be non-empty text")
        n = _number(body, "n", 1, int, 1, MAX_IMAGES_PER_REQUEST)
        defaults = model.config.image_sampling
        guidance = _number(body, "guidance", defaults["guidance_scale"], float, 0.0, 50.0)
        temperature = _number(body, "temperature", defaults["temperature"], float, 0.0, 10.0)
        seed = _number(body, "seed", None, int, 0, 2 ** 63 - 1)
        if body.get("response_format", "b64_json") != "b64_json":
            raise BadRequest("response_format must be b64_json (images are not stored to serve by URL)")

        ids, caption = t2i_prefix(tokenizer, prompt, model.config.max_caption_tokens)
        req = image_batcher.submit(ImageRequest(ids, caption, n=n, guidance=guidance, temperature=temperature,
                                                top_k=defaults["top_k"], top_p=defaults["top_p"], seed=seed,
                                                null_prefix=null, results=LoopQueue(asyncio.get_running_loop())))
        if body.get("stream"):
            total = n * model.config.image_tokens

            async def events():
                """progress events ({"progress": fraction of the codes sampled}), then the images."""
                shown = -1
                try:
                    while True:
                        if await request.is_disconnected() or time.perf_counter() - req.submitted > request_timeout:
                            yield "data: " + _dumps({"error": {"message": "timed out (request_timeout)"}}) + "\n\n"
                            return
                        try:
                            pics = await req.aresult(0.25)
                        except asyncio.TimeoutError:
                            if req.codes_done != shown:
                                shown = req.codes_done
                                yield "data: " + _dumps({"progress": round(shown / total, 4)}) + "\n\n"
                            continue
                        images_total[0] += len(pics)
                        yield "data: " + _dumps({"progress": 1.0, "created": int(time.time()),
                                                 "data": [{"b64_json": _png(im)} for im in pics]}) + "\n\n"
                        yield "data: [DONE]\n\n"
                        return
                finally:
                    req.cancel()
            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            pics = await req.aresult(request_timeout)
        except asyncio.TimeoutError:
            req.cancel()
            return error(504, f"the images took longer than {request_timeout:g} s (request_timeout)")
        images_total[0] += len(pics)
        data = [{"b64_json": _png(im)} for im in pics]
        return {"created": int(time.time()), "data": data}

    return app


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _dumps(obj) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))
