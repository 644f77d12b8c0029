"""`mmjax serve`: a FastAPI app over a model's jitted functions with dynamic batching,
limits, Prometheus metrics and a browser page. FastAPI and uvicorn are the `serve` extra,
so this file imports nothing: `mmjax.cli` loads `command` without them.

  from mmjax.deploy.serve.app import Settings, create_app, serve
  from mmjax.deploy.serve.workdir_backend import ModelBackend      # a workdir / HF directory
  from mmjax.deploy.serve.backend import ExportedBackend           # an `mmjax export` directory
  serve(create_app(ModelBackend.from_path("runs/demo"), Settings(max_batch=16)))

Serving an export (`backend` and `app` only) loads no mmjax model code. `mmjax serve
--workers N` (workers.py) answers HTTP in N front-end processes (frontend.py) and runs the
model in one, rows passing over a Unix socket (channel.py).
"""
