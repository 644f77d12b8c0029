"""Deployment: export (jax.export StableHLO, ONNX) and running an export; quantization and
the HTTP server beside them. Import each from its own module (`mmjax.deploy.export`,
`mmjax.deploy.exported`, ...).

This file imports nothing, on purpose: `mmjax.deploy.exported` must load in a process that
never imports mmjax's model code, Flax or Orbax, and importing it runs this file first.
"""
