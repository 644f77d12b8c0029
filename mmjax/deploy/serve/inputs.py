"""A request's body -> checked inputs, or an `ApiError` (status + one line naming the fault).

Images come as multipart file parts or base64 strings in JSON. Every size is checked
before the work it would cost: the body's bytes while it streams in, an image's pixel
count from its header before a pixel is decoded.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import json
from typing import Any

import pydantic
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
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


@dataclasses.dataclass
class Body:
  """A parsed request: its non-image fields and its images' encoded bytes, in order."""
  fields: dict[str, Any]
  images: list[tuple[str, bytes]]      # (where it came from, e.g. "image[0]", bytes)


async def read_body(request: Request, limit: int) -> bytes:
  """The body, refused with 413 as soon as it (or its declared length) passes `limit`."""
  declared = request.headers.get("content-length")
  if declared is not None and declared.isdigit() and int(declared) > limit:
    raise ApiError(413, f"request body is {int(declared)} bytes; the limit is {limit}")
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise ApiError(413, f"request body exceeds the limit of {limit} bytes")
    chunks.append(chunk)
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
  body = await read_body(request, limits.max_request_bytes)
  if kind == "application/json":
    return _json_body(body, image_fields)
  return await _multipart_body(request, body, image_fields, lists, limits)


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


async def _multipart_body(request: Request, body: bytes, image_fields: tuple[str, ...],
                          lists: tuple[str, ...], limits: Limits) -> Body:
  async def replay():
    return {"type": "http.request", "body": body, "more_body": False}

  try:
    form = await Request(request.scope, replay).form(
        max_files=limits.max_images, max_fields=limits.max_texts + 16,
        max_part_size=limits.max_request_bytes)
  except MultiPartException as e:
    raise ApiError(400, f"malformed multipart body: {e.message}") from None
  except HTTPException as e:        # what starlette makes of a MultiPartException in an app
    raise ApiError(400, f"malformed multipart body: {e.detail}") from None
  fields: dict[str, Any] = {}
  images = []
  try:
    for name in dict.fromkeys(form.keys()):
      values = form.getlist(name)
      if name in image_fields:
        for i, v in enumerate(values):
          where = f"{name}[{i}]" if len(values) > 1 else name
          if isinstance(v, UploadFile):
            images.append((where, await v.read()))
          else:                                      # a text part: base64, as in JSON
            images.append((where, _b64decode(v, where)))
        continue
      if any(isinstance(v, UploadFile) for v in values):
        raise ApiError(422, f"{name}: expected a text field, got a file upload")
      fields[name] = values if len(values) > 1 or name in lists else values[0]
  finally:
    await form.close()
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


def decode_image(data: bytes, where: str, max_pixels: int) -> Image.Image:
  """Encoded bytes -> an RGB PIL image. The size comes from the header (`Image.open`
  decodes nothing): an image over `max_pixels` is refused before any pixel memory exists."""
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
  try:
    image.load()
    return image.convert("RGB")
  except (OSError, SyntaxError, ValueError, EOFError):
    raise ApiError(422, f"{where}: the {image.format} data is truncated or corrupt") from None


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
