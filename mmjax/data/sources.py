"""`build_source(data, split)`: a random-access source of example dicts, chosen by `data.name`."""

from mmjax.data.errors import DataError

_BUILDERS = ('shapes', 'digits', 'files', 'tfds')


def build_source(data, split: str):
  """A grain-compatible source (`len`, `[i]`) of dicts: image uint8 [H, W, 3], caption str,
  integer labels named in `source.label_names`, and pass-through strings."""
  # Imported by name so that a spawned grain worker only loads the module it needs.
  if data.name == 'shapes':
    from mmjax.data import shapes as module  # pylint: disable=g-import-not-at-top
  elif data.name == 'digits':
    from mmjax.data import digits as module  # pylint: disable=g-import-not-at-top
  elif data.name == 'files':
    from mmjax.data import files as module  # pylint: disable=g-import-not-at-top
  elif data.name == 'tfds':
    from mmjax.data import tfds_source as module  # pylint: disable=g-import-not-at-top
  else:
    raise DataError(f'data.name={data.name!r}: expected one of {", ".join(_BUILDERS)}')
  return module.build(data, split)
