"""`build_source(data, split)`: a random-access source of example dicts, chosen by `data.name`;
`Sources`: each one built once per run and shared."""

import importlib

from mmjax.data.errors import DataError

# data.name -> the module whose `build(data, split)` makes that source, and whose
# CORPUS_FIELDS name the data.* fields that change its captions (the tokenizer cache key).
# Imported by name on first use, so a spawned grain worker only loads the module it needs.
SOURCES = {
    'shapes': 'mmjax.data.shapes',
    'digits': 'mmjax.data.digits',
    'files': 'mmjax.data.files',
    'folder': 'mmjax.data.folder',
    'tfds': 'mmjax.data.tfds_source',
    'webdataset': 'mmjax.data.webdataset_source',
}


def source_module(name: str):
  """The module registered in SOURCES for `data.name`."""
  if name not in SOURCES:
    raise DataError(f'data.name={name!r}: expected one of {", ".join(SOURCES)}')
  return importlib.import_module(SOURCES[name])


def build_source(data, split: str):
  """A grain-compatible source (`len`, `[i]`) of dicts: image uint8 [H, W, 3], caption str,
  integer labels named in `source.label_names`, and pass-through strings."""
  return source_module(data.name).build(data, split)


class Sources:
  """Built sources by (split, data config), each built on the first `get` and shared after.

  One per run, handed to the tokenizer, the train iterator and the evaluators: a user's
  files are read, and every image decoded to validate it, once per split rather than
  once per consumer, and each bad row is warned about once.
  """

  def __init__(self):
    self._built = {}

  def get(self, data, split: str):
    key = (split, data.to_json())  # the whole data config: any field may change the source
    if key not in self._built:
      self._built[key] = build_source(data, split)
    return self._built[key]
