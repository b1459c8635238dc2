"""Import of the released HySAC checkpoint (``hysac_model.pth`` [+ ``hysac_bounds.json``]), ``hysac.md`` §4.4.

The reference saves one torch state dict of its ``HySAC`` module: two PEFT-0.4-wrapped HF towers and four scalars.

  visual.base_model.model.<CLIPVisionModelWithProjection key>     base weights (vision_model.*, visual_projection.*)
  textual.base_model.model.<CLIPTextModelWithProjection key>      base weights (text_model.*, text_projection.*)
  <tower prefix><module>.lora_A.default.weight                    Linear (r, in); patch conv OIHW (r, 3, 14, 14)
  <tower prefix><module>.lora_B.default.weight                    Linear (out, r); patch conv (1024, r, 1, 1)
  curv, visual_alpha, textual_alpha, logit_scale                  log-space scalars (0-d or (1,))
  pixel_mean, pixel_std                                           unused buffers (ignored)

Every key must be one of these. Base weights (when present; frozen in HySAC training) are checked by name and
shape against the ``--base`` CLIP and must equal its values (allclose, atol 1e-5 + rtol 1e-3), because the output
references ``--base`` instead of copying it. LoRA tensors go through :func:`checkpoints_convert.peft.import_peft`
(layout transforms, rank check, every site covered). All problems are collected into one error.

Output (``--dst``): the HySAC trainable-state directory (``hysac_trainable.json`` recording the base path +
``hysac_trainable.safetensors`` with LoRA + scalars; ``vlsafe_jax.model_io``), loadable with
``vlsafe_jax.methods.hysac.model.load_hysac(dst)``; plus ``bounds.json`` when ``--bounds`` is given (validated, the
reference's S/U/V/G keys). torch is imported only when :func:`read_pth` runs (``safetensors_io.torch_load``).

The HySAC model code sits above this package, so :func:`convert` is handed it as a :class:`HySACModelCode` record
(the CLI in ``__main__`` builds it from ``methods/hysac/model.py`` and ``models/lora.py``).
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints_convert import peft
from checkpoints_convert.clip import CLIP_KEYMAP
from checkpoints_convert.mapping import ConversionError
from checkpoints_convert.safetensors_io import CheckpointFormatError, check_finite, torch_load
from vlsafe_jax import model_io

PREFIXES = {"visual": "visual.base_model.model.", "textual": "textual.base_model.model."}
# What each tower's HF model may contain after its prefix (its own CLIP*ModelWithProjection keys).
_TOWER_ROOTS = {"visual": ("vision_model.", "visual_projection."), "textual": ("text_model.", "text_projection.")}
SCALAR_KEYS = ("curv", "visual_alpha", "textual_alpha", "logit_scale")
IGNORED = ("pixel_mean", "pixel_std")
_LORA = re.compile(r"\.lora_[AB]\.[^.]+\.weight$")
_BUFFER = re.compile(r"(^|\.)position_ids$")
BASE_ATOL, BASE_RTOL = 1e-5, 1e-3
# The frozen CLIP weights of a LoRA-wrapped model (LoRAParam subclasses Param), as models.lora.BASE_PARAMS.
_BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


@dataclasses.dataclass(frozen=True)
class HySACModelCode:
  """The HySAC model code :func:`convert` drives (passed in: this package sits below models/ and methods/).

  Attributes:
    build: ``(base dir, *, lora_rank, lora_alpha, lora_dropout, lora_targets) -> HySAC`` with the base CLIP of
      ``base dir`` and fresh adapters (``HySAC.from_pretrained(base, HySACOptions(...))``); the model has
      ``.clip``, ``.scalars`` and ``.clamp_scalars_()``.
    lora_sites: ``module -> {dotted site name: LoRA site}`` (``models.lora.lora_sites``).
    save: ``(model, dst, *, base_path, extra) -> Path``: writes the trainable-state directory
      (``methods.hysac.model.save_trainable``).
  """
  build: Callable[..., Any]
  lora_sites: Callable[[Any], Mapping[str, Any]]
  save: Callable[..., Any]


class HySACImportError(ConversionError):
  """Every problem found while importing a HySAC checkpoint, in one message (a :class:`ConversionError`)."""

  def __init__(self, source: str, problems: list[str]):
    self.problems = list(problems)
    self.missing, self.unexpected, self.misshaped, self.ambiguous, self.duplicate = [], [], [], [], []
    ValueError.__init__(self, f"HySAC checkpoint {source} does not match ({len(problems)} problems):\n  "
                        + "\n  ".join(problems))


def read_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """``torch.load(path, weights_only=True)`` -> ``{key: float32/int numpy}``; unwraps ``{"model": sd}``-style
  containers. Raises :class:`CheckpointFormatError` naming the file."""
  p = Path(path)
  if not p.is_file():
    raise CheckpointFormatError(f"HySAC checkpoint {p} does not exist")
  sd = torch_load(p)
  for wrapper in ("state_dict", "model", "model_state_dict"):
    if isinstance(sd, Mapping) and set(sd) == {wrapper} and isinstance(sd[wrapper], Mapping):
      sd = sd[wrapper]
  if not isinstance(sd, Mapping):
    raise CheckpointFormatError(f"{p}: expected a state dict (name -> tensor), got {type(sd).__name__}")
  out = {}
  for k, v in sd.items():
    if not hasattr(v, "detach"):
      raise CheckpointFormatError(f"{p}: entry {k!r} is a {type(v).__name__}, not a tensor")
    t = v.detach().cpu()
    out[k] = check_finite((t.float() if t.is_floating_point() else t).numpy(), p, k)
  return out


def split_keys(sd: Mapping[str, np.ndarray]) -> tuple[dict, dict, dict, list[str]]:
  """Sorts checkpoint keys into ``(lora, base, scalars, errors)``; base keys lose their tower prefix."""
  lora, base, scalars, errors = {}, {}, {}, []
  for k, v in sd.items():
    if k in IGNORED:
      continue
    if k in SCALAR_KEYS:
      if np.size(v) != 1:
        errors.append(f"{k}: scalar expected, got shape {np.shape(v)}")
      else:
        scalars[k] = float(np.reshape(v, ()))
      continue
    tower = next((t for t, p in PREFIXES.items() if k.startswith(p)), None)
    if tower is None:
      errors.append(f"{k}: unexpected key (not a tower weight under {list(PREFIXES.values())}, a scalar "
                    f"{SCALAR_KEYS} or an ignored buffer {IGNORED})")
      continue
    if _LORA.search(k):
      lora[k] = v
      continue
    rest = k[len(PREFIXES[tower]):]
    if not rest.startswith(_TOWER_ROOTS[tower]):
      errors.append(f"{k}: {tower} tower key outside {_TOWER_ROOTS[tower]}")
      continue
    if not _BUFFER.search(rest):
      base[rest] = (k, v)
  errors += [f"missing scalar {s!r}" for s in SCALAR_KEYS if s not in scalars]
  return lora, base, scalars, errors


def _check_base(model, base: Mapping[str, tuple[str, np.ndarray]]) -> list[str]:
  """Base weights of the checkpoint vs the ``--base`` CLIP inside ``model``: names, shapes, values."""
  flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model.clip, _BASE_PARAMS))}
  errors = []
  for rest, (key, arr) in sorted(base.items()):
    hits = CLIP_KEYMAP.to_ours(rest)
    if len(hits) != 1 or hits[0][0] not in flat:
      errors.append(f"{key}: no matching tensor in the base CLIP ({'no rule' if not hits else hits[0][0]})")
      continue
    path, tf = hits[0]
    ours = np.asarray(flat[path].get_value(), np.float32)
    got = tf.forward(np.asarray(arr, np.float32))
    if got.shape != ours.shape:
      errors.append(f"{key}: shape {arr.shape} maps to {got.shape}, base CLIP {path} has {ours.shape}")
    elif not np.allclose(got, ours, atol=BASE_ATOL, rtol=BASE_RTOL):
      errors.append(f"{key}: differs from the --base CLIP's {path} (max |diff| {np.abs(got - ours).max():.3g}); "
                    f"the checkpoint was trained on another base model")
  return errors


def convert(src: str | os.PathLike, base: str | os.PathLike, dst: str | os.PathLike, *, code: HySACModelCode,
            bounds: str | os.PathLike | None = None, lora_alpha: float = 1.0, lora_dropout: float = 0.1,
            check_base: bool = True) -> Path:
  """Converts the released HySAC checkpoint into a trainable-state directory (see the module docstring).

  Args:
    src: ``hysac_model.pth``.
    base: HF (or converted) CLIP directory the checkpoint was fine-tuned from (openai/clip-vit-large-patch14).
    dst: output directory.
    code: the HySAC model code (:class:`HySACModelCode`).
    bounds: optional ``hysac_bounds.json``, copied to ``dst/bounds.json`` after validation.
    lora_alpha: PEFT ``lora_alpha`` (not stored in a state dict; HySAC used 1 with r = 16 -> scaling 1/16). The
      rank is read from the tensors.
    lora_dropout: recorded for further training (inference never uses dropout).
    check_base: compare the checkpoint's base weights with ``base``.

  Returns:
    ``dst`` as a Path.

  Raises:
    HySACImportError (a ConversionError): every unmatched / mis-shaped / differing key at once.
  """
  sd = read_pth(src)
  lora, base_w, scalars, errors = split_keys(sd)
  ranks = {int(v.shape[0]) for k, v in lora.items() if ".lora_A." in k and np.ndim(v) >= 2}
  if len(ranks) > 1:
    errors.append(f"LoRA ranks differ across sites: {sorted(ranks)}")
  if not lora:
    errors.append("no LoRA tensors (<tower prefix><module>.lora_A.default.weight) found")
  b = model_io.load_bounds(bounds) if bounds is not None else None
  if errors:
    raise HySACImportError(str(src), errors)
  targets = sorted({re.sub(r"\.lora_[AB]\..*$", "", k).rsplit(".", 1)[-1] for k in lora})
  model = code.build(base, lora_rank=ranks.pop(), lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                     lora_targets=tuple(targets))
  if check_base:
    errors += _check_base(model, base_w)
  try:
    peft.import_peft(code.lora_sites(model.clip), lora, prefix=tuple(PREFIXES.values()))
  except ValueError as e:
    errors.append(str(e))
  if errors:
    raise HySACImportError(str(src), errors)
  for name, value in scalars.items():
    var = getattr(model.scalars, name)
    var.set_value(jnp.asarray(value, jnp.float32))
  raw = dict(scalars)
  model.clamp_scalars_()
  out = code.save(model, dst, base_path=str(Path(base).resolve()),
                  extra={"source": str(Path(src).resolve()), "imported_scalars": raw,
                         "imported_from": "hysac_model.pth (PEFT 0.4 state dict)"})
  if b is not None:
    model_io.save_bounds(Path(out) / "bounds.json", b)
  return Path(out)


__all__ = ["HySACImportError", "HySACModelCode", "PREFIXES", "SCALAR_KEYS", "read_pth", "split_keys", "convert"]
