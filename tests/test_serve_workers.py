"""`mmjax serve --workers N`: HTTP front ends in processes of their own, the model and its
batchers in one process, rows passed over a Unix socket (deploy/serve/channel.py)."""
import asyncio
import concurrent.futures
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from conftest import ROOT, cli, xla_flags
from mmjax.deploy.serve.app import Settings, create_app
from mmjax.deploy.serve.channel import ModelFailed, ModelServer, RemoteService, hello
from mmjax.deploy.serve.backend import ModelInfo
from mmjax.deploy.serve.inputs import ApiError
from mmjax.deploy.serve.workdir_backend import ModelBackend

INFO = ModelInfo(source="fake", embed_dim=3, classify_input="", class_names=("a", "b"),
                 image_size=(4, 4), max_len=8, logit_scale=10.0)


class FakeService:
  """app.Service's interface over numpy, with calls that finish out of order."""
  functions = {"image": [1, 2], "text": [1, 2]}

  async def run(self, name, *arrays):
    if name == "text":
      ids, mask = arrays
      if (ids < 0).any():
        raise ValueError("negative ids")
      await asyncio.sleep(0.05 * float(ids[0, 0] % 3))      # later calls may finish first
      return (ids * mask).astype(np.float32)
    if name == "image":
      raise ApiError(503, "the image queue is full (256 requests)", {"Retry-After": "1"})
    raise ApiError(404, f"no {name}")

  async def status(self):
    return False, "warming up"

  async def metrics_text(self):
    return b"mmjax_ready 0.0\n"


def test_channel_carries_arrays_errors_and_status(tmp_path):
  path = str(tmp_path / "model.sock")

  async def main():
    server = ModelServer(FakeService(), INFO)
    await server.start(path)
    info, functions = await asyncio.to_thread(hello, path)
    assert info == INFO and functions == FakeService.functions
    remote = RemoteService(path, functions, timeout_s=10)
    await remote.start()
    ids = [np.full((1 + i % 2, 8), i, np.int32) for i in range(6)]
    outs = await asyncio.gather(*(remote.run("text", x, np.ones_like(x)) for x in ids))
    for x, out in zip(ids, outs):                          # each call got its own rows back
      assert out.dtype == np.float32 and out.shape == x.shape
      np.testing.assert_array_equal(out, x)
    with pytest.raises(ApiError) as e:
      await remote.run("image", np.zeros((1, 4, 4, 3), np.float32))
    assert (e.value.status, e.value.headers) == (503, {"Retry-After": "1"})
    assert "queue is full" in e.value.message
    with pytest.raises(ModelFailed, match="ValueError: negative ids"):
      await remote.run("text", -np.ones((1, 8), np.int32), np.ones((1, 8), np.int32))
    assert await remote.status() == (False, "warming up")
    assert await remote.metrics_text() == b"mmjax_ready 0.0\n"
    # The model process goes: calls in flight and later ones are 503, the front end is told.
    gone = []
    remote.on_gone = lambda: gone.append(True)
    await server.stop()
    await asyncio.sleep(0.1)
    assert gone == [True]
    with pytest.raises(ApiError) as e:
      await remote.run("text", ids[0], ids[0])
    assert e.value.status == 503 and "not answering" in e.value.message
    await remote.stop()

  asyncio.run(main())


def test_a_front_end_app_answers_through_the_channel(tmp_path, demo_tiny_workdir):
  """The app a front end runs (inputs without weights + RemoteService) answers like the
  app over the model itself."""
  from fastapi.testclient import TestClient  # pylint: disable=g-import-not-at-top
  from mmjax import io as mmjax_io  # pylint: disable=g-import-not-at-top
  from mmjax.deploy.serve.app import Service  # pylint: disable=g-import-not-at-top
  from mmjax.deploy.serve.workdir_backend import WorkdirInputs  # pylint: disable=g-import-not-at-top
  backend = ModelBackend.from_path(demo_tiny_workdir)
  path = str(tmp_path / "model.sock")
  settings = Settings(max_batch=2, max_wait_ms=1)
  request = {"texts": ["a red circle", "a cat"]}
  with TestClient(create_app(backend, settings)) as local:
    while local.get("/readyz").status_code != 200:
      time.sleep(0.05)
    want = local.post("/v1/embed/text", json=request).json()

  loop = asyncio.new_event_loop()
  service = Service(backend, settings)

  async def start():
    await service.start()
    server = ModelServer(service, backend.info)
    await server.start(path)
    return server

  server = loop.run_until_complete(start())
  import threading  # pylint: disable=g-import-not-at-top
  thread = threading.Thread(target=loop.run_forever, daemon=True)
  thread.start()
  try:
    info, functions = hello(path)
    assert info == backend.info
    inputs = WorkdirInputs(mmjax_io.load(demo_tiny_workdir, params=False), info)
    assert inputs.loaded.params is None                        # no weights in a front end
    with TestClient(create_app(inputs, settings, RemoteService(path, functions, 30))) as c:
      end = time.time() + 120
      while c.get("/readyz").status_code != 200:
        assert time.time() < end
        time.sleep(0.05)
      got = c.post("/v1/embed/text", json=request).json()
      np.testing.assert_allclose(got["embeddings"], want["embeddings"], atol=1e-6)
      assert c.get("/v1/info").json()["routes"] == local_routes(backend, settings)
      text = c.get("/metrics").text      # the front end's HTTP counts + the model's batches
      assert 'mmjax_requests_total{route="/v1/embed/text",status="200"} 1.0' in text
      assert re.search(r'mmjax_batch_rows_count\{function="text"\} [1-9]', text), text
  finally:
    asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
    asyncio.run_coroutine_threadsafe(service.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(30)


@pytest.fixture(scope="module")
def demo_tiny_workdir(demo_tiny_run):
  """demo:tiny trained 20 steps: image and text towers, no decoder (nothing slow to
  compile for every batch size)."""
  return demo_tiny_run[0]


def local_routes(backend, settings):
  from fastapi.testclient import TestClient  # pylint: disable=g-import-not-at-top
  with TestClient(create_app(backend, settings)) as c:
    return c.get("/v1/info").json()["routes"]


# --- the real thing: `mmjax serve --workers 2` in a process of its own -------------------

def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def children(pid: int) -> list[int]:
  try:
    return [int(p) for p in
            pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
  except FileNotFoundError:
    return []


def alive(pid: int) -> bool:
  try:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def start(workdir, log: pathlib.Path, *flags) -> tuple[subprocess.Popen, str]:
  port = free_port()
  env = dict(os.environ, XLA_FLAGS=xla_flags(), PYTHONPATH=str(ROOT))
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "mmjax.cli", "serve", "--workdir",
                             str(workdir), "--port", str(port), "--workers", "2", *flags],
                            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
  url, end = f"http://127.0.0.1:{port}", time.time() + 300
  while True:
    assert proc.poll() is None, log.read_text()
    try:
      if httpx.get(url + "/readyz").status_code == 200:
        return proc, url
    except httpx.TransportError:
      pass
    assert time.time() < end, log.read_text()
    time.sleep(0.2)


def test_workers_answer_batch_across_front_ends_survive_a_lost_one_and_drain(
    demo_tiny_workdir, tmp_path):
  backend = ModelBackend.from_path(demo_tiny_workdir)
  texts = [f"a {w} circle" for w in ("red", "blue", "green", "big", "small", "cat", "dog", "x")]
  want = np.asarray(backend.functions["text"].fn(*backend.text_rows(texts)))
  log = tmp_path / "server.log"
  proc, url = start(demo_tiny_workdir, log, "--max-batch", "4", "--max-wait-ms", "300")
  try:
    fronts = children(proc.pid)
    assert len(fronts) == 2, fronts
    post = lambda t: httpx.post(url + "/v1/embed/text", json={"texts": [t]}, timeout=60)
    with concurrent.futures.ThreadPoolExecutor(len(texts)) as pool:
      answers = list(pool.map(post, texts))
    assert [a.status_code for a in answers] == [200] * len(texts)
    np.testing.assert_allclose([a.json()["embeddings"][0] for a in answers], want, atol=1e-5)
    metrics = httpx.get(url + "/metrics").text
    count = lambda name, **labels: float(re.search(
        re.escape(name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}")
        + r" (\S+)", metrics).group(1))
    # Every front end's requests, summed; 8 one-row requests in fewer model calls.
    assert count("mmjax_requests_total", route="/v1/embed/text", status="200") == len(texts)
    assert count("mmjax_batch_rows_sum", function="text") == len(texts)
    assert count("mmjax_batch_rows_count", function="text") < len(texts)

    # A front end that dies is replaced; the server keeps answering.
    os.kill(fronts[0], signal.SIGKILL)
    end = time.time() + 60
    while not (len(children(proc.pid)) == 2 and fronts[0] not in children(proc.pid)):
      assert time.time() < end, log.read_text()
      time.sleep(0.1)
    assert all(post(t).status_code == 200 for t in texts[:4])

    # SIGTERM: a request waiting for company in the batcher is still answered, then all exit.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
      answer = pool.submit(httpx.post, url + "/v1/embed/text", json={"texts": ["a cat"]},
                           timeout=60)
      end = time.time() + 30
      while 'mmjax_queue_depth{function="text"} 1.0' not in httpx.get(url + "/metrics").text:
        assert time.time() < end and not answer.done(), "the request never queued"
        time.sleep(0.01)
      fronts = children(proc.pid)
      proc.send_signal(signal.SIGTERM)
      assert answer.result().status_code == 200
    assert proc.wait(60) == 0, log.read_text()
    assert not any(alive(p) for p in fronts), log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()
  finally:
    if proc.poll() is None:
      proc.kill()


def test_front_ends_exit_when_the_model_process_is_killed(demo_tiny_workdir, tmp_path):
  log = tmp_path / "server.log"
  proc, _ = start(demo_tiny_workdir, log, "--max-batch", "1")
  fronts = children(proc.pid)
  assert len(fronts) == 2
  proc.kill()
  proc.wait()
  end = time.time() + 60
  while any(alive(p) for p in fronts):
    assert time.time() < end, f"front ends {fronts} outlived their model process"
    time.sleep(0.1)


def test_cli_workers_must_not_be_negative(tmp_path):
  r = cli("serve", "--workdir", str(tmp_path), "--workers", "-1")
  assert r.returncode == 2 and "--workers=-1: must be >= 0" in r.stderr


def test_front_ends_that_keep_dying_stop_the_server(tmp_path):
  from mmjax.deploy.serve.workers import FrontEndsFailed, _FrontEnds  # pylint: disable=g-import-not-at-top
  with socket.socket() as sock:
    fronts = _FrontEnds([sys.executable, "-c", "import sys; sys.exit(3)"], sock, dict(os.environ))
    fronts.start()
    with pytest.raises(FrontEndsFailed, match=r"exited 3 times in a row .* \(the last with 3\)"):
      for _ in range(10):
        fronts.procs[0].wait(30)
        fronts.replace_dead()                      # the first two failures start another
    assert fronts.failed_starts == 3
