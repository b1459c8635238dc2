"""Loop pieces shared by the trainers (``clip_trainer``, ``hysac_trainer``, ``tga_trainer``, ``vlm_base``,
``lorentz_demo``): run directory, metrics, optimizer, one setup (:func:`build_setup`), one jitted update with
donation and gradient accumulation (:func:`make_update_fn`), orbax resume, non-finite guard, progress bars.

Train state is a plain dict pytree ``{"params": pure dict, "opt": optax state, "step": int32}``; the frozen part of
a model (base weights, rng streams) is a separate, non-donated pure dict. ``make_update_fn`` turns a loss function
``loss_fn(params, frozen, batch, key) -> (loss, aux)`` into the jitted ``(state, frozen, batch, rng) -> (state,
metrics)`` step: one trace, state donated, ``out_shardings`` pinned.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from vlsafe_jax import checkpoint as ckpt_lib
from vlsafe_jax import perf, sharding
from vlsafe_jax.data import pipeline, sources

State = dict[str, Any]


class NonFiniteLossError(RuntimeError):
  """Raised when a step produced a NaN/Inf loss with ``nonfinite="raise"``; the last checkpoint is untouched."""


class StopAfterSteps(RuntimeError):
  """Raised after ``max_steps_this_run`` steps (simulates a killed job; the run resumes from its checkpoint)."""


# --------------------------------------------------------------------------------------------------------------
# Run directory and metrics
# --------------------------------------------------------------------------------------------------------------

def maybe_initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
  """Starts JAX's multi-process runtime (``jax.distributed.initialize``) when the launch asks for it: config
  ``distributed=True`` or the environment variable ``JAX_COORDINATOR_ADDRESS``. Call it before anything touches a
  JAX device (the trainers' ``run`` does so first); a second call is a no-op.

  Under SLURM, Open MPI, Kubernetes and on Cloud TPU, JAX detects every argument itself. Elsewhere (one command
  per host or per device) set ``JAX_COORDINATOR_ADDRESS=host:port`` of process 0 and, read here because JAX has no
  variables for them, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; ``JAX_LOCAL_DEVICE_IDS=0,1`` (read by JAX)
  restricts a process to some of its host's devices. CPU processes use JAX's default gloo collectives.
  """
  want = bool(cfg.get("distributed", False)) or "JAX_COORDINATOR_ADDRESS" in os.environ
  if not want or jax.distributed.is_initialized():
    return
  env_int = lambda name: int(os.environ[name]) if os.environ.get(name) else None
  jax.distributed.initialize(num_processes=env_int("JAX_NUM_PROCESSES"), process_id=env_int("JAX_PROCESS_ID"))
  print(f"[distributed] process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of "
        f"{jax.device_count()} devices", flush=True)


_ABSENT = object()


def _flat(d: dict, prefix: str = "") -> dict:
  """``{"a": {"b": 1}} -> {"a.b": 1}`` (config keys as the command line spells them)."""
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def prepare_workdir(workdir: Path, cfg: ml_collections.ConfigDict) -> Path:
  """Creates the run directory and writes ``config.json``; a different config in an existing run is an error
  (a new ``--workdir`` starts afresh), except for the keys that only control how far this process runs."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "config.json"
  new = json.loads(json.dumps(cfg.to_dict(), default=list))
  volatile = ("max_steps_this_run",)
  strip = lambda d: {k: (strip(v) if isinstance(v, dict) else v) for k, v in d.items() if k not in volatile}
  if path.exists() and jax.process_index() == 0:
    old = json.loads(path.read_text())
    if strip(old) != strip(new):
      a, b = _flat(strip(old)), _flat(strip(new))
      diff = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(a.keys() | b.keys())
              if a.get(k, _ABSENT) != b.get(k, _ABSENT)]
      raise ValueError(f"{path} holds a different config ({'; '.join(diff[:8])}{' ...' if len(diff) > 8 else ''}); "
                       f"re-run with the same config to resume, or pass a new --workdir to start afresh")
  if jax.process_index() == 0:
    ckpt_lib.write_text_atomic(path, json.dumps(new, indent=2))
  return workdir


class MetricsWriter:
  """Appends JSON lines to ``metrics.jsonl`` (process 0 only). On resume, :meth:`truncate` drops the records a
  killed run wrote after its last checkpoint, so a resumed run's log equals an uninterrupted one."""

  def __init__(self, path: Path):
    self.path = Path(path)

  def truncate(self, stage: str, step: int) -> None:
    """Drops ``stage``'s records with ``step`` > ``step`` (0: all of them) and a torn last line (a process killed
    mid-append). The file is replaced atomically, so a kill during the truncation loses nothing."""
    if not self.path.exists() or jax.process_index() != 0:
      return
    text = self.path.read_text()
    lines = [l for l in text.splitlines() if l.strip()]
    if lines and not text.endswith("\n"):
      lines.pop()       # written without its newline: the append was cut off (a complete record ends with one)
    keep = [l for l in lines if not (json.loads(l).get("stage") == stage and json.loads(l).get("step", -1) > step)]
    ckpt_lib.write_text_atomic(self.path, "".join(l + "\n" for l in keep))

  def write(self, record: Mapping[str, Any]) -> None:
    if jax.process_index() != 0:
      return
    clean = {k: (float(v) if isinstance(v, (np.floating, np.integer, jax.Array)) else v) for k, v in record.items()}
    with self.path.open("a") as f:
      f.write(json.dumps(clean) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------------------

def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """``constant`` (the reference) or ``warmup_cosine`` (MERU: linear warmup then cosine decay to 0)."""
  if optim.schedule == "constant":
    return optax.constant_schedule(optim.lr)
  if optim.schedule == "warmup_cosine":
    warm = min(int(optim.warmup_steps), max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warm, max(total_steps, warm + 1))
  raise ValueError(f"optim.schedule must be 'constant' or 'warmup_cosine', got {optim.schedule!r}")


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, wd_mask: Any = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with betas / eps / weight decay from ``optim``; ``wd_mask`` (pure dict of bools) selects decayed leaves."""
  lr = learning_rate_schedule(optim, total_steps)
  tx = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay, mask=wd_mask)
  return tx, lr


# --------------------------------------------------------------------------------------------------------------
# Sharded state and the jitted update
# --------------------------------------------------------------------------------------------------------------

def make_mesh(cfg: ml_collections.ConfigDict) -> Mesh:
  """``('data', 'fsdp', 'model')`` mesh over all visible devices from ``cfg.mesh.{data,fsdp,model}``.

  ``model`` > 1 turns on tensor parallelism (MLP hidden units, heads and vocabulary split by the logical table in
  ``vlsafe_jax/sharding.py``); the batch is split over ``data`` x ``fsdp`` only.
  """
  return sharding.make_mesh(data=cfg.mesh.data, fsdp=cfg.mesh.fsdp, model=cfg.mesh.get("model", 1))


def pure_shardings(state: nnx.State, mesh: Mesh) -> Any:
  """Pure-dict tree of NamedShardings for an nnx ``State`` (logical annotations; unannotated = replicated)."""
  return nnx.to_pure_dict(sharding.state_shardings(state, mesh))


def train_state_shardings(tx: optax.GradientTransformation, abstract_params: Any, param_sh: Any,
                          mesh: Mesh) -> State:
  """Shardings of ``{"params", "opt", "step"}``: optimizer moments follow their parameters, the rest replicated."""
  abs_opt = jax.eval_shape(tx.init, abstract_params)
  repl = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, param_sh, transform_non_params=lambda _: repl)
  return {"params": param_sh, "opt": opt_sh, "step": repl}


def init_train_state(tx: optax.GradientTransformation, params: Any, state_sh: State) -> State:
  """Jitted, sharded init of the train state (optimizer moments are created directly on their devices)."""
  fn = jax.jit(lambda p: {"params": p, "opt": tx.init(p), "step": jnp.zeros((), jnp.int32)},
               out_shardings=state_sh)
  return fn(params)


def global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def guard_nonfinite(nonfinite: str, loss: jax.Array, grad_norm: jax.Array, new: Any, old: Any
                    ) -> tuple[Any, dict[str, jax.Array]]:
  """The non-finite guard of a train step: ``(state to keep, {"finite", "skipped"} as float32 0-d metrics)``.

  A step is finite when both the loss and the gradient norm are: a finite loss can still carry a NaN/Inf
  gradient (e.g. a square root at 0), and that update would poison the parameters just the same.

  Args:
    nonfinite: ``"raise"`` keeps ``new`` whatever happened (the host loop raises before any checkpoint of it);
      ``"skip"`` keeps ``old`` on a non-finite step, so parameters and optimizer moments are untouched.
    new, old: pytrees of the same structure (e.g. ``(params, opt_state)`` after and before the update).
  """
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  skipped = jnp.logical_not(finite) if nonfinite == "skip" else jnp.zeros((), bool)
  if nonfinite == "skip":
    # where, not cond: the update is computed anyway (it is the step's whole cost) and NaN never leaks through.
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  return new, {"finite": finite.astype(jnp.float32), "skipped": skipped.astype(jnp.float32)}


def split_micro(x: jax.Array, accum: int) -> jax.Array:
  """(B, ...) -> (A, B/A, ...) taking rows {i*A + a} for micro-batch a, so each device's contiguous batch block
  contributes equally to every micro-batch (no cross-device reshuffle when B/A is a multiple of the devices)."""
  b = x.shape[0]
  if b % accum:
    raise ValueError(f"batch of {b} rows does not split into {accum} equal micro-batches")
  return jnp.swapaxes(x.reshape((b // accum, accum) + x.shape[1:]), 0, 1)


def make_update_fn(loss_fn: Callable, tx: optax.GradientTransformation, *, state_sh: State, mesh: Mesh,
                   lr_fn: optax.Schedule | None = None, nonfinite: str = "raise",
                   pre_step: Callable[[Any], Any] | None = None, accum: int = 1,
                   step_input: Callable[[jax.Array], Any] | None = None,
                   metrics_fn: Callable[[dict, jax.Array], dict] | None = None) -> Callable:
  """The jitted train step ``(state, frozen, batch, rng) -> (state, metrics)`` (state donated); the one update
  step of every trainer (HySAC, TGA, the synthetic LLaVA, the Lorentz demo).

  Args:
    loss_fn: ``(params, frozen, batch, key) -> (loss, aux dict of arrays)``, or with ``step_input``
      ``(params, frozen, batch, key, step_input(step)) -> ...``; ``key`` = ``fold_in(rng, step)``, so dropout
      masks depend on the step, not on the process history.
    tx: optimizer.
    state_sh: train-state shardings (``out_shardings`` of the state).
    mesh: device mesh (the metrics are replicated on it).
    lr_fn: schedule, logged as ``lr``.
    nonfinite: ``"raise"`` (update anyway; the host raises before any checkpoint of the bad state) or ``"skip"``
      (keep params and optimizer state of a step whose loss or gradient norm is NaN/Inf). The metrics carry
      ``finite`` and ``skipped`` (1.0 for a skipped step, else 0.0; always 0.0 under ``"raise"``), see
      :func:`guard_nonfinite`. The step counter advances either way, so the schedule and data stay in step.
    pre_step: applied to the params before the forward pass (HySAC's scalar clamps); its result is what the
      gradients are taken at and what the update is applied to.
    accum: gradient accumulation: every batch leaf (B, ...) is split into ``accum`` micro-batches by
      :func:`split_micro` and a ``lax.scan`` sums loss, aux and gradients, then divides by ``accum`` (the mean of
      the micro-batch means; equal to the full-batch mean when every micro-batch has the same weight). With
      ``accum=1`` the step is exactly the plain one (no scan). All micro-batches share ``key``.
    step_input: ``step (int32 0-d, updates completed) -> value`` passed to ``loss_fn`` as a fifth argument (TGA's
      ``rho = step / total_steps``); not split into micro-batches.
    metrics_fn: ``(aux, step) -> dict`` of 0-d metrics replacing ``aux`` in the record (default: ``aux`` as is);
      ``loss``, ``grad_norm``, ``finite``, ``skipped`` and ``lr`` are always added.
  """
  if nonfinite not in ("raise", "skip"):
    raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
  if accum < 1:
    raise ValueError(f"accum must be >= 1, got {accum}")
  repl = NamedSharding(mesh, P())
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, frozen, batch, rng):
    params = state["params"] if pre_step is None else pre_step(state["params"])
    key = jax.random.fold_in(rng, state["step"])
    extra = () if step_input is None else (step_input(state["step"]),)
    if accum == 1:
      (loss, aux), grads = grad_fn(params, frozen, batch, key, *extra)
    else:
      micro = jax.tree.map(lambda x: split_micro(x, accum), batch)

      def body(acc, mb):
        (l, a), g = grad_fn(params, frozen, mb, key, *extra)
        return jax.tree.map(jnp.add, acc, (l, a, g)), None
      shapes = jax.eval_shape(lambda: grad_fn(params, frozen, jax.tree.map(lambda x: x[0], micro), key, *extra))
      zeros = jax.tree.map(jnp.zeros_like, (shapes[0][0], shapes[0][1], shapes[1]))
      (loss, aux, grads), _ = jax.lax.scan(body, zeros, micro)
      loss, aux, grads = jax.tree.map(lambda x: x / accum, (loss, aux, grads))
    updates, opt = tx.update(grads, state["opt"], params)
    new_params = optax.apply_updates(params, updates)
    grad_norm = global_norm(grads)
    (new_params, opt), guard = guard_nonfinite(nonfinite, loss, grad_norm, (new_params, opt),
                                               (state["params"], state["opt"]))
    shown = aux if metrics_fn is None else metrics_fn(aux, state["step"])
    metrics = {"loss": loss, **shown, "grad_norm": grad_norm, **guard}
    if lr_fn is not None:
      metrics["lr"] = lr_fn(state["step"])
    return {"params": new_params, "opt": opt, "step": state["step"] + 1}, metrics

  return jax.jit(step, donate_argnums=(0,), out_shardings=(state_sh, repl))


@dataclasses.dataclass
class TrainSetup:
  """What one training stage needs (built by :func:`build_setup`). ``state = {"params", "opt", "step"}`` is
  donated to ``step_fn``; ``frozen`` (the non-trainable rest of the model: base weights, rng streams) never is.
  ``graphdef`` + ``params`` + ``frozen`` merge back into the model (:func:`merged`). ``loss_cfg`` is the method's
  loss config, kept for evaluation with the same settings (may be None)."""
  graphdef: Any
  state: State
  frozen: Any
  tx: optax.GradientTransformation
  lr_fn: optax.Schedule | None
  state_sh: State
  mesh: Mesh
  step_fn: Callable
  loss_cfg: Any = None


def build_setup(model: nnx.Module, trainable: Any, optim: ml_collections.ConfigDict | Callable, mesh: Mesh, *,
                make_loss_fn: Callable[[Any], Callable], total_steps: int, loss_cfg: Any = None,
                **update_kw) -> TrainSetup:
  """Split -> place -> optimizer -> state -> jitted step, the one setup sequence of every trainer.

  Args:
    model: the nnx model (its values are read, not changed).
    trainable: nnx filter of the trained variables; everything else is ``frozen``.
    optim: a ConfigDict for :func:`make_optimizer` (AdamW + schedule, no weight-decay mask), or a callable
      ``(trainable nnx.State, total_steps) -> (tx, lr_fn)`` for anything else (HySAC's decay mask and scalar lr,
      a clipped AdamW); ``lr_fn`` may be None.
    mesh: device mesh; trainable and frozen state follow the logical sharding table (unannotated = replicated),
      optimizer moments follow their parameters.
    make_loss_fn: ``graphdef -> loss_fn`` for :func:`make_update_fn`.
    total_steps: for the schedule.
    update_kw: the other :func:`make_update_fn` keywords (``nonfinite``, ``pre_step``, ``accum``, ``step_input``,
      ``metrics_fn``).
  """
  graphdef, train_state, frozen_state = nnx.split(model, trainable, ...)
  param_sh = pure_shardings(train_state, mesh)
  frozen_sh = pure_shardings(frozen_state, mesh)
  params = sharding.put(nnx.to_pure_dict(train_state), param_sh)
  frozen = sharding.put(nnx.to_pure_dict(frozen_state), frozen_sh)
  if callable(optim):
    tx, lr_fn = optim(train_state, total_steps)
  else:
    tx, lr_fn = make_optimizer(optim, total_steps)
  abs_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  state_sh = train_state_shardings(tx, abs_params, param_sh, mesh)
  state = init_train_state(tx, params, state_sh)
  step_fn = make_update_fn(make_loss_fn(graphdef), tx, state_sh=state_sh, mesh=mesh, lr_fn=lr_fn, **update_kw)
  return TrainSetup(graphdef, state, frozen, tx, lr_fn, state_sh, mesh, step_fn, loss_cfg)


def merged(setup: TrainSetup, params: Any = None) -> nnx.Module:
  """A new model from ``setup``'s graphdef, ``params`` (default: the current trained ones) and the frozen rest."""
  return nnx.merge(setup.graphdef, setup.state["params"] if params is None else params, setup.frozen)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints and the loop
# --------------------------------------------------------------------------------------------------------------

def resume(ckpt: ckpt_lib.Checkpointer, state: State, loader, writer: MetricsWriter, stage: str,
           total_steps: int) -> State:
  """Restores the newest good checkpoint of ``stage`` into ``state``'s shapes/shardings and ``loader``'s position.

  A latest step that is truncated or corrupt is reported, moved aside and the previous one used
  (:meth:`Checkpointer.restore_latest_good`; all bad raises, never a silent fresh start). ``metrics.jsonl`` is
  trimmed back to the restored step so a resumed run logs each step once. Returns ``state`` unchanged when there
  is no checkpoint yet.
  """
  found = ckpt.restore_latest_good(arrays={"state": state}, json=("data", "meta"))
  if found is None:
    writer.truncate(stage, 0)    # a run killed before its first checkpoint may have logged steps already
    return state
  step, out = found
  loader.set_state(out["data"])
  writer.truncate(stage, step)
  print(f"[{stage}] resumed from step {step}/{total_steps}")
  return out["state"]


def save(ckpt: ckpt_lib.Checkpointer, step: int, state: State, loader, meta: Mapping[str, Any]) -> None:
  ckpt.save(step, arrays={"state": state}, json={"data": loader.get_state(), "meta": dict(meta)})


def to_host(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


class _Throughput:
  """Examples/s over the steps of a record, Chrono-style: the first step of a process (trace + compile) is never
  timed, and checkpoint saves and epoch hooks are paused out, so the number is the train step's own rate."""

  def __init__(self):
    self.t0: float | None = None     # None until the first (compiling) step of this process has finished
    self.steps = 0                   # timed steps since the last record
    self.paused = 0.0

  def step_done(self, first: bool, out: Any) -> None:
    if first:
      jax.block_until_ready(out)     # the compile step ends here; timing starts after it
      self.t0 = time.perf_counter()
    else:
      self.steps += 1

  def pause(self, seconds: float) -> None:
    self.paused += seconds

  def take(self) -> tuple[int, float]:
    """``(timed steps, seconds)`` since the last call (call after a device sync); resets the window."""
    now = time.perf_counter()
    out = (self.steps, now - self.t0 - self.paused)
    self.t0, self.steps, self.paused = now, 0, 0.0
    return out


def run_loop(*, stage: str, step_fn: Callable, state: State, frozen: Any, loader, mesh: Mesh, rng: jax.Array,
             total_steps: int, ckpt: ckpt_lib.Checkpointer, writer: MetricsWriter, meta: Mapping[str, Any],
             train_cfg: ml_collections.ConfigDict, batch_size: int, flops_per_example: float | None = None,
             log_extra: Callable[[State], dict[str, float]] | None = None,
             on_epoch_end: Callable[[State, int], bool] | None = None,
             on_log: Callable[[dict[str, Any]], None] | None = None) -> State:
  """Steps ``state`` to ``total_steps`` with checkpoints every ``train_cfg.checkpoint_every`` steps and at the end.

  Non-finite losses or gradients: with ``nonfinite="raise"`` the loop raises :class:`NonFiniteLossError` *before*
  writing the record or saving, so the last good checkpoint stays the latest (checked at every log and checkpoint
  step, and at every step with ``check_every_step``); with ``"skip"`` the step left the state unchanged and its
  record says ``skipped`` = 1 (with ``log_every`` > 1 a record describes its own step only).
  ``train_cfg.max_steps_this_run`` (0 = unlimited) stops the process after that many steps with
  :class:`StopAfterSteps` (after the checkpoint of that step, if one was due): a simulated kill.
  ``on_epoch_end(state, epoch) -> stop?`` runs after each epoch (validation, early stopping); ``on_log(record)``
  after each metrics record is written (console warnings).

  Throughput (``examples_per_s``, ``examples_per_s_per_device``, ``mfu``) covers only the ``timed_steps`` of the
  record: the first step of each process (compilation) and save / hook time are excluded; a record with no timed
  step has no throughput fields. The step call runs under ``jax.transfer_guard("disallow")``: batches and keys are
  placed explicitly, so an implicit host<->device copy inside the loop is an error, not a silent slowdown.
  """
  start = int(jax.device_get(state["step"]))
  log_every = max(int(train_cfg.log_every), 1)
  ckpt_every = max(int(train_cfg.checkpoint_every), 1)
  limit = int(train_cfg.get("max_steps_this_run", 0) or 0)
  check_every = train_cfg.nonfinite == "raise" and train_cfg.get("check_every_step", False)
  bar = tqdm(total=total_steps, initial=start, desc=f"train[{stage}]", unit="step", dynamic_ncols=True,
             disable=jax.process_index() != 0 or not train_cfg.get("progress", True))
  rng = jax.device_put(rng, NamedSharding(mesh, P()))   # explicit: the guarded step may not move it implicitly
  clock, ran = _Throughput(), 0
  steps_per_epoch = loader.steps_per_epoch
  try:
    for step in range(start, total_steps):
      batch = sharding.shard_batch(next(loader), mesh)
      with jax.transfer_guard("disallow"):
        state, metrics = step_fn(state, frozen, batch, rng)
      clock.step_done(ran == 0, metrics)
      ran += 1
      done = step + 1
      log_now = done % log_every == 0 or done == total_steps
      save_now = done % ckpt_every == 0 or done == total_steps
      host = to_host(metrics) if log_now else None
      if train_cfg.nonfinite == "raise" and (log_now or save_now or check_every):
        check = host or to_host({k: metrics[k] for k in ("finite", "loss", "grad_norm")})
        if not check["finite"]:
          raise NonFiniteLossError(
              f"[{stage}] non-finite loss {check['loss']} (gradient norm {check['grad_norm']}) at step {done}; "
              f"stopping without saving. The last good checkpoint ({ckpt.latest_step()}) in {ckpt.directory} is "
              f"intact. Lower the learning rate, or set train.nonfinite=skip to skip such steps.")
      if log_now:
        rec = {"stage": stage, "step": done, "epoch": done / steps_per_epoch, **host}
        n, dt = clock.take()
        rec["timed_steps"] = n
        if n:
          rec["examples_per_s"] = n * batch_size / dt
          rec["examples_per_s_per_device"] = n * batch_size / dt / jax.device_count()
          if flops_per_example:
            m = perf.mfu(n * batch_size * flops_per_example / dt / jax.device_count())
            if m is not None:
              rec["mfu"] = m
        if log_extra is not None:
          rec.update(log_extra(state))
        writer.write(rec)
        if on_log is not None:
          on_log(rec)
        bar.set_postfix(loss=f"{host['loss']:.4f}", ex_s=f"{rec.get('examples_per_s', 0):.0f}")
      bar.update(1)
      t_pause = time.perf_counter()
      if save_now:
        save(ckpt, done, state, loader, meta)
      if on_epoch_end is not None and done % steps_per_epoch == 0:
        if on_epoch_end(state, done // steps_per_epoch):
          if ckpt.latest_step() != done:
            save(ckpt, done, state, loader, meta)
          writer.write({"stage": stage, "step": done, "event": "early_stop"})
          break
      clock.pause(time.perf_counter() - t_pause)
      if limit and ran >= limit and done < total_steps:
        raise StopAfterSteps(f"[{stage}] stopped after {ran} steps (max_steps_this_run); re-run to resume")
  finally:
    bar.close()
  return state



# --------------------------------------------------------------------------------------------------------------
# Data (the sources themselves come from vlsafe_jax.data.sources)
# --------------------------------------------------------------------------------------------------------------

def make_train_loader(source, transform, global_batch: int, data: ml_collections.ConfigDict, seed: int):
  """The checkpointable grain loader over a training split (per-host slice of each global batch)."""
  if len(source) < global_batch:
    raise ValueError(f"training split has {len(source)} items, fewer than one global batch ({global_batch})")
  return pipeline.make_loader(source, global_batch, seed=seed, shuffle=True, transform=transform,
                              worker_count=data.worker_count, read_threads=data.read_threads)


def embed_split(encode: Callable[[dict], tuple[np.ndarray, ...]], source, transform, batch_size: int,
                limit: int | None = None) -> dict[str, np.ndarray]:
  """Runs ``encode(batch) -> (e_i, e_iu, e_t, e_tu)`` over a split; returns ``{"I", "I*", "T", "T*", "tags"}``.

  Batches are padded to ``batch_size`` (one compilation) and the padding rows dropped.
  """
  outs = {k: [] for k in ("I", "I*", "T", "T*", "tags")}
  for batch in sources.batches(source, transform, batch_size, limit):
    n = batch["safe_image"].shape[0]
    padded = sources.pad_batch(batch, batch_size, ("safe_image", "unsafe_image", "safe_ids", "unsafe_ids"))
    embs = jax.device_get(encode(padded))
    for k, e in zip(("I", "I*", "T", "T*"), embs):
      outs[k].append(np.asarray(e[:n], np.float32))
    outs["tags"].append(np.asarray(batch.get("tag", np.zeros(n, np.int32)))[:n])
  return {k: np.concatenate(v) for k, v in outs.items()}


__all__ = [
    "NonFiniteLossError", "StopAfterSteps", "maybe_initialize_distributed", "prepare_workdir", "MetricsWriter",
    "learning_rate_schedule", "make_optimizer", "make_mesh", "pure_shardings", "train_state_shardings",
    "init_train_state", "global_norm", "guard_nonfinite", "split_micro", "make_update_fn", "TrainSetup", "build_setup",
    "merged", "resume", "save", "to_host", "run_loop", "make_train_loader", "embed_split",
]
