"""Prometheus metrics of one server, in a registry of its own (two apps in one process
never share counts): requests by route and status, latency by route, rows per model call
and queued requests per function."""
from __future__ import annotations

import time

import prometheus_client as prom

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:

  def __init__(self):
    self.registry = prom.CollectorRegistry()
    self.requests = prom.Counter("mmjax_requests", "HTTP requests answered",
                                 ("route", "status"), registry=self.registry)
    self.latency = prom.Histogram("mmjax_request_seconds", "time to answer a request",
                                  ("route",), registry=self.registry)
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

  def __init__(self, app, metrics: Metrics):
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
