"""HTTP caption server: concurrent requests batched into one beam search, and a demo page.

    python -m captioner.serve [ckpt_path=...] [port=8000] [beam=5] [max_batch_size=16] \\
        [batch_timeout=0.01] [backend=onnx model_dir=...]

Endpoints (docs/serving.md has the fields and error codes):

- ``POST /predict``: one image as a multipart upload (field ``image``), as JSON
  ``{"image": "<base64>"}``, or as the raw body (``Content-Type: image/...``); returns
  ``{caption, words, tokens, score, finished, ...}`` and, with ``attention=true`` (a query
  parameter, form field or JSON key), the per-word attention grid.
- ``GET /health``: ``{"status": "ok", ...}`` once the model is loaded.
- ``GET /``: the demo page (choose or drop an image; caption, attention overlay, time taken).

Built on FastAPI and uvicorn (the ASGI stack LitServe runs on) rather than LitServe itself:
LitServe 0.2's batched loop answers every request of a batch with the error when one request's
``decode_request`` raises, turns a malformed JSON body into a 500, and owns ``GET /``. Here each
request is read and decoded in the HTTP layer (a bad one gets its own 4xx and never reaches a
batch); :class:`Batcher` then collects the decoded images of concurrent clients, up to
``max_batch_size`` or ``batch_timeout`` seconds after the first, and runs one search per batch
on one worker thread, so the model never runs two batches at once.

Images go through :func:`captioner.data.images.load_image`, the training preprocessing, and the
model is the one :func:`captioner.caption.load_model` loads for the caption CLI, so the server
and ``python -m captioner.caption`` give the same caption for the same file and settings.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse
from omegaconf import DictConfig
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from captioner.caption import LoadedModel, load_model
from captioner.data.images import IMAGE_ERRORS, load_image
from captioner.search import Hypothesis
from captioner.vocab import END

PAGE = Path(__file__).with_name("serve_page.html")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


class RequestError(Exception):
    """A bad request: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ServeSettings:
    """What the server does per request (from ``conf/serve.yaml``)."""

    beam_size: int = 5
    max_len: int = 50
    length_penalty: float = 0.0
    max_batch_size: int = 16
    batch_timeout: float = 0.01
    max_bytes: int = 20_000_000
    max_pixels: int = 40_000_000


# ---------------------------------------------------------------------------- batching
class Batcher:
    """Collects items from concurrent requests and runs them in batches on one worker thread.

    The first waiting item opens a batch; items arriving within ``batch_timeout`` seconds join
    it, up to ``max_batch_size``. While a batch runs, new items queue up and form the next one,
    so under load batches fill without waiting. If ``run`` raises, every request of that batch
    gets the exception (a model failure, not a bad input: inputs are checked before they
    are submitted).

    Args:
        run: ``list of items -> list of results`` (same length, same order).
        max_batch_size: most items per call of ``run``.
        batch_timeout: seconds a batch waits for more items after its first.
    """

    def __init__(self, run: Callable[[list[Any]], Sequence[Any]], max_batch_size: int,
                 batch_timeout: float):
        if max_batch_size < 1 or batch_timeout < 0:
            raise ValueError(f"need max_batch_size >= 1 and batch_timeout >= 0, got {max_batch_size} "
                             f"and {batch_timeout}")
        self.run = run
        self.max_batch_size = max_batch_size
        self.batch_timeout = batch_timeout
        self.batch_sizes: list[int] = []  # of the batches run so far (reported by /health)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="caption-search")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def submit(self, item: Any) -> Any:
        """Queue ``item`` and wait for its result."""
        if self._queue is None:
            raise RuntimeError("Batcher.start() was not called")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.batch_timeout
        while len(batch) < self.max_batch_size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        return [(item, future) for item, future in batch if not future.done()]  # drop gone clients

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self.run, [item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 - handed to the waiting requests
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


# ---------------------------------------------------------------------------- requests
def decode_image(data: bytes, image_size: int, draft_min_ratio: float | None, max_pixels: int) -> np.ndarray:
    """The bytes of an uploaded image -> (3, S, S) uint8 through ``load_image``.

    Raises:
        RequestError: 413 for more than ``max_pixels`` pixels, 422 for bytes that are not a
            readable image (unknown format, truncated or corrupt file).
    """
    try:
        with Image.open(io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"the image has too many pixels: {e}") from None
    except Image.UnidentifiedImageError:
        raise RequestError(422, f"not an image: no image format recognised in the {len(data)} bytes "
                                f"received") from None
    except IMAGE_ERRORS as e:
        raise RequestError(422, f"not a readable image (a truncated or corrupt file?): "
                                f"{type(e).__name__}: {e}") from None
    if width * height > max_pixels:
        raise RequestError(413, f"the image is {width}x{height} = {width * height} pixels; this server "
                                f"takes at most {max_pixels} (max_pixels)")
    try:
        return load_image(io.BytesIO(data), image_size, draft_min_ratio)
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"the image has too many pixels: {e}") from None
    except IMAGE_ERRORS as e:
        raise RequestError(422, f"the image could not be decoded (truncated or corrupt file?): "
                                f"{type(e).__name__}: {e}") from None


def parse_flag(value: Any, name: str) -> bool:
    """A boolean request option: JSON true/false or the strings 1/0, true/false, yes/no, on/off."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise RequestError(400, f"{name} must be true or false, got {value!r}")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``max_bytes``."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise RequestError(413, f"the request has {length} bytes; this server takes at most {max_bytes} "
                                f"(max_bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"the request has more than {max_bytes} bytes (max_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_upload(request: Request, max_bytes: int) -> tuple[bytes, bool]:
    """(image bytes, attention flag) from a multipart, JSON or raw-image request.

    Raises:
        RequestError: 400 for an empty body, a missing or empty ``image``, malformed JSON or
            base64, a bad ``attention`` value; 413 for a body over ``max_bytes``; 415 for
            another content type.
    """
    attention = parse_flag(request.query_params.get("attention", "false"), "attention")
    body = await read_body(request, max_bytes)
    if not body:
        raise RequestError(400, "empty request body: send an image (multipart field 'image', JSON "
                                "{\"image\": \"<base64>\"} or the raw bytes with Content-Type image/...)")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        async def stream():
            yield body

        try:
            form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=10).parse()
        except MultiPartException as e:
            raise RequestError(400, f"malformed multipart body: {e.message}") from None
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise RequestError(400, "the multipart body has no file field 'image' (curl -F image=@photo.jpg)")
        data = await upload.read()
        if "attention" in form:
            attention = parse_flag(form["attention"], "attention")
    elif content_type == "application/json":
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"malformed JSON body: {e}") from None
        if not isinstance(payload, dict) or not isinstance(payload.get("image"), str):
            raise RequestError(400, "the JSON body needs a string field 'image' holding the base64 image")
        encoded = payload["image"]
        if encoded.startswith("data:") and "," in encoded:  # a data URL
            encoded = encoded.split(",", 1)[1]
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, f"the field 'image' is not valid base64: {e}") from None
        if "attention" in payload:
            attention = parse_flag(payload["attention"], "attention")
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        data = body
    else:
        raise RequestError(415, f"unsupported Content-Type {content_type or '(none)'!r}: send "
                                f"multipart/form-data, application/json or image/*")
    if not data:
        raise RequestError(400, "the image is empty (0 bytes)")
    return data, attention


def describe(hyp: Hypothesis, loaded: LoadedModel, attention: bool) -> dict[str, Any]:
    """The JSON answer for one image's best hypothesis."""
    words = [loaded.word_map.word_of(t) for t in hyp.tokens]
    answer: dict[str, Any] = {"caption": " ".join(words), "words": words, "tokens": list(hyp.tokens),
                              "score": float(hyp.score), "finished": bool(hyp.finished)}
    if attention and hyp.alphas is not None:
        regions = hyp.alphas.shape[1]
        side = int(round(regions ** 0.5))
        answer["attention"] = hyp.alphas.float().tolist()  # (L, P), one row per emitted token
        answer["attention_words"] = words + ([END] if hyp.finished else [])
        answer["grid"] = [side, side] if side * side == regions else [1, regions]
    return answer


# ---------------------------------------------------------------------------- the app
def build_app(loaded: LoadedModel, settings: ServeSettings, backend: str = "torch"):
    """The FastAPI app serving ``loaded`` with ``settings``."""
    model = loaded.model

    def run(batch: list[np.ndarray]) -> list[Hypothesis]:
        images = torch.from_numpy(np.stack(batch))  # (n, 3, S, S) uint8
        generate = model.captioner.generate if hasattr(model, "captioner") else model.generate
        hyps = generate(images, beam_size=settings.beam_size, max_len=settings.max_len,
                        length_penalty=settings.length_penalty)
        return [h[0] for h in hyps]

    batcher = Batcher(run, settings.max_batch_size, settings.batch_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="captioner", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    page = PAGE.read_text()

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError):
        return JSONResponse({"error": e.message}, status_code=e.status)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "backend": backend, "model": str(loaded.source),
                "image_size": loaded.image_size, "beam": settings.beam_size, "max_len": settings.max_len,
                "max_batch_size": settings.max_batch_size, "max_pixels": settings.max_pixels,
                "max_bytes": settings.max_bytes,
                "batches": {"count": len(batcher.batch_sizes), "images": sum(batcher.batch_sizes),
                            "largest": max(batcher.batch_sizes, default=0)}}

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        started = time.perf_counter()
        data, attention = await read_upload(request, settings.max_bytes)
        pixels = await run_in_threadpool(decode_image, data, loaded.image_size, loaded.draft_min_ratio,
                                         settings.max_pixels)
        hyp = await batcher.submit(pixels)
        answer = describe(hyp, loaded, attention)
        answer["image_size"] = loaded.image_size
        answer["seconds"] = round(time.perf_counter() - started, 4)
        return JSONResponse(answer)

    return app


def serve(cfg: DictConfig) -> None:
    """Load the model ``cfg`` names and serve it on ``cfg.host:cfg.port`` until interrupted."""
    import uvicorn

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    loaded = load_model(cfg)
    settings = ServeSettings(beam_size=cfg.beam, max_len=cfg.max_len, length_penalty=cfg.length_penalty,
                             max_batch_size=cfg.max_batch_size, batch_timeout=cfg.batch_timeout,
                             max_bytes=cfg.max_bytes, max_pixels=cfg.max_pixels)
    app = build_app(loaded, settings, backend=cfg.get("backend", "torch"))
    print(f"Serving {loaded.source} on http://{cfg.host}:{cfg.port}/ (beam {settings.beam_size}, "
          f"batches of up to {settings.max_batch_size})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=int(cfg.port), log_level=cfg.get("log_level", "warning"))


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    """``python -m captioner.serve [ckpt_path=...] [port=8000]``."""
    serve(cfg)


if __name__ == "__main__":
    main()
