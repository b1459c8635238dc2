"""Python config files (``get_config(arg)`` -> ``ml_collections.ConfigDict``) and ``key=value`` overrides.

A config is a Python file under ``configs/`` (or anywhere) defining ``get_config(arg: str | None)``. It is
referenced by path (``configs/hysac_synthetic.py``), by path with an argument (``configs/x.py:smoke``), or by
bare name (``hysac_synthetic``, looked up in the packaged ``configs`` directory). The returned ConfigDict is
locked, so an override naming an unknown key fails with the key and the closest known names.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_path(spec: str) -> tuple[Path, str | None]:
  """Splits ``path[:arg]`` and finds the file (a bare name is looked up in ``configs/``)."""
  path, _, arg = spec.partition(":")
  arg = arg or None
  p = Path(path)
  if not p.suffix:
    p = p.with_suffix(".py")
  # Relative paths are tried as given, then inside the packaged configs/ directory.
  rel = p.relative_to("configs") if p.parts and p.parts[0] == "configs" else p
  for candidate in (p, CONFIG_DIR / rel):
    if candidate.exists():
      return candidate, arg
  known = sorted(x.stem for x in CONFIG_DIR.glob("*.py") if not x.stem.startswith("_"))
  raise FileNotFoundError(f"config file {spec!r} not found (known configs in {CONFIG_DIR}: {known})")


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads ``get_config(arg)`` from a config file and applies ``key=value`` overrides."""
  path, arg = resolve_path(spec)
  mod_name = f"_vlsafe_config_{path.stem}"
  module_spec = importlib.util.spec_from_file_location(mod_name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path} defines no get_config(arg)")
  cfg = module.get_config(arg) if arg is not None else module.get_config()
  if not isinstance(cfg, ml_collections.ConfigDict):
    cfg = ml_collections.ConfigDict(cfg)
  cfg.lock()
  apply_overrides(cfg, overrides, source=str(path))
  return cfg


def _parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    low = text.lower()
    if low in ("true", "false"):
      return low == "true"
    if low in ("none", "null"):
      return None
    return text


def _known_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in cfg.items():
    out.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      out.extend(_known_keys(v, prefix + k + "."))
  return out


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str], source: str = "config") -> None:
  """Applies ``a.b.c=value`` strings in place. Values are Python literals; bare words are strings."""
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"override {item!r} is not of the form key=value")
    key, text = item.split("=", 1)
    value = _parse_value(text)
    node = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        close = difflib.get_close_matches(key, _known_keys(cfg), n=5)
        raise KeyError(f"unknown config key {key!r} in override {item!r} (config {source}); "
                       f"did you mean one of {close}?")
      if i < len(parts) - 1:
        node = node[part]
    old = node[parts[-1]]
    # ConfigDict rejects type changes; allow int -> float and tuple/list literal round trips.
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    try:
      node[parts[-1]] = value
    except TypeError as e:
      raise TypeError(f"override {item!r}: {e}") from None


def to_dict(cfg: ml_collections.ConfigDict) -> dict:
  return cfg.to_dict()


def split_cli(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
  """Splits ``--flag value`` / ``--flag=value`` options from ``key=value`` overrides."""
  flags, overrides = {}, []
  it = iter(argv)
  for a in it:
    if a.startswith("--"):
      if "=" in a:
        k, v = a[2:].split("=", 1)
      else:
        k, v = a[2:], next(it, None)
        if v is None:
          raise ValueError(f"option {a} needs a value")
      flags[k.replace("-", "_")] = v
    else:
      overrides.append(a)
  return flags, overrides


def load_cli(argv: Sequence[str], default_config: str, commands: Sequence[str] = ()
             ) -> tuple[ml_collections.ConfigDict, Path, str | None]:
  """The entry points' ``[--config C] [--workdir DIR] [COMMAND] [key=value ...]`` command line.

  Returns ``(config with overrides, run directory (default runs/<config name>), the one COMMAND given or None)``;
  a second command or an unknown ``--flag`` exits with a usage message.
  """
  flags, rest = split_cli(argv)
  given = [a for a in rest if a in commands]
  if len(given) > 1:
    raise SystemExit(f"give one command of {tuple(commands)}, got {given}")
  unknown = set(flags) - {"config", "workdir"}
  if unknown:
    raise SystemExit(f"unknown option(s) {sorted('--' + u for u in unknown)}; use --config, --workdir, key=value")
  cfg = load(flags.get("config", default_config), [a for a in rest if a not in commands])
  return cfg, Path(flags.get("workdir", Path("runs") / cfg.name)), (given[0] if given else None)


__all__ = ["load", "load_cli", "apply_overrides", "split_cli", "to_dict", "resolve_path", "CONFIG_DIR"]
