"""Where built data (pre-rendered images, trained tokenizers) is kept on disk."""

import hashlib
import json
import os
import pathlib


def cache_root(data) -> pathlib.Path:
  """`data.cache_dir`, else $MMJAX_CACHE, else ~/.cache/mmjax."""
  root = data.get('cache_dir', '') or os.environ.get('MMJAX_CACHE', '')
  return pathlib.Path(root or '~/.cache/mmjax').expanduser()


def cache_key(params: dict) -> str:
  """A short stable hash of every parameter that changes the cached content."""
  text = json.dumps(params, sort_keys=True, default=list)
  return hashlib.sha256(text.encode()).hexdigest()[:16]
