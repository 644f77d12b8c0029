"""The import graph of mmjax: no cycles, and every edge points down the layers of
DESIGN.md (cli -> train -> tuning/evals -> io/parallel -> data/models/objectives -> config).
Function-level imports count: hiding a cycle inside a function is still a cycle."""
import ast
import pathlib

from conftest import ROOT, run_python

PACKAGE = ROOT / "mmjax"
# Lower numbers are lower layers; a module may import its own layer or any below it.
LAYERS = {
    "mmjax.config": 0, "mmjax.config_blocks": 1, "mmjax.config_checks": 1,
    "mmjax.models": 1, "mmjax.objectives": 1, "mmjax.chunked_losses": 1, "mmjax.data": 1,
    "mmjax.io": 2, "mmjax.parallel": 3,
    "mmjax.evals": 4, "mmjax.tuning": 4, "mmjax.generate": 4,
    "mmjax.train": 5, "mmjax.deploy": 5,
    "mmjax.cli": 6, "mmjax": 6,
}


def modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PACKAGE.rglob("*.py"):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def edges() -> dict[str, set[str]]:
  """module -> the mmjax modules it imports, anywhere in its body."""
  mods = modules()

  def resolve(name):
    while name and name not in mods:
      name = name.rpartition(".")[0]
    return name or None

  graph = {m: set() for m in mods}
  for m, path in mods.items():
    package = m if path.name == "__init__.py" else m.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
      targets = []
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = package.split(".")[:len(package.split(".")) - node.level + 1]
          base = ".".join(up + ([base] if base else []))
        targets = [f"{base}.{a.name}" for a in node.names]
      for t in targets:
        r = resolve(t) if t.split(".")[0] == "mmjax" else None
        if r and r != m:
          graph[m].add(r)
  return graph


def layer(module: str) -> int:
  """The layer of the nearest listed package; a new top-level module must be listed."""
  name = module
  while name not in LAYERS:
    name = name.rpartition(".")[0]
  assert name != "mmjax" or module == "mmjax", f"{module}: add it to LAYERS"
  return LAYERS[name]


def test_no_import_cycles():
  graph = edges()
  # Tarjan-free check: a module that can reach itself is on a cycle.
  cycles = []
  for start in graph:
    stack, seen = [(start, [start])], set()
    while stack:
      node, trail = stack.pop()
      for nxt in graph[node]:
        if nxt == start:
          cycles.append(" -> ".join(trail + [start]))
        elif nxt not in seen:
          seen.add(nxt)
          stack.append((nxt, trail + [nxt]))
  assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles))[:10])


def test_every_import_points_down_the_layers():
  up = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a, targets in edges().items() for b in targets
        # a package may import its own submodules (and they each other): same layer
        if layer(b) > layer(a)]
  assert not up, "\n".join(sorted(up))


def test_io_imports_only_models_config_and_the_tokenizer():
  allowed = ("mmjax.io", "mmjax.models", "mmjax.config", "mmjax.data.tokenizer",
             "mmjax.data.errors")
  bad = [f"{a} imports {b}" for a, targets in edges().items() if a.startswith("mmjax.io")
         for b in targets if not any(b == p or b.startswith(p + ".") for p in allowed)]
  assert not bad, "\n".join(sorted(bad))


def test_every_module_imports_in_a_fresh_interpreter():
  names = sorted(modules())
  code = "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
  r = run_python(code + "print('imported', %d)" % len(names), timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"imported {len(names)}" in r.stdout
