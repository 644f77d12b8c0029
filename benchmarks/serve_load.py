"""`mmjax serve` under load: requests/s, latency percentiles, 4xx/5xx and the mean batch,
with dynamic batching on and off, and with a share of malformed requests mixed in.

  .venv/bin/python benchmarks/serve_load.py [--workdir W] [--clients 32] [--seconds 20]
      [--stress-clients 64] [--stress-seconds 60] [--malformed 0.2] [--route embed/image]
      [--http h11,httptools] [--workers 0,2]

Without --workdir, writes an untrained workdir of configs/demo.py's model (its towers,
tokenizer and 32x32 images; throughput does not depend on the weights). Each run starts
`mmjax serve` on a free 127.0.0.1 port in its own process, waits for /readyz, and drives
it from this process with `clients` keep-alive connections (`Connection`: prepared
HTTP/1.1 bytes, light enough to leave the cores to the server), each sending its next
request when the last is answered, for `seconds` (every request bounded by a 30 s
timeout). Good requests cycle through 8 images (or 8 label sets) whose answers were taken
one at a time before the load; every good answer under load must equal its reference
(atol 1e-5). Prints one JSON line per run, then a summary line with the targets: zero
5xx under the stress run, batching on >= 3x the requests/s of batching off. Each run
also measures GET /healthz at the same concurrency (the HTTP stack's ceiling, no model
work), the server's CPU time per answered request during the load (its processes, front
ends included, read from /proc: what batching saves, whatever share of the cores the
server got) and the load generator's own; and the summary the image function alone at
batch 1 and max_batch (rows/s): the most batching can give where the model, not HTTP, is
the bottleneck. The on/off pair runs once per uvicorn HTTP parser in `--http` and per
front-end count in `--workers` (the stress run uses the first of each);
`--stress-seconds 0` skips it.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import pathlib
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (220, 220, 30), (200, 30, 200),
          (30, 200, 200), (120, 120, 120), (250, 250, 250)]
LABELS = ["a small red circle", "a large blue square", "a green triangle",
          "a small yellow circle", "a purple square", "a large cyan triangle"]


def cpu_model() -> str:
  out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  return next((line.split(":", 1)[1].strip() for line in out.splitlines()
               if line.startswith("Model name")), platform.processor())


def demo_workdir(path: pathlib.Path) -> pathlib.Path:
  """An untrained workdir of configs/demo.py (model, data, tokenizer)."""
  import mmjax  # pylint: disable=g-import-not-at-top
  from mmjax.data.tokenizer import get_tokenizer  # pylint: disable=g-import-not-at-top
  from mmjax.io import hf, workdir  # pylint: disable=g-import-not-at-top
  from mmjax.io.loading import special_ids  # pylint: disable=g-import-not-at-top
  from mmjax.train.state import initial_state  # pylint: disable=g-import-not-at-top
  config = mmjax.load_config("demo", ["--config.evals={}"])
  tok = get_tokenizer(config.data)
  model = mmjax.build_model(config, tok.vocab_size, special_ids(tok))
  workdir.write_workdir(path, config, initial_state(config, hf.init_params(model, config)), {},
                        tok)
  return path


def png(color) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (32, 32), color).save(buf, "PNG")
  return buf.getvalue()


def good_requests(route: str) -> list[dict]:
  """8 distinct well-formed bodies (httpx keyword arguments) for `route`."""
  images = [base64.b64encode(png(c)).decode() for c in COLORS]
  if route == "embed/image":
    return [dict(json={"images": [im]}) for im in images]
  if route == "zeroshot":
    return [dict(json={"image": im, "labels": random.Random(i).sample(LABELS, 4)})
            for i, im in enumerate(images)]
  raise SystemExit(f"--route {route}: expected embed/image or zeroshot")


BAD_REQUESTS = [
    dict(content=b'{"images": [', headers={"content-type": "application/json"}),
    dict(content=b'{"texts": ["caf\xe9"]}', headers={"content-type": "application/json"}),
    dict(content=b"x", headers={"content-type": "text/plain"}),
    dict(json={"images": [base64.b64encode(b"not an image").decode()]}),
    dict(json={"images": [base64.b64encode(png((1, 2, 3))[:50]).decode()]}),
    dict(json={"image": "", "labels": []}),
    dict(json={}),
]


def answer(route: str, body: dict):
  """The numbers a good answer is compared on."""
  return body["embeddings"] if route == "embed/image" else body["scores"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_server(workdir, port: int, batching: bool, max_batch: int, http: str, workers: int,
                 log, buckets: str = "") -> subprocess.Popen:
  cmd = [sys.executable, "-m", "mmjax.cli", "serve", "--workdir", str(workdir), "--port",
         str(port), "--max-batch", str(max_batch), "--queue", "1024", "--http", http,
         "--workers", str(workers)]
  if buckets:
    cmd[cmd.index("--max-batch"):cmd.index("--max-batch") + 2] = ["--buckets", buckets]
  if not batching:
    cmd.append("--no-batching")
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                              filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))))
  url, end = f"http://127.0.0.1:{port}", time.time() + 600
  while True:
    if proc.poll() is not None:
      raise SystemExit(f"mmjax serve exited with {proc.returncode}; see {log.name}")
    try:
      if httpx.get(url + "/readyz").status_code == 200:
        return proc
    except httpx.TransportError:
      pass
    if time.time() > end:
      proc.kill()
      raise SystemExit("mmjax serve was not ready within 600 s")
    time.sleep(0.2)


def cpu_seconds(pid: int) -> float:
  """User + system CPU time of process `pid` and its children so far (Linux /proc: the
  front ends of --workers are children of the model process)."""
  total = 0.0
  for p in [pid, *children(pid)]:
    try:
      fields = pathlib.Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
      continue
    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
  return total


def children(pid: int) -> list[int]:
  try:
    kids = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
  except FileNotFoundError:
    return []
  return [int(k) for k in kids]


def mean_batch(metrics: str, function: str) -> float:
  values = {}
  for name in ("sum", "count"):
    m = re.search(rf'mmjax_batch_rows_{name}{{function="{function}"}} (\S+)', metrics)
    values[name] = float(m.group(1)) if m else 0.0
  return values["sum"] / values["count"] if values["count"] else 0.0


def raw_request(method: str, path: str, kwargs: dict | None = None) -> bytes:
  """httpx-style keyword arguments (json= or content= and headers=) -> HTTP/1.1 bytes."""
  kwargs = kwargs or {}
  headers = {k.lower(): v for k, v in kwargs.get("headers", {}).items()}
  if "json" in kwargs:
    body = json.dumps(kwargs["json"]).encode()
    headers.setdefault("content-type", "application/json")
  else:
    body = kwargs.get("content", b"")
  lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1", f"content-length: {len(body)}",
           *(f"{k}: {v}" for k, v in headers.items())]
  return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection:
  """One keep-alive HTTP/1.1 connection sending prepared requests: a load generator that
  costs far less CPU per request than an HTTP library, so that on a small machine the
  server, not the client, gets the cores: 0.07-0.10 ms per embed/image request against
  httpx's AsyncClient's 1.31-1.35 ms, measured in one run (2026-12-01, "AMD EPYC"), when
  the server itself spends 1.5-2.5 ms."""

  def __init__(self, port: int):
    self.port, self.reader, self.writer = port, None, None

  async def send(self, request: bytes) -> tuple[int, bytes]:
    """-> (status, body); reconnects when the server closed the connection."""
    for attempt in range(2):
      if self.writer is None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
      try:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        break
      except (ConnectionError, asyncio.IncompleteReadError):
        self.close()
        if attempt:
          raise
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    fields = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    body = await self.reader.readexactly(int(fields.get("content-length", 0)))
    if fields.get("connection") == "close":
      self.close()
    return status, body

  def close(self):
    if self.writer is not None:
      self.writer.close()
    self.reader = self.writer = None


async def drive(port: int, route: str, clients: int, seconds: float, malformed: float,
                references: list) -> dict:
  goods = [raw_request("POST", f"/v1/{route}", kw) for kw in good_requests(route)]
  bads = [raw_request("POST", f"/v1/{route}", kw) for kw in BAD_REQUESTS]
  # An answer's bytes, once checked against its reference, need not be parsed again.
  checked = [set() for _ in goods]
  latencies, codes, mismatched, transport = [], {}, 0, 0
  end = time.perf_counter() + seconds

  async def one(seed: int):
    nonlocal mismatched, transport
    rng, conn = random.Random(seed), Connection(port)
    while time.perf_counter() < end:
      bad = rng.random() < malformed
      i = rng.randrange(len(goods))
      start = time.perf_counter()
      try:
        status, body = await asyncio.wait_for(conn.send(rng.choice(bads) if bad else goods[i]),
                                              30)
      except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        transport += 1
        conn.close()
        continue
      codes[status] = codes.get(status, 0) + 1
      if not bad:
        latencies.append(time.perf_counter() - start)
        if status != 200:
          mismatched += 1
        elif body not in checked[i]:
          if np.allclose(answer(route, json.loads(body)), references[i], atol=1e-5):
            checked[i].add(body)
          else:
            mismatched += 1
    conn.close()

  cpu, t0 = time.process_time(), time.perf_counter()
  await asyncio.gather(*(one(k) for k in range(clients)))
  elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu
  ms = np.asarray(latencies) * 1000
  return {"requests": sum(codes.values()), "good_requests": len(latencies),
          "rps": round(sum(codes.values()) / elapsed, 1),
          "good_rps": round(len(latencies) / elapsed, 1),
          "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
          "p95_ms": round(float(np.percentile(ms, 95)), 1) if len(ms) else None,
          "p99_ms": round(float(np.percentile(ms, 99)), 1) if len(ms) else None,
          "status_2xx": sum(v for k, v in codes.items() if 200 <= k < 300),
          "status_4xx": sum(v for k, v in codes.items() if 400 <= k < 500),
          "status_5xx": sum(v for k, v in codes.items() if k >= 500),
          "transport_errors": transport, "wrong_answers": mismatched,
          "client_cpu_ms_per_request": round(1000 * cpu / max(sum(codes.values()), 1), 3)}


async def ceiling(port: int, clients: int, seconds: float) -> tuple[float, int]:
  """(requests/s of GET /healthz, transport errors): what the HTTP stack and this load
  generator allow with no model work at all."""
  done, failed, end = 0, 0, time.perf_counter() + seconds
  request = raw_request("GET", "/healthz")

  async def one():
    nonlocal done, failed
    conn = Connection(port)
    while time.perf_counter() < end:
      try:
        await asyncio.wait_for(conn.send(request), 30)
        done += 1
      except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        failed += 1
        conn.close()
    conn.close()

  t0 = time.perf_counter()
  await asyncio.gather(*(one() for _ in range(clients)))
  return round(done / (time.perf_counter() - t0), 1), failed


def model_rows_per_s(workdir, max_batch: int, repeats: int = 40) -> dict:
  """The image function alone, in this process: rows/s at batch 1 and at max_batch (what
  batching can buy at the model, without HTTP), the two sizes called in turn so that they
  share the machine's load alike; the median call and the fastest."""
  from mmjax.deploy.serve.workdir_backend import ModelBackend  # pylint: disable=g-import-not-at-top
  backend = ModelBackend.from_path(workdir)
  fn, size = backend.functions["image"].fn, backend.info.image_size
  xs = {b: np.random.default_rng(0).random((b, *size, 3), np.float32) for b in (1, max_batch)}
  times = {b: [] for b in xs}
  for x in xs.values():
    fn(x)
  for _ in range(repeats):
    for b, x in xs.items():
      t = time.perf_counter()
      fn(x)
      times[b].append(time.perf_counter() - t)
  out = {}
  for b, t in times.items():
    out[f"model_rows_per_s_batch{b}_median"] = round(b / float(np.median(t)), 1)
    out[f"model_rows_per_s_batch{b}_best"] = round(b / min(t), 1)
  return out


def run(workdir, route: str, batching: bool, clients: int, seconds: float, malformed: float,
        max_batch: int, http: str, workers: int, logdir: pathlib.Path,
        buckets: str = "") -> dict:
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  with open(logdir / f"server_{port}.log", "w") as log:
    proc = start_server(workdir, port, batching, max_batch, http, workers, log, buckets)
  try:
    references = [answer(route, httpx.post(f"{url}/v1/{route}", timeout=30, **kw).json())
                  for kw in good_requests(route)]
    cpu = cpu_seconds(proc.pid)
    got = asyncio.run(drive(port, route, clients, seconds, malformed, references))
    got["server_cpu_ms_per_request"] = round(
        1000 * (cpu_seconds(proc.pid) - cpu) / max(got["requests"], 1), 2)
    got["mean_batch"] = round(mean_batch(httpx.get(url + "/metrics").text, "image"), 2)
    got["healthz_rps"], got["healthz_transport_errors"] = asyncio.run(
        ceiling(port, clients, min(seconds, 10)))
  finally:
    proc.terminate()
    proc.wait(60)
  return {"route": route, "batching": batching, "http": http, "workers": workers,
          "buckets": buckets or "powers of two",
          "clients": clients,
          "seconds": seconds, "malformed": malformed, "max_batch": max_batch, **got}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", default=None)
  p.add_argument("--route", default="embed/image", choices=["embed/image", "zeroshot"])
  p.add_argument("--clients", type=int, default=32)
  p.add_argument("--seconds", type=float, default=20)
  p.add_argument("--stress-clients", type=int, default=64)
  p.add_argument("--stress-seconds", type=float, default=60)
  p.add_argument("--malformed", type=float, default=0.2)
  p.add_argument("--max-batch", type=int, default=16)
  p.add_argument("--http", default="auto",
                 help="comma-separated uvicorn HTTP parsers (auto, h11, httptools)")
  p.add_argument("--buckets", default="",
                 help="`mmjax serve --buckets` (its largest replaces --max-batch)")
  p.add_argument("--workers", default="0",
                 help="comma-separated `mmjax serve --workers` counts (0: one process)")
  p.add_argument("--only-stress", action="store_true", help="skip the on/off pairs")
  args = p.parse_args()
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" /
                                                         "jax-compilation-cache"))
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    workdir = args.workdir or demo_workdir(tmp / "demo_untrained")
    common = dict(cpu=cpu_model(), cores=os.cpu_count(),
                  model=str(args.workdir) if args.workdir else "configs/demo.py, untrained")
    summary = {}
    pairs = [(h, int(w)) for h in args.http.split(",") for w in args.workers.split(",")]
    for http, workers in [] if args.only_stress else pairs:
      on, off = (run(workdir, args.route, batching, args.clients, args.seconds, 0.0,
                     args.max_batch, http, workers, tmp, args.buckets)
                 for batching in (True, False))
      for got in (on, off):
        print(json.dumps({**common, **got}), flush=True)
      key = f"{http}_workers{workers}"
      summary[f"speedup_batching_{key}"] = round(on["rps"] / max(off["rps"], 1e-9), 2)
      summary[f"server_cpu_per_request_off_over_on_{key}"] = round(
          off["server_cpu_ms_per_request"] / max(on["server_cpu_ms_per_request"], 1e-9), 2)
    if args.stress_seconds > 0:
      stress = run(workdir, args.route, True, args.stress_clients, args.stress_seconds,
                   args.malformed, args.max_batch, pairs[0][0], pairs[0][1], tmp, args.buckets)
      print(json.dumps({**common, **stress}), flush=True)
      summary.update(stress_5xx=stress["status_5xx"] + stress["transport_errors"],
                     stress_wrong_answers=stress["wrong_answers"])
    model = model_rows_per_s(workdir, args.max_batch)
  print(json.dumps({**summary, "speedup_target": 3.0, **model}))


if __name__ == "__main__":
  main()
