"""PEFT LoRA tensors <-> vlsafe_jax LoRA sites (``models/lora.py``), in both directions.

PEFT names a site's adapters ``<prefix><HF module path>.lora_A.<adapter>.weight`` / ``lora_B``; our sites carry
``lora_a`` (d_in, r) and ``lora_b`` (r, d_out) in Flax layout, the patch conv as a flattened ((p_h p_w C), r) /
(r, O) pair. The functions take the sites as a ``{dotted module name: site}`` mapping (``models.lora.lora_sites``),
so this package never imports the model code; ``models.lora.import_peft`` / ``export_peft`` are the model-level
entry points. torch tensors are duck-typed (torch is never imported here).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx


def _to_numpy(t) -> np.ndarray:
  # torch tensors are duck-typed (torch is never imported here); bf16 goes through float32.
  if hasattr(t, "detach"):
    t = t.detach().cpu()
    if "bfloat16" in str(t.dtype) or "float16" in str(t.dtype):
      t = t.float()
    return t.numpy()
  return np.asarray(t)


_PEFT_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])\.(?P<adapter>[^.]+)\.weight$")


def import_peft(sites: Mapping[str, nnx.Module], tensors: Mapping[str, Any],
                prefix: str | Sequence[str] = "base_model.model.", *, adapter: str = "default",
                ignore: str | None = None, allow_missing: bool = False) -> None:
  """Copies PEFT LoRA tensors into LoRA ``sites`` (``{dotted module name: site}``, ``models.lora.lora_sites`` of
  a model adapted with PEFT's r/alpha), in place.

  Names: ``<prefix><HF module path>.lora_A.<adapter>.weight`` / ``lora_B``. The HF module path after the
  prefix must equal a LoRA site's dotted nnx path (CLIP mirrors HF names). Prefixes: a PEFT-wrapped HF
  ``CLIPModel`` uses ``'base_model.model.'``; HySAC's state dict uses ``'visual.base_model.model.'`` and
  ``'textual.base_model.model.'`` (pass both); ``''`` = no prefix.

  Layouts (torch -> here): Linear A (r, in) -> (in, r); B (out, r) -> (r, out). Conv A OIHW (r, C, p_h, p_w)
  -> HWIO flatten ((p_h p_w C), r); B (O, r, 1, 1) -> (r, O).

  Args:
    tensors: name -> array (numpy, jax or torch).
    ignore: optional regex (``re.search``) of names to skip (e.g. the base weights in a full state dict).
    allow_missing: do not complain about LoRA sites that receive no tensors.

  Raises:
    ValueError: listing together every name without the prefix, non-LoRA name, name without a LoRA site,
      other-adapter name, mis-shaped tensor, and (unless allow_missing) every site left without A or B.
  """
  prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
  errors: list[str] = []
  assigned: dict[tuple[str, str], np.ndarray] = {}
  for key in sorted(tensors):
    if ignore is not None and re.search(ignore, key):
      continue
    rest = next((key[len(p):] for p in prefixes if key.startswith(p)), None)
    if rest is None:
      errors.append(f"{key}: does not start with prefix {' or '.join(map(repr, prefixes))}")
      continue
    m = _PEFT_KEY.match(rest)
    if m is None:
      errors.append(f"{key}: not a PEFT LoRA tensor name (expected '<module>.lora_A|lora_B.<adapter>.weight')")
      continue
    if m["adapter"] != adapter:
      errors.append(f"{key}: adapter {m['adapter']!r} != {adapter!r}")
      continue
    site = sites.get(m["module"])
    if site is None:
      errors.append(f"{key}: no LoRA site named {m['module']!r} in the model")
      continue
    arr = _to_numpy(tensors[key])
    var = site.lora_a if m["which"] == "A" else site.lora_b
    want = tuple(var.get_value().shape)
    conv = isinstance(site, nnx.Conv)       # LoRAConv subclasses nnx.Conv, LoRALinear nnx.Linear
    try:
      arr = _peft_layout(arr, m["which"], conv)
    except ValueError as e:
      errors.append(f"{key}: {e}")
      continue
    if arr.shape != want:
      errors.append(f"{key}: shape {tuple(_to_numpy(tensors[key]).shape)} maps to {arr.shape}, "
                    f"site {m['module']} expects {want} (rank {site.lora_rank})")
      continue
    assigned[(m["module"], m["which"])] = arr
  if not allow_missing:
    for name in sites:
      for which in "AB":
        if (name, which) not in assigned:
          errors.append(f"LoRA site {name} got no lora_{which} tensor")
  if errors:
    raise ValueError(f"PEFT import failed ({len(errors)} problems):\n  " + "\n  ".join(errors))
  for (name, which), arr in assigned.items():
    var = sites[name].lora_a if which == "A" else sites[name].lora_b
    var.set_value(jnp.asarray(arr, var.get_value().dtype))


def _peft_layout(arr: np.ndarray, which: str, conv: bool) -> np.ndarray:
  """Torch PEFT tensor -> our (rows, cols) layout; see :func:`import_peft`."""
  if not conv:
    if arr.ndim != 2:
      raise ValueError(f"Linear lora_{which} must be 2-D, got shape {arr.shape}")
    return arr.T
  if arr.ndim != 4:
    raise ValueError(f"Conv lora_{which} must be 4-D (OIHW), got shape {arr.shape}")
  if which == "A":                                      # (r, C, ph, pw) -> (ph, pw, C, r) -> (ph*pw*C, r)
    return np.transpose(arr, (2, 3, 1, 0)).reshape(-1, arr.shape[0])
  if arr.shape[2:] != (1, 1):
    raise ValueError(f"Conv lora_B must be a 1x1 kernel (O, r, 1, 1), got shape {arr.shape}")
  return arr[:, :, 0, 0].T


def export_peft(sites: Mapping[str, nnx.Module], prefix: str = "base_model.model.", adapter: str = "default"
                ) -> dict[str, np.ndarray]:
  """Inverse of :func:`import_peft`: PEFT-named float32 numpy tensors in torch layout."""
  out = {}
  for name, site in sites.items():
    a = np.asarray(site.lora_a.get_value(), np.float32)
    b = np.asarray(site.lora_b.get_value(), np.float32)
    if isinstance(site, nnx.Conv):
      ph, pw = site.kernel_size
      c = a.shape[0] // (ph * pw)
      a = np.transpose(a.reshape(ph, pw, c, -1), (3, 2, 0, 1))
      b = b.T[:, :, None, None]
    else:
      a, b = a.T, b.T
    out[f"{prefix}{name}.lora_A.{adapter}.weight"] = np.ascontiguousarray(a)
    out[f"{prefix}{name}.lora_B.{adapter}.weight"] = np.ascontiguousarray(b)
  return out



__all__ = ["import_peft", "export_peft"]
