"""UWM calibration pass: capture target-layer inputs on paired safe/unsafe inputs, score, select, edit.

The pass is generic over any model whose Linear layers are named: it takes an ``encode_fn(params, inputs, mask)``
that runs one tower and returns the *inputs* of named Linear layers, ``{layer_path: x_btd}`` (``layer_path`` like
``vision_model.encoder.layers.3.mlp.fc2``, the same dotted path as the layer's kernel in ``params``). For CLIP,
:func:`clip_encode_fn` builds it from the model's ``capture=`` intermediates (no monkey-patching).

One calibration step = ONE jitted function per batch: safe forward + unsafe forward + per-sample per-feature token
statistics (``saliency.layer_stats``, text padding masked) + the rank-1 accumulator update of every target layer.
Only ``(d_in, d_out)`` accumulators live across steps (donated between steps). With several visible devices the
batch is split over the mesh's ``('data', 'fsdp')`` axes; parameters and accumulators are replicated and XLA
all-reduces the batch sums.

Batches are dicts of host arrays: ``{"safe": (B, ...), "unsafe": (B, ...)}`` plus, for text,
``{"safe_mask": (B, T), "unsafe_mask": (B, T)}`` (1 = valid token). Row n of ``safe`` and ``unsafe`` form pair n.
The last, shorter batch is padded (one compilation) and the padding rows do not count.

Editing follows the reference order (text tower first, then vision, ``uwm.md`` §1): each tower is scored from its
own calibration batches, masks are selected per layer by ``tau`` and applied with ``alpha``; the result is a NEW
parameter pytree / model, the input is untouched. :func:`masked_model` is the call-time variant for alpha/tau
sweeps (``edit.MaskedDense`` wrappers, weights unchanged).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from vlsafe_jax import sharding
from vlsafe_jax.data.sources import pad_batch
from vlsafe_jax.methods.uwm import edit, saliency

EncodeFn = Callable[[Any, jax.Array, "jax.Array | None"], Mapping[str, jax.Array]]
TOWERS = ("text", "vision")   # the reference edits text first, then vision


@dataclasses.dataclass
class CalibrationResult:
  """Scores of one tower. ``scores``: ``{layer_path: R_io}`` float32 Flax layout; ``pairs``: pairs used;
  ``dropped``: pairs skipped (a side with < 2 valid tokens)."""
  scores: dict[str, jax.Array]
  pairs: int
  dropped: int


@dataclasses.dataclass
class UWMResult:
  """An edit: the new model (or params), ``masks`` ``{layer_path: bool mask_io}``, ``scores`` and per-tower info."""
  model: Any
  masks: dict[str, jax.Array]
  scores: dict[str, jax.Array]
  info: dict[str, dict[str, Any]]


# --------------------------------------------------------------------------------------------------------------
# CLIP adapters

_LAYER_LOCAL = re.compile(r"\.encoder\.layers\.\d+\.(.+)$")


def capture_names(layer_paths: Iterable[str]) -> tuple[str, ...]:
  """Layer-local Linear names (``mlp.fc2``) of CLIP encoder-layer paths, in first-seen order.

  Raises:
    ValueError: naming the path, if a target is not a Linear inside an encoder layer (projection heads etc.
      cannot be captured through the CLIP towers).
  """
  out: list[str] = []
  for p in layer_paths:
    m = _LAYER_LOCAL.search(p)
    if m is None:
      raise ValueError(f"UWM target {p!r} is not a Linear inside a CLIP encoder layer "
                       f"('<tower>.encoder.layers.<i>.<name>'); its inputs cannot be captured")
    if m.group(1) not in out:
      out.append(m.group(1))
  return tuple(out)


def clip_encode_fn(graphdef: Any, tower: str, capture: Sequence[str]) -> EncodeFn:
  """``encode_fn(state, inputs, mask) -> {layer_path: x_btd}`` for one CLIP tower (pure; call inside jit).

  Args:
    graphdef: from ``nnx.split(clip_model)``.
    tower: ``"vision"`` (inputs: NHWC pixels, mask ignored) or ``"text"`` (inputs: token ids ``(B, T)``, mask:
      the attention mask ``(B, T)``).
    capture: layer-local Linear names (``capture_names``).
  """
  if tower not in TOWERS:
    raise ValueError(f"UWM tower must be one of {TOWERS}, got {tower!r}")
  prefix = f"{tower}_model.encoder.layers."

  def fn(state, inputs, mask=None):
    model = nnx.merge(graphdef, state)
    if tower == "vision":
      _, out = model.encode_image(inputs, capture=tuple(capture))
    else:
      _, out = model.encode_text(inputs, mask, capture=tuple(capture))
    return {k: v for k, v in out.items() if k.startswith(prefix)}
  return fn


def pairs_from_batch(batch: Mapping[str, Any], tower: str) -> dict[str, Any]:
  """Maps a ``transform.QuadrupletTransform`` batch (quadruplets or calibration pairs) to calibration pairs.

  Vision: ``safe_image``/``unsafe_image``; text: ``safe_ids``/``safe_mask``/``unsafe_ids``/``unsafe_mask``.
  """
  keys = (("safe_image", "unsafe_image") if tower == "vision"
          else ("safe_ids", "unsafe_ids", "safe_mask", "unsafe_mask"))
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f"UWM {tower} calibration batch lacks {missing}; it has {sorted(batch)}")
  if tower == "vision":
    return {"safe": batch["safe_image"], "unsafe": batch["unsafe_image"]}
  return {"safe": batch["safe_ids"], "unsafe": batch["unsafe_ids"], "safe_mask": batch["safe_mask"],
          "unsafe_mask": batch["unsafe_mask"]}


# --------------------------------------------------------------------------------------------------------------
# Calibration

def default_mesh():
  """A 1-D data mesh over all devices when several are visible, else None (plain single-device jit)."""
  return sharding.make_mesh(data=-1) if jax.device_count() > 1 else None


# Cached: a second calibrate() with the same encode_fn and config reuses the compiled step instead of building a
# fresh jax.jit (whose first call would compile again).
@functools.lru_cache(maxsize=16)
def make_step(encode_fn: EncodeFn, cfg: saliency.ScoreConfig) -> Callable:
  """The jitted calibration step ``(accs, params, kernels, batch, real_b, offset) -> accs`` (accs donated).

  Forward both sides, reduce the captured inputs of the accumulated layers to ``(a, s)`` per sample and feature
  (validity masks for text), and add the pairs to the rank-1 accumulators, all in one XLA program.
  """
  def step(accs, params, kernels, batch, real_b, offset):
    cap_s = encode_fn(params, batch["safe"], batch.get("safe_mask"))
    cap_u = encode_fn(params, batch["unsafe"], batch.get("unsafe_mask"))
    missing = [k for k in accs if k not in cap_s]
    if missing:
      raise KeyError(f"UWM encode_fn did not capture the inputs of {missing}; it returned {sorted(cap_s)[:6]}...")
    return saliency.stats_and_update(
        accs, {k: cap_s[k] for k in accs}, {k: cap_u[k] for k in accs}, kernels, cfg,
        valid_safe_bt=batch.get("safe_mask"), valid_unsafe_bt=batch.get("unsafe_mask"), real_b=real_b,
        offset=offset)
  return jax.jit(step, donate_argnums=(0,))


def calibrate(encode_fn: EncodeFn, params: Any, batches: Iterable[Mapping[str, Any]],
              targets: str | Sequence[str], cfg: saliency.ScoreConfig, *, mesh: Any = "auto",
              progress: bool = False, desc: str = "UWM calibration", total: int | None = None
              ) -> CalibrationResult:
  """Scores every target layer over the calibration batches (``uwm.md`` §3-§4).

  Args:
    encode_fn: see the module docstring; must capture the inputs of every target layer.
    params: parameter pytree holding the target kernels (``nnx.State`` or nested dict) passed to ``encode_fn``.
    batches: iterable of pair batches (module docstring); all batches but the last must have the same size.
    targets: layer-path patterns (``edit.find_targets``).
    cfg: aggregation / eps / magnitude prior.
    mesh: ``"auto"`` (data mesh over all devices when > 1), None (single device) or a ``jax.sharding.Mesh``.
    progress: tqdm bar over batches.
    total: number of batches, for the bar.

  Returns:
    :class:`CalibrationResult` with float32 scores in Flax layout.

  Raises:
    saliency.NonFiniteRatioError: a pair gave a non-finite per-sample ratio (names layer and pair index).
    ValueError: no batches, or no usable pair.
  """
  kernels = edit.find_targets(params, targets)
  if mesh == "auto":
    mesh = default_mesh()
  accs = saliency.init_accumulators(kernels, cfg.aggregation)
  n_dev = 1
  if mesh is not None:
    rep = sharding.replicated(mesh)
    params, kernels, accs = jax.device_put((params, kernels, accs), rep)
    n_dev = int(np.prod([mesh.shape[a] for a in sharding.BATCH_AXES if a in mesh.shape]))
  step = make_step(encode_fn, cfg)
  it = batches
  if progress:
    it = tqdm(batches, desc=desc, total=total, unit="batch")
  rows, offset, seen = None, 0, 0
  for batch in it:
    batch = {k: np.asarray(v) for k, v in batch.items() if v is not None}
    n = batch["safe"].shape[0]
    if batch["unsafe"].shape[0] != n:
      raise ValueError(f"UWM calibration batch {seen}: {n} safe rows but {batch['unsafe'].shape[0]} unsafe rows")
    if rows is None:
      rows = -(-n // n_dev) * n_dev   # a multiple of the batch devices
    if n > rows:
      raise ValueError(f"UWM calibration batch {seen} has {n} pairs, more than the first batch ({rows}); "
                       f"only the last batch may be shorter")
    padded = pad_batch(batch, rows)   # repeats the last real row: finite inputs, masked out of every sum by real_b
    real_b = np.arange(rows) < n
    if mesh is not None:
      padded, real_b = sharding.shard_batch((padded, real_b), mesh)
    accs = step(accs, params, kernels, padded, real_b, np.int32(offset))
    offset += n
    seen += 1
  if seen == 0:
    raise ValueError(f"{desc}: no calibration batches")
  scores = saliency.finalize_all(accs, kernels, cfg)
  first = next(iter(accs.values()))
  return CalibrationResult(scores=scores, pairs=int(first.count), dropped=int(first.dropped))


def edit_params(params: Any, scores: Mapping[str, jax.Array], tau: float, alpha: float
                ) -> tuple[Any, dict[str, jax.Array]]:
  """Selection (``edit.select_all``) + manipulation (``edit.apply``): ``(new_params, masks)``; input untouched."""
  masks = edit.select_all(scores, tau)
  return edit.apply(params, masks, alpha), masks


def uwm_params(encode_fns: Mapping[str, EncodeFn], params: Any, batches: Mapping[str, Callable[[], Iterable]],
               cfg: edit.UWMConfig, *, mesh: Any = "auto", progress: bool = False,
               totals: Mapping[str, int] | None = None) -> UWMResult:
  """UWM on a parameter pytree, tower by tower (text first, then vision): calibrate, select, apply.

  Args:
    encode_fns: ``{tower: encode_fn}`` for the towers to edit (``"text"``, ``"vision"``).
    params: the parameter pytree (not modified).
    batches: ``{tower: () -> iterable of pair batches}`` (a factory, so data are read only when needed).
    cfg: per-tower targets / tau / alpha / eps / prior and the aggregation.

  Returns:
    :class:`UWMResult` whose ``model`` is the new params pytree.
  """
  unknown = set(encode_fns) - set(TOWERS)
  if unknown:
    raise ValueError(f"UWM towers must be among {TOWERS}, got {sorted(unknown)}")
  masks, scores, info = {}, {}, {}
  cur = params
  for tower in TOWERS:
    if tower not in encode_fns:
      continue
    tc = cfg.tower(tower)
    res = calibrate(encode_fns[tower], cur, batches[tower](), tc.targets, cfg.score_config(tower), mesh=mesh,
                    progress=progress, desc=f"UWM {tower} calibration", total=(totals or {}).get(tower))
    cur, m = edit_params(cur, res.scores, tc.tau, tc.alpha)
    masks.update(m)
    scores.update(res.scores)
    info[tower] = {"pairs": res.pairs, "dropped": res.dropped, "layers": len(m), "tau": tc.tau, "alpha": tc.alpha,
                   "selected": int(sum(int(jnp.sum(x)) for x in m.values())),
                   "weights": int(sum(x.size for x in m.values()))}
  return UWMResult(model=cur, masks=masks, scores=scores, info=info)


def uwm_clip(model: Any, batches: Mapping[str, Callable[[], Iterable]], cfg: edit.UWMConfig | None = None, *,
             mesh: Any = "auto", progress: bool = False, totals: Mapping[str, int] | None = None) -> UWMResult:
  """UWM on a ``vlsafe_jax.models.clip.CLIP``: returns a NEW model (the input model is untouched).

  Args:
    model: the CLIP (both towers, or the ones named in ``batches``).
    batches: ``{"text": factory, "vision": factory}`` of pair batches (:func:`pairs_from_batch` maps
      ``QuadrupletTransform`` batches); towers absent from the dict are not edited.
    cfg: ``edit.UWMConfig()`` (CLIP ViT-L/14 defaults) when None.
  """
  cfg = cfg or edit.UWMConfig()
  graphdef, state = nnx.split(model)
  fns = {}
  for tower in batches:
    if tower not in TOWERS:
      raise ValueError(f"UWM towers must be among {TOWERS}, got {tower!r}")
    layer_paths = edit.find_targets(state, cfg.tower(tower).targets)
    fns[tower] = clip_encode_fn(graphdef, tower, capture_names(layer_paths))
  res = uwm_params(fns, state, batches, cfg, mesh=mesh, progress=progress, totals=totals)
  res.model = nnx.merge(graphdef, res.model)
  return res


# --------------------------------------------------------------------------------------------------------------
# Call-time variant

def _resolve_parent(model: Any, path: str) -> tuple[Any, str]:
  parts = path.split(".")
  obj = model
  for p in parts[:-1]:
    try:
      obj = obj[int(p)] if p.isdigit() else getattr(obj, p)
    except (AttributeError, IndexError, KeyError) as e:
      raise KeyError(f"UWM layer path {path!r}: no submodule {p!r} in {type(obj).__name__}") from e
  return obj, parts[-1]


def masked_model(model: Any, masks: Mapping[str, jax.Array], alpha: float = -1.0) -> Any:
  """A copy of ``model`` whose masked Linear layers are ``edit.MaskedDense`` (weights untouched).

  Sweep with :func:`set_alpha` / :func:`set_masks` without rewriting weights; ``alpha`` lives in a variable so a
  jitted forward does not retrace. The input model is not modified (``nnx.clone`` first).
  """
  out = nnx.clone(model)
  for path, m in masks.items():
    parent, name = _resolve_parent(out, path)
    lin = getattr(parent, name, None)
    if not isinstance(lin, nnx.Linear):
      raise KeyError(f"UWM layer path {path!r} is not an nnx.Linear (got {type(lin).__name__})")
    setattr(parent, name, edit.MaskedDense(lin, m, alpha))
  return out


def set_alpha(model: Any, alpha: float) -> None:
  """Sets the call-time alpha of every ``MaskedDense`` in ``model`` (in place)."""
  for _, node in nnx.iter_graph(model):
    if isinstance(node, edit.MaskedDense):
      node.alpha.set_value(jnp.asarray(alpha, jnp.float32))


def set_masks(model: Any, masks: Mapping[str, jax.Array]) -> None:
  """Replaces the masks of the ``MaskedDense`` layers named in ``masks`` (e.g. a new tau), in place."""
  for path, m in masks.items():
    parent, name = _resolve_parent(model, path)
    node = getattr(parent, name)
    if not isinstance(node, edit.MaskedDense):
      raise KeyError(f"UWM layer path {path!r} is not a MaskedDense")
    if m.shape != node.mask.get_value().shape:
      raise ValueError(f"UWM mask for {path!r} has shape {m.shape}, expected {node.mask.get_value().shape}")
    node.mask.set_value(jnp.asarray(m, bool))


__all__ = [
    "TOWERS", "CalibrationResult", "UWMResult", "capture_names", "clip_encode_fn", "pairs_from_batch",
    "default_mesh", "make_step", "calibrate", "edit_params", "uwm_params", "uwm_clip", "masked_model",
    "set_alpha", "set_masks",
]
