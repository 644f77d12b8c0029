"""Model calls between processes, for `mmjax serve --workers N`.

N front ends (HTTP, decoding, preprocessing, JSON; a process each, so that they use N
cores) send their rows over a Unix socket to the one model process, which owns the
device and the batchers: rows from every front end are gathered into the same batch.

A frame, either way: a 4-byte big-endian header length, a JSON header, then the raw
bytes (C order) of the arrays the header lists as [dtype, shape]:

  front end -> model   {"id": 7, "op": "run", "fn": "image", "arrays": [["<f4", [1, 32, 32, 3]]]}
  model -> front end   {"id": 7, "arrays": [["<f4", [1, 64]]]}          the rows
                       {"id": 7, "status": 503, "message": "...", "headers": {...}}
                       {"id": 7, "failed": "ValueError", "message": "..."}    the model raised

`op` "hello" answers the model's `ModelInfo` and functions (name -> batch sizes),
"status" its readiness, "metrics" its Prometheus text (rows per call, queue depth).
Both ends are this package's own processes on a socket in a private folder; nothing
here is meant for other clients.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import struct

import numpy as np

from mmjax.deploy.serve.backend import ModelInfo
from mmjax.deploy.serve.inputs import ApiError

log = logging.getLogger(__name__)
_LENGTH = struct.Struct(">I")


class ModelGone(Exception):
  """The model process closed the channel (it stopped or died)."""


class ModelFailed(Exception):
  """The model raised on a batch holding this request's rows (its type and message)."""


def frame(header: dict, arrays=()) -> bytes:
  arrays = [np.ascontiguousarray(a) for a in arrays]
  header = dict(header, arrays=[[a.dtype.str, list(a.shape)] for a in arrays])
  head = json.dumps(header).encode()
  return b"".join([_LENGTH.pack(len(head)), head, *(a.tobytes() for a in arrays)])


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict, list[np.ndarray]]:
  """-> (header, arrays); asyncio.IncompleteReadError at the end of the stream."""
  (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
  header = json.loads(await reader.readexactly(size))
  arrays = []
  for dtype, shape in header.pop("arrays", []):
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    arrays.append(np.frombuffer(await reader.readexactly(count * dtype.itemsize),
                                dtype).reshape(shape))
  return header, arrays


class ModelServer:
  """The model process's end: answers every front end's calls with `service` (app.Service:
  its batchers gather rows across connections)."""

  def __init__(self, service, info: ModelInfo):
    self.service, self.info = service, info
    self._server: asyncio.AbstractServer | None = None
    self._tasks: set[asyncio.Task] = set()
    self._writers: set[asyncio.StreamWriter] = set()

  async def start(self, path: str) -> None:
    self._server = await asyncio.start_unix_server(self._connection, path)

  async def stop(self) -> None:
    """Stop taking connections, answer the calls already received, then close every
    connection (a front end still running sees the model go)."""
    if self._server is not None:
      self._server.close()
    if self._tasks:
      await asyncio.gather(*self._tasks, return_exceptions=True)
    for writer in list(self._writers):
      writer.close()
    if self._server is not None:
      await self._server.wait_closed()

  async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    self._writers.add(writer)
    try:
      while True:
        header, arrays = await read_frame(reader)
        task = asyncio.create_task(self._answer(header, arrays, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
    except (asyncio.IncompleteReadError, ConnectionError):
      pass                                    # the front end closed its end
    finally:
      self._writers.discard(writer)
      writer.close()

  async def _answer(self, header: dict, arrays, writer: asyncio.StreamWriter) -> None:
    reply, out = {"id": header["id"]}, ()
    op = header.get("op", "run")
    if op == "hello":
      reply.update(info=dataclasses.asdict(self.info), functions=self.service.functions)
    elif op == "status":
      reply.update(zip(("ready", "error"), await self.service.status()))
    elif op == "metrics":
      reply["text"] = (await self.service.metrics_text()).decode()
    else:
      try:
        out = (await self.service.run(header["fn"], *arrays),)
      except ApiError as e:
        reply.update(status=e.status, message=e.message, headers=e.headers)
      except Exception as e:  # pylint: disable=broad-except
        reply.update(failed=type(e).__name__, message=str(e))
    if not writer.is_closing():
      writer.write(frame(reply, out))


def hello(path: str, timeout_s: float = 60.0) -> tuple[ModelInfo, dict[str, list[int]]]:
  """(the model's info, its functions' batch sizes), asked once, blocking, at start-up."""
  with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
    s.settimeout(timeout_s)
    s.connect(path)
    s.sendall(frame({"id": 0, "op": "hello"}))
    with s.makefile("rb") as f:
      (size,) = _LENGTH.unpack(f.read(_LENGTH.size))
      header = json.loads(f.read(size))
  info = header["info"]
  info.update(class_names=tuple(info["class_names"]),
              image_size=tuple(info["image_size"]) if info["image_size"] else None)
  return ModelInfo(**info), header["functions"]


class RemoteService:
  """A front end's `Service`: the same interface, its calls answered by the model process
  over one connection (calls in flight are told apart by id)."""

  def __init__(self, path: str, functions: dict[str, list[int]], timeout_s: float):
    self.path, self.timeout_s = path, timeout_s
    self.functions = {name: tuple(sizes) for name, sizes in functions.items()}
    self._writer: asyncio.StreamWriter | None = None
    self._reader_task: asyncio.Task | None = None
    self._pending: dict[int, asyncio.Future] = {}
    self._next_id = 1
    self.on_gone = lambda: None          # called once if the model process goes away

  async def start(self) -> None:
    reader, self._writer = await asyncio.open_unix_connection(self.path)
    self._reader_task = asyncio.create_task(self._read(reader))

  async def stop(self) -> None:
    if self._writer is not None:
      self._writer.close()
    if self._reader_task is not None:
      self._reader_task.cancel()
      await asyncio.gather(self._reader_task, return_exceptions=True)

  async def _read(self, reader: asyncio.StreamReader) -> None:
    try:
      while True:
        header, arrays = await read_frame(reader)
        future = self._pending.pop(header["id"], None)
        if future is not None and not future.done():
          future.set_result((header, arrays))
    except (asyncio.IncompleteReadError, ConnectionError):
      for future in self._pending.values():
        if not future.done():
          future.set_exception(ModelGone("the model process closed the channel"))
      self._pending.clear()
      log.error("the model process closed the channel")
      self.on_gone()

  async def _call(self, header: dict, arrays=()) -> tuple[dict, list[np.ndarray]]:
    if self._reader_task is None or self._reader_task.done():
      raise ApiError(503, "the model process is not answering", {"Retry-After": "1"})
    call_id, self._next_id = self._next_id, self._next_id + 1
    future = asyncio.get_running_loop().create_future()
    self._pending[call_id] = future
    self._writer.write(frame(dict(header, id=call_id), arrays))
    try:
      return await asyncio.wait_for(future, self.timeout_s)
    except asyncio.TimeoutError:
      raise ApiError(504, f"no answer from the model within {self.timeout_s:g} s") from None
    except ModelGone as e:
      raise ApiError(503, str(e), {"Retry-After": "1"}) from None
    finally:
      self._pending.pop(call_id, None)

  async def run(self, name: str, *arrays: np.ndarray) -> np.ndarray:
    header, out = await self._call({"op": "run", "fn": name}, arrays)
    if "status" in header:
      raise ApiError(header["status"], header["message"], header["headers"])
    if "failed" in header:
      raise ModelFailed(f"{header['failed']}: {header['message']}")
    return out[0]

  async def status(self) -> tuple[bool, str]:
    try:
      header, _ = await self._call({"op": "status"})
    except ApiError as e:
      return False, e.message
    return header["ready"], header["error"]

  async def metrics_text(self) -> bytes:
    try:
      header, _ = await self._call({"op": "metrics"})
    except ApiError:
      return b""
    return header["text"].encode()

