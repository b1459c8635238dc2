"""Type checks for config fields read from a ``config.json`` dict, so a wrong-typed value is reported by its key.

The config dataclasses annotate their fields with plain types (``int``, ``float``, ``str``, ``bool``, optionally
``| None``); a value of another JSON type would otherwise fail far away (``hidden_size % heads`` on a string) with a
message that names neither the file nor the field.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Annotation head -> accepted Python types (JSON numbers: an int is a valid float; bool is never a number here).
_ACCEPT = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def check_field_types(cls, values: Mapping[str, Any], where: str) -> None:
  """Raises ``ValueError`` naming ``where.<field>`` for the first value whose JSON type does not fit the field.

  Only fields annotated ``T`` or ``T | None`` with T in int/float/str/bool are checked; ``None`` is accepted for
  ``T | None``; richer annotations (tuples, unions of several types) are left to the dataclass.
  """
  fields = {f.name: str(f.type).replace(" ", "") for f in dataclasses.fields(cls)}
  for key, v in values.items():
    ann = fields.get(key)
    if ann is None:
      continue
    head, _, rest = ann.partition("|")
    if head not in _ACCEPT or rest not in ("", "None"):
      continue
    if v is None and rest == "None":
      continue
    ok = isinstance(v, _ACCEPT[head]) and (head == "bool" or not isinstance(v, bool))
    if not ok:
      raise ValueError(f"{where}.{key} must be {'an' if head == 'int' else 'a'} {head}"
                       f"{' or null' if rest else ''}, got {type(v).__name__} {v!r:.60}")


__all__ = ["check_field_types"]
