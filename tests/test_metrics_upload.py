"""A gs:// workdir's metrics go up from a background thread (on test_gcs's Cloud Storage
emulator on 127.0.0.1): a slow bucket does not stall `write`, writes coalesce, `close`
waits for the last upload, a failure reaches `close` with the URL, and a run that ends
without `close` still uploads its last rows at exit."""
import logging
import threading
import time

import pytest
from etils import epath

from conftest import run_python
from mmjax.io import storage
from mmjax.train.metrics_writer import MetricWriter, MetricsUploadError, read_metrics
from test_gcs import bucket, endpoint  # noqa: F401  (fixtures)

ROWS = 5


def _uploads(monkeypatch, seconds=0.0, fail=lambda n: False):
  """storage.upload, with metrics.jsonl's slowed by `seconds`, failing on the calls where
  fail(n) (n from 0); returns the list of the remote URLs it was called with."""
  real, calls = storage.upload, []

  def upload(local, remote):
    calls.append(str(remote))
    if remote.name == "metrics.jsonl":
      time.sleep(seconds)
    if fail(len(calls) - 1):
      raise OSError(f"503 Service Unavailable\nretry later ({remote})")
    real(local, remote)
  monkeypatch.setattr(storage, "upload", upload)
  return calls


def _upload_threads():
  return {t for t in threading.enumerate() if t.name.startswith("mmjax-metrics-upload")}


def test_slow_uploads_do_not_stall_writes_and_close_waits_for_the_last(bucket, monkeypatch):
  run = f"{bucket}/slow"
  calls = _uploads(monkeypatch, seconds=2.0)
  writer = MetricWriter(run, resume_step=0)
  thread = writer._uploader._thread
  took = []
  for step in range(1, ROWS + 1):
    start = time.monotonic()
    writer.write(step, {"loss": 1.0 / step})
    took.append(time.monotonic() - start)
  assert max(took) < 1.0, took                 # each upload sleeps 2 s
  writer.close()
  assert [r["step"] for r in read_metrics(run)] == list(range(1, ROWS + 1))
  [events] = list((epath.Path(run) / "tensorboard").iterdir())
  assert b"train/loss" in events.read_bytes()
  # 5 writes and a close: the first upload, then one for everything written during it.
  metrics = [c for c in calls if c.endswith("/metrics.jsonl")]
  assert 1 <= len(metrics) <= 3, calls
  assert not thread.is_alive()


def test_a_failing_final_upload_is_raised_at_close_with_the_url(bucket, monkeypatch,
                                                                caplog):
  run = f"{bucket}/failing"
  _uploads(monkeypatch, fail=lambda n: True)
  writer = MetricWriter(run)
  thread = writer._uploader._thread
  with caplog.at_level(logging.WARNING, logger="mmjax"):
    for step in range(1, ROWS + 1):
      writer.write(step, {"loss": 1.0})            # never raises in the train loop
    with pytest.raises(MetricsUploadError, match=f"to {run}/metrics.jsonl failed: OSError: "
                                                 "503 Service Unavailable") as e:
      writer.close()
  # Warned once (not once per row), naming the file and the URL.
  warned = [r.getMessage() for r in caplog.records if "metrics upload" in r.getMessage()]
  assert len(warned) == 1 and f"{run}/metrics.jsonl" in warned[0], warned
  # The rows the bucket lacks are kept locally, where the message says.
  kept = str(e.value).rsplit("the rows are kept in ", 1)[1]
  assert [r["step"] for r in read_metrics(kept)] == list(range(1, ROWS + 1))
  assert not thread.is_alive()


def test_after_a_failed_run_the_upload_failure_is_logged_not_raised(bucket, monkeypatch,
                                                                   caplog):
  """`close_after_error` (the train loop's way out of a failed run): the run's own error,
  not the upload's, is what propagates; the upload failure is logged with the URL."""
  run = f"{bucket}/failed_run"
  _uploads(monkeypatch, fail=lambda n: True)
  writer = MetricWriter(run)
  thread = writer._uploader._thread
  writer.write(1, {"loss": 1.0})
  with caplog.at_level(logging.ERROR, logger="mmjax"):
    writer.close_after_error()
  errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
  assert len(errors) == 1 and f"{run}/metrics.jsonl" in errors[0], errors
  assert not thread.is_alive()


def test_a_failed_upload_is_retried_by_the_next(bucket, monkeypatch, caplog):
  run = f"{bucket}/flaky"
  _uploads(monkeypatch, seconds=0.2, fail=lambda n: n == 0)
  writer = MetricWriter(run)
  with caplog.at_level(logging.INFO, logger="mmjax"):
    for step in range(1, ROWS + 1):
      writer.write(step, {"loss": 1.0})
      time.sleep(0.1)
    writer.close()                                 # the last upload worked: no error
  assert [r["step"] for r in read_metrics(run)] == list(range(1, ROWS + 1))
  assert any("works again" in r.getMessage() for r in caplog.records)


def test_a_local_workdir_is_written_in_place_without_a_thread(tmp_path, monkeypatch):
  calls, before = _uploads(monkeypatch), _upload_threads()
  writer = MetricWriter(tmp_path)
  writer.write(1, {"loss": 1.0})
  assert _upload_threads() == before and writer._uploader is None
  assert [r["step"] for r in read_metrics(tmp_path)] == [1]
  writer.close()
  assert calls == []


_EXIT_WITHOUT_CLOSE = r'''
import sys, time
from mmjax.io import storage
from mmjax.train.metrics_writer import MetricWriter
real = storage.upload
def slow(local, remote):
  time.sleep(1.0)
  real(local, remote)
storage.upload = slow
writer = MetricWriter(sys.argv[1])
for step in range(1, 4):
  writer.write(step, {'loss': float(step)})
raise SystemExit(1)     # what an exception out of the train loop leaves: no close()
'''


def test_a_process_that_exits_without_close_still_uploads_its_last_rows(bucket):
  run = f"{bucket}/exited"
  # The emulator runs in this process; the child finds it through the environment (and,
  # as the `endpoint` fixture makes this process do, skips google-auth's GCE probe).
  out = run_python(_EXIT_WITHOUT_CLOSE.replace("sys.argv[1]", repr(run)), timeout=120,
                   env={"NO_GCE_CHECK": "true"})
  assert out.returncode == 1, out.stderr[-3000:]
  assert [r["loss"] for r in read_metrics(run)] == [1.0, 2.0, 3.0]
