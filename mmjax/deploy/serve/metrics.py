"""Prometheus metrics of one server, in registries of their own (two apps in one process
never share counts).

`HttpMetrics` (requests by route and status, latency by route) live where HTTP is
answered; `ModelMetrics` (rows per model call, queued requests per function, readiness)
where the batchers run. In one process that is the same place. Under `mmjax serve
--workers N` the front ends' HTTP metrics are summed across processes by
prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set for them by the
model process) and the model's come from the model process over the channel.
"""
from __future__ import annotations

import os
import time

import prometheus_client as prom
from prometheus_client import multiprocess

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"


class HttpMetrics:

  def __init__(self):
    self.registry = prom.CollectorRegistry()
    self.requests = prom.Counter("mmjax_requests", "HTTP requests answered",
                                 ("route", "status"), registry=self.registry)
    self.latency = prom.Histogram("mmjax_request_seconds", "time to answer a request",
                                  ("route",), registry=self.registry)

  def text(self) -> bytes:
    """This process's counts, or every front end's summed (multiprocess mode)."""
    if os.environ.get(MULTIPROC_DIR):
      registry = prom.CollectorRegistry()
      multiprocess.MultiProcessCollector(registry)
      return prom.generate_latest(registry)
    return prom.generate_latest(self.registry)


class ModelMetrics:

  def __init__(self):
    self.registry = prom.CollectorRegistry()
    self.batch_size = prom.Histogram("mmjax_batch_rows", "real rows per model call",
                                     ("function",), buckets=ROW_BUCKETS, registry=self.registry)
    self.queue_depth = prom.Gauge("mmjax_queue_depth", "requests waiting for a model call",
                                  ("function",), registry=self.registry)
    self.ready = prom.Gauge("mmjax_ready", "1 once every batch size is compiled",
                            registry=self.registry)

  def text(self) -> bytes:
    return prom.generate_latest(self.registry)


class MetricsMiddleware:
  """ASGI middleware counting every HTTP answer under its route's template (unmatched
  paths under "other", so a scan of random URLs cannot grow the label set)."""

  def __init__(self, app, metrics: HttpMetrics):
    self.app, self.metrics = app, metrics

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    start, status = time.perf_counter(), [500]

    async def send_status(message):
      if message["type"] == "http.response.start":
        status[0] = message["status"]
      await send(message)

    try:
      await self.app(scope, receive, send_status)
    finally:
      route = getattr(scope.get("route"), "path", "other")
      self.metrics.requests.labels(route, str(status[0])).inc()
      self.metrics.latency.labels(route).observe(time.perf_counter() - start)
