"""``python -m vlsafe_jax.bench NAME [options]``: runs one benchmark workload (perf.md §5).

Each workload lives in ``vlsafe_jax/bench/<NAME>.py`` and defines ``main(argv: list[str]) -> None``; it
times the JAX side and its PyTorch reference in the same process and prints a table with the device named.
"""
import importlib
import pkgutil
import sys

import vlsafe_jax.bench as _pkg


def available() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(_pkg.__path__) if not m.name.startswith("_"))


def main(argv: list[str]) -> None:
  if not argv or argv[0] in ("-h", "--help"):
    print(__doc__)
    print("available:", ", ".join(available()))
    return
  name, rest = argv[0], argv[1:]
  if name not in available():
    raise SystemExit(f"unknown benchmark {name!r}; available: {', '.join(available())}")
  importlib.import_module(f"vlsafe_jax.bench.{name}").main(rest)


if __name__ == "__main__":
  main(sys.argv[1:])
