"""Dynamic batching: concurrent requests' rows gathered into one call of a jitted function.

A request submits its rows (a tuple of arrays with a leading row axis); one collector
task per function takes queued requests until `max_batch` rows or `max_wait_s` after the
first, pads the rows to the next bucket size by repeating the last one, and runs the
function on the shared model thread. A bucket is a shape the function was compiled for
at warm-up, so traffic never triggers a compile.

The queue is bounded (`Overloaded` when full); a request that outlives `timeout_s` is
answered `TimedOut` and its rows are dropped if they have not been run yet. `stop()`
finishes every request queued before it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from typing import Callable, Sequence

import numpy as np

Arrays = tuple[np.ndarray, ...]


class Overloaded(Exception):
  """The queue is full (or the server is stopping): retry later."""


class TimedOut(Exception):
  """A request waited longer than its timeout."""


def buckets(max_batch: int) -> tuple[int, ...]:
  """Padded batch sizes: powers of two below `max_batch`, and `max_batch`."""
  if max_batch < 1:
    raise ValueError(f"max_batch={max_batch}: must be >= 1")
  sizes, b = [], 1
  while b < max_batch:
    sizes.append(b)
    b *= 2
  return (*sizes, max_batch)


def check_sizes(sizes) -> tuple[int, ...]:
  """Explicit bucket sizes: increasing positive integers; the last is the most rows a call
  takes."""
  sizes = tuple(int(s) for s in sizes)
  if not sizes or sizes[0] < 1 or any(a >= b for a, b in zip(sizes, sizes[1:])):
    raise ValueError(f"batch sizes {','.join(map(str, sizes))}: expected increasing "
                     f"integers >= 1")
  return sizes


def pad_to(arrays: Arrays, size: int) -> Arrays:
  """Rows [n, ...] -> [size, ...], the last row repeated (a real input, never NaN-prone)."""
  n = len(arrays[0])
  if n == size:
    return arrays
  return tuple(np.concatenate([a, np.repeat(a[-1:], size - n, axis=0)]) for a in arrays)


@dataclasses.dataclass
class _Job:
  arrays: Arrays
  future: asyncio.Future

  @property
  def rows(self) -> int:
    return len(self.arrays[0])


class Batcher:
  """Runs `fn(*arrays) -> np.ndarray [B, ...]` on batches gathered from `submit` calls.

  fn: takes arrays whose leading dim is one of `buckets(max_batch)`; runs on `executor`
    (one thread: calls on the device are serialised, the event loop stays free).
  example: one row of each input (leading dim 1), for warm-up.
  gather: False answers each request with its own call (dynamic batching off).
  sizes: the padded batch sizes (default `buckets(max_batch)`); their largest is max_batch.
    Finer sizes waste fewer padded rows where a call's cost grows with its rows (a CPU),
    at one compile each.
  on_batch(rows, bucket), on_depth(queued): metrics hooks.
  """

  def __init__(self, name: str, fn: Callable[..., np.ndarray], example: Arrays, *,
               executor: concurrent.futures.Executor, max_batch: int = 16,
               max_wait_s: float = 0.005, queue_size: int = 256, gather: bool = True,
               sizes: Sequence[int] = (),
               on_batch: Callable[[int, int], None] = lambda rows, bucket: None,
               on_depth: Callable[[int], None] = lambda queued: None):
    self.name, self.fn, self.example = name, fn, example
    self.sizes = check_sizes(sizes) if sizes else buckets(max_batch)
    self.executor, self.max_batch, self.max_wait_s = executor, self.sizes[-1], max_wait_s
    self.queue_size, self.gather = queue_size, gather
    self.on_batch, self.on_depth = on_batch, on_depth
    self._queue: asyncio.Queue[_Job | None] | None = None
    self._task: asyncio.Task | None = None
    self._carry: _Job | None = None     # taken from the queue, did not fit the last batch
    self._waiting = 0                   # jobs submitted and not yet running (queued or gathered)
    self._stopping = False

  def bucket(self, rows: int) -> int:
    return next(b for b in self.sizes if b >= rows)

  def warm_up(self) -> None:
    """Compile every bucket (blocking; call on the executor's thread)."""
    for size in self.sizes:
      self.fn(*pad_to(self.example, size))

  def start(self) -> None:
    self._queue = asyncio.Queue()
    self._task = asyncio.get_running_loop().create_task(self._collect(), name=self.name)

  async def stop(self) -> None:
    """Answer everything queued so far, then end the collector."""
    if self._task is None:
      return
    self._stopping = True
    self._queue.put_nowait(None)
    await self._task
    self._task = None

  @property
  def depth(self) -> int:
    """Requests (or chunks of max_batch rows) waiting for a model call."""
    return self._waiting

  async def submit(self, *arrays: np.ndarray, timeout_s: float | None = None) -> np.ndarray:
    """Rows [n, ...] of each input -> fn's output rows [n, ...], in order."""
    if self._task is None or self._stopping:
      raise Overloaded(f"the {self.name} batcher is not running (server starting or stopping)")
    n = len(arrays[0])
    chunks = [tuple(a[i:i + self.max_batch] for a in arrays) for i in range(0, n, self.max_batch)]
    if self._waiting + len(chunks) > self.queue_size:
      raise Overloaded(f"the {self.name} queue is full ({self.queue_size} requests)")
    loop = asyncio.get_running_loop()
    jobs = [_Job(c, loop.create_future()) for c in chunks]
    for job in jobs:
      self._queue.put_nowait(job)
    self._waiting += len(jobs)
    self.on_depth(self._waiting)
    try:
      outs = await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs)), timeout_s)
    except asyncio.TimeoutError:
      raise TimedOut(f"no answer from the model within {timeout_s:g} s") from None
    return np.concatenate(outs)

  async def _next_batch(self) -> tuple[list[_Job], bool]:
    """(jobs whose rows fit in one call, whether the stop marker was reached)."""
    first = self._carry or await self._queue.get()
    self._carry = None
    if first is None:
      return [], True
    jobs, rows = [first], first.rows
    loop = asyncio.get_running_loop()
    deadline = loop.time() + self.max_wait_s
    while self.gather and rows < self.max_batch:
      try:
        job = self._queue.get_nowait()
      except asyncio.QueueEmpty:
        left = deadline - loop.time()
        if left <= 0:
          break
        try:
          job = await asyncio.wait_for(self._queue.get(), left)
        except asyncio.TimeoutError:
          break
      if job is None:
        return jobs, True
      if rows + job.rows > self.max_batch:
        self._carry = job
        break
      jobs.append(job)
      rows += job.rows
    return jobs, False

  async def _collect(self) -> None:
    loop = asyncio.get_running_loop()
    while True:
      jobs, stop = await self._next_batch()
      self._waiting -= len(jobs)
      self.on_depth(self._waiting)
      jobs = [j for j in jobs if not j.future.done()]       # timed out while queued
      if jobs:
        await self._run(loop, jobs)
      if stop and self._carry is None:
        return

  async def _run(self, loop, jobs: Sequence[_Job]) -> None:
    rows = sum(j.rows for j in jobs)
    size = self.bucket(rows)
    try:
      inputs = pad_to(tuple(np.concatenate(parts) for parts in zip(*(j.arrays for j in jobs))),
                      size)
      out = await loop.run_in_executor(self.executor, self.fn, *inputs)
    except Exception as e:  # pylint: disable=broad-except
      # Rows that do not stack, or a model that failed on this batch: each of its requests
      # gets the error, and the collector lives on for the next batch (were it to die,
      # every later request would wait for its timeout).
      for j in jobs:
        if not j.future.done():
          j.future.set_exception(e)
      return
    self.on_batch(rows, size)
    start = 0
    for j in jobs:
      if not j.future.done():
        j.future.set_result(out[start:start + j.rows])
      start += j.rows
