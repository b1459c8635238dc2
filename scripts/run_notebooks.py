"""Execute the notebooks in ``notebooks/`` top to bottom and write executed copies (for viewing).

  python scripts/run_notebooks.py OUT_DIR [--only hysac,uwm] [-p NAME KEY=VALUE ...] [--cwd DIR] [--timeout S]
  python scripts/run_notebooks.py --strip        # clear outputs of notebooks/*.ipynb in place (before a commit)

The committed notebooks carry no outputs (tests/notebooks/test_notebooks.py fails if one does): outputs would go
stale the moment the library changes, so instead every notebook is executed by the test suite and this command
regenerates executed copies on demand. Copies go to ``OUT_DIR/<name>.ipynb``; the sources are never modified.

Runner: ``nbclient`` (the Jupyter project's execution engine, the one under ``nbconvert --execute`` and papermill),
with the ``python3`` kernel of the current environment. Parameters follow papermill's convention: the first code
cell tagged ``parameters`` holds the defaults (CPU, synthetic settings), and overrides go into a new cell tagged
``injected-parameters`` inserted right after it, so later assignments win and the notebook itself stays unchanged.

``-p hysac KEY=VALUE`` overrides a parameter of notebook ``hysac`` (VALUE is a Python literal, e.g.
``CLIP_DIR='/ckpt/clip-vit-large-patch14'`` or ``BATCH=8``). The test suite uses the same functions.
"""
from __future__ import annotations

import argparse
import ast
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
KERNEL = "python3"


class NotebookCellError(RuntimeError):
  """A cell of a notebook raised; the message names the notebook, the cell index and the start of its source."""


def notebook_paths(directory: Path = NOTEBOOK_DIR) -> list[Path]:
  """Every ``*.ipynb`` in ``directory`` (checkpoint folders excluded), sorted by name."""
  return sorted(p for p in directory.glob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def parameters_index(nb: Any, name: str = "") -> int:
  """Index of the first code cell tagged ``parameters``; a ValueError naming the notebook if there is none."""
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code" and PARAMETERS_TAG in cell.get("metadata", {}).get("tags", []):
      return i
  raise ValueError(f"{name or 'notebook'}: no code cell tagged {PARAMETERS_TAG!r} (the parameters cell)")


def inject_parameters(nb: Any, params: Mapping[str, Any], name: str = "") -> Any:
  """Inserts a cell tagged ``injected-parameters`` with ``KEY = repr(value)`` lines after the parameters cell.

  Every key must be assigned in the parameters cell, so a misspelt override fails here instead of being ignored.
  """
  i = parameters_index(nb, name)
  if not params:
    return nb
  assigned = set()
  for node in ast.parse(nb.cells[i].source).body:
    if isinstance(node, ast.Assign):
      assigned |= {t.id for t in node.targets if isinstance(t, ast.Name)}
  unknown = sorted(set(params) - assigned)
  if unknown:
    raise ValueError(f"{name or 'notebook'}: parameters {unknown} are not assigned in its parameters cell "
                     f"(known: {sorted(assigned)})")
  src = "# Parameters injected by the runner (papermill convention)\n" + "\n".join(
      f"{k} = {v!r}" for k, v in params.items())
  cell = nbformat.v4.new_code_cell(src, metadata={"tags": [INJECTED_TAG]})
  nb.cells.insert(i + 1, cell)
  return nb


def execute(path: Path, *, cwd: Path, params: Mapping[str, Any] | None = None, timeout: int = 900,
            out_path: Path | None = None) -> tuple[Any, dict[str, float]]:
  """Runs notebook ``path`` in a fresh ``python3`` kernel with working directory ``cwd``.

  Returns ``(executed notebook, {"total_s": wall seconds})`` (per-cell times are in each cell's
  ``metadata.execution``). A failing cell raises
  :class:`NotebookCellError` naming the notebook and the cell (0-based index over all cells, markdown included);
  the partly executed copy is still written to ``out_path`` when given.
  """
  nb = nbformat.read(path, as_version=4)
  inject_parameters(nb, dict(params or {}), path.name)
  client = NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}},
                          record_timing=True)
  t0 = time.perf_counter()
  try:
    client.execute()
  except CellExecutionError as e:
    idx = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"
                and any(o.get("output_type") == "error" for o in c.get("outputs", []))), None)
    lines = nb.cells[idx].source.strip().splitlines() if idx is not None else []
    head = lines[0][:100] if lines else ""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))   # the kernel's traceback comes with ANSI colours
    raise NotebookCellError(f"{path.name}: cell {idx} ({head!r}) failed:\n{text}") from e
  finally:
    if out_path is not None:
      out_path.parent.mkdir(parents=True, exist_ok=True)
      nbformat.write(nb, out_path)
  timing = {"total_s": time.perf_counter() - t0}
  return nb, timing


def strip_outputs(nb: Any) -> bool:
  """Removes outputs and execution counts in place; True if anything was removed."""
  changed = False
  for cell in nb.cells:
    if cell.cell_type == "code":
      if cell.get("outputs") or cell.get("execution_count") is not None:
        changed = True
      cell["outputs"], cell["execution_count"] = [], None
  return changed


def _parse_params(items: list[list[str]]) -> dict[str, dict[str, Any]]:
  out: dict[str, dict[str, Any]] = {}
  for name, kv in items:
    key, sep, value = kv.partition("=")
    if not sep:
      raise SystemExit(f"-p {name} {kv}: expected KEY=VALUE")
    try:
      out.setdefault(name, {})[key.strip()] = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
      raise SystemExit(f"-p {name} {kv}: VALUE must be a Python literal ({e})") from e
  return out


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("out_dir", type=Path, nargs="?")
  ap.add_argument("--strip", action="store_true", help="clear the outputs of notebooks/*.ipynb in place and exit")
  ap.add_argument("--only", default="", help="comma-separated notebook names (default: all)")
  ap.add_argument("-p", nargs=2, action="append", default=[], metavar=("NOTEBOOK", "KEY=VALUE"))
  ap.add_argument("--cwd", type=Path, default=None, help="kernel working directory (default: OUT_DIR)")
  ap.add_argument("--timeout", type=int, default=900, help="seconds per cell")
  args = ap.parse_args(argv)
  if args.strip:
    for p in notebook_paths():
      nb = nbformat.read(p, as_version=4)
      if strip_outputs(nb):
        nbformat.write(nb, p)
        print(f"{p.name}: outputs cleared")
    return 0
  if args.out_dir is None:
    ap.error("OUT_DIR is required (or --strip)")
  params = _parse_params(args.p)
  only = {s for s in args.only.split(",") if s}
  paths = [p for p in notebook_paths() if not only or p.stem in only]
  missing = only - {p.stem for p in paths} | set(params) - {p.stem for p in paths}
  if missing:
    raise SystemExit(f"no notebook named {sorted(missing)} in {NOTEBOOK_DIR}")
  args.out_dir.mkdir(parents=True, exist_ok=True)
  cwd = (args.cwd or args.out_dir).resolve()
  failed = 0
  for p in paths:
    try:
      _, t = execute(p, cwd=cwd, params=params.get(p.stem), timeout=args.timeout, out_path=args.out_dir / p.name)
      print(f"{p.name}: ok ({t['total_s']:.0f} s) -> {args.out_dir / p.name}")
    except NotebookCellError as e:
      failed += 1
      print(f"{p.name}: FAILED -> {args.out_dir / p.name}\n{e}", file=sys.stderr)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
