"""A Transformer stack's params in its two layouts, and the conversion between them.

  unrolled (model.scan_layers=False): "image_tower/encoder/block_3/mlp/fc1/kernel"  [I, O]
  scanned  (model.scan_layers=True):  "image_tower/encoder/blocks/mlp/fc1/kernel"   [L, I, O]

Every reader of params that may meet a model of the other layout converts here: the
checkpointer's restore (params and optimizer state: Adam's moments mirror the params'
dicts), `mmjax.io.load` into a given config, the Hugging Face import and export. Only
dicts under an "encoder" key change; a ResNet's "stage_s/block_i" never does.

Leaves may be numpy arrays, jax Arrays (or tracers) or ShapeDtypeStructs, whose
NamedSharding gains (or loses) a leading unsharded layer axis.
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

ENCODER = "encoder"
SCANNED = "blocks"
_BLOCK = re.compile(r"^block_(\d+)$")
_NAME = re.compile(r"(?:^|/)encoder/(blocks|block_\d+)/")


def scanned_names(names: Iterable[str]) -> bool | None:
  """True if "a/encoder/blocks/..." names are among `names`, False if "a/encoder/block_i/..."
  ones are, None if neither (a model without Transformer stacks)."""
  kinds = {m.group(1) == SCANNED for m in map(_NAME.search, names) if m}
  if len(kinds) > 1:
    raise ValueError("params mix the scanned (encoder/blocks) and unrolled (encoder/block_i) "
                     "layouts")
  return kinds.pop() if kinds else None


def is_scanned(tree: Any) -> bool | None:
  """`scanned_names` of a params-like tree (nested dicts, possibly inside other nodes)."""
  names = []
  _walk_dicts(tree, lambda path, node: names.append(path + "/"))
  return scanned_names(names)


def encoder_depths(params: Any) -> dict[str, int]:
  """{"image_tower/encoder": depth} of every stack in `params`, in either layout."""
  out = {}

  def visit(path, node):
    if path.rpartition("/")[2] != ENCODER:
      return
    if SCANNED in node:
      leaves = jax.tree.leaves(node[SCANNED])
      if leaves:
        out[path] = int(leaves[0].shape[0])
    else:
      blocks = _block_keys(node)
      if blocks:
        out[path] = len(blocks)

  _walk_dicts(params, visit)
  return out


def to_layout(tree: Any, scanned: bool, depths: dict[str, int] | None = None) -> Any:
  """`tree` (params, an optimizer state, a TrainState, ...) with every stack stacked
  (`scanned`) or unstacked. `depths` (`encoder_depths` of the params) is needed only to
  unstack a subtree without leaves (an optimizer state's frozen, masked-out stack)."""
  depths = encoder_depths(tree) if depths is None else depths

  def convert(path: str, node: dict) -> dict:
    node = {k: convert(f"{path}/{k}" if path else str(k), v) if isinstance(v, dict) else v
            for k, v in node.items()}
    if path.rpartition("/")[2] != ENCODER:
      return node
    return _stack(path, node) if scanned else _unstack(path, node, depths)

  return jax.tree.map(lambda node: convert("", node) if isinstance(node, dict) else node,
                      tree, is_leaf=lambda x: isinstance(x, dict))


def like(tree: Any, reference: Any) -> Any:
  """`tree` in the layout of `reference` (either params-like); unchanged when either has
  no stacks or both share a layout."""
  want = is_scanned(reference)
  if want is None or is_scanned(tree) in (None, want):
    return tree
  return to_layout(tree, want, encoder_depths(reference))


# --- helpers --------------------------------------------------------------------------

def _walk_dicts(tree: Any, visit) -> None:
  """visit(path, d) for every dict d in `tree`, path the dict keys from its outermost dict."""
  def walk(path, node):
    visit(path, node)
    for k, v in node.items():
      if isinstance(v, dict):
        walk(f"{path}/{k}" if path else str(k), v)
  for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, dict)):
    if isinstance(node, dict):
      walk("", node)


def _block_keys(node: dict) -> list[str]:
  """block_0 ... block_{n-1} of an unrolled stack, in order (an error if one is missing)."""
  numbers = sorted(int(m.group(1)) for m in map(_BLOCK.match, map(str, node)) if m)
  if numbers and numbers != list(range(len(numbers))):
    raise ValueError(f"encoder blocks {numbers} are not numbered 0..{len(numbers) - 1}")
  return [f"block_{i}" for i in numbers]


def _stack(path: str, node: dict) -> dict:
  names = _block_keys(node)
  if not names:
    return node
  try:
    stacked = jax.tree.map(lambda *xs: _stack_leaves(xs), *(node[n] for n in names))
  except ValueError as e:   # blocks of different trees: a per-block optimizer mask
    raise ValueError(f"{path}: the blocks differ in structure (a per-block freeze or "
                     f"learning rate?), so they cannot be stacked for scan_layers: "
                     f"{str(e).splitlines()[0]}") from None
  rest = {k: v for k, v in node.items() if k not in names}
  return {SCANNED: stacked, **rest}


def _unstack(path: str, node: dict, depths: dict[str, int]) -> dict:
  if SCANNED not in node:
    return node
  leaves = jax.tree.leaves(node[SCANNED])
  depth = int(leaves[0].shape[0]) if leaves else _depth_of(path, depths)
  rest = {k: v for k, v in node.items() if k != SCANNED}
  blocks = {f"block_{i}": jax.tree.map(lambda x, i=i: _take(x, i), node[SCANNED])
            for i in range(depth)}
  return {**blocks, **rest}


def _depth_of(path: str, depths: dict[str, int]) -> int:
  for key, depth in depths.items():
    if path == key or path.endswith("/" + key) or key.endswith("/" + path):
      return depth
  raise ValueError(f"{path}: cannot tell how many blocks an empty scanned stack has")


def _with_layer_axis(sharding, add: bool):
  if not isinstance(sharding, NamedSharding):
    return sharding
  spec = tuple(sharding.spec)
  return NamedSharding(sharding.mesh, P(None, *spec) if add else P(*spec[1:]))


def _stack_leaves(xs: tuple) -> Any:
  first = xs[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs), *first.shape), first.dtype,
                                sharding=_with_layer_axis(first.sharding, True))
  if all(isinstance(x, (np.ndarray, np.generic)) for x in xs):
    return np.stack(xs)
  return jnp.stack(xs)


def _take(x: Any, i: int) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype,
                                sharding=_with_layer_axis(x.sharding, False))
  return x[i]


def onto(tree: Any, target: Any) -> Any:
  """`tree` (arrays) in the layout of `target` (the same kind of tree, arrays or
  ShapeDtypeStructs), placed with `target`'s shardings when every leaf has one."""
  scanned = is_scanned(target)
  if scanned is None or is_scanned(tree) in (None, scanned):
    return tree
  convert = lambda t: to_layout(t, scanned, encoder_depths(target))
  shardings = [getattr(leaf, "sharding", None) for leaf in jax.tree.leaves(target)]
  if any(s is None for s in shardings):
    return convert(tree)
  return jax.jit(convert, out_shardings=jax.tree.map(lambda t: t.sharding, target))(tree)


def for_config(tree: Any, config) -> Any:
  """`tree` in the layout of the model `config` describes (`model.scan_layers`)."""
  want = bool(config.model.get("scan_layers", False))
  return tree if is_scanned(tree) in (None, want) else to_layout(tree, want)
