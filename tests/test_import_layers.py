"""The house plan's import rule, checked on the source: imports point down the layers, and no two files import
each other.

Every ``import`` and ``from ... import`` in ``vlsafe_jax/`` and ``checkpoints_convert/`` is read with ``ast``,
including the ones inside function bodies (a lazy import is still a dependency). ``from pkg import name`` counts as
an import of ``pkg.name`` when that is a module. The layer order is written once, in ``LAYERS``.
"""
from __future__ import annotations

import ast
import itertools
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("vlsafe_jax", "checkpoints_convert")

# Highest first. A module belongs to the first layer with a matching prefix (a prefix matches the module itself and
# everything below it). A module may import from its own layer or any lower one, never from a higher one.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("entry points", ("vlsafe_jax.train.__main__", "vlsafe_jax.evaluate", "vlsafe_jax.uwm", "vlsafe_jax.cmrm",
                      "vlsafe_jax.tga", "vlsafe_jax.hysac_probe", "vlsafe_jax.bench",
                      "checkpoints_convert.__main__")),
    ("jobs", ("vlsafe_jax.jobs",)),
    ("train and eval", ("vlsafe_jax.train", "vlsafe_jax.eval")),
    ("methods", ("vlsafe_jax.methods",)),
    ("models", ("vlsafe_jax.models",)),
    ("conversion tables", ("checkpoints_convert",)),
    ("data", ("vlsafe_jax.data",)),
    ("geometry", ("vlsafe_jax.geometry",)),
    ("utilities", ("vlsafe_jax.sharding", "vlsafe_jax.checkpoint", "vlsafe_jax.perf", "vlsafe_jax.config",
                   "vlsafe_jax.model_io", "vlsafe_jax._compat", "vlsafe_jax")),
)


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for pkg in PACKAGES:
    for path in (ROOT / pkg).rglob("*.py"):
      parts = path.relative_to(ROOT).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


def layer_of(module: str) -> int:
  for rank, (_, prefixes) in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return rank
  raise AssertionError(f"{module}: in no layer of LAYERS; add it there")


def imports(modules: dict[str, pathlib.Path]) -> list[tuple[str, str, int]]:
  """(importer, imported module, line) for every project-internal import, lazy ones included."""
  edges = []
  for mod, path in modules.items():
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base = mod.split(".") if is_pkg else mod.split(".")[:-1]
          base = base[:len(base) - node.level + 1]
          pkg = ".".join(base + ([node.module] if node.module else []))
        else:
          pkg = node.module or ""
        # ``from pkg import sub`` imports the module pkg.sub when there is one.
        targets = [f"{pkg}.{a.name}" if f"{pkg}.{a.name}" in modules else pkg for a in node.names]
      else:
        continue
      for target in targets:
        if target.split(".")[0] in PACKAGES:
          while target not in modules and "." in target:
            target = target.rsplit(".", 1)[0]
          if target != mod and not mod.startswith(target + "."):  # a package's own __init__ on the way down
            edges.append((mod, target, node.lineno))
  return sorted(set(edges))


def test_every_module_has_a_layer():
  for mod in _modules():
    layer_of(mod)


def test_imports_point_down_the_layers():
  upward = [f"{src}:{line} imports {dst} ({LAYERS[layer_of(src)][0]} -> {LAYERS[layer_of(dst)][0]})"
            for src, dst, line in imports(_modules()) if layer_of(dst) < layer_of(src)]
  assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_no_file_imports_a_file_that_imports_it():
  edges = {(s, d) for s, d, _ in imports(_modules())}
  circles = sorted({tuple(sorted(p)) for p in edges if (p[1], p[0]) in edges})
  assert not circles, f"file-pair circles: {circles}"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
  """The check can fail: a lazy import of a job from a model module is reported."""
  pkg = tmp_path / "vlsafe_jax"
  (pkg / "models").mkdir(parents=True)
  (pkg / "jobs").mkdir()
  for p in (pkg / "__init__.py", pkg / "models" / "__init__.py", pkg / "jobs" / "__init__.py", pkg / "jobs" / "x.py"):
    p.write_text("")
  (pkg / "models" / "m.py").write_text("def f():\n  from vlsafe_jax.jobs import x\n")
  monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
  mods = {k: v for k, v in _modules().items()}
  assert ("vlsafe_jax.models.m", "vlsafe_jax.jobs.x", 2) in imports(mods)
  with pytest.raises(AssertionError, match="vlsafe_jax.models.m:2 imports vlsafe_jax.jobs.x"):
    test_imports_point_down_the_layers()
