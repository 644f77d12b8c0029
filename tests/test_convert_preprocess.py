"""mmjax's image transform equals transformers' image processors (PIL backend) on real photos."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

transformers = pytest.importorskip("transformers")
skdata = pytest.importorskip("skimage.data")

from mmjax.io import ImagePreprocess  # noqa: E402

# Photos of several shapes: square, landscape 3:2 and 4:3-ish, grayscale.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")


def processors():
  t = transformers
  yield "clip", t.CLIPImageProcessorPil()                     # shortest side 224, bicubic, crop
  yield "clip_336", t.CLIPImageProcessorPil(size={"shortest_edge": 336},
                                            crop_size={"height": 336, "width": 336})
  # (without do_convert_rgb, transformers itself fails on the grayscale photo)
  yield "vit", t.ViTImageProcessorPil(do_convert_rgb=True)    # 224x224, bilinear, 0.5 mean/std
  yield "vit_crop", t.ViTImageProcessorPil(size={"height": 250, "width": 240}, resample=3,
                                           do_center_crop=True, crop_size=224,
                                           do_convert_rgb=True)


@pytest.mark.parametrize("name,hf", list(processors()),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_preprocess_matches_hf_image_processor(name, hf):
  ours = ImagePreprocess.from_hf(hf.to_dict())
  worst = 0.0
  for photo in PHOTOS:
    image = Image.fromarray(getattr(skdata, photo)())   # "camera" is grayscale (mode L)
    ref = hf(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    got = ours(image)
    assert got.shape == ref.shape and got.dtype == np.float32, (photo, got.shape, ref.shape)
    worst = max(worst, float(np.abs(got - ref).max()))
  print(name, "max abs diff", worst)
  assert worst <= 1e-5
  # Saved and read back by transformers, the config gives the same transform.
  again = type(hf)(**ours.to_hf())
  image = skdata.chelsea()
  np.testing.assert_array_equal(again(images=image, return_tensors="np")["pixel_values"],
                                hf(images=image, return_tensors="np")["pixel_values"])
