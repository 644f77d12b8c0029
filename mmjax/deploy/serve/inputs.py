"""A request's body -> checked inputs, or an `ApiError` (status + one line naming the fault).

Images come as multipart file parts or base64 strings in JSON. Every size is checked
before the work it would cost: the body's bytes while it streams in, an image's pixel
count from its header before a pixel is decoded.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import codecs
import dataclasses
import io
import json
from typing import Any

import pydantic
from PIL import Image
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class ApiError(Exception):
  """An answer other than 200: HTTP `status` and a message for the caller."""

  def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.headers = status, message, headers or {}


@dataclasses.dataclass(frozen=True)
class Limits:
  max_request_bytes: int = 8 << 20     # the whole body, multipart or JSON
  max_pixels: int = 4096 * 4096        # width x height of one image, read from its header
  max_images: int = 16                 # per request (embed/image, similarity)
  max_texts: int = 64                  # labels, prompts or texts per request
  max_text_chars: int = 1000           # per label or text
  body_timeout_s: float = 30.0         # to receive the whole body (a stalled upload: 408)


@dataclasses.dataclass
class Body:
  """A parsed request: its non-image fields and its images' encoded bytes, in order."""
  fields: dict[str, Any]
  images: list[tuple[str, bytes]]      # (where it came from, e.g. "image[0]", bytes)


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
  """The body, refused with 413 as soon as it (or its declared length) passes `limit`, and
  with 408 when it has not all arrived within `timeout_s` (a stalled or trickled upload
  would otherwise hold its connection and memory for as long as the client likes)."""
  declared = request.headers.get("content-length")
  if declared is not None and declared.isdigit() and int(declared) > limit:
    raise ApiError(413, f"request body is {int(declared)} bytes; the limit is {limit}")
  chunks = []

  async def receive():
    size = 0
    async for chunk in request.stream():
      size += len(chunk)
      if size > limit:
        raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
      chunks.append(chunk)

  try:
    await asyncio.wait_for(receive(), timeout_s)
  except asyncio.TimeoutError:
    raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s",
                   {"Connection": "close"}) from None
  return b"".join(chunks)


async def parse(request: Request, limits: Limits, image_fields: tuple[str, ...],
                lists: tuple[str, ...] = ()) -> Body:
  """JSON ({field: value, image fields as base64 strings or lists of them}) or multipart
  (image fields as file parts, other fields as text parts; the fields named in `lists`
  are lists, one part per item)."""
  kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
  if kind not in ("application/json", "multipart/form-data"):
    raise ApiError(415, f"content type {kind or '(none)'!r} is not accepted: send "
                        f"application/json or multipart/form-data")
  body = await read_body(request, limits.max_request_bytes, limits.body_timeout_s)
  if kind == "application/json":
    return _json_body(body, image_fields)
  return _multipart_body(body, request.headers["content-type"], image_fields, lists, limits)


def _json_body(body: bytes, image_fields: tuple[str, ...]) -> Body:
  try:
    text = body.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise ApiError(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
  except RecursionError:
    raise ApiError(400, "malformed JSON: nested too deeply") from None
  except ValueError as e:       # e.g. an integer of more digits than Python converts
    raise ApiError(400, f"malformed JSON: {e}") from None
  if not isinstance(data, dict):
    raise ApiError(422, f"the JSON body must be an object, not {type(data).__name__}")
  images = []
  for name in image_fields:
    value = data.pop(name, None)
    if value is None:
      continue
    values = value if isinstance(value, list) else [value]
    for i, v in enumerate(values):
      where = f"{name}[{i}]" if isinstance(value, list) else name
      if not isinstance(v, str):
        raise ApiError(422, f"{where}: expected a base64 string, got {type(v).__name__}")
      images.append((where, _b64decode(v, where)))
  return Body(data, images)


def _b64decode(text: str, where: str) -> bytes:
  if text.startswith("data:"):                     # a data URL: data:image/png;base64,....
    text = text.partition(",")[2]
  try:
    return base64.b64decode(text, validate=True)
  except (binascii.Error, ValueError):
    raise ApiError(422, f"{where}: not valid base64") from None


@dataclasses.dataclass
class _Part:
  """One part of a multipart body, undecoded."""
  disposition: bytes = b""
  name: bytes = b""
  filename: bytes | None = None      # set: a file part
  data: bytearray = dataclasses.field(default_factory=bytearray)


def _multipart_parts(body: bytes, boundary: bytes, limits: Limits) -> list[_Part]:
  """The parts of a complete multipart/form-data body (python-multipart's parser; the
  bytes are ours to decode), or 400/422 naming what is wrong."""
  parts: list[_Part] = []
  header, ended = [b"", b""], []

  def header_end():
    if header[0].strip().lower() == b"content-disposition":
      parts[-1].disposition = header[1]
    header[:] = [b"", b""]

  def headers_finished():
    part = parts[-1]
    _, options = parse_options_header(part.disposition)
    if b"name" not in options:
      raise ApiError(400, f'malformed multipart body: part {len(parts)} has no "name" in '
                          f"its Content-Disposition header")
    part.name, part.filename = options[b"name"], options.get(b"filename")
    if part.filename is None and b"filename*=" in part.disposition.lower():
      part.filename = b""              # RFC 5987's form only, which the parser drops
    files = sum(p.filename is not None for p in parts)
    if files > limits.max_images:
      raise ApiError(422, f"more than {limits.max_images} file parts; the limit is "
                          f"{limits.max_images} images per request")
    if len(parts) - files > limits.max_texts + 16:
      raise ApiError(422, f"more than {limits.max_texts + 16} text parts; the limit is "
                          f"{limits.max_texts} labels or texts per request")

  def on_header_field(data, start, end):
    header[0] += data[start:end]

  def on_header_value(data, start, end):
    header[1] += data[start:end]

  callbacks = {
      "on_part_begin": lambda: parts.append(_Part()),
      "on_part_data": lambda data, start, end: parts[-1].data.extend(data[start:end]),
      "on_header_field": on_header_field,
      "on_header_value": on_header_value,
      "on_header_end": header_end,
      "on_headers_finished": headers_finished,
      "on_end": lambda: ended.append(True),
  }
  try:
    parser = MultipartParser(boundary, callbacks)
    parser.write(body)
    parser.finalize()
  except FormParserError as e:
    raise ApiError(400, f"malformed multipart body: {e}") from None
  if not ended:
    raise ApiError(400, "malformed multipart body: it ends before its closing boundary")
  return parts


def _decode_text(data: bytes, charset: str, where: str) -> str:
  try:
    return data.decode(charset)
  except UnicodeDecodeError as e:
    raise ApiError(400, f"{where}: not valid {charset} (byte {e.start})") from None


def _multipart_body(body: bytes, content_type: str, image_fields: tuple[str, ...],
                    lists: tuple[str, ...], limits: Limits) -> Body:
  """Text parts are decoded strictly in the body's charset (UTF-8 unless the content type
  names another): an undecodable byte is refused, naming the field, never guessed at."""
  _, params = parse_options_header(content_type)
  if not params.get(b"boundary"):
    raise ApiError(400, "malformed multipart body: Missing boundary in the content type")
  charset = params.get(b"charset", b"utf-8").decode("latin-1")
  try:
    charset = codecs.lookup(charset).name
  except LookupError:
    raise ApiError(415, f"multipart charset {charset!r} is not known") from None
  parts = _multipart_parts(body, params[b"boundary"], limits)
  by_name: dict[bytes, list[_Part]] = {}
  for part in parts:
    by_name.setdefault(part.name, []).append(part)
  fields: dict[str, Any] = {}
  images = []
  for raw, group in by_name.items():
    name = _decode_text(raw, charset, "a multipart part's name")
    wheres = [f"{name}[{i}]" if len(group) > 1 else name for i in range(len(group))]
    if name in image_fields:
      for where, part in zip(wheres, group):
        data = bytes(part.data)
        if part.filename is None:                  # a text part: base64, as in JSON
          data = _b64decode(_decode_text(data, charset, where), where)
        images.append((where, data))
      continue
    if any(part.filename is not None for part in group):
      raise ApiError(422, f"{name}: expected a text field, got a file upload")
    values = [_decode_text(bytes(p.data), charset, where) for where, p in zip(wheres, group)]
    fields[name] = values if len(values) > 1 or name in lists else values[0]
  return Body(fields, images)


def validate(model: type[pydantic.BaseModel], fields: dict[str, Any]) -> pydantic.BaseModel:
  """`fields` as `model`, or 422 naming the first field at fault."""
  try:
    return model.model_validate(fields)
  except pydantic.ValidationError as e:
    err = e.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    raise ApiError(422, f"{where}: {err['msg']}{more}") from None


def open_image(data: bytes, where: str, max_pixels: int) -> Image.Image:
  """Encoded bytes -> a PIL image whose header alone is read (`Image.open` decodes
  nothing): an image over `max_pixels` is refused before any pixel memory exists."""
  if not data:
    raise ApiError(422, f"{where}: the image is empty")
  try:
    image = Image.open(io.BytesIO(data), formats=FORMATS)
  except Image.DecompressionBombError:
    raise ApiError(413, f"{where}: the image's header declares too many pixels; the limit "
                        f"is {max_pixels}") from None
  except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError):
    raise ApiError(422, f"{where}: not a readable image (expected one of "
                        f"{', '.join(FORMATS)})") from None
  width, height = image.size
  if width * height > max_pixels:
    raise ApiError(413, f"{where}: the image is {width} x {height} = {width * height} pixels; "
                        f"the limit is {max_pixels}")
  if width < 1 or height < 1:
    raise ApiError(422, f"{where}: the image is {width} x {height}")
  return image


def load_rgb(image: Image.Image, where: str) -> Image.Image:
  """An opened image's pixels, decoded, as RGB."""
  try:
    image.load()
    return image.convert("RGB")
  except (OSError, SyntaxError, ValueError, EOFError):
    raise ApiError(422, f"{where}: the {image.format} data is truncated or corrupt") from None


def decode_image(data: bytes, where: str, max_pixels: int) -> Image.Image:
  """Encoded bytes -> an RGB PIL image (`open_image`, then `load_rgb`)."""
  return load_rgb(open_image(data, where, max_pixels), where)


def check_texts(texts: list[str], field: str, limits: Limits) -> list[str]:
  """1..max_texts non-empty strings of at most max_text_chars each, or 422."""
  if not texts:
    raise ApiError(422, f"{field}: give at least one")
  if len(texts) > limits.max_texts:
    raise ApiError(422, f"{field}: {len(texts)} given; the limit is {limits.max_texts} per "
                        f"request")
  for i, t in enumerate(texts):
    if not t.strip():
      raise ApiError(422, f"{field}[{i}] is empty")
    if len(t) > limits.max_text_chars:
      raise ApiError(422, f"{field}[{i}] is {len(t)} characters; the limit is "
                          f"{limits.max_text_chars}")
  return texts
