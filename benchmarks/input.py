"""Input throughput: images/s of each data source's train iterator vs the train step's.

  .venv/bin/python benchmarks/input.py [--images 1024 --batches 12 --workers 0,2,4]

The same `--images` pictures (96x96 JPEGs of built-in shapes, with their captions) are
written as each source reads them: `files` (JSONL + image files), `folder` (a folder per
class), `webdataset` (img2dataset-style tar shards of 64) and `tfds` (an array_record
dataset). Each source then feeds `mmdata.make_iterator` with configs/bench.py's data
settings (32 px, 32 tokens, batch 64, no augmentation) at each worker count; after the
first batch (worker start-up, shuffle set-up) `--batches` batches are timed. The train
step is configs/bench.py's own jitted step (`loop.make_step`) on one such batch, timed
after compilation: the images/s the step consumes. One JSON line per measurement.
"""
from __future__ import annotations

import argparse
import io
import json
import pathlib
import sys
import tarfile
import tempfile
import time

import jax
import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mmjax import data as mmdata  # noqa: E402
from mmjax import parallel  # noqa: E402
from mmjax.config import data_block, load_config  # noqa: E402
from mmjax.train.loop import make_step, setup  # noqa: E402

SIZE = 96          # stored pixels per side; the pipeline resizes to the config's 32
PER_SHARD = 64


def _jpeg(image: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format="JPEG", quality=90)
  return out.getvalue()


def write_sources(root: pathlib.Path, n: int) -> dict[str, dict]:
  """The same n examples as files, folder, webdataset and tfds; their data.* fields."""
  cfg = data_block("shapes", image_size=SIZE, train_size=n, eval_size=8, seed=0)
  source = mmdata.build_source(cfg, "train")
  examples = [source[i] for i in range(n)]
  images = [_jpeg(e["image"]) for e in examples]
  captions = [e["caption"] for e in examples]
  labels = [e["caption"].split()[2] for e in examples]    # "a <size> <colour> <shape> ..."

  (root / "files").mkdir()
  with open(root / "files" / "train.jsonl", "w") as f:
    for i, (image, caption) in enumerate(zip(images, captions)):
      (root / "files" / f"{i}.jpg").write_bytes(image)
      f.write(json.dumps(dict(image=f"{i}.jpg", caption=caption)) + "\n")
  for i, (image, label) in enumerate(zip(images, labels)):
    folder = root / "folder" / "train" / label
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{i}.jpg").write_bytes(image)
  (root / "folder" / "test" / labels[0]).mkdir(parents=True)
  (root / "folder" / "test" / labels[0] / "0.jpg").write_bytes(images[0])
  (root / "shards").mkdir()
  shards = -(-n // PER_SHARD)
  for s in range(shards):
    with tarfile.open(root / "shards" / f"{s:05d}.tar", "w") as tar:
      for i in range(s * PER_SHARD, min(n, (s + 1) * PER_SHARD)):
        for name, payload in ((f"{i:09d}.jpg", images[i]), (f"{i:09d}.txt", captions[i].encode())):
          info = tarfile.TarInfo(name)
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))
  _write_tfds(root / "tfds", images, captions)
  return {
      "files": dict(name="files", path=str(root / "files" / "train.jsonl")),
      "folder": dict(name="folder", path=str(root / "folder")),
      "webdataset": dict(name="webdataset", shards=f"{root}/shards/{{00000..{shards - 1:05d}}}.tar",
                         shuffle_buffer=256),
      "tfds": dict(name="tfds", tfds_name="bench_pairs", data_dir=str(root / "tfds"),
                   text_key="caption", label_key=""),
  }


def _write_tfds(data_dir: pathlib.Path, images, captions) -> None:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class BenchPairs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(SIZE, SIZE, 3), encoding_format="jpeg"),
          "caption": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, (image, caption) in enumerate(zip(images, captions)):
        yield i, dict(image=Image.open(io.BytesIO(image)), caption=caption)

  BenchPairs(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def input_rate(fields: dict, bench, tokenizer, workers: int, batches: int) -> dict:
  data = data_block(fields["name"], **{k: v for k, v in fields.items() if k != "name"},
                    image_size=bench.data.image_size, max_len=bench.data.max_len,
                    num_workers=workers)
  t0 = time.perf_counter()
  it = mmdata.make_iterator(data, "train", batch_size=bench.batch_size, train=True,
                            tokenizer=tokenizer, process_index=0, process_count=1)
  next(it)                                   # start-up: workers, source index, first batch
  t1 = time.perf_counter()
  for _ in range(batches):
    next(it)
  dt = time.perf_counter() - t1
  return dict(source=fields["name"], workers=workers, startup_s=round(t1 - t0, 2),
              images_per_s=round(batches * bench.batch_size / dt, 1))


def step_rate(bench, batch: dict, steps: int) -> dict:
  run = setup(bench)
  step = make_step(run)
  state, device_batch = run.state, parallel.device_batch(batch, run.mesh)
  state, metrics = step(state, device_batch)       # compile
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, device_batch)
  jax.block_until_ready(metrics)
  dt = time.perf_counter() - t0
  return dict(train_step="configs/bench.py", batch=bench.batch_size,
              images_per_s=round(steps * bench.batch_size / dt, 1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=1024)
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--workers", default="0,2,4")
  parser.add_argument("--sources", default="files,folder,webdataset,tfds")
  args = parser.parse_args()
  bench = load_config("bench")
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    t0 = time.perf_counter()
    sources = write_sources(root, args.images)
    print(json.dumps(dict(written=args.images, seconds=round(time.perf_counter() - t0, 1))),
          flush=True)
    tok_data = data_block("files", path=sources["files"]["path"], vocab_size=256,
                          cache_dir=str(root / "cache"))
    tokenizer = mmdata.get_tokenizer(tok_data)
    batch = None
    for name in args.sources.split(","):
      for workers in map(int, args.workers.split(",")):
        print(json.dumps(input_rate(sources[name], bench, tokenizer, workers, args.batches)),
              flush=True)
    data = data_block("files", path=sources["files"]["path"], image_size=bench.data.image_size,
                      max_len=bench.data.max_len)
    batch = next(mmdata.make_iterator(data, "train", batch_size=bench.batch_size, train=True,
                                      tokenizer=tokenizer, process_index=0, process_count=1))
  batch = {k: v for k, v in batch.items() if v.dtype.kind != "U"}
  batch["text"] = np.minimum(batch["text"], 8191)
  print(json.dumps(step_rate(bench, batch, args.steps)), flush=True)


if __name__ == "__main__":
  main()
