"""Mesh construction and the project's one logical-axis table.

Models annotate parameters with *logical* axis names (``nnx.with_partitioning(init, ("embed", "mlp"))``) and
never mention mesh axes. Trainers and generators place state and batches through this module, which maps
logical names onto a 3-axis mesh ``('data', 'fsdp', 'model')``:

  * ``data``  - pure data parallelism (parameters replicated along it);
  * ``fsdp``  - data parallelism whose devices also split parameters along their ``embed`` axis (ZeRO-3 style);
  * ``model`` - tensor parallelism over MLP hidden units, attention heads and the vocabulary.

The batch is always split over ``('data', 'fsdp')``. The same table serves every strategy: a replicated run is
a mesh of shape ``(n, 1, 1)``, FSDP is ``(1, n, 1)``, tensor parallel ``(1, 1, n)``, and mixtures work too.
A dimension that a mesh axis does not divide stays replicated along it (tiny test models have prime sizes).

Meshes are built with ``AxisType.Auto`` on every axis (classic GSPMD; ``platform.md`` §8.2) so that
``with_sharding_constraint`` works identically on jax 0.10.2 and 0.11.x.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")

# The one table: logical axis name -> mesh axis (or None = replicated). Parameter axes first, then activations.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("vocab", "model"),        # embedding rows / LM-head columns
    ("embed", "fsdp"),         # model width: split by FSDP, replicated otherwise
    ("mlp", "model"),          # MLP hidden units
    ("heads", "model"),        # attention query heads (x head_dim, fused in one Linear output)
    ("kv_heads", "model"),     # key/value heads (GQA)
    ("lora_rank", None),       # LoRA rank r: tiny, never split
    ("conv_hw", None),         # conv kernel spatial dims
    ("conv_in", None),         # conv input channels (RGB)
    ("positions", None),       # learned position-embedding rows
    ("norm", None),            # LayerNorm / RMSNorm scales and biases
    ("scalar", None),          # learned scalars (HySAC curvature, alphas, logit scale)
    # activations
    ("batch", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "model"),
    ("act_heads", "model"),
)


def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a ``('data', 'fsdp', 'model')`` mesh with Auto axis types.

  Args:
    data, fsdp, model: axis sizes; exactly one may be -1, meaning "all remaining devices".
    devices: devices to use (default: all of ``jax.devices()``, every host's in multi-host runs).

  Returns:
    A ``jax.sharding.Mesh`` whose size equals the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, model]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data}, fsdp={fsdp}, model={model}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split into mesh axes {sizes}")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"{len(devices)} are visible")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None, rules=LOGICAL_RULES) -> P:
  """Maps a tuple of logical axis names to a ``PartitionSpec`` through ``rules``.

  If ``shape`` and ``mesh`` are given, any dimension the assigned mesh axes do not divide is replicated
  instead (so prime-sized test models place on any mesh). Mesh axes of size 1 are dropped.
  """
  if not logical:
    return P()
  table = dict(rules)
  out = []
  for i, name in enumerate(logical):
    axes = table.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if mesh is not None:
      axes = tuple(a for a in axes if mesh.shape[a] > 1)
      if shape is not None and axes:
        if shape[i] % int(np.prod([mesh.shape[a] for a in axes])):
          axes = ()
    out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
  return P(*out)


def _logical_names(var: nnx.Variable) -> tuple | None:
  meta = var.get_metadata()
  return meta.get("out_sharding") or meta.get("sharding_names")


def state_shardings(state: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """NamedShardings for an nnx ``State`` (concrete or abstract) from its logical annotations.

  Variables without annotations are replicated.
  """
  def one(x):
    if isinstance(x, nnx.Variable):
      spec = logical_to_spec(_logical_names(x), getattr(x.get_value(), "shape", None), mesh, rules)
      return x.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def put(tree: Any, shardings: Any) -> Any:
  """``jax.device_put(tree, shardings)`` that also works when the shardings span several processes.

  Multi-process JAX refuses to ``device_put`` an array committed to one local device (e.g. a freshly built model's
  weights) onto devices of other processes, and checks uncommitted inputs with one cross-process comparison per
  leaf. Here every process builds its own shards from its local copy (``jax.make_array_from_callback``), so every
  process must pass the same values (same seed, same checkpoint). Typed PRNG keys travel as their key data.

  Args:
    tree: pytree of numpy arrays, jax arrays on this process's devices, or typed PRNG key arrays.
    shardings: one ``Sharding`` or a matching pytree of them.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def one(x, s):
    if s.is_fully_addressable:
      return jax.device_put(x, s)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      # Key data has one more trailing axis than the keys; the same sharding leaves it whole.
      return jax.random.wrap_key_data(one(jax.random.key_data(x), s), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])
  return jax.tree.map(one, tree, shardings)


def place_state(state: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
  """Moves an nnx ``State`` onto ``mesh`` according to its logical annotations (:func:`put`)."""
  shardings = state_shardings(state, mesh, rules)
  return jax.tree.map(put, state, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch-major array: leading axis over ``('data', 'fsdp')``, the rest replicated."""
  axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
  lead = None if not axes else (axes[0] if len(axes) == 1 else axes)
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1))))


@functools.lru_cache(maxsize=None)
def process_batch_block(mesh: Mesh) -> tuple[int, int]:
  """``(block, count)``: this process's devices hold rows ``[block*B/count, (block+1)*B/count)`` of every global
  batch placed by :func:`batch_sharding` on ``mesh`` (``count`` = number of processes).

  Raises ValueError when the batch axes do not give each process one contiguous block of its own, e.g. a
  ``model`` axis spanning hosts (the batch is then replicated across processes, but every host reads different
  rows). Meshes from :func:`make_mesh` over CPU or GPU devices (sorted by id, process-major) put process ``p``'s
  block at ``p``: the order of the data loaders' host slices (``data/pipeline.py``).
  """
  n = jax.process_count()
  shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  held = {idx[0].indices(shards)[0] for idx in batch_sharding(mesh, 1).addressable_devices_indices_map(
      (shards,)).values()}
  per = shards // n
  if shards % n or len(held) != per or max(held) - min(held) != per - 1:
    raise ValueError(
        f"mesh {dict(mesh.shape)} over {n} processes: process {jax.process_index()} holds batch shards "
        f"{sorted(held)} of {shards}; each process must hold one contiguous block of {shards}/{n} (make the "
        f"batch axes {BATCH_AXES} span the processes, e.g. keep the 'model' axis within a host)")
  return min(held) // per, n


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Places a pytree of host (numpy) arrays on ``mesh``, split along the batch axis.

  Single-process: a plain ``device_put`` of the global batch. Multi-process: each process passes its *local* rows
  (``B / process_count``, its loader's host slice) and ``jax.make_array_from_process_local_data`` assembles the
  global array, with this process's rows at its devices' block (:func:`process_batch_block`, checked here).
  """
  multi = jax.process_count() > 1
  if multi:
    process_batch_block(mesh)

  def one(x):
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    s = batch_sharding(mesh, x.ndim)
    if multi:
      return jax.make_array_from_process_local_data(s, np.asarray(x))
    return jax.device_put(x, s)
  return jax.tree.map(one, batch)


def constrain(x: jax.Array, logical: Sequence[str | None], rules=LOGICAL_RULES) -> jax.Array:
  """``with_sharding_constraint`` by logical names; a no-op without a (multi-device) mesh context.

  Works inside ``jit``: the mesh comes from ``jax.set_mesh`` via the abstract mesh.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


__all__ = [
    "MESH_AXES", "BATCH_AXES", "LOGICAL_RULES", "make_mesh", "logical_to_spec", "state_shardings",
    "put", "place_state", "batch_sharding", "process_batch_block", "shard_batch", "constrain", "replicated",
]
