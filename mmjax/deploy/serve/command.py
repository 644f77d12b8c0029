"""`mmjax serve --workdir W | --export DIR [--host 127.0.0.1 --port 8000 ...]`."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from mmjax.deploy.exported import ExportedError
from mmjax.deploy.serve.batching import check_sizes
from mmjax.deploy.serve.backend import ExportedBackend
from mmjax.deploy.serve.workdir_backend import ModelBackend
from mmjax.io import CheckpointMismatch, UnreadableCheckpoint, UnsupportedModel

# A model that cannot be loaded or served: one line, exit 2.
USER_ERRORS = (FileNotFoundError, ValueError, KeyError, CheckpointMismatch,
               UnreadableCheckpoint, UnsupportedModel, ExportedError)


def add_arguments(p: argparse.ArgumentParser) -> None:
  """`mmjax serve`'s flags on the argparse (sub)parser `p`."""
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", metavar="WORKDIR_OR_HF_DIR",
                      help="an mmjax workdir (latest step) or a Hugging Face directory")
  source.add_argument("--export", metavar="DIR", help="an `mmjax export` directory")
  p.add_argument("--step", type=int, default=None, help="with --workdir: checkpoint step")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--port", type=int, default=8000)
  p.add_argument("--max-batch", type=int, default=None,
                 help="rows per model call (default 16); compiled for 1, 2, 4, ..., max-batch")
  p.add_argument("--buckets", default=None, metavar="1,2,3,4,6,8",
                 help="the padded batch sizes to compile instead of powers of two (finer "
                      "sizes pad fewer rows, at a compile each); the largest is --max-batch")
  p.add_argument("--max-wait-ms", type=float, default=5.0,
                 help="how long a batch waits for more requests after its first")
  p.add_argument("--queue", type=int, default=256,
                 help="queued requests per function before answering 503")
  p.add_argument("--timeout-s", type=float, default=30.0,
                 help="per request: to receive its body (408 after), and for the model's "
                      "answer (504 after)")
  p.add_argument("--no-batching", action="store_true",
                 help="one model call per request (for comparison)")
  p.add_argument("--max-request-mb", type=float, default=8.0, help="request body limit")
  p.add_argument("--max-pixels", type=int, default=4096 * 4096, help="per image")
  p.add_argument("--max-labels", type=int, default=64,
                 help="labels, prompts or texts per request")
  p.add_argument("--workers", type=int, default=0,
                 help="HTTP front-end processes, each on a core of its own, sending their "
                      "rows to this process's batchers (0: answer HTTP in this process)")
  p.add_argument("--http", default="auto", choices=("auto", "h11", "httptools"),
                 help="uvicorn's HTTP parser (auto: httptools when installed, else h11)")
  p.add_argument("--no-progress", action="store_true", help=argparse.SUPPRESS)


def _batch_sizes(args) -> tuple[int, tuple[int, ...]]:
  """(max_batch, explicit bucket sizes or ()) from --max-batch and --buckets; a ValueError
  naming the flag."""
  if args.buckets is None:
    return (16 if args.max_batch is None else args.max_batch), ()
  try:
    sizes = check_sizes(int(s) for s in args.buckets.split(","))
  except ValueError as e:
    raise ValueError(f"--buckets={args.buckets}: expected increasing integers >= 1, "
                     f"comma-separated") from e
  if args.max_batch is not None and args.max_batch != sizes[-1]:
    raise ValueError(f"--max-batch={args.max_batch} but the largest of --buckets is "
                     f"{sizes[-1]}: give one of them, or the same most")
  return sizes[-1], sizes


def _problem(args) -> str:
  try:
    max_batch, _ = _batch_sizes(args)
  except ValueError as e:
    return str(e)
  for flag, value, least in (("--max-batch", max_batch, 1), ("--queue", args.queue, 1),
                             ("--max-labels", args.max_labels, 1),
                             ("--max-pixels", args.max_pixels, 1), ("--port", args.port, 0),
                             ("--workers", args.workers, 0)):
    if value < least:
      return f"{flag}={value}: must be >= {least}"
  for flag, value in (("--max-wait-ms", args.max_wait_ms), ("--timeout-s", args.timeout_s),
                      ("--max-request-mb", args.max_request_mb)):
    if not value > 0:
      return f"{flag}={value}: must be > 0"
  if args.http == "httptools" and importlib.util.find_spec("httptools") is None:
    return "--http=httptools: httptools is not installed (pip install httptools)"
  return ""


def main(args) -> int:
  """Load the model, serve until SIGINT/SIGTERM. 2 on a user error, 1 if the server could
  not start (the port is taken)."""
  problem = _problem(args)
  if problem:
    print(f"mmjax serve: error: {problem}", file=sys.stderr)
    return 2
  try:
    # FastAPI and uvicorn are the optional `serve` extra: imported for this command alone,
    # so that every other command runs without them.
    from mmjax.deploy.serve import app as app_lib  # pylint: disable=g-import-not-at-top
    from mmjax.deploy.serve import workers  # pylint: disable=g-import-not-at-top
    from mmjax.deploy.serve.inputs import Limits  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f"mmjax serve: error: {e.name} is not installed; pip install 'mmjax[serve]'",
          file=sys.stderr)
    return 2
  try:
    backend = (ExportedBackend.from_path(args.export) if args.export else
               ModelBackend.from_path(args.workdir, args.step))
  except USER_ERRORS as e:
    if os.environ.get("MMJAX_TRACEBACK"):
      raise
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    print(f"mmjax serve: error: {message}", file=sys.stderr)
    return 2
  limits = Limits(max_request_bytes=int(args.max_request_mb * (1 << 20)),
                  max_pixels=args.max_pixels, max_texts=args.max_labels,
                  body_timeout_s=args.timeout_s)
  max_batch, buckets = _batch_sizes(args)
  settings = app_lib.Settings(max_batch=max_batch, buckets=buckets,
                              max_wait_ms=args.max_wait_ms,
                              queue=args.queue, timeout_s=args.timeout_s,
                              batching=not args.no_batching, limits=limits)
  if args.workers:
    source = workers.Source(workdir=args.workdir, step=args.step, export=args.export)
    try:
      started = workers.serve_workers(backend, settings, source, workers=args.workers,
                                      host=args.host, port=args.port,
                                      graceful_s=args.timeout_s, http=args.http)
    except workers.FrontEndsFailed as e:
      print(f"mmjax serve: error: {e}", file=sys.stderr)
      return 1
  else:
    started = app_lib.serve(app_lib.create_app(backend, settings), args.host, args.port,
                            graceful_s=args.timeout_s, http=args.http)
  if not started:
    print(f"mmjax serve: error: could not listen on {args.host}:{args.port}", file=sys.stderr)
    return 1
  return 0
