"""`webdataset`: image-text tar shards as img2dataset writes them, streamed.

A shard `00000.tar` holds samples as members sharing a key: `<key>.jpg` (or .jpeg, .png,
.webp) and a caption `<key>.txt` and/or `<key>.json` with a "caption" field. Shards are
named by local paths, brace patterns (`shards/{00000..00099}.tar`) or fsspec URLs
(`gs://bucket/laion/{00000..41407}.tar`), `data.shards` for the train split and
`data.eval_shards` for the others.

Training streams (`WebDataset.stream`): in every epoch all processes draw the same seeded
shard order and process p reads shards p, p + P, ...; grain worker processes split a
process's shards again the same way, and decode in the worker. Samples are shuffled in
blocks of `data.shuffle_buffer`: a block is read, permuted by a seed of (epoch, block), and
emitted, so the iterator state is where the block began (shard, sample) plus how many of
it were emitted, and a resume re-reads at most one block. That state differs between
processes; the pipeline's `ProcessStates` gathers all of them into the one checkpoint.

Bad data is counted, never fatal and never a hang: a truncated or unreadable shard ends
that shard, a sample without its image or caption, or whose image does not decode, is
skipped. A shard that cannot be opened at all (a wrong path, gs:// without credentials) is
a DataError naming its URL. Eval splits are small: they are read whole into memory and are
random access like the other sources.

Tar members are grouped here with `tarfile` rather than the `webdataset` package: importing
it imports torch (2.5 s and hundreds of MB in every grain worker) for ~20 lines of grouping.
Brace patterns use `braceexpand`, the small package webdataset itself uses.
"""

import collections
import io
import json
import logging
import os
import tarfile

import braceexpand
import fsspec
import grain
import numpy as np

from mmjax.data.errors import DataError
from mmjax.data.files import DECODE_ERRORS, decode_image

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
# What reading a shard's bytes raises when the shard ends early or the store fails midway.
READ_ERRORS = (tarfile.TarError, EOFError, OSError)
_WARN_LIMIT = 5          # per skip reason and process; the rest are only counted


def expand(shards) -> list[str]:
  """Shard URLs of `shards`: a brace pattern, or a list of them, or several separated by
  whitespace."""
  patterns = shards.split() if isinstance(shards, str) else list(shards)
  return [url for pattern in patterns for url in braceexpand.braceexpand(pattern)]


# Client libraries of cloud stores (fsspec's gcsfs, s3fs, adlfs and what they call): their
# errors (no credentials, access denied) are not OSErrors and cannot be imported here
# without those optional packages, so they are known by the module that raised them.
_STORE_MODULES = ('google.', 'gcsfs', 's3fs', 'botocore', 'aiobotocore', 'adlfs', 'azure.')


def open_shard(url: str):
  """A binary file object of `url` (local path or any fsspec URL); DataError naming it when
  it cannot be opened: missing, no access, no credentials, no filesystem for the scheme."""
  try:
    if '://' not in url:
      return open(url, 'rb')
    return fsspec.open(url, 'rb').open()
  except Exception as e:  # pylint: disable=broad-except
    if not (isinstance(e, (OSError, ImportError, ValueError))
            or type(e).__module__.startswith(_STORE_MODULES)):
      raise
    detail = str(e).splitlines()[0] if str(e) else 'no detail'
    raise DataError(f'webdataset shard {url}: cannot open it ({type(e).__name__}: {detail})'
                    ) from e


class Skips:
  """Skip counts by reason, each reason warned about for its first few samples."""

  def __init__(self, counts=None):
    self.counts = collections.Counter(counts or {})

  def add(self, reason: str, where: str) -> None:
    self.counts[reason] += 1
    if self.counts[reason] <= _WARN_LIMIT:
      logging.warning('webdataset: skipped %s (%s)%s', where, reason,
                      '; further ones are only counted' if self.counts[reason] == _WARN_LIMIT
                      else '')


def _key_and_ext(name: str) -> tuple[str, str]:
  """'dir/000012.jpg' -> ('dir/000012', 'jpg'): the key runs to the first dot of the base
  name, as webdataset and img2dataset have it ('x.seg.png' -> ext 'seg.png')."""
  folder, _, base = name.rpartition('/')
  stem, _, ext = base.partition('.')
  return (f'{folder}/{stem}' if folder else stem), ext.lower()


def read_samples(url: str, skips: Skips):
  """The samples of one shard in order, as dicts {'__key__', '__url__', <ext>: bytes}.

  A sample is the run of consecutive members sharing a key. A shard that ends early yields
  the samples before the break and counts one skip (the sample being read is dropped).
  """
  sample = None
  with open_shard(url) as f:
    try:
      with tarfile.open(fileobj=f, mode='r|*') as tar:    # a stream: one pass, in order
        for member in tar:
          if not member.isfile() or member.name.rpartition('/')[2].startswith('__'):
            continue          # folders, links, and webdataset's __meta__ members
          key, ext = _key_and_ext(member.name)
          data = tar.extractfile(member).read()
          if sample is not None and sample['__key__'] != key:
            yield sample
            sample = None
          sample = sample or {'__key__': key, '__url__': url}
          sample[ext] = data
    except READ_ERRORS as e:
      skips.add('truncated or unreadable shard', f'the rest of {url}: {e}')
      return
  if sample is not None:
    yield sample


def caption_of(sample: dict) -> str | None:
  """The sample's caption: its .txt, else the "caption" of its .json; None if neither."""
  if sample.get('txt') is not None:
    return sample['txt'].decode('utf-8', 'replace').strip() or None
  if sample.get('json') is not None:
    try:
      caption = json.loads(sample['json']).get('caption')
    except (ValueError, AttributeError):
      return None
    return caption.strip() or None if isinstance(caption, str) else None
  return None


def decode(sample: dict, skips: Skips) -> dict | None:
  """{'image': uint8 [H, W, 3], 'caption', 'key'}, or None (skip counted) when the sample
  has no image or caption, or its image does not decode."""
  where = f'{sample["__url__"]}:{sample["__key__"]}'
  ext = next((e for e in IMAGE_EXTENSIONS if sample.get(e) is not None), None)
  caption = caption_of(sample)
  if ext is None:
    skips.add('no image', where)
    return None
  if caption is None:
    skips.add('no caption', where)
    return None
  try:
    image = decode_image(io.BytesIO(sample[ext]))
  except DECODE_ERRORS as e:
    skips.add('undecodable image', f'{where}.{ext}: {e}')
    return None
  return {'image': image, 'caption': caption, 'key': sample['__key__']}


def _shard_size(url: str) -> int | None:
  """The sample count img2dataset records in `<shard>_stats.json` beside a shard, if any."""
  stats = url[:-len('.tar')] + '_stats.json' if url.endswith('.tar') else None
  if stats is None:
    return None
  try:
    with fsspec.open(stats, 'rt') as f:
      return int(json.load(f)['successes'])
  except (OSError, ValueError, KeyError, TypeError):
    return None


class WebDataset:
  """The shards of one split. Training streams them (`stream`); `len`, `[i]` and `texts`
  read every shard (an eval split, a tokenizer trained on the captions)."""

  streaming = True

  def __init__(self, urls: list[str], shuffle_buffer: int = 1000):
    if not urls:
      raise DataError('webdataset: no shards given')
    self.urls, self.shuffle_buffer = urls, max(1, int(shuffle_buffer))
    self.label_names = {}
    self.skips = Skips()
    self._examples = None
    self._len = None

  def _read_all(self) -> list[dict]:
    if self._examples is None:
      decoded = (decode(s, self.skips) for url in self.urls for s in read_samples(url, self.skips))
      self._examples = [e for e in decoded if e is not None]
      if not self._examples:
        raise DataError(f'webdataset {self.urls[0]} ...: no readable sample in '
                        f'{len(self.urls)} shards (skipped: {dict(self.skips.counts)})')
    return self._examples

  def __len__(self) -> int:
    """Samples in the split: img2dataset's counts when every shard has its _stats.json,
    else counted by reading every shard once (no image is decoded or kept). Once the split
    is in memory, its good examples."""
    if self._examples is not None:
      return len(self._examples)
    if self._len is None:
      sizes = [_shard_size(u) for u in self.urls]
      if None in sizes:
        logging.warning('webdataset: %d of %d shards have no img2dataset _stats.json; '
                        'counting their samples reads them once', sizes.count(None),
                        len(sizes))
        sizes = [n if n is not None else sum(1 for _ in read_samples(u, Skips()))
                 for n, u in zip(sizes, self.urls)]
      self._len = sum(sizes)
    return self._len

  def __getitem__(self, index: int) -> dict:
    """Example `index` of the whole split, read into memory on first use (an eval split);
    [0] alone reads only up to the first good sample (what the tokenizer looks at)."""
    if index == 0 and self._examples is None:
      for url in self.urls:
        for sample in read_samples(url, Skips()):
          example = decode(sample, Skips())
          if example is not None:
            return example
    return self._read_all()[index]

  def texts(self) -> list[str]:
    """Every caption, read without decoding or keeping an image."""
    captions = (caption_of(s) for url in self.urls for s in read_samples(url, self.skips))
    return [c for c in captions if c is not None]

  def stream(self, *, seed: int, process_index: int, process_count: int,
             num_epochs: int | None, readers: int = 1) -> 'ShardStream':
    """This process's examples; `readers` grain workers will each read a part of them."""
    if len(self.urls) < process_count * readers:
      raise DataError(f'webdataset: {len(self.urls)} shards for {process_count} processes x '
                      f'{readers} readers (data.num_workers); each reader needs at least one '
                      'shard: write more, smaller shards or lower data.num_workers')
    return ShardStream(self.urls, seed=seed, part=slice(process_index, None, process_count),
                       num_epochs=num_epochs, buffer=self.shuffle_buffer)


class ShardStream(grain.IterDataset):
  """Decoded examples of this process's shards (see the module docstring)."""

  def __init__(self, urls, *, seed, part: slice, num_epochs, buffer):
    super().__init__()
    self.urls, self.seed, self.num_epochs, self.buffer = list(urls), seed, num_epochs, buffer
    self.parts = [part]       # applied in order: the process's, then a grain worker's

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """grain's hook: worker `i` of `n` reads every n-th of the process's shards."""
    del sequential_slice      # shards are whole units; the order is what changes
    self.parts.append(sl)

  def shards(self, epoch: int) -> list[str]:
    """This reader's shards in `epoch`: one seeded order for every process, then sliced."""
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
    urls = [self.urls[i] for i in order]
    for part in self.parts:
      urls = urls[part]
    return urls

  def __iter__(self):
    return _ShardIterator(self)

  def __str__(self) -> str:
    return f'ShardStream({len(self.urls)} shards, parts={self.parts})'


class _ShardIterator(grain.DatasetIterator):
  """Reads blocks of samples, shuffles each, decodes on the way out."""

  def __init__(self, ds: ShardStream):
    super().__init__()
    self.ds = ds
    self.skips = Skips()
    self._restart(epoch=0, shard=0, sample=0, block=0, emitted=0)

  def _restart(self, *, epoch, shard, sample, block, emitted) -> None:
    """Position at `emitted` samples into block `block` of `epoch`, which began at sample
    `sample` of shard number `shard` in the epoch's order."""
    self.epoch, self.block, self.emitted = epoch, block, emitted
    self.urls = self.ds.shards(epoch)
    self.shard, self.sample = shard, sample       # the reader: next sample to read
    self.block_start = (shard, sample)
    self.samples = None                           # the open shard's sample generator
    self.pending = collections.deque()            # the permuted block, its rest
    self.good = int(bool(block or emitted))       # examples returned in this epoch (>0)
    if self.shard < len(self.urls):
      self._open(skip=sample)
    self._fill()
    for _ in range(emitted):
      self.pending.popleft()

  def _open(self, skip: int = 0) -> None:
    self.samples = read_samples(self.urls[self.shard], self.skips)
    for _ in range(skip):
      next(self.samples, None)

  def _read(self):
    """The next raw sample of this epoch's shards, or None at the end of the last one."""
    while self.shard < len(self.urls):
      sample = next(self.samples, None)
      if sample is not None:
        self.sample += 1
        return sample
      self.shard, self.sample = self.shard + 1, 0
      if self.shard < len(self.urls):
        self._open()
    return None

  def _fill(self) -> None:
    """Read the next block and permute it."""
    self.block_start = (self.shard, self.sample)
    block = []
    while len(block) < self.ds.buffer:
      sample = self._read()
      if sample is None:
        break
      block.append(sample)
    rng = np.random.default_rng([self.ds.seed, self.epoch, self.block])
    self.pending = collections.deque(block[i] for i in rng.permutation(len(block)))

  def __next__(self) -> dict:
    while True:
      if not self.pending:
        if self.emitted:               # the block is done: start the next
          self.block, self.emitted = self.block + 1, 0
          self._fill()
        if not self.pending:           # the epoch is done
          if self.ds.num_epochs is not None and self.epoch + 1 >= self.ds.num_epochs:
            raise StopIteration
          if not self.good:            # another pass would find nothing either: no hang
            raise DataError(f'webdataset: no readable sample in the {len(self.urls)} shards '
                            f'of {self.ds} (skipped: {dict(self.skips.counts)})')
          self._restart(epoch=self.epoch + 1, shard=0, sample=0, block=0, emitted=0)
          continue
      self.emitted += 1
      example = decode(self.pending.popleft(), self.skips)
      if example is not None:
        self.good += 1
        return example

  def get_state(self) -> dict:
    shard, sample = self.block_start
    return dict(epoch=self.epoch, block=self.block, shard=shard, sample=sample,
                emitted=self.emitted, skipped=dict(self.skips.counts))

  def set_state(self, state: dict) -> None:
    self.skips = Skips(state.get('skipped'))
    self._restart(epoch=state['epoch'], shard=state['shard'], sample=state['sample'],
                  block=state['block'], emitted=state['emitted'])


# The data.* fields that change the captions: the tokenizer's cache key (sources.SOURCES).
CORPUS_FIELDS = ('shards',)


def build(data, split: str) -> WebDataset:
  field = 'shards' if split == 'train' else 'eval_shards'
  shards = data.get(field, '')
  if not shards:
    raise DataError(f'data.{field}: not set; the webdataset source reads its {split} split '
                    'from it (a path, brace pattern or URL of .tar shards)')
  urls = expand(shards)
  local = [u for u in urls if '://' not in u and not os.path.isfile(u)]
  if local:
    raise DataError(f'data.{field}: shard {local[0]} does not exist '
                    f'({len(local)} of {len(urls)} missing)')
  return WebDataset(urls, shuffle_buffer=data.get('shuffle_buffer', 1000))
