"""`mmjax serve --workers N`: this process runs the model; N front-end processes answer HTTP.

One Python process answers HTTP on one core: parsing, decoding images, preprocessing and
writing JSON cost it more per request than a small model's batched call costs per row, so
its batcher rarely sees more than a few requests at once. With N front ends that work
spreads over N cores, while every model call still runs here, gathered across all of them
(channel.py): one copy of the weights, one owner of the accelerator.

This process binds the listening socket and hands it to every front end (they accept on
it in turn); serves the batchers on a Unix socket in a private folder; starts a new front
end when one dies (and gives up when they keep dying); and on SIGINT/SIGTERM stops the
front ends (each finishes its requests in flight, which the model here still answers),
then drains the batchers and returns.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from mmjax.deploy.serve.app import Settings, Service
from mmjax.deploy.serve.channel import ModelServer
from mmjax.deploy.serve.metrics import MULTIPROC_DIR

log = logging.getLogger(__name__)
# A front end that exits within this many seconds of its start counts as a failed start;
# after this many failed starts in a row the server stops (it would only spin).
FAILED_START_S, MOST_FAILED_STARTS = 60.0, 3


class FrontEndsFailed(Exception):
  """The front ends kept exiting right after they started."""


@dataclasses.dataclass(frozen=True)
class Source:
  """What the front ends load their preprocessing and tokenizer from (no weights)."""
  workdir: str | None = None
  step: int | None = None
  export: str | None = None


def listen(host: str, port: int) -> socket.socket | None:
  """The server's listening socket (None when host:port cannot be bound)."""
  try:
    sock = socket.create_server((host, port), backlog=2048)
  except OSError as e:
    log.error("could not listen on %s:%d: %s", host, port, e)
    return None
  sock.set_inheritable(True)
  return sock


def serve_workers(backend, settings: Settings, source: Source, *, workers: int,
                  host: str = "127.0.0.1", port: int = 8000, graceful_s: float = 30.0,
                  http: str = "auto") -> bool:
  """Serve `backend` with `workers` front ends until SIGINT/SIGTERM, then drain: True; False
  when host:port could not be bound; FrontEndsFailed when the front ends kept dying."""
  sock = listen(host, port)
  if sock is None:
    return False
  with sock:
    asyncio.run(_run(backend, settings, source, sock, workers, graceful_s, http))
  return True


class _FrontEnds:
  """The front-end processes: started, restarted, stopped."""

  def __init__(self, command: list[str], sock: socket.socket, env: dict):
    self.command, self.sock, self.env = command, sock, env
    self.procs: list[subprocess.Popen] = []
    self.started: list[float] = []
    self.failed_starts = 0

  def start(self, i: int | None = None) -> None:
    # A session of its own: a terminal's Ctrl-C reaches this process only, which then
    # stops the front ends once (uvicorn takes a second signal as "abort now").
    proc = subprocess.Popen(self.command, pass_fds=(self.sock.fileno(),), env=self.env,
                            start_new_session=True)
    if i is None:
      self.procs.append(proc)
      self.started.append(time.monotonic())
    else:
      self.procs[i], self.started[i] = proc, time.monotonic()

  def replace_dead(self) -> None:
    """Start a new front end for each that exited; FrontEndsFailed once they keep failing."""
    for i, proc in enumerate(self.procs):
      if proc.poll() is None:
        continue
      quick = time.monotonic() - self.started[i] < FAILED_START_S
      self.failed_starts = self.failed_starts + 1 if quick else 0
      if self.failed_starts >= MOST_FAILED_STARTS:
        raise FrontEndsFailed(f"front ends exited {self.failed_starts} times in a row within "
                              f"{FAILED_START_S:g} s of starting (the last with "
                              f"{proc.returncode}); see their log above")
      log.warning("front end %d (pid %d) exited with %s; starting another", i, proc.pid,
                  proc.returncode)
      self.start(i)

  def stop(self, wait_s: float) -> None:
    """SIGTERM each (it drains its requests in flight), then wait; kill what is left."""
    for proc in self.procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + wait_s
    for proc in self.procs:
      try:
        proc.wait(max(0.0, end - time.monotonic()))
      except subprocess.TimeoutExpired:
        log.error("front end pid %d did not stop within %g s; killing it", proc.pid, wait_s)
        proc.kill()
        proc.wait()


async def _run(backend, settings: Settings, source: Source, sock: socket.socket, workers: int,
               graceful_s: float, http: str) -> None:
  loop = asyncio.get_running_loop()
  stop = asyncio.Event()
  for sig in (signal.SIGINT, signal.SIGTERM):
    loop.add_signal_handler(sig, stop.set)
  service = Service(backend, settings)
  await service.start()                          # warm-up compiles in the background
  folder = pathlib.Path(tempfile.mkdtemp(prefix="mmjax-serve-"))
  channel = str(folder / "model.sock")
  server = ModelServer(service, backend.info)
  await server.start(channel)
  (folder / "metrics").mkdir()
  config = dict(fd=sock.fileno(), channel=channel, source=dataclasses.asdict(source),
                settings=dataclasses.asdict(settings), graceful_s=graceful_s, http=http)
  # Front ends never touch the accelerator: this process owns it.
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{MULTIPROC_DIR: str(folder / "metrics")})
  fronts = _FrontEnds([sys.executable, "-m", "mmjax.deploy.serve.frontend", json.dumps(config)],
                      sock, env)
  try:
    for _ in range(workers):
      fronts.start()
    log.info("%d front ends on %s, the model in pid %d", workers, sock.getsockname(),
             os.getpid())
    while not stop.is_set():
      try:
        await asyncio.wait_for(stop.wait(), 0.5)
      except asyncio.TimeoutError:
        fronts.replace_dead()
  finally:
    # The front ends first, while the model still answers their requests in flight.
    await loop.run_in_executor(None, fronts.stop, graceful_s + 10)
    await server.stop()
    await service.stop()
    shutil.rmtree(folder, ignore_errors=True)
