"""The HTTP app: routes over a backend's functions, each behind a dynamic batcher.

  app = create_app(ModelBackend.from_path("runs/demo"), Settings(max_batch=16))
  serve(app, host="127.0.0.1", port=8000)       # uvicorn; SIGTERM drains, then exits

Every answer that is not a 200 is JSON {"error": "..."} naming what was wrong.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import pathlib
import signal
import threading

import numpy as np
import prometheus_client as prom
import pydantic
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mmjax.deploy.serve import schemas
from mmjax.deploy.serve.batching import Batcher, Overloaded, TimedOut
from mmjax.deploy.serve.inputs import (ApiError, Body, Limits, check_texts, load_rgb, open_image,
                                       parse, validate)
from mmjax.deploy.serve.metrics import HttpMetrics, MetricsMiddleware, ModelMetrics

log = logging.getLogger(__name__)
PAGE = pathlib.Path(__file__).with_name("page.html")
# Requests whose images hold up to this many pixels (their headers say) are decoded on
# the event loop: a thread hop costs more than decoding them (a 224 x 224 JPEG: ~1 ms).
# Larger ones go to a thread. The pixels, not the encoded bytes, decide: a 4096 x 4096
# PNG of one colour is a few KB and decodes to 50 MB in tens of milliseconds.
INLINE_DECODE_PIXELS = 256 * 256
# Large decodes in flight at once: each holds up to max_pixels x 3 bytes (x2 while
# converted to RGB), so this bounds their memory whatever the number of clients.
DECODE_SLOTS = max(1, min(4, os.cpu_count() or 1))
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)      # after which `serve` drains and returns

# What each function a route runs means, for the 404 of a model without it.
_MISSING = {"image": "this model has no joint image-text embedding (no image tower or "
                     "model.embed_dim is 0)",
            "text": "this model has no joint image-text embedding (no text tower or "
                    "model.embed_dim is 0)",
            "classify": "this model has no classifier (model.classifier.num_classes is 0)",
            "caption": "this model has no decoder"}


@dataclasses.dataclass(frozen=True)
class Settings:
  max_batch: int = 16            # rows per model call; buckets 1, 2, 4, ..., max_batch
  buckets: tuple[int, ...] = ()  # explicit padded batch sizes instead (the largest is the max)
  max_wait_ms: float = 5.0       # how long a batch waits for more requests after its first
  queue: int = 256               # queued requests per function before 503
  timeout_s: float = 30.0        # per request, from queueing to the model's answer
  batching: bool = True          # False: one model call per request
  limits: Limits = Limits()


class Service:
  """A backend's batchers, sharing one model thread, and the model's readiness. A front end
  of `mmjax serve --workers N` has a `channel.RemoteService` instead, with the same
  interface: start, stop, run, status, metrics_text and functions."""

  def __init__(self, backend, settings: Settings, metrics: ModelMetrics | None = None):
    self.backend, self.settings = backend, settings
    self.metrics = metrics or ModelMetrics()
    self.ready, self.error = False, ""
    self.executor = None
    self.batchers: dict[str, Batcher] = {}
    self._warm: asyncio.Task | None = None

  async def start(self) -> None:
    s, m = self.settings, self.metrics
    self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mmjax-model")
    for name, f in self.backend.functions.items():
      b = Batcher(name, f.fn, f.example, executor=self.executor, max_batch=s.max_batch,
                  sizes=s.buckets,
                  max_wait_s=s.max_wait_ms / 1000, queue_size=s.queue, gather=s.batching,
                  on_batch=lambda rows, _, n=name: m.batch_size.labels(n).observe(rows),
                  on_depth=lambda depth, n=name: m.queue_depth.labels(n).set(depth))
      b.start()
      m.queue_depth.labels(name).set(0)
      self.batchers[name] = b
    self._warm = asyncio.get_running_loop().create_task(self._warm_up())

  async def _warm_up(self) -> None:
    loop = asyncio.get_running_loop()
    try:
      for name, b in self.batchers.items():
        log.info("compiling %s for batch sizes %s", name, b.sizes)
        await loop.run_in_executor(self.executor, b.warm_up)
    except Exception as e:  # pylint: disable=broad-except
      self.error = f"warm-up failed: {type(e).__name__}: {e}"
      log.error("%s", self.error)
      return
    self.ready = True
    self.metrics.ready.set(1)
    log.info("ready: %s", ", ".join(self.batchers))

  @property
  def functions(self) -> dict[str, list[int]]:
    """The functions served (after `start`) -> the batch sizes each was compiled for."""
    return {name: list(b.sizes) for name, b in self.batchers.items()}

  async def status(self) -> tuple[bool, str]:
    """(ready: every batch size compiled, what went wrong if warm-up failed)."""
    return self.ready, self.error

  async def metrics_text(self) -> bytes:
    return self.metrics.text()

  async def stop(self) -> None:
    """Answer every queued request, then let the model thread go."""
    if self._warm is not None and not self._warm.done():
      self._warm.cancel()
    for b in self.batchers.values():
      await b.stop()
    self.executor.shutdown(wait=True)

  async def run(self, name: str, *arrays: np.ndarray) -> np.ndarray:
    if name not in self.batchers:
      raise ApiError(404, _MISSING[name])
    try:
      return await self.batchers[name].submit(*arrays, timeout_s=self.settings.timeout_s)
    except Overloaded as e:
      raise ApiError(503, str(e), {"Retry-After": "1"}) from None
    except TimedOut as e:
      raise ApiError(504, str(e)) from None


def _body_doc(model) -> dict:
  """OpenAPI for a route that reads its own body: JSON per `model`, or multipart."""
  return {"requestBody": {"required": True, "content": {
      "application/json": {"schema": model.model_json_schema()},
      "multipart/form-data": {"schema": {"type": "object", "description":
                                         "the same fields; images as file parts"}}}}}


_ERRORS = {code: {"model": schemas.ErrorOut} for code in (400, 404, 408, 413, 415, 422, 503,
                                                            504)}


def create_app(backend, settings: Settings = Settings(), service=None) -> FastAPI:
  """The FastAPI app serving `backend` (a ModelBackend or an exported artifact's: its
  info, and images and texts to rows). `service` runs the model: by default a `Service`
  of the backend's functions in this process; a front end's `channel.RemoteService`."""
  metrics = HttpMetrics()
  service = service or Service(backend, settings)
  limits, info = settings.limits, backend.info
  decode_slots = asyncio.Semaphore(DECODE_SLOTS)

  @contextlib.asynccontextmanager
  async def lifespan(_):
    await service.start()
    try:
      yield
    finally:
      await service.stop()

  app = FastAPI(title="mmjax serve", version="1", lifespan=lifespan,
                description=f"Inference for {info.source}.")
  app.state.service = service
  app.add_middleware(MetricsMiddleware, metrics=metrics)

  @app.exception_handler(ApiError)
  async def _api_error(_, e: ApiError):
    return JSONResponse({"error": e.message}, e.status, headers=e.headers)

  @app.exception_handler(HTTPException)
  async def _http_error(_, e: HTTPException):
    return JSONResponse({"error": str(e.detail)}, e.status_code, headers=e.headers)

  @app.exception_handler(Exception)
  async def _bug(_, e: Exception):
    # Not the caller's fault: logged with its traceback; the answer is still JSON.
    log.exception("internal error")
    return JSONResponse({"error": f"internal error: {type(e).__name__}"}, 500)

  @app.exception_handler(RequestValidationError)
  async def _validation_error(_, e: RequestValidationError):
    err = e.errors()[0]
    return JSONResponse({"error": f"{'.'.join(map(str, err['loc']))}: {err['msg']}"}, 422)

  async def images_in(body: Body, field: str, most: int) -> np.ndarray:
    """The body's images, decoded and preprocessed off the event loop -> [N, H, W, 3]."""
    if not body.images:
      raise ApiError(422, f"{field}: give an image")
    if len(body.images) > most:
      raise ApiError(422, f"{field}: {len(body.images)} images given; the limit is {most}")

    opened = [(where, open_image(data, where, limits.max_pixels))
              for where, data in body.images]              # headers only: sizes checked

    def prepare():
      return np.concatenate([backend.image_rows(load_rgb(image, where))
                             for where, image in opened])

    if sum(image.width * image.height for _, image in opened) <= INLINE_DECODE_PIXELS:
      return prepare()
    async with decode_slots:
      return await run_in_threadpool(prepare)

  def texts_in(texts: list[str], field: str) -> tuple[np.ndarray, np.ndarray]:
    return backend.text_rows(check_texts(texts, field, limits))

  def needs(*names: str) -> None:
    for name in names:
      if name not in service.functions:
        raise ApiError(404, _MISSING[name])

  @app.post("/v1/embed/image", response_model=schemas.Embeddings, responses=_ERRORS,
            openapi_extra=_body_doc(schemas.ImagesJson))
  async def embed_image(request: Request):
    """Unit embeddings of one or more images."""
    needs("image")
    body = await parse(request, limits, ("images",))
    validate(schemas.ImagesJson, dict(body.fields, images=[]))
    emb = await service.run("image", await images_in(body, "images", limits.max_images))
    return _answer(schemas.Embeddings(embeddings=emb.tolist(), dim=emb.shape[1]))

  @app.post("/v1/embed/text", response_model=schemas.Embeddings, responses=_ERRORS,
            openapi_extra=_body_doc(schemas.TextsIn))
  async def embed_text(request: Request):
    """Unit embeddings of one or more texts."""
    needs("text")
    body = await parse(request, limits, (), lists=("texts",))
    fields = validate(schemas.TextsIn, body.fields)
    emb = await service.run("text", *texts_in(fields.texts, "texts"))
    return _answer(schemas.Embeddings(embeddings=emb.tolist(), dim=emb.shape[1]))

  @app.post("/v1/zeroshot", response_model=schemas.ZeroShotOut, responses=_ERRORS,
            openapi_extra=_body_doc(schemas.ZeroShotJson))
  async def zeroshot(request: Request):
    """Scores of an image against class names (softmax over the labels' prompts)."""
    needs("image", "text")
    body = await parse(request, limits, ("image",), lists=("labels",))
    fields = validate(schemas.ZeroShotIn, body.fields)
    if len(fields.template) > limits.max_text_chars:    # before it is copied per label
      raise ApiError(422, f"template: {len(fields.template)} characters; the limit is "
                          f"{limits.max_text_chars}")
    if "{}" not in fields.template:
      raise ApiError(422, f"template: {fields.template!r} has no '{{}}' for the label")
    labels = check_texts(fields.labels, "labels", limits)
    ids, mask = texts_in([fields.template.replace("{}", l) for l in labels], "labels")
    image = await images_in(body, "image", 1)
    img, txt = await asyncio.gather(service.run("image", image),
                                    service.run("text", ids, mask))
    sims = txt @ img[0]                                            # [K]
    scores = _softmax(info.logit_scale * sims)
    return _answer(schemas.ZeroShotOut(labels=labels, scores=scores.tolist(),
                                       similarities=sims.tolist(),
                                       best=labels[int(np.argmax(scores))]))

  @app.post("/v1/classify", response_model=schemas.ClassifyOut, responses=_ERRORS,
            openapi_extra=_body_doc(schemas.ClassifyJson))
  async def classify(request: Request):
    """The fine-tuned classifier's best classes for an image (and/or a text)."""
    needs("classify")
    body = await parse(request, limits, ("image",))
    fields = validate(schemas.ClassifyIn, body.fields)
    arrays = ()
    if info.classify_input in ("image", "fusion"):
      arrays += (await images_in(body, "image", 1),)
    elif body.images:
      raise ApiError(422, "image: this model classifies text; send 'text'")
    if info.classify_input in ("text", "fusion"):
      if fields.text is None:
        raise ApiError(422, "text: Field required (this model classifies text)")
      arrays += texts_in([fields.text], "text")
    elif fields.text is not None:
      raise ApiError(422, "text: this model classifies images; send 'image'")
    probs = _softmax((await service.run("classify", *arrays))[0])
    order = np.argsort(-probs)[:fields.top_k]
    return _answer(schemas.ClassifyOut(
        label=info.class_names[order[0]], label_id=int(order[0]),
        top=[schemas.Scored(label=info.class_names[i], score=float(probs[i])) for i in order]))

  @app.post("/v1/similarity", response_model=schemas.SimilarityOut, responses=_ERRORS,
            openapi_extra=_body_doc(schemas.SimilarityJson))
  async def similarity(request: Request):
    """Cosine similarity of every image with every text."""
    needs("image", "text")
    body = await parse(request, limits, ("images",), lists=("texts",))
    fields = validate(schemas.SimilarityIn, body.fields)
    ids, mask = texts_in(fields.texts, "texts")
    images = await images_in(body, "images", limits.max_images)
    img, txt = await asyncio.gather(service.run("image", images),
                                    service.run("text", ids, mask))
    return _answer(schemas.SimilarityOut(similarities=(img @ txt.T).tolist()))

  @app.post("/v1/caption", response_model=schemas.CaptionOut, responses=_ERRORS,
            openapi_extra=_body_doc(schemas.CaptionJson))
  async def caption(request: Request):
    """A greedy caption of the image, from the model's decoder."""
    needs("caption")
    body = await parse(request, limits, ("image",))
    validate(schemas.CaptionIn, body.fields)
    tokens = await service.run("caption", await images_in(body, "image", 1))
    return _answer(schemas.CaptionOut(caption=backend.caption_text(tokens[0])))

  @app.get("/v1/info", response_model=schemas.InfoOut)
  async def model_info():
    """What this model serves."""
    routes = {"image": ["/v1/embed/image"], "text": ["/v1/embed/text"],
              "classify": ["/v1/classify"], "caption": ["/v1/caption"]}
    functions = service.functions
    served = [r for name in functions for r in routes[name]]
    if {"image", "text"} <= set(functions):
      served += ["/v1/zeroshot", "/v1/similarity"]
    return schemas.InfoOut(
        source=info.source, routes=sorted(served), embed_dim=info.embed_dim,
        classify_input=info.classify_input, class_names=list(info.class_names),
        image_size=list(info.image_size) if info.image_size else None, max_len=info.max_len,
        has_decoder="caption" in functions, buckets=next(iter(functions.values()), []),
        batching=settings.batching)

  @app.get("/healthz")
  async def healthz():
    return {"status": "ok"}

  @app.get("/readyz", responses={503: {"model": schemas.ErrorOut}})
  async def readyz():
    ready, error = await service.status()
    if ready:
      return {"ready": True}
    return JSONResponse({"ready": False, "error": error or "warming up: compiling "
                         "the model for every batch size"}, 503, headers={"Retry-After": "1"})

  @app.get("/metrics")
  async def prometheus_metrics():
    return Response(metrics.text() + await service.metrics_text(),
                    media_type=prom.CONTENT_TYPE_LATEST)

  @app.get("/", response_class=HTMLResponse)
  async def page():
    return HTMLResponse(PAGE.read_text())

  return app


def _answer(answer: pydantic.BaseModel) -> Response:
  """A response model, serialised once: built by the route, it is valid already (returned
  as is, FastAPI would validate it a second time)."""
  return Response(answer.model_dump_json(), media_type="application/json")


def _softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max())
  return e / e.sum()


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *,
          graceful_s: float = 30.0, http: str = "auto", sock=None) -> bool:
  """Run `app` under uvicorn until SIGINT/SIGTERM; then stop taking connections, finish
  the requests in flight (up to `graceful_s`), drain the batchers and return True (False:
  it never started, e.g. the port was taken). `http`: uvicorn's HTTP parser, "auto" is
  httptools when installed (the `serve` extra), else h11; the event loop is uvloop's when
  installed. `sock`: a listening socket to serve on instead of binding host:port (a front
  end of `mmjax serve --workers N` is given its model process's)."""
  config = uvicorn.Config(app, host=host, port=port, log_level="info", http=http,
                          timeout_graceful_shutdown=graceful_s, access_log=False)
  server = uvicorn.Server(config)
  # Once drained, uvicorn raises the signal that stopped it again, for the handler in
  # place before it ran: here one that ignores it, so that the caller gets its return
  # value (not a KeyboardInterrupt traceback, nor death by SIGTERM after a clean drain).
  main = threading.current_thread() is threading.main_thread()
  before = {sig: signal.signal(sig, lambda *_: None) for sig in _STOP_SIGNALS} if main else {}
  try:
    server.run(sockets=[sock] if sock is not None else None)
  finally:
    for sig, handler in before.items():
      signal.signal(sig, handler)
  return server.started
