"""The tokenizer of a Hugging Face model directory, as an mmjax `Tokenizer`.

tokenizer.json, a BERT vocab.txt, or GPT-2's vocab.json + merges.txt (see
`mmjax.data.tokenizer.load_tokenizer`); a GPT-2 vocabulary gives a `CausalTokenizer`.
"""
from __future__ import annotations

import pathlib

from mmjax.data.tokenizer import CausalTokenizer, Tokenizer, load_tokenizer

__all__ = ["CausalTokenizer", "hf_tokenizer"]

_FILES = (("tokenizer.json",), ("vocab.txt",), ("vocab.json", "merges.txt"))


def hf_tokenizer(directory) -> Tokenizer | None:
  """The directory's tokenizer, or None when it has no tokenizer files."""
  directory = pathlib.Path(directory)
  if any(all((directory / f).is_file() for f in files) for files in _FILES):
    return load_tokenizer(directory)
  return None
