"""Where a workdir lives: a local folder or a URL (gs://bucket/run, s3://...).

Every reader and writer of a workdir takes `as_path(workdir)`, an `etils.epath.Path`:
the local filesystem for a plain path, fsspec for a URL (gs:// through gcsfs, which must
be installed). Orbax takes the same paths, and TensorStore writes the checkpoint arrays
to the bucket itself. Without TensorFlow installed, epath serves gs:// through fsspec
(etils/epath/gpath.py); with it, through tf.io.gfile.

Object stores cannot append: files a run appends to (metrics.jsonl, TensorBoard events)
are kept in a local mirror and uploaded whole after each write
(mmjax.train.metrics_writer).

A remote workdir is probed once per process (`check`) before anything is built: an
unreachable endpoint, missing credentials or a missing bucket is a one-line
`RemoteUnreachable` naming the URL, within `timeout_s()` seconds, instead of the minute
of retries (and the stack traces in the log) the client libraries would spend on it.
"""
from __future__ import annotations

import functools
import logging
import os
import pathlib
import shutil
import tempfile
import threading

import fsspec
from etils import epath

TIMEOUT_ENV = "MMJAX_REMOTE_TIMEOUT"   # seconds a first answer from a remote workdir may take
_DEFAULT_TIMEOUT_S = 20.0


class RemoteUnreachable(OSError):
  """A workdir URL that cannot be read: no answer, no credentials, no bucket."""


def is_remote(path) -> bool:
  return "://" in os.fspath(path)


def as_path(path) -> epath.Path:
  """`path` as an epath.Path: a URL stays a URL (pathlib would turn gs://b/x into a local
  "gs:/b/x", lost with the VM); a local path is made absolute, with ~ expanded."""
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def resolve(path) -> pathlib.Path | epath.Path:
  """A URL as an epath.Path; a local path as an absolute pathlib.Path, ~ expanded (what
  the readers of a local workdir have always been given)."""
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return pathlib.Path(path).expanduser().absolute()


def timeout_s() -> float:
  value = os.environ.get(TIMEOUT_ENV, "")
  try:
    return float(value) if value else _DEFAULT_TIMEOUT_S
  except ValueError:
    raise ValueError(f"{TIMEOUT_ENV}={value!r}: expected a number of seconds") from None


class _LastError(logging.Handler):
  """Keeps the last retry message of a client library (gcsfs logs each failed try)."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.message = ""

  def emit(self, record: logging.LogRecord) -> None:
    self.message = record.getMessage().splitlines()[0][:300]


def _hint(path: epath.Path, e: BaseException) -> str:
  text = str(e).strip().splitlines()
  first = f"{type(e).__name__}: {text[0][:300] if text else ''}"
  if "gcsfs" in first or "gcsfs" in repr(e) or (isinstance(e, ImportError)
                                                 and str(path).startswith("gs://")):
    return f"{first}; gs:// workdirs need gcsfs (pip install gcsfs)"
  lowered = first.lower()
  if any(w in lowered for w in ("401", "403", "forbidden", "credential", "anonymous",
                                 "permission", "unauthorized")):
    return (f"{first}; check the credentials (gcloud auth application-default login, or "
            f"GOOGLE_APPLICATION_CREDENTIALS) and their access to the bucket")
  return first


@functools.lru_cache(maxsize=None)
def _probe(url: str, seconds: float) -> None:
  path = epath.Path(url)
  outcome: dict = {}

  def run():
    try:
      outcome["exists"] = path.exists()
    except BaseException as e:  # any client error; reported below in one line
      outcome["error"] = e

  # The client libraries log each retry (and a stack trace when they give up): hold those
  # records back and keep the last one for the message.
  loggers = [logging.getLogger(name) for name in ("gcsfs", "fsspec", "s3fs", "google.auth")]
  saved = [(lg.level, lg.propagate) for lg in loggers]
  last = _LastError()
  for lg in loggers:
    lg.addHandler(last)
    lg.setLevel(logging.DEBUG)
    lg.propagate = False
  try:
    # A daemon thread: a client still retrying after the deadline does not keep the
    # process alive.
    worker = threading.Thread(target=run, name=f"mmjax-probe {url}", daemon=True)
    worker.start()
    worker.join(seconds)
  finally:
    for lg, (level, propagate) in zip(loggers, saved):
      lg.removeHandler(last)
      lg.setLevel(level)
      lg.propagate = propagate
  if worker.is_alive():
    since = f" (last error: {last.message})" if last.message else ""
    raise RemoteUnreachable(f"{url}: no answer within {seconds:g} s{since}; check the "
                            f"network, the endpoint and the credentials ({TIMEOUT_ENV} "
                            f"sets the wait)")
  if "error" in outcome:
    raise RemoteUnreachable(f"{url}: cannot be read: {_hint(path, outcome['error'])}")


def check(path, what: str = "workdir") -> None:
  """Nothing for a local path; for a URL, one request that must answer (the path need
  not exist) within `timeout_s()`, else a one-line `RemoteUnreachable` naming `what`.
  A success is remembered for the rest of the process."""
  if not is_remote(path):
    return
  try:
    _probe(os.fspath(path), timeout_s())
  except RemoteUnreachable as e:
    raise RemoteUnreachable(f"{what} {e}") from None


def local_mirror(path: epath.Path, name: str) -> pathlib.Path | None:
  """None for a local `path`; for a remote one, a fresh local folder to stage the files
  that are appended to (an object store has no append), named after `name`."""
  if not is_remote(path):
    return None
  return pathlib.Path(tempfile.mkdtemp(prefix=f"mmjax-{name}-"))


def upload(local: pathlib.Path, remote: epath.Path) -> None:
  """Copy the file or folder `local` to `remote`, replacing what is there."""
  if local.is_dir():
    remote.mkdir(parents=True, exist_ok=True)
    for child in local.iterdir():
      upload(child, remote / child.name)
  else:
    remote.write_bytes(local.read_bytes())


def move(src: epath.Path, dst: epath.Path) -> None:
  """Move the file or folder `src` to `dst` (absent), on one filesystem. An object store
  has no folders to rename: its objects are copied on the server, then deleted (epath's
  rename wants dst's parent folder to exist)."""
  if not is_remote(src):
    shutil.move(os.fspath(src), os.fspath(dst))
    return
  fs, src_path = fsspec.core.url_to_fs(os.fspath(src))
  fs.copy(src_path, fs._strip_protocol(os.fspath(dst)), recursive=True)
  fs.rm(src_path, recursive=True)
