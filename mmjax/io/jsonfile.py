"""Reading the JSON files of workdirs and Hugging Face directories, with named errors."""
from __future__ import annotations

import json
import pathlib


def read_json(path: pathlib.Path, what: str) -> dict:
  """The JSON object in `path`; a missing, malformed or non-object file is a one-line
  error that names the file and says what it should hold."""
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file (expected {what})")
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                     f"expected {what}") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected "
                     f"{what}") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path}: holds a JSON {type(value).__name__}; expected {what}")
  return value
