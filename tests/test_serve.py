"""`mmjax serve`: every route with good and bad input through FastAPI's TestClient, the
dynamic batcher, metrics, readiness and graceful shutdown.

Most HTTP tests run on a small numpy backend (no JAX, fast); the tiny trained-shape
model checks that answers equal the model's own outputs and that traffic compiles
nothing."""
import asyncio
import base64
import concurrent.futures
import functools
import io
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

import chex
import httpx
import jax
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from conftest import ROOT, cli
import mmjax
from mmjax.deploy.export import export
from mmjax.deploy.serve import command as serve_command
from mmjax.deploy.serve.app import Settings, create_app
from mmjax.deploy.serve.backend import ExportedBackend, Function, ModelInfo
from mmjax.deploy.serve.batching import Batcher, Overloaded, TimedOut, buckets
from mmjax.deploy.serve.inputs import ApiError, Limits, decode_image
from mmjax.deploy.serve.workdir_backend import ModelBackend


def png(size=(40, 30), color=(255, 0, 0)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, "PNG")
  return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
  """A PNG that declares `width` x `height` in its header and holds no pixel data."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
  return base64.b64encode(data).decode()


class FakeBackend:
  """A numpy model: image embedding = mean colour, text embedding from character
  counts, classes by the dominant channel. `gate` (a threading.Event) holds every model
  call until set; `delay_s` slows each call."""

  def __init__(self, gate: threading.Event | None = None, delay_s: float = 0.0):
    self.gate, self.delay_s, self.calls, self.entered = gate, delay_s, [], 0
    self.info = ModelInfo(source="fake", embed_dim=3, classify_input="image",
                          class_names=("red", "green", "blue"), image_size=(4, 4), max_len=8,
                          logit_scale=10.0)

  def image_rows(self, image):
    return np.asarray(image.resize((4, 4)), np.float32)[None] / 255

  def text_rows(self, texts):
    ids = np.zeros((len(texts), 8), np.int32)
    for i, t in enumerate(texts):
      codes = [ord(c) % 97 for c in t[:8]]
      ids[i, :len(codes)] = codes
    return ids, (ids > 0).astype(np.int32)

  def _call(self, out):
    self.entered += 1
    if self.gate is not None:
      self.gate.wait(10)
    time.sleep(self.delay_s)
    self.calls.append(len(out))
    return out

  @property
  def functions(self):
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
    return {
        "image": Function(lambda x: self._call(unit(x.mean((1, 2)) + 0.1)),
                          (np.zeros((1, 4, 4, 3), np.float32),)),
        "text": Function(lambda ids, m: self._call(unit((ids[:, :3] % 7 + 1).astype(np.float32))),
                         self.text_rows(["x"])),
        "classify": Function(lambda x: self._call(x.mean((1, 2)) * 5),
                             (np.zeros((1, 4, 4, 3), np.float32),)),
    }


def wait_ready(client, timeout=300):
  end = time.time() + timeout
  while client.get("/readyz").status_code != 200:
    assert time.time() < end, client.get("/readyz").json()
    time.sleep(0.05)


@pytest.fixture(scope="module")
def fake():
  with TestClient(create_app(FakeBackend(), Settings(max_batch=4, max_wait_ms=1))) as c:
    wait_ready(c)
    yield c


def metric(text: str, name: str, **labels) -> float:
  """One sample's value from Prometheus text (0 when absent)."""
  for line in text.splitlines():
    m = re.match(rf"{name}(\{{.*\}})? (\S+)$", line)
    if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
      return float(m.group(2))
  return 0.0


# --- bad input: each a 4xx JSON error naming the problem --------------------------------

RED = png()
BAD = {
    "malformed JSON": ("/v1/zeroshot", dict(content=b'{"labels": [', headers={
        "content-type": "application/json"}), 400, "malformed JSON"),
    "non-image upload": ("/v1/zeroshot", dict(files={"image": ("a.txt", b"hello", "text/plain")},
                                              data={"labels": ["a"]}), 422,
                         "image: not a readable image"),
    "truncated PNG": ("/v1/zeroshot", dict(json={"image": b64(png((64, 64))[:60]),
                                                 "labels": ["a"]}), 422, "truncated or corrupt"),
    "20000 x 20000 header": ("/v1/zeroshot", dict(json={"image": b64(png_header(20000, 20000)),
                                                        "labels": ["a"]}), 413, "too many pixels"),
    "5000 x 5000 header": ("/v1/classify", dict(files={"image": ("a.png", png_header(5000, 5000),
                                                                 "image/png")}),
                           413, "5000 x 5000 = 25000000 pixels; the limit is 16777216"),
    "empty label list": ("/v1/zeroshot", dict(json={"image": b64(RED), "labels": []}), 422,
                         "labels: give at least one"),
    "10,000 labels": ("/v1/zeroshot", dict(json={"image": b64(RED), "labels": ["a"] * 10_000}),
                      422, "labels: 10000 given; the limit is 64"),
    "deeply nested JSON": ("/v1/embed/text", dict(content=b"[" * 100_000, headers={
        "content-type": "application/json"}), 400, "nested too deeply"),
    "invalid UTF-8": ("/v1/embed/text", dict(content=b'{"texts": ["caf\xe9"]}', headers={
        "content-type": "application/json"}), 400, "not valid UTF-8 (byte 15)"),
    "wrong content type": ("/v1/embed/text", dict(content=b"texts=a", headers={
        "content-type": "application/x-www-form-urlencoded"}), 415, "content type"),
    "no content type": ("/v1/embed/text", dict(content=b"{}"), 415, "(none)"),
    "missing field": ("/v1/zeroshot", dict(json={"image": b64(RED)}), 422,
                      "labels: Field required"),
    "missing image": ("/v1/zeroshot", dict(json={"labels": ["a"]}), 422, "image: give an image"),
    "unknown field": ("/v1/embed/text", dict(json={"texts": ["a"], "txet": 1}), 422,
                      "txet: Extra inputs are not permitted"),
    "wrong type": ("/v1/embed/text", dict(json={"texts": "a"}), 422, "texts: Input should be"),
    "not an object": ("/v1/embed/text", dict(json=["a"]), 422, "must be an object"),
    "bad base64": ("/v1/classify", dict(json={"image": "%%%"}), 422, "image: not valid base64"),
    "empty label": ("/v1/zeroshot", dict(json={"image": b64(RED), "labels": ["a", " "]}), 422,
                    "labels[1] is empty"),
    "text too long": ("/v1/embed/text", dict(json={"texts": ["a" * 1001]}), 422,
                      "texts[0] is 1001 characters; the limit is 1000"),
    "an integer of 5000 digits": ("/v1/classify", dict(
        content=b'{"top_k": ' + b"1" * 5000 + b"}", headers={"content-type": "application/json"}),
        400, "malformed JSON: Exceeds the limit"),
    "template too long": ("/v1/zeroshot", dict(json={"image": b64(RED), "labels": ["a"],
                                                     "template": "{}" + "x" * 5000}), 422,
                          "template: 5002 characters; the limit is 1000"),
    "template without {}": ("/v1/zeroshot", dict(json={"image": b64(RED), "labels": ["a"],
                                                       "template": "a photo"}), 422, "template"),
    "too many images": ("/v1/embed/image", dict(json={"images": [b64(RED)] * 17}), 422,
                        "the limit is 16"),
    "body too large": ("/v1/embed/image", dict(json={"images": ["A" * (9 << 20)]}), 413,
                       "the limit is 8388608"),
    "multipart part without a name": ("/v1/classify", dict(
        content=b"--x\r\nContent-Type: text/plain\r\n\r\nabc\r\n--x--\r\n",
        headers={"content-type": "multipart/form-data; boundary=x"}), 400,
        'malformed multipart body: part 1 has no "name" in its Content-Disposition header'),
    "multipart without a boundary": ("/v1/classify", dict(content=b"abc", headers={
        "content-type": "multipart/form-data"}), 400, "Missing boundary"),
    "truncated multipart": ("/v1/embed/text", dict(
        content=b'--x\r\nContent-Disposition: form-data; name="texts"\r\n\r\nab',
        headers={"content-type": "multipart/form-data; boundary=x"}), 400,
        "ends before its closing boundary"),
    "invalid UTF-8 in a multipart label": ("/v1/zeroshot", dict(
        files={"image": ("a.png", RED, "image/png")}, data={"labels": ["ok", b"caf\xe9"]}),
        400, "labels[1]: not valid utf-8 (byte 3)"),
    "invalid UTF-8 in a multipart text": ("/v1/embed/text", dict(
        files={"texts": (None, b"\xff\xfe")}), 400, "texts: not valid utf-8 (byte 0)"),
    "unknown multipart charset": ("/v1/embed/text", dict(content=b"--x--\r\n", headers={
        "content-type": "multipart/form-data; boundary=x; charset=klingon"}), 415, "klingon"),
    "too many file parts": ("/v1/embed/image", dict(
        files=[("images", ("a.png", RED, "image/png"))] * 17), 422,
        "more than 16 file parts"),
    "text to an image classifier": ("/v1/classify", dict(json={"image": b64(RED), "text": "a"}),
                                    422, "classifies images"),
    "no decoder": ("/v1/caption", dict(json={"image": b64(RED)}), 404,
                   "this model has no decoder"),
    "unknown route": ("/v1/nothing", dict(json={}), 404, "Not Found"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_a_4xx_naming_the_problem(fake, case):
  route, kwargs, status, message = BAD[case]
  r = fake.post(route, **kwargs)
  assert r.status_code == status, r.text
  assert message in r.json()["error"], r.json()


def test_bad_input_leaves_the_server_answering(fake):
  before = fake.post("/v1/zeroshot", json={"image": b64(RED), "labels": ["a", "b"]}).json()
  for route, kwargs, _, _ in BAD.values():
    fake.post(route, **kwargs)
  assert fake.post("/v1/zeroshot", json={"image": b64(RED), "labels": ["a", "b"]}).json() == before
  assert fake.get("/healthz").json() == {"status": "ok"}


def test_huge_header_is_refused_before_decoding():
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  for w, h in ((20_000, 20_000), (5_000, 5_000)):
    with pytest.raises(ApiError) as e:
      decode_image(png_header(w, h), "image", Limits().max_pixels)
    assert e.value.status == 413
  # 20,000 x 20,000 RGB would be 1.2 GB; nothing near that was allocated.
  assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 100_000   # KiB


# --- every route, JSON and multipart ----------------------------------------------------

def test_routes_json_and_multipart_agree(fake):
  blue = png(color=(0, 0, 255))
  z_json = fake.post("/v1/zeroshot", json={"image": b64(blue), "labels": ["sky", "sea"],
                                           "template": "a photo of the {}"}).json()
  z_form = fake.post("/v1/zeroshot", files={"image": ("b.png", blue, "image/png")},
                     data={"labels": ["sky", "sea"], "template": "a photo of the {}"}).json()
  assert z_json == z_form and z_json["labels"] == ["sky", "sea"]
  np.testing.assert_allclose(sum(z_json["scores"]), 1.0, rtol=1e-6)
  one_label = fake.post("/v1/zeroshot", files={"image": ("b.png", blue, "image/png")},
                        data={"labels": "sky"}).json()
  assert one_label["labels"] == ["sky"] and one_label["scores"] == [pytest.approx(1.0)]

  c = fake.post("/v1/classify", files={"image": ("b.png", blue, "image/png")},
                data={"top_k": "2"}).json()
  assert c["label"] == "blue" and c["label_id"] == 2 and len(c["top"]) == 2
  assert c == fake.post("/v1/classify", json={"image": "data:image/png;base64," + b64(blue),
                                              "top_k": 2}).json()

  e = fake.post("/v1/embed/image", files=[("images", ("a.png", RED, "image/png")),
                                          ("images", ("b.png", blue, "image/png"))]).json()
  assert e["dim"] == 3 and np.argmax(e["embeddings"][0]) == 0 and np.argmax(e["embeddings"][1]) == 2
  t = fake.post("/v1/embed/text", json={"texts": ["ab", "cd", "ef"]}).json()
  chex.assert_shape(np.asarray(t["embeddings"]), (3, 3))
  s = fake.post("/v1/similarity", json={"images": [b64(RED), b64(blue)],
                                        "texts": ["ab", "cd", "ef"]}).json()
  np.testing.assert_allclose(s["similarities"],
                             np.asarray(e["embeddings"]) @ np.asarray(t["embeddings"]).T,
                             atol=1e-6)


def test_multipart_text_is_utf8_and_a_declared_charset_is_honoured(fake):
  labels = ["café", "猫", "naïve"]
  got = fake.post("/v1/zeroshot", files={"image": ("a.png", RED, "image/png")},
                  data={"labels": labels}).json()
  assert got["labels"] == labels
  body = (b'--x\r\nContent-Disposition: form-data; name="texts"\r\n\r\ncaf\xe9\r\n--x--\r\n')
  latin = fake.post("/v1/embed/text", content=body, headers={
      "content-type": "multipart/form-data; boundary=x; charset=latin-1"})
  assert latin.json() == fake.post("/v1/embed/text", json={"texts": ["café"]}).json()
  as_utf8 = fake.post("/v1/embed/text", content=body, headers={
      "content-type": "multipart/form-data; boundary=x"})
  assert as_utf8.status_code == 400 and "texts: not valid utf-8" in as_utf8.json()["error"]
  # A file part named only in RFC 5987's form (filename*=) is still a file.
  upload = (b"--x\r\nContent-Disposition: form-data; name=\"images\"; "
            b"filename*=UTF-8''caf%C3%A9.png\r\nContent-Type: image/png\r\n\r\n" + RED +
            b"\r\n--x--\r\n")
  got = fake.post("/v1/embed/image", content=upload, headers={
      "content-type": "multipart/form-data; boundary=x"})
  assert got.json() == fake.post("/v1/embed/image", json={"images": [b64(RED)]}).json()


def test_health_info_metrics_docs_and_page(fake):
  assert fake.get("/readyz").json() == {"ready": True}
  info = fake.get("/v1/info").json()
  assert info["routes"] == ["/v1/classify", "/v1/embed/image", "/v1/embed/text",
                            "/v1/similarity", "/v1/zeroshot"]
  assert info["buckets"] == [1, 2, 4] and not info["has_decoder"]
  fake.post("/v1/embed/text", json={"texts": ["ab"]})
  fake.post("/v1/embed/text", json={})
  text = fake.get("/metrics").text
  assert metric(text, "mmjax_requests_total", route="/v1/embed/text", status="200") >= 1
  assert metric(text, "mmjax_requests_total", route="/v1/embed/text", status="422") >= 1
  assert metric(text, "mmjax_request_seconds_count", route="/v1/embed/text") >= 2
  assert metric(text, "mmjax_batch_rows_count", function="text") >= 1
  assert "mmjax_queue_depth" in text and metric(text, "mmjax_ready") == 1
  schema = fake.get("/openapi.json").json()
  body = schema["paths"]["/v1/zeroshot"]["post"]["requestBody"]["content"]
  assert set(body["application/json"]["schema"]["properties"]) == {"image", "labels", "template"}
  assert "multipart/form-data" in body
  page = fake.get("/")
  assert page.headers["content-type"].startswith("text/html")
  assert 'id="bars"' in page.text and "/v1/zeroshot" in page.text
  assert not re.search(r'(src|href)=["\']?(https?:)?//', page.text)   # no external assets


# --- dynamic batching -------------------------------------------------------------------

def test_buckets():
  assert buckets(1) == (1,) and buckets(16) == (1, 2, 4, 8, 16) and buckets(12) == (1, 2, 4, 8, 12)


def test_explicit_bucket_sizes_pad_to_the_nearest_and_are_checked():
  calls = []

  def fn(x):
    calls.append(x.shape[0])
    return x + 1

  async def main():
    pool = concurrent.futures.ThreadPoolExecutor(1)
    b = Batcher("f", fn, (np.zeros((1, 2)),), executor=pool, max_batch=99, sizes=(1, 3, 5),
                max_wait_s=0.2)
    assert b.sizes == (1, 3, 5) and b.max_batch == 5           # the largest size is the most
    b.start()
    outs = await asyncio.gather(*(b.submit(np.full((1, 2), i, np.float32)) for i in range(4)))
    await b.stop()
    pool.shutdown()
    return outs

  outs = asyncio.run(main())
  np.testing.assert_array_equal(np.concatenate(outs)[:, 0], [1, 2, 3, 4])
  # 4 one-row requests: one call of 4 rows, padded to 5 (not to the 8 of powers of two).
  assert calls == [5], calls
  for bad in ((), (0, 2), (2, 2), (4, 2)):
    with pytest.raises(ValueError, match="expected increasing integers"):
      Batcher("f", fn, (np.zeros((1, 2)),), executor=None, sizes=bad or (3, 1))


def test_cli_bucket_flags(tmp_path):
  r = cli("serve", "--workdir", str(tmp_path), "--buckets", "4,2")
  assert r.returncode == 2 and "--buckets=4,2: expected increasing integers" in r.stderr
  r = cli("serve", "--workdir", str(tmp_path), "--buckets", "1,x")
  assert r.returncode == 2 and "--buckets=1,x" in r.stderr
  r = cli("serve", "--workdir", str(tmp_path), "--buckets", "1,2,6", "--max-batch", "8")
  assert r.returncode == 2 and "largest of --buckets is 6" in r.stderr
  r = cli("serve", "--workdir", "/nonexistent/run", "--buckets", "1,2,6", "--max-batch", "6")
  assert r.returncode == 2 and "does not exist" in r.stderr       # the flags were fine


def test_batcher_gathers_pads_splits_and_bounds_its_queue():
  calls = []

  def fn(x):
    calls.append(x.shape[0])
    time.sleep(0.02)
    return x * 2

  async def main():
    pool = concurrent.futures.ThreadPoolExecutor(1)
    b = Batcher("f", fn, (np.zeros((1, 2)),), executor=pool, max_batch=8, max_wait_s=0.05,
                queue_size=6)
    b.start()
    rows = [np.full((n, 2), i, np.float32) for i, n in enumerate((1, 3, 2, 1, 9))]
    outs = await asyncio.gather(*(b.submit(r) for r in rows))
    for r, o in zip(rows, outs):
      np.testing.assert_array_equal(o, r * 2)         # each request gets its own rows back
    assert all(c in b.sizes for c in calls) and len(calls) < 6   # padded to buckets, gathered
    got = await asyncio.gather(*(b.submit(np.ones((1, 2))) for _ in range(7)),
                               return_exceptions=True)
    full = [g for g in got if isinstance(g, Overloaded)]
    assert len(full) == 1 and "queue is full (6 requests)" in str(full[0])
    with pytest.raises(TimedOut):
      await b.submit(np.ones((1, 2)), timeout_s=1e-6)
    queued = [asyncio.ensure_future(b.submit(np.full((1, 2), i))) for i in range(5)]
    await asyncio.sleep(0)
    await b.stop()                                       # drains what was queued
    assert [float(q[0, 0]) for q in await asyncio.gather(*queued)] == [0, 2, 4, 6, 8]
    with pytest.raises(Overloaded, match="not running"):
      await b.submit(np.ones((1, 2)))
    pool.shutdown()

  asyncio.run(main())


def test_batcher_survives_a_failing_call():
  def fn(x):
    if (x < 0).any():
      raise RuntimeError("negative")
    return x

  async def main():
    pool = concurrent.futures.ThreadPoolExecutor(1)
    b = Batcher("f", fn, (np.zeros((1, 1)),), executor=pool, max_batch=2, gather=False)
    b.start()
    with pytest.raises(RuntimeError, match="negative"):
      await b.submit(-np.ones((1, 1)))
    np.testing.assert_array_equal(await b.submit(np.ones((1, 1))), np.ones((1, 1)))
    await b.stop()
    pool.shutdown()

  asyncio.run(main())


def test_batcher_survives_rows_that_do_not_stack():
  """Two requests gathered into one call whose rows cannot be concatenated: both get the
  error, and the collector still answers the next request (a dead collector would leave
  every later request waiting for its timeout)."""
  async def main():
    pool = concurrent.futures.ThreadPoolExecutor(1)
    b = Batcher("f", lambda x: x, (np.zeros((1, 2)),), executor=pool, max_batch=4,
                max_wait_s=0.5)
    b.start()
    got = await asyncio.gather(b.submit(np.ones((1, 2)), timeout_s=10),
                               b.submit(np.ones((1, 3)), timeout_s=10), return_exceptions=True)
    assert all(isinstance(g, ValueError) for g in got), got
    np.testing.assert_array_equal(await b.submit(np.ones((1, 2)), timeout_s=10), np.ones((1, 2)))
    await b.stop()
    pool.shutdown()

  asyncio.run(main())


def test_large_images_are_decoded_off_the_event_loop():
  """Whether an image is decoded on the event loop depends on its pixels (from its
  header), not its encoded bytes: a 2000 x 2000 PNG of one colour is ~10 KB."""
  backend, threads = FakeBackend(), []
  rows = backend.image_rows
  backend.image_rows = lambda image: (threads.append(threading.get_ident()), rows(image))[1]
  big = png(size=(2000, 2000), color=(0, 0, 255))
  assert len(big) < 64 << 10
  with TestClient(create_app(backend, Settings(max_batch=4, max_wait_ms=1))) as c:
    wait_ready(c)
    loop_thread = c.portal.call(threading.get_ident)
    small = c.post("/v1/embed/image", json={"images": [b64(RED)]})
    large = c.post("/v1/embed/image", json={"images": [b64(big)]})
  assert small.status_code == large.status_code == 200
  assert np.argmax(large.json()["embeddings"][0]) == 2
  assert threads[0] == loop_thread and threads[1] != loop_thread


def test_full_queue_is_503_with_retry_after_and_readyz_waits_for_warm_up():
  gate = threading.Event()
  app = create_app(FakeBackend(gate), Settings(max_batch=1, queue=2, timeout_s=20))
  with TestClient(app) as c:
    assert c.get("/readyz").status_code == 503        # warm-up is held at the gate
    assert c.get("/healthz").status_code == 200
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
      futures = [pool.submit(c.post, "/v1/embed/text", json={"texts": ["ab"]}) for _ in range(6)]
      time.sleep(1.0)
      gate.set()
      codes = sorted(f.result().status_code for f in futures)
    full = [f.result() for f in futures if f.result().status_code == 503]
    assert codes.count(200) >= 2 and full, codes
    assert full[0].headers["retry-after"] == "1" and "queue is full" in full[0].json()["error"]
    wait_ready(c)


def test_timeout_is_504():
  app = create_app(FakeBackend(delay_s=0.5), Settings(max_batch=1, timeout_s=0.1))
  with TestClient(app) as c:
    wait_ready(c, 30)
    r = c.post("/v1/embed/text", json={"texts": ["ab"]})
    assert r.status_code == 504 and "within 0.1 s" in r.json()["error"]


def test_graceful_shutdown_finishes_in_flight_requests():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  gate = threading.Event()
  gate.set()
  backend = FakeBackend(gate)
  app = create_app(backend, Settings(batching=False))
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run)
  thread.start()
  url = f"http://127.0.0.1:{port}"
  end = time.time() + 30
  while True:
    try:
      if httpx.get(url + "/readyz").status_code == 200:
        break
    except httpx.TransportError:
      pass
    assert time.time() < end
    time.sleep(0.05)
  gate.clear()                                        # hold the model: requests pile up
  start, text = backend.entered, app.state.service.batchers["text"]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futures = [pool.submit(httpx.post, url + "/v1/embed/text", json={"texts": [t]}, timeout=20)
               for t in ("ab", "cd", "ef", "gh")]
    while backend.entered - start < 1 or text.depth < 3:    # one in the model, three queued
      assert time.time() < end + 30
      time.sleep(0.02)
    server.should_exit = True                         # what SIGTERM does
    time.sleep(0.3)
    gate.set()
    assert [f.result().status_code for f in futures] == [200] * 4
  thread.join(10)
  assert not thread.is_alive()
  with pytest.raises(httpx.TransportError):
    httpx.get(url + "/healthz")


def test_a_stalled_upload_is_408_and_the_server_answers_others():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  app = create_app(FakeBackend(), Settings(limits=Limits(body_timeout_s=0.5)))
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run)
  thread.start()
  try:
    url, end = f"http://127.0.0.1:{port}", time.time() + 30
    while True:
      try:
        if httpx.get(url + "/readyz").status_code == 200:
          break
      except httpx.TransportError:
        pass
      assert time.time() < end
      time.sleep(0.05)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
      conn.sendall(b"POST /v1/embed/text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                   b"\r\nContent-Length: 100\r\n\r\n{\"texts\": [")      # and then nothing
      t = time.time()
      reply = b""
      while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
        chunk = conn.recv(4096)
        if not chunk:
          break
        reply += chunk
      waited = time.time() - t
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b'"error":"the request body did not arrive within 0.5 s"' in reply
    assert 0.4 < waited < 5
    assert httpx.post(url + "/v1/embed/text", json={"texts": ["ab"]}).status_code == 200
  finally:
    server.should_exit = True
    thread.join(10)


TINY_SERVER = """
import sys
import numpy as np
from mmjax.deploy.serve.app import create_app, serve
from mmjax.deploy.serve.backend import Function, ModelInfo

class Tiny:
  info = ModelInfo(source="tiny", embed_dim=2, classify_input="", class_names=(),
                   image_size=None, max_len=4, logit_scale=1.0)
  functions = {"text": Function(lambda ids, mask: np.full((len(ids), 2), 0.5 ** 0.5),
                                (np.ones((1, 4), np.int32),) * 2)}

  def text_rows(self, texts):
    return (np.ones((len(texts), 4), np.int32),) * 2

print("served", serve(create_app(Tiny()), port=int(sys.argv[1]), http="h11"), flush=True)
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_drains_and_returns(sig):
  """Ctrl-C or SIGTERM: uvicorn drains and `serve` returns True (uvicorn's re-raised
  signal is neither a KeyboardInterrupt traceback nor a death by SIGTERM)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, "-c", TINY_SERVER, str(port)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    end = time.time() + 120
    while True:
      assert proc.poll() is None, proc.communicate()
      try:
        if httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200:
          break
      except httpx.TransportError:
        pass
      assert time.time() < end
      time.sleep(0.1)
    r = httpx.post(f"http://127.0.0.1:{port}/v1/embed/text", json={"texts": ["a"]})
    assert r.status_code == 200 and r.json()["dim"] == 2
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  assert proc.returncode == 0 and "served True" in out, (proc.returncode, out, err)
  assert "Traceback" not in err and "Finished server process" in err, err


# --- the real model ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(serve_workdir):
  backend = ModelBackend.from_path(serve_workdir)
  app = create_app(backend, Settings(max_batch=4, max_wait_ms=100))
  with TestClient(app) as c:
    wait_ready(c)
    yield backend, c


def test_answers_equal_the_models_own_outputs(model):
  backend, c = model
  m, v = backend.model, backend.loaded.variables
  images = [png(color=(200, 30, 30)), png((20, 50), (30, 30, 200))]
  x = np.stack([backend.preprocess(Image.open(io.BytesIO(i))) for i in images])
  apply = lambda method, *xs: np.asarray(jax.jit(functools.partial(m.apply, method=method))(
      v, *xs))
  img_emb = apply(lambda mod, x: mod.encode_image(x)[0], x)
  labels = ["a red circle", "a blue square", "a cat"]
  ids, mask = backend.tokenizer.encode(labels, backend.info.max_len)
  txt_emb = apply(lambda mod, ids, mask: mod.encode_text(ids, mask)[0], ids, mask)
  logits = apply(lambda mod, x: mod.classify({"image": x}), x)

  got = c.post("/v1/embed/image", json={"images": [b64(i) for i in images]}).json()
  np.testing.assert_allclose(got["embeddings"], img_emb, atol=1e-5)
  got = c.post("/v1/embed/text", json={"texts": labels}).json()
  np.testing.assert_allclose(got["embeddings"], txt_emb, atol=1e-5)
  z = c.post("/v1/zeroshot", files={"image": ("a.png", images[0], "image/png")},
             data={"labels": labels}).json()
  sims = txt_emb @ img_emb[0]
  np.testing.assert_allclose(z["similarities"], sims, atol=1e-5)
  np.testing.assert_allclose(z["scores"], jax.nn.softmax(backend.info.logit_scale * sims),
                             atol=1e-5)
  cl = c.post("/v1/classify", json={"image": b64(images[1]), "top_k": 3}).json()
  probs = np.asarray(jax.nn.softmax(logits[1]))
  assert cl["label_id"] == int(np.argmax(probs))
  assert cl["label"] == ("circle", "square", "triangle")[cl["label_id"]]
  np.testing.assert_allclose([t["score"] for t in cl["top"]], np.sort(probs)[::-1], atol=1e-5)
  s = c.post("/v1/similarity", json={"images": [b64(i) for i in images], "texts": labels}).json()
  np.testing.assert_allclose(s["similarities"], img_emb @ txt_emb.T, atol=1e-5)
  caption = c.post("/v1/caption", files={"image": ("a.png", images[0], "image/png")}).json()
  want = mmjax.generate(backend.loaded, images=[Image.open(io.BytesIO(images[0]))],
                        max_tokens=m.text_tower.max_len - 1)
  assert caption == {"caption": want[0]["generated"][0]}
  assert "/v1/caption" in c.get("/v1/info").json()["routes"]


def test_concurrent_requests_share_batches_and_compile_nothing(model):
  backend, c = model
  lowered = []
  record = lambda event, secs, **kw: lowered.append(event) if "mlir_module" in event else None
  jax.monitoring.register_event_duration_secs_listener(record)
  try:
    texts = [f"a {w} circle" for w in ("red", "blue", "green", "big", "small", "cat")]
    calls = lambda: metric(c.get("/metrics").text, "mmjax_batch_rows_count", function="text")
    before = calls()
    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
      answers = list(pool.map(lambda t: c.post("/v1/embed/text", json={"texts": [t]}), texts))
    gathered = calls() - before
    alone = c.post("/v1/embed/text", json={"texts": texts}).json()["embeddings"]
  finally:
    jax.monitoring.unregister_event_duration_listener(record)
  # 6 one-row requests in fewer model calls: some call ran rows of several requests.
  assert 2 <= gathered < len(texts), gathered          # max_batch is 4
  np.testing.assert_allclose([a.json()["embeddings"][0] for a in answers], alone, atol=1e-5)
  assert not lowered, lowered                         # every batch size was compiled at warm-up


def test_cli_serve_errors(tmp_path, monkeypatch):
  r = cli("serve", "--workdir", "/nonexistent/run")
  assert r.returncode == 2 and "does not exist" in r.stderr
  r = cli("serve", "--export", str(tmp_path))
  assert r.returncode == 2 and "no manifest.json" in r.stderr
  r = cli("serve", "--workdir", str(tmp_path), "--max-batch", "0")
  assert r.returncode == 2 and "--max-batch=0: must be >= 1" in r.stderr
  monkeypatch.setattr(serve_command.importlib.util, "find_spec", lambda name: None)
  r = cli("serve", "--workdir", str(tmp_path), "--http", "httptools")
  assert r.returncode == 2 and "httptools is not installed" in r.stderr


def test_export_serves_the_same_answers(model, serve_workdir, tmp_path):
  _, live = model
  export(serve_workdir, tmp_path / "export", what="image,text,classify")
  backend = ExportedBackend.from_path(tmp_path / "export")
  image = png(color=(30, 200, 30))
  requests = [("/v1/zeroshot", dict(json={"image": b64(image), "labels": ["a cat", "a dog"]})),
              ("/v1/classify", dict(json={"image": b64(image), "top_k": 3})),
              ("/v1/embed/text", dict(json={"texts": ["a big blue square"]}))]
  with TestClient(create_app(backend, Settings(max_batch=2))) as c:
    wait_ready(c)
    routes = set(live.get("/v1/info").json()["routes"]) - {"/v1/caption"}   # not exported
    assert set(c.get("/v1/info").json()["routes"]) == routes
    for route, kwargs in requests:
      want, got = live.post(route, **kwargs).json(), c.post(route, **kwargs).json()
      assert got.keys() == want.keys()
      for key in want:
        w, g = _split(want[key]), _split(got[key])
        assert g[0] == w[0], (route, key)                 # names, labels, ids
        np.testing.assert_allclose(g[1], w[1], atol=1e-5)  # scores, embeddings


def _split(value) -> tuple[list, list]:
  """A JSON answer's field -> (its strings and ints, its floats)."""
  if isinstance(value, (str, int)):
    return [value], []
  if value and isinstance(value[0], dict):                 # [{"label", "score"}]
    return [v["label"] for v in value], [v["score"] for v in value]
  if value and isinstance(value[0], str):
    return value, []
  return [], value
