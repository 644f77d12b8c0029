"""gs:// workdirs, for real, without Google: `mmjax train` into gs://bucket/run on a Cloud
Storage emulator on 127.0.0.1 (gcp-storage-emulator; gcsfs finds it through
STORAGE_EMULATOR_HOST, TensorStore through TENSORSTORE_GCS_HTTP_URL), a resume from its
checkpoint, `mmjax eval` of it; and an endpoint that refuses or denies: one line, exit 2,
in seconds."""
import http.server
import json
import logging
import os
import socket
import threading
import time

import gcsfs
import pytest
from etils import epath
from gcp_storage_emulator.handlers import objects as emulator_objects
from gcp_storage_emulator.server import create_server
from google.auth.compute_engine import _metadata as gce_metadata

from conftest import ROOT, cli
from mmjax.io import storage
from mmjax.train.metrics_writer import read_metrics

TRAIN = ["--config", "demo:tiny", "--config.evals={}", "--config.log_every=5",
         "--config.total_steps=20", "--config.checkpoint_every=10"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _download_with_generation(original):
  """The emulator's object download, plus the generation headers that Cloud Storage always
  sends: without them TensorStore reads generation 0 and OCDBT's conditional writes fail
  ("Malformed StorageGeneration")."""
  def download(request, response, storage_, *args, **kwargs):
    original(request, response, storage_, *args, **kwargs)
    if response.status.value < 300:
      obj = storage_.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = obj["generation"]
      response["x-goog-metageneration"] = obj["metageneration"]
  return download


def _fresh_clients():
  """Forget the gcsfs clients (each holds the endpoint it was made with) and the probes."""
  gcsfs.GCSFileSystem.clear_instance_cache()
  storage._probe.cache_clear()


@pytest.fixture
def endpoint(monkeypatch):
  """Points gcsfs, TensorStore and google-auth at 127.0.0.1: set(url) aims Cloud Storage at
  `url`; the GCE metadata server is a closed local port, so the credential search ends
  at once in anonymous access and nothing leaves the machine. (gcsfs's token="anon"
  would not do: it then asks the bucket's layout over gRPC, retrying for 30 s.)"""
  closed = f"127.0.0.1:{_free_port()}"
  monkeypatch.setenv("GCE_METADATA_HOST", closed)
  monkeypatch.setenv("GCE_METADATA_ROOT", closed)
  monkeypatch.setenv("GCE_METADATA_IP", closed)
  monkeypatch.setattr(gce_metadata, "_NO_GCE_CHECK", True)    # (read once, at its import)

  def set_url(url):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    monkeypatch.setenv("TENSORSTORE_GCS_HTTP_URL", url)
    _fresh_clients()

  yield set_url
  _fresh_clients()


@pytest.fixture
def bucket(endpoint, monkeypatch):
  """gs://bucket on an in-memory emulator."""
  monkeypatch.setattr(emulator_objects, "download",
                      _download_with_generation(emulator_objects.download))
  port = _free_port()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket="bucket")
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
  server.start()
  endpoint(f"http://127.0.0.1:{port}")
  yield "gs://bucket"
  server.stop()


def _no_local_copy():
  # pathlib would have made gs://bucket/run a local folder gs:/bucket/run
  return not (ROOT / "gs:").exists() and not os.path.exists("gs:")


@pytest.mark.slow
def test_train_resume_and_eval_a_gs_workdir(bucket):
  run = f"{bucket}/run"
  first = cli("train", "--workdir", run, *TRAIN, "--config.stop_after=10")
  assert first.returncode == 0, first.stderr[-3000:]
  assert json.loads(first.stdout.splitlines()[-1])["steps"] == 10
  remote = epath.Path(run)
  assert sorted(p.name for p in (remote / "checkpoints").iterdir()) == ["10"]
  for name in ("config.json", "tokenizer.json", "metrics.jsonl", "training.png"):
    assert (remote / name).is_file(), name
  assert list((remote / "tensorboard").iterdir())
  # What a run killed after step 15 (its last checkpoint: 10) leaves behind.
  metrics = remote / "metrics.jsonl"
  metrics.write_text(metrics.read_text() + json.dumps(
      {"step": 15, "kind": "train", "loss": 99.0}) + "\n")

  second = cli("train", "--workdir", run, *TRAIN)
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"resumed from {run}/checkpoints at step 10" in second.stderr
  assert json.loads(second.stdout.splitlines()[-1])["steps"] == 20
  assert sorted(p.name for p in (remote / "checkpoints").iterdir()) == ["10", "20"]
  rows = [r for r in read_metrics(run) if r["kind"] == "train"]
  assert [r["step"] for r in rows] == [5, 10, 15, 20]     # the killed run's row replaced
  assert rows[2]["loss"] != 99.0

  evaluated = cli("eval", "--workdir", run, "--config", "demo:tiny")   # with its evals
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  result = json.loads(evaluated.stdout.splitlines()[-1])
  assert result["step"] == 20
  assert 0.0 <= result["zeroshot_color_acc"] <= 1.0
  assert _no_local_copy()


def test_moving_and_uploading_folders_on_a_bucket(bucket, tmp_path):
  """What setting an unreadable step aside (storage.move) and the metrics mirror
  (storage.upload) do on an object store, which has no folders to rename."""
  step = epath.Path(f"{bucket}/w/checkpoints/7")
  (step / "state").mkdir(parents=True, exist_ok=True)
  (step / "state" / "a").write_text("x")
  (step / "_CHECKPOINT_METADATA").write_text("{}")
  aside = epath.Path(f"{bucket}/w/checkpoints_unreadable/7")
  storage.move(step, aside)
  assert not step.exists()
  assert (aside / "state" / "a").read_text() == "x"
  assert (aside / "_CHECKPOINT_METADATA").read_text() == "{}"
  (tmp_path / "tb").mkdir()
  (tmp_path / "tb" / "events.1").write_bytes(b"\x00\x01")
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
  storage.upload(tmp_path, epath.Path(f"{bucket}/w"))
  assert epath.Path(f"{bucket}/w/tb/events.1").read_bytes() == b"\x00\x01"
  assert read_metrics(f"{bucket}/w") == [{"step": 1}]


class _Denied(http.server.BaseHTTPRequestHandler):
  """Cloud Storage's answer to a caller without credentials."""

  def do_GET(self):
    body = json.dumps({"error": {"code": 401, "message": "Anonymous caller does not have "
                                 "storage.objects.get access to the Google Cloud Storage "
                                 "object."}}).encode()
    self.send_response(401)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


class _QuietServer(http.server.ThreadingHTTPServer):
  """A client that hangs up before the answer is written (gcsfs retries on its own
  schedule) is no error of the server's: nothing goes to the stderr the test reads."""

  def handle_error(self, request, client_address):
    pass


@pytest.fixture
def denying(endpoint):
  server = _QuietServer(("127.0.0.1", 0), _Denied)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  endpoint(f"http://127.0.0.1:{server.server_address[1]}")
  yield
  server.shutdown()


def _one_line_error(result, seconds, limit):
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-2000:]
  assert seconds < limit
  return lines[0]


def test_gs_workdir_without_credentials_is_one_line_exit_2(denying):
  t0 = time.time()
  r = cli("train", "--workdir", "gs://bucket/run", "--config", "demo:tiny")
  line = _one_line_error(r, time.time() - t0, 10)
  assert line.startswith("mmjax train: error: --workdir gs://bucket/run: cannot be read")
  assert "Anonymous caller" in line and "credentials" in line
  assert r.stdout == "" and _no_local_copy()


def test_unreachable_gs_endpoint_fails_in_seconds(endpoint, monkeypatch):
  port = _free_port()          # closed: nothing listens there
  endpoint(f"http://127.0.0.1:{port}")
  monkeypatch.setenv(storage.TIMEOUT_ENV, "2")
  t0 = time.time()
  r = cli("eval", "--workdir", "gs://bucket/run")
  line = _one_line_error(r, time.time() - t0, 8)
  assert line.startswith("mmjax eval: error: --workdir gs://bucket/run: no answer within 2 s")
  assert f"127.0.0.1:{port}" in line       # the last error the client retried on
