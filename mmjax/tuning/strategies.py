"""Fine-tuning strategies as data: a learning-rate scale for every param (0 = frozen,
no optimizer state) and, for progressive unfreezing, the step each param starts at.

`config.finetune.strategy` picks one of STRATEGIES; `layer_decay` (layer-wise
learning-rate decay) and `lr_groups` ((regex, scale), ...) multiply on top, with
any strategy. The optimizer (`mmjax.train.optimizer`) turns the scales into an
`optax.multi_transform` with one group per distinct scale; the train step turns
"ever trains" into stop_gradient (no backward pass into frozen-only parts) and
the start steps into a mask on the gradients and updates (compiled once).

Param layout the strategies read: a tower is a top-level "image_tower", "text_tower"
or "fusion"; in a tower of depth L, embeddings are layer 0, "encoder/block_i" is
layer i + 1 and what sits above the blocks (final norm, pooler) layer L + 1.
Everything outside the towers (classifier, projections, ITM/MLM heads) is "head".
A ResNet tower reads the same way: its stem is layer 0 and "stage_s/block_i" (blocks
numbered across stages) layer i + 1, so `freeze_bottom=k` freezes the stem and the
first k blocks, and progressive unfreezing goes down one residual block at a time.
A frozen BatchNorm keeps the running statistics it was loaded with (`Plan.stats_from`).
A scanned tower (model.scan_layers) holds its blocks as one stacked "encoder/blocks":
whole-tower and per-param strategies work on it (full, per_modality, linear_probe, lora,
adapters, freeze_towers/freeze_regex), per-block ones (progressive, freeze_bottom,
layer_decay) are refused.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import ml_collections

from mmjax.io.layers_layout import scanned_names
from mmjax.io.trees import path_name

TOWERS = {"image_tower": "image", "text_tower": "text", "fusion": "fusion"}
_BLOCK = re.compile(r"/(?:encoder|stage_\d+)/block_(\d+)/")
_EMBED = re.compile(r"^\w+/(patch_embed|posemb|cls|ln_pre|token_embed|type_embed|ln_embed|"
                    r"text_in|image_in|modality_embed|stem)(/|$)")
NEVER = 2 ** 31 - 1     # a start step no run reaches
PEFT = re.compile(r"/(lora_a|lora_b)$|/adapter_(attn|mlp)/")


def tower_of(name: str) -> str | None:
  """"image", "text" or "fusion" for a tower's param; None for a head's."""
  return TOWERS.get(name.split("/", 1)[0])


def depths(names) -> dict[str, int]:
  """Blocks per tower, read from the param names."""
  out: dict[str, int] = {}
  for n in names:
    m = _BLOCK.search(n)
    if m:
      t = tower_of(n)
      out[t] = max(out.get(t, 0), int(m.group(1)) + 1)
  return out


def layer_of(name: str, depth: int) -> int:
  """0 for embeddings, i + 1 in block i, depth + 1 above the blocks (see module doc)."""
  m = _BLOCK.search(name)
  if m:
    return int(m.group(1)) + 1
  return 0 if _EMBED.search(name) else depth + 1


@dataclasses.dataclass(frozen=True)
class Plan:
  """What trains: per-param trees with the structure of the params."""
  lr_scale: Any                 # float; 0.0 = frozen for the whole run
  unfreeze_step: Any = None     # int per param (progressive only): trains from this step on

  @property
  def trainable(self) -> Any:
    return jax.tree.map(lambda s: s > 0, self.lr_scale)

  def stats_from(self, batch_stats) -> Any:
    """The step from which each BatchNorm statistic updates: when its norm's scale and
    bias start training (0 for a plan without start steps), NEVER for a frozen norm."""
    by_name = lambda tree: {path_name(p): v for p, v in
                            jax.tree_util.tree_flatten_with_path(tree)[0]}
    begins = by_name(self.unfreeze_step) if self.unfreeze_step is not None else {}
    starts = {}     # norm module -> its first trainable param's start
    for name, scale in by_name(self.lr_scale).items():
      module = name.rpartition("/")[0]
      start = begins.get(name, 0) if scale > 0 else NEVER
      starts[module] = min(starts.get(module, NEVER), start)
    return jax.tree_util.tree_map_with_path(
        lambda path, _: starts.get(path_name(path).rpartition("/")[0], NEVER), batch_stats)

  def count(self, params) -> tuple[int, int]:
    """(trainable, total) numbers of parameters (params may be abstract)."""
    sizes = jax.tree.leaves(jax.tree.map(lambda p: int(p.size), params))
    on = jax.tree.leaves(self.trainable)
    return sum(s for s, t in zip(sizes, on) if t), sum(sizes)


# A strategy: (param name, tower depths, finetune config) -> (lr scale, start step).

def full(name, depth, ft):
  return 1.0, 0


def partial(name, depth, ft):
  """Freeze whole towers, the bottom k blocks (and embeddings) of every tower, or a regex."""
  tower = tower_of(name)
  if tower in ft.freeze_towers:
    return 0.0, 0
  if ft.freeze_regex and re.search(ft.freeze_regex, name):
    return 0.0, 0
  if ft.freeze_bottom and tower is not None and layer_of(name, depth[tower]) <= ft.freeze_bottom:
    return 0.0, 0
  return 1.0, 0


def per_modality(name, depth, ft):
  """One tower trains at `modality_lr_scale` x the learning rate, heads at 1x, the rest
  is frozen."""
  tower = tower_of(name)
  if tower is None:
    return 1.0, 0
  return (ft.modality_lr_scale if tower == ft.modality else 0.0), 0


def linear_probe(name, depth, ft):
  return (1.0 if name.startswith("classifier/") else 0.0), 0


def peft(name, depth, ft):
  """LoRA / adapters: their params and the heads train; every base weight is frozen."""
  return (1.0 if tower_of(name) is None or PEFT.search(name) else 0.0), 0


def progressive(name, depth, ft):
  """Heads from step 0; in each tower of `unfreeze_towers` (default: all), the top block
  (with the norms above it) from step N, the next one down from 2N, ..., down to
  `unfreeze_depth` blocks (embeddings come last, after the bottom block)."""
  tower = tower_of(name)
  if tower is None:
    return 1.0, 0
  if ft.unfreeze_towers and tower not in ft.unfreeze_towers:
    return 0.0, 0
  k = max(depth[tower] + 1 - layer_of(name, depth[tower]), 1)   # 1 = top block
  if k > ft.unfreeze_depth:
    return 0.0, 0
  return 1.0, k * ft.unfreeze_every


STRATEGIES: dict[str, Callable] = {
    "full": full,
    "partial": partial,
    "per_modality": per_modality,
    "linear_probe": linear_probe,
    "lora": peft,
    "adapters": peft,
    "progressive": progressive,
}


def _check(ft, names, depth) -> None:
  s = ft.strategy
  if s not in STRATEGIES:
    raise ValueError(f"finetune.strategy={s!r} unknown; known: {sorted(STRATEGIES)}")
  known = set(TOWERS.values())
  for key in ("freeze_towers", "unfreeze_towers"):
    bad = set(ft.get(key, ())) - known
    if bad:
      raise ValueError(f"finetune.{key} has {sorted(bad)}; towers are {sorted(known)}")
  if s == "per_modality" and ft.modality not in depth:
    raise ValueError(f"finetune.modality={ft.modality!r}: the model has towers {sorted(depth)}")
  if s == "linear_probe" and not any(n.startswith("classifier/") for n in names):
    raise ValueError("finetune.strategy='linear_probe' needs model.classifier.num_classes > 0")
  if s == "lora" and not ft.lora_rank:
    raise ValueError("finetune.strategy='lora' needs finetune.lora_rank > 0")
  if s == "adapters" and not ft.adapter_dim:
    raise ValueError("finetune.strategy='adapters' needs finetune.adapter_dim > 0")
  if s in ("lora", "adapters") and any(n.startswith("image_tower/stem/") for n in names):
    raise ValueError(f"finetune.strategy={s!r} adds {s} to Transformer layers, and the ResNet "
                     "image tower has none: use full, partial, linear_probe or progressive")
  if s == "progressive" and (ft.unfreeze_every < 1 or ft.unfreeze_depth < 0):
    raise ValueError("finetune.unfreeze_every must be >= 1 and unfreeze_depth >= 0")
  if not 0.0 < ft.layer_decay <= 1.0:
    raise ValueError(f"finetune.layer_decay={ft.layer_decay}: expected 0 < decay <= 1")
  per_block = [f"finetune.{k}={ft[k]!r}" for k, on in (
      ("strategy", s == "progressive"), ("freeze_bottom", ft.freeze_bottom),
      ("layer_decay", ft.layer_decay < 1.0)) if on]
  if per_block and scanned_names(names):
    raise ValueError(f"{per_block[0]} treats each Transformer block on its own, but "
                     "model.scan_layers=True stacks a tower's blocks into one param: set "
                     "model.scan_layers=False for this fine-tune")


def make_plan(ft: ml_collections.ConfigDict, params: Any) -> Plan:
  """The plan of `ft` (config.finetune) for `params` (arrays or ShapeDtypeStructs)."""
  flat = {path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  depth = depths(flat)
  _check(ft, flat, depth)
  strategy = STRATEGIES[ft.strategy]
  groups = [(re.compile(rx), float(scale)) for rx, scale in ft.get("lr_groups", ())]

  def scale_and_start(path, _):
    name = path_name(path)
    scale, start = strategy(name, depth, ft)
    tower = tower_of(name)
    if tower is not None and ft.layer_decay < 1.0:
      scale *= ft.layer_decay ** (depth[tower] + 1 - layer_of(name, depth[tower]))
    for rx, s in groups:
      if rx.search(name):
        scale *= s
        break
    return float(scale), int(start)

  both = jax.tree_util.tree_map_with_path(scale_and_start, params)
  is_pair = lambda x: isinstance(x, tuple)
  lr_scale = jax.tree.map(lambda x: x[0], both, is_leaf=is_pair)
  start = None
  if ft.strategy == "progressive":
    start = jax.tree.map(lambda x: x[1], both, is_leaf=is_pair)
  return Plan(lr_scale, start)
