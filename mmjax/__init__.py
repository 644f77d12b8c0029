"""mmjax: multimodal models in JAX/Flax.

The names below are imported on first use (PEP 562): `import mmjax` alone loads no model
code, Flax or Orbax, so that `mmjax.load_exported(DIR)` runs an exported model in a process
that never imports them. A new top-level name is one line in `_API`.
"""
import importlib
import sys
import types

__version__ = "0.1.0"

# name -> the module that defines it
_API = {
    "load_config": "mmjax.config",
    "build_model": "mmjax.models",
    "from_pretrained": "mmjax.io", "load": "mmjax.io", "save_pretrained": "mmjax.io",
    "train": "mmjax.train.loop", "evaluate": "mmjax.train.loop",
    "finetune": "mmjax.train.loop", "restore": "mmjax.train.loop",
    "load_exported": "mmjax.deploy.exported",
    "generate": "mmjax.generate.run",
}
__all__ = sorted(_API)


def __getattr__(name: str):
  if name in _API:
    value = getattr(importlib.import_module(_API[name]), name)
  else:   # a subpackage not imported yet (`mmjax.io.trees` after a bare `import mmjax`)
    try:
      value = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
      if e.name != f"{__name__}.{name}":
        raise
      raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
  globals()[name] = value
  return value


def __dir__():
  return sorted({*globals(), *_API})


class _Package(types.ModuleType):
  """Importing `mmjax.train.loop` binds the subpackage as `mmjax.train`; the API's function
  of that name wins, as it did when this file imported it eagerly."""

  def __setattr__(self, name, value):
    if name in _API and isinstance(value, types.ModuleType):
      return
    super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
