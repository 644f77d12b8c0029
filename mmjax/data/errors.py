"""The one exception type of the data package."""


class DataError(ValueError):
  """Bad data or data config; the message names the file, line, key or field at fault."""
