"""Where metrics go: metrics.jsonl (one JSON object per line) and TensorBoard.

Only process 0 writes, so a pod run leaves one copy. `read_metrics` is the one
reader of metrics.jsonl.

A run can be killed at any point (kill -9, power loss, full disk) and resumed
from a checkpoint older than its last rows. So the file may end in a torn line,
and may hold rows past the step a resumed run restarts from: the reader skips
torn lines, and `MetricWriter(workdir, resume_step=S)` drops the rows after S
before the resumed run writes them again.

A remote workdir (gs://...; mmjax.io.storage) cannot be appended to, and tensorboardX
writes only local files without extra packages: the writer keeps both in a local
mirror, starting from the workdir's metrics.jsonl, and uploads metrics.jsonl and this
run's event file whole after each write. The uploads run on one background thread
(`_Uploader`), so a slow bucket never stalls the train loop: writes made while an upload
is under way are coalesced into one more upload of the latest contents. `close` waits
for the final upload. A failed upload is logged (file and URL) and retried with the next
write, never raised in the train loop; if the final one fails, `close` raises
`MetricsUploadError` naming them, as the remote copy then lacks rows. A run that fails
closes its writer on the way out with `close_after_error` (the final upload's failure is
logged, not raised over the run's own error); a process that exits without either still
finishes its last upload, at exit. A local workdir is written in place, with no thread.
"""
from __future__ import annotations

import atexit
import json
import logging
import math
import os
import pathlib
import shutil
import tempfile
import threading
import time
from typing import Iterator, Mapping

import jax

from mmjax.io import storage

log = logging.getLogger("mmjax")

FILENAME = "metrics.jsonl"


class MetricWriter:
  """Appends one row per `write` to <workdir>/metrics.jsonl and TensorBoard.

  resume_step: the step of the checkpoint this run resumes from (0: a run that
    starts from scratch). Rows with step > resume_step, written by a run killed
    after that checkpoint, are dropped from metrics.jsonl, and TensorBoard hides
    its events from resume_step + 1 on, so each step is logged once. Rows at
    resume_step itself (the train window and the evaluation that ran before the
    kill) stay: the resumed run starts at resume_step + 1. None: leave what is
    there and append (rows may repeat steps).
  """

  def __init__(self, workdir: str | pathlib.Path, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0
    self.workdir = storage.as_path(workdir)
    # None for a local workdir, written in place; a local folder for a remote one.
    self._mirror = storage.local_mirror(self.workdir, "metrics") if self.enabled else None
    local = self._mirror or pathlib.Path(self.workdir)
    self.path = local / FILENAME
    self._tb = None
    self._uploader = None
    self._lock = threading.Lock()     # held while the mirror changes (see _Uploader)
    if self.enabled:
      from tensorboardX import SummaryWriter  # heavy import, only on the writer
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if self._mirror and (self.workdir / FILENAME).is_file():
        self.path.write_bytes((self.workdir / FILENAME).read_bytes())
      if resume_step is None:
        _end_torn_line(self.path)
      else:
        _truncate_after(self.path, resume_step)
      # tensorboardX names event files by the second and opens them with "wb": a
      # writer opened in the same second as the last one would overwrite its file.
      # The suffix keeps them apart and sorted in the order written, which
      # TensorBoard relies on to apply purge_step to the older files only.
      self._tb = SummaryWriter(str(local / "tensorboard"),
                               purge_step=None if resume_step is None else resume_step + 1,
                               filename_suffix=f".{time.time_ns()}")
      if self._mirror:
        self._uploader = _Uploader(self._mirror, self.workdir, self._lock)

  def write(self, step: int, metrics: Mapping[str, float], kind: str = "train") -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    with self._lock:
      with self.path.open("a") as f:
        f.write(json.dumps({"step": int(step), "kind": kind, **clean}) + "\n")
      for k, v in clean.items():
        if math.isfinite(v):
          self._tb.add_scalar(f"{kind}/{k}", v, int(step))
      self._tb.flush()
    if self._uploader:
      self._uploader.request()

  def close(self) -> None:
    """Flush TensorBoard and, for a remote workdir, wait for the final upload. Raises
    `MetricsUploadError` if that failed; the local mirror is then kept, and named."""
    if self._tb is None:
      return
    with self._lock:
      self._tb.close()
    self._tb = None
    if self._uploader:
      self._uploader.finish()
    if self._mirror:
      shutil.rmtree(self._mirror, ignore_errors=True)


  def close_after_error(self) -> None:
    """`close` on the way out of a run that failed: the rows so far are flushed and
    uploaded; an upload failure is logged, not raised over the run's own error."""
    try:
      self.close()
    except MetricsUploadError as e:
      log.error("%s", e)


class MetricsUploadError(OSError):
  """The final upload of a remote workdir's metrics failed: the bucket lacks rows (they
  are in the local mirror that the message names)."""


class _Uploader:
  """Copies a local mirror folder to a remote workdir from one daemon thread.

  `request` returns at once; requests made while an upload runs coalesce into one more
  upload of what the mirror holds then. Each upload first copies the mirror to a staging
  folder under `lock` (which the writer holds while it changes the mirror), so the bytes
  sent are whole rows and whole TensorBoard records, and the writer waits at most for
  that local copy, never for the network. `finish` uploads once more and returns when
  that is done, raising if it failed; an exit without it (atexit) does the same, logged.
  """

  def __init__(self, mirror: pathlib.Path, remote, lock: threading.Lock):
    self.mirror, self.remote, self.lock = mirror, remote, lock
    self._staging = pathlib.Path(tempfile.mkdtemp(prefix="mmjax-metrics-upload-"))
    self._wake = threading.Condition()
    self._pending = self._closing = False
    self._error: str | None = None      # the last upload's failure, None after a success
    self._failures = 0                   # uploads failed in a row
    self._thread = threading.Thread(target=self._run, name=f"mmjax-metrics-upload {remote}",
                                    daemon=True)
    self._thread.start()
    atexit.register(self._at_exit)

  def request(self) -> None:
    with self._wake:
      self._pending = True
      self._wake.notify()

  def finish(self) -> None:
    atexit.unregister(self._at_exit)
    with self._wake:
      self._pending = self._closing = True
      self._wake.notify()
    self._thread.join()
    shutil.rmtree(self._staging, ignore_errors=True)
    if self._error:
      raise MetricsUploadError(f"{self._error} ({self._failures} upload(s) failed in a row); "
                               f"the rows are kept in {self.mirror}")

  def _at_exit(self) -> None:
    """The writer was not closed (an exception ended the run): the last rows still go."""
    try:
      self.finish()
    except MetricsUploadError as e:
      log.error("%s", e)
    else:
      shutil.rmtree(self.mirror, ignore_errors=True)

  def _run(self) -> None:
    while True:
      with self._wake:
        while not (self._pending or self._closing):
          self._wake.wait()
        if not self._pending:
          return
        self._pending = False
      self._upload()

  def _upload(self) -> None:
    with self.lock:
      shutil.copytree(self.mirror, self._staging, dirs_exist_ok=True)
    for child in sorted(self._staging.iterdir()):
      url = self.remote / child.name
      try:
        storage.upload(child, url)
      except Exception as e:  # pylint: disable=broad-except  # any client error: retried
        first = str(e).strip().splitlines()
        self._error = (f"metrics upload of {child.name} to {url} failed: "
                       f"{type(e).__name__}: {first[0][:300] if first else ''}")
        if not self._failures:
          log.warning("%s; retried with the next row", self._error)
        self._failures += 1
        return
    if self._failures:
      log.info("metrics upload to %s works again after %d failure(s)", self.remote,
               self._failures)
    self._error, self._failures = None, 0


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """The rows of <workdir>/metrics.jsonl, in file order ([] if there is none).

  Lines that are not a JSON object (a torn last write, a corrupt block) are
  skipped with one warning that names the file and their line numbers.
  """
  path = storage.as_path(workdir) / FILENAME
  if not path.exists():
    return []
  rows, bad = [], []
  for number, _, row in _lines(path.read_bytes()):
    if row is None:
      bad.append(number)
    else:
      rows.append(row)
  if bad:
    shown = ", ".join(map(str, bad[:10])) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
    log.warning("%s: skipped %d unreadable line(s) (torn or corrupt write): line %s", path,
                len(bad), shown)
  return rows


def _lines(data: bytes) -> Iterator[tuple[int, bytes, dict | None]]:
  """(1-based line number, raw line without its newline, parsed row or None if it is
  not a JSON object) for each non-blank line of the file's bytes `data`."""
  for number, raw in enumerate(data.split(b"\n"), 1):
    if not raw.strip():
      continue
    try:
      row = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):   # torn write, NUL/garbage block
      row = None
    yield number, raw, row if isinstance(row, dict) else None


def _end_torn_line(path: pathlib.Path) -> None:
  """Make `path` end with a newline before appending to it.

  A last line without its newline is either a whole row whose newline was lost
  (kept, and ended) or a torn write (dropped: truncated off, so the next row is
  not glued onto it and the file carries no junk line forever).
  """
  if not path.exists() or path.stat().st_size == 0:
    return
  with path.open("r+b") as f:
    f.seek(-1, os.SEEK_END)
    if f.read(1) == b"\n":
      return
    f.seek(0)
    data = f.read()
    start = data.rfind(b"\n") + 1
    tail = data[start:]
    try:
      whole = isinstance(json.loads(tail.decode("utf-8")), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
      whole = False
    if whole:
      f.write(b"\n")
    else:
      log.warning("%s: dropped a torn last line %d (%d bytes) before appending", path,
                  data.count(b"\n") + 1, len(tail))
      f.truncate(start)


def _truncate_after(path: pathlib.Path, step: int) -> None:
  """Rewrite `path` without the rows whose step is > `step` and without unreadable
  lines. Atomic: the new file is written beside it and moved over it, so a crash
  during the rewrite leaves the old file whole."""
  if not path.exists():
    return
  data = path.read_bytes()
  kept, dropped, bad = [], 0, 0
  for _, raw, row in _lines(data):
    if row is None:
      bad += 1
    elif isinstance(row.get("step"), (int, float)) and row["step"] > step:
      dropped += 1
    else:
      kept.append(raw)
  if not dropped and not bad and (not data or data.endswith(b"\n")):
    return
  log.info("%s: resuming at step %d: dropped %d row(s) after it and %d unreadable line(s)",
           path, step, dropped, bad)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    os.fchmod(fd, path.stat().st_mode & 0o777)   # mkstemp's is 0600; keep the file's own
    with os.fdopen(fd, "wb") as f:
      f.write(b"".join(raw + b"\n" for raw in kept))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:   # gone after the replace; left only by a failed write
    pathlib.Path(tmp).unlink(missing_ok=True)
