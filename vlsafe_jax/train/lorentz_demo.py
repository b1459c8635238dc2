"""A clearly labelled demo of the Lorentz geometry and the seven-term HySAC loss (configs/lorentz_demo.py).

Four learnable ``(N, D)`` feature tables stand in for the encoders' outputs on N quadruplets (safe image I, unsafe
image I*, safe caption T, unsafe caption T*). They are scaled by the learned alphas, lifted with ``exp_map0`` and
trained with :func:`vlsafe_jax.methods.hysac.losses.hysac_loss` together with HySAC's four learned scalars (clamped
at the start of every step). The same run trains the paper's ablations so the effect of the entailment cones on
the root-distance hierarchy is visible.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from vlsafe_jax import sharding
from vlsafe_jax.geometry import lorentz
from vlsafe_jax.methods.hysac import losses, scalars
from vlsafe_jax.perf import format_table
from vlsafe_jax.train import common

SETS = ("I", "I*", "T", "T*")   # order of the hysac_loss arguments: e_i, e_iu, e_t, e_tu

ABLATIONS = losses.ABLATIONS


class FreeEmbeddings(nnx.Module):
  """Four free feature tables (N, D) plus HySAC's learned scalars."""

  def __init__(self, n: int, dim: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(1.0)
    self.tables = nnx.Dict({name: nnx.Param(init(rngs.params(), (n, dim))) for name in ("i", "iu", "t", "tu")})
    self.scalars = scalars.HyperbolicScalars(embed_dim=dim)

  def lifted(self, idx: jax.Array) -> tuple[jax.Array, ...]:
    c = self.scalars.curvature()
    a_img, a_txt = self.scalars.visual_alpha[...], self.scalars.textual_alpha[...]
    return tuple(losses.lift(self.tables[k][...][idx], a, c)
                 for k, a in (("i", a_img), ("iu", a_img), ("t", a_txt), ("tu", a_txt)))


def train_variant(cfg: ml_collections.ConfigDict, variant: str, log=None) -> tuple[dict, dict[str, np.ndarray]]:
  """Trains the free embeddings of ``cfg`` with the loss of ``variant`` (a key of ``losses.ABLATIONS``).

  Returns ``(result, points)``: the result row :func:`run` prints and saves (root distances, order, R@1,
  curvature, final loss) and the four final sets as hyperboloid points ``{"I", "I*", "T", "T*": (N, D) float32}``
  (e.g. to plot them when ``cfg.dim == 2``). ``log`` receives a metrics record every 10 steps (None: dropped).
  """
  log = log or (lambda rec: None)
  model = FreeEmbeddings(cfg.n_quadruplets, cfg.dim, rngs=nnx.Rngs(cfg.seed))
  loss_cfg = losses.HySACLossConfig(negatives=cfg.negatives, **ABLATIONS[variant])
  bounds = model.scalars.bounds

  def make_loss_fn(graphdef):
    def loss_fn(params, frozen, batch, key):
      del key                                   # deterministic
      m = nnx.merge(graphdef, params, frozen)
      return losses.hysac_loss(*m.lifted(batch["idx"]), m.scalars.curvature(), m.scalars.scale(), loss_cfg)
    return loss_fn

  # The common setup and step (one device: the tables are tiny); the reference clamps the scalars before every
  # forward pass (pre_step), and AdamW has a constant lr and no weight decay.
  mesh = sharding.make_mesh(data=1, devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    setup = common.build_setup(
        model, nnx.Param, lambda _, steps: (optax.adamw(cfg.lr, b1=0.9, b2=0.98, weight_decay=0.0), None), mesh,
        make_loss_fn=make_loss_fn, total_steps=cfg.steps,
        pre_step=lambda params: scalars.clamp_scalars(params, bounds))
    state, rng_key = setup.state, jax.random.key(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    for i in tqdm(range(cfg.steps), desc=f"demo[{variant}]", leave=False):
      idx = jnp.asarray(rng.choice(cfg.n_quadruplets, cfg.batch_size, replace=False))
      state, metrics = setup.step_fn(state, setup.frozen, {"idx": idx}, rng_key)
      if i % 10 == 0 or i == cfg.steps - 1:
        terms = {k: float(v) for k, v in metrics.items() if k not in ("loss", "grad_norm", "finite", "skipped")}
        values = {k: float(state["params"]["scalars"][k]) for k in scalars.SCALAR_NAMES}
        log({"variant": variant, "step": i, "loss": float(metrics["loss"]), **terms, **values})
  total = metrics["loss"]
  model = common.merged(setup, state["params"])
  model.scalars.clamp_()
  e = model.lifted(jnp.arange(cfg.n_quadruplets))
  c = model.scalars.curvature()
  root = {name: float(jnp.mean(lorentz.elementwise_dist(jnp.zeros_like(x), x, c))) for name, x in zip(SETS, e)}
  # T -> I retrieval by geodesic distance (index-aligned ground truth).
  d_ti = lorentz.pairwise_dist(e[2], e[0], c)
  r1 = float(jnp.mean(jnp.argmin(d_ti, axis=1) == jnp.arange(cfg.n_quadruplets))) * 100
  ordered = root["T"] < root["I"] < root["T*"] < root["I*"]
  result = {"variant": variant, "final_loss": float(total), "curvature": float(c), "root_distance": root,
            "T->I R@1": r1, "order T<I<T*<I*": bool(ordered)}
  return result, {name: np.asarray(x, np.float32) for name, x in zip(SETS, e)}


def run(cfg: ml_collections.ConfigDict, workdir: Path) -> dict:
  print("=" * 100)
  print("DEMO: Lorentz geometry + seven-term HySAC loss on free embeddings (no encoders, no data).")
  print("This is not HySAC training; the CLIP+LoRA pipeline on the synthetic benchmark is the HySAC job.")
  print("=" * 100)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=list))
  t0 = time.time()
  with (workdir / "metrics.jsonl").open("w") as f:
    log = lambda rec: f.write(json.dumps(rec) + "\n")
    results = [train_variant(cfg, v, log)[0] for v in cfg.ablations]
  rows = [[r["variant"], *(f"{r['root_distance'][s]:.3f}" for s in ("T", "I", "T*", "I*")),
           "yes" if r["order T<I<T*<I*"] else "no", f"{r['T->I R@1']:.1f}", f"{r['curvature']:.3f}",
           f"{r['final_loss']:.4f}"] for r in results]
  print(format_table(["variant", "d(0,T)", "d(0,I)", "d(0,T*)", "d(0,I*)", "T<I<T*<I*", "T->I R@1 %",
                      "curvature", "final loss"], rows))
  print(f"({time.time() - t0:.1f} s; metrics in {workdir / 'metrics.jsonl'})")
  (workdir / "results.json").write_text(json.dumps(results, indent=2))
  return {"results": results}
