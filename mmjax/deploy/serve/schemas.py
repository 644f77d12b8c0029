"""The routes' JSON bodies (pydantic), as OpenAPI documents them at /docs.

A route's `...In` model holds its non-image fields, checked for JSON and multipart
alike; its `...Json` model adds the images as base64 strings, the JSON body's schema.
In multipart, images are file parts named as the JSON field ("image"; "images" may
repeat) and a repeated text part is a list ("labels", "texts").
"""
from __future__ import annotations

import pydantic
from pydantic import Field


class _In(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid")


class TextsIn(_In):
  texts: list[str] = Field(description="texts to embed")


class ImagesJson(_In):
  images: list[str] = Field(description="base64 images (PNG, JPEG, WEBP, GIF, BMP)")


class ZeroShotIn(_In):
  labels: list[str] = Field(description="class names, e.g. ['a cat', 'a dog']")
  template: str = Field("{}", description="prompt for each label; '{}' is the label")


class ZeroShotJson(ZeroShotIn):
  image: str = Field(description="base64 image")


class ClassifyIn(_In):
  text: str | None = Field(None, description="the text (a text or image+text classifier)")
  top_k: int = Field(5, ge=1, le=1000, description="how many best classes to list")


class ClassifyJson(ClassifyIn):
  image: str | None = Field(None, description="base64 image (an image classifier)")


class SimilarityIn(_In):
  texts: list[str]


class SimilarityJson(SimilarityIn):
  images: list[str] = Field(description="base64 images")


class CaptionIn(_In):
  """No options: a caption is greedy, up to the server's token budget (one compiled
  program per batch size)."""


class CaptionJson(CaptionIn):
  image: str = Field(description="base64 image")


class Embeddings(pydantic.BaseModel):
  embeddings: list[list[float]] = Field(description="unit vectors [N, dim]")
  dim: int


class ZeroShotOut(pydantic.BaseModel):
  labels: list[str]
  scores: list[float] = Field(description="softmax over the labels of scale * cosine")
  similarities: list[float] = Field(description="cosine of the image and each prompt")
  best: str


class Scored(pydantic.BaseModel):
  label: str
  score: float


class ClassifyOut(pydantic.BaseModel):
  label: str
  label_id: int
  top: list[Scored] = Field(description="the top_k classes, best first, softmax scores")


class SimilarityOut(pydantic.BaseModel):
  similarities: list[list[float]] = Field(description="cosine [images, texts]")


class CaptionOut(pydantic.BaseModel):
  caption: str


class ErrorOut(pydantic.BaseModel):
  error: str


class InfoOut(pydantic.BaseModel):
  source: str
  routes: list[str]
  embed_dim: int
  classify_input: str
  class_names: list[str]
  image_size: list[int] | None
  max_len: int
  has_decoder: bool
  buckets: list[int]
  batching: bool
