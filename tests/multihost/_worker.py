"""One process of the multi-host test (``test_multihost.py``); also the 1-process x 8-device reference.

``python tests/multihost/_worker.py OUT_NPZ CKPT_DIR {save,reference}``, with the launch in the environment:
``JAX_NUM_CPU_DEVICES`` (devices of this process), and for a multi-process run ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (read by ``common.maybe_initialize_distributed``, the trainers' own
start-up). Every process writes ``OUT_NPZ`` (numpy arrays under slash-separated names):

* ``data/epoch``: (steps, rows of this process) item indices its training loader yields over one epoch;
* ``hysac/...`` and ``tga/...``: two steps of the HySAC train step (mesh data 8) and one of the TGA train step (mesh
  FSDP 8: parameters split across the processes), each fed with this process's slice of the same global batches:
  ``m{i}/{metric}`` per step, ``p0/...`` and ``p/...`` all trainable parameters (gathered) before and after;
* ``save``: the two train states and the HySAC loader position are checkpointed into ``CKPT_DIR`` (orbax, each
  process writing its own shards), then restored into fresh targets: ``restored/...``, ``data/next`` (the trained
  loader's next batch) and ``data/restored_next`` (that of a fresh loader set to the restored position);
* ``reference``: after its own steps, waits for a line on stdin (the test sends it once the ``save`` run has
  finished), then restores ``CKPT_DIR`` into its own shapes and shardings: ``restored/...``, ``data/restored_next``.

The optimizer is plain SGD (``common.make_optimizer`` swapped, as ``tests/train/test_tga_train.py`` does): its update
is linear in the gradient, so parameters after a step are compared within the reduction-order bound of the gradient.
AdamW's per-element normalisation would turn float32 noise in a near-zero gradient into an O(lr) difference.
"""
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from vlsafe_jax import checkpoint as ckpt_lib  # noqa: E402
from vlsafe_jax import sharding  # noqa: E402
from vlsafe_jax.data import tga_rows, tga_synthetic  # noqa: E402
from vlsafe_jax.jobs import tga as tga_job  # noqa: E402
from vlsafe_jax.methods.hysac import losses  # noqa: E402
from vlsafe_jax.methods.hysac import model as H  # noqa: E402
from vlsafe_jax.methods.tga import loss as tga_loss  # noqa: E402
from vlsafe_jax.models import clip as C  # noqa: E402
from vlsafe_jax.models.llava import Llava  # noqa: E402
from vlsafe_jax.train import common, hysac_trainer, tga_trainer, vlm_base  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from _clip_configs import TINY  # noqa: E402

HYSAC_BATCH, HYSAC_ITEMS, TGA_BATCH = 16, 48, 8
LR = 0.1
common.make_optimizer = lambda optim, total_steps, wd_mask=None: (optax.sgd(LR), optax.constant_schedule(LR))
DATA_CFG = ml_collections.ConfigDict(dict(worker_count=0, read_threads=0))


class QuadSource:
  """``n`` HySAC records for :data:`TINY` (10-px images, 7 tokens ending in EOS 52), a pure function of the index."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    rng = np.random.default_rng([5, int(i)])
    ids = rng.integers(1, 50, size=(2, 7)).astype(np.int32)
    ids[:, -1] = 52
    return {"index": np.int32(i), "safe_image": rng.normal(size=(10, 10, 3)).astype(np.float32),
            "unsafe_image": rng.normal(size=(10, 10, 3)).astype(np.float32), "safe_ids": ids[0],
            "unsafe_ids": ids[1]}


def gather(tree, mesh):
  """Every leaf as a numpy array on every process (a jitted copy to replicated, then fetched)."""
  return jax.device_get(jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))(tree))


def flat(prefix, tree):
  return {f"{prefix}/{jax.tree_util.keystr(path)}": np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def steps(setup, loader, n, drop=()):
  """``n`` steps of ``setup.step_fn`` on the loader's host slices; returns the per-step metrics."""
  out = []
  for _ in range(n):
    batch = {k: v for k, v in next(loader).items() if k not in drop}
    setup.state, m = setup.step_fn(setup.state, setup.frozen, sharding.shard_batch(batch, setup.mesh),
                                   jax.random.key(3))
    out.append(jax.device_get(m))
  return out


def hysac(res):
  mesh = sharding.make_mesh(data=8)
  optim = ml_collections.ConfigDict(dict(lr=LR, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.0,
                                         schedule="constant", warmup_steps=0))
  setup = hysac_trainer.build_hysac(C.CLIP(TINY, rngs=nnx.Rngs(0)), options=H.HySACOptions(lora_rank=3),
                                    loss_cfg=losses.HySACLossConfig(), optim=optim, total_steps=10, mesh=mesh)
  res.update(flat("hysac/p0", gather(setup.state["params"], mesh)))
  loader = common.make_train_loader(QuadSource(HYSAC_ITEMS), None, HYSAC_BATCH, DATA_CFG, seed=1)
  for i, m in enumerate(steps(setup, loader, 2, drop=("index",))):
    res.update({f"hysac/m{i}/{k}": np.asarray(v) for k, v in m.items()})
  res.update(flat("hysac/p", gather(setup.state["params"], mesh)))
  return setup, loader


def tga(res):
  mesh = sharding.make_mesh(data=1, fsdp=8)
  tok = tga_synthetic.tokenizer()
  cfg = vlm_base.llava_config(tok, image_size=16, patch_size=8, vision_width=16, vision_layers=1, width=24,
                              layers=2, heads=2, kv_heads=1, mlp=40)
  data = tga_synthetic.TGASynthetic(seed=0, n_train=4, n_eval=2, image_size=16)
  src = tga_rows.TGASource(data.stage_rows("finetune", tga_job.bag_of_words_retrieve), tok, cfg, stage="finetune",
                           max_length=56, ref_max_length=36, image_fn=data.image_fn(), template="llava_v1",
                           system=tga_synthetic.SYSTEM)
  optim = ml_collections.ConfigDict(dict(lr=LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                                         schedule="constant", warmup_steps=0))
  with jax.set_mesh(mesh):
    setup = tga_trainer.build_stage(Llava(cfg, rngs=nnx.Rngs(2)), "finetune",
                                    loss_cfg=tga_loss.TGALossConfig(layers=(1, 2)), optim=optim, total_steps=4,
                                    mesh=mesh)
    res.update(flat("tga/p0", gather(setup.state["params"], mesh)))
    loader = common.make_train_loader(src, None, TGA_BATCH, DATA_CFG, seed=2)
    for i, m in enumerate(steps(setup, loader, 1)):
      res.update({f"tga/m{i}/{k}": np.asarray(v) for k, v in m.items()})
    res.update(flat("tga/p", gather(setup.state["params"], mesh)))
  return setup


def epoch_indices():
  """The item indices this process's training loader yields over one epoch: (steps, rows of this process)."""
  loader = common.make_train_loader(QuadSource(HYSAC_ITEMS), None, HYSAC_BATCH, DATA_CFG, seed=4)
  return np.stack([next(loader)["index"] for _ in range(loader.steps_per_epoch)])


def log(what: str, t0: float) -> float:
  """Section timings on stderr (shown by the test when a run fails or is slow)."""
  t = time.perf_counter()
  print(f"[worker {jax.process_index()}/{jax.process_count()}] {what}: {t - t0:.1f} s (cpu {time.process_time():.1f} s)",
        file=sys.stderr, flush=True)
  return t


def main(out: Path, ckpt_dir: Path, mode: str):
  if mode not in ("save", "reference"):
    raise SystemExit(f"mode must be 'save' or 'reference', got {mode!r}")
  t = time.perf_counter()
  common.maybe_initialize_distributed(ml_collections.ConfigDict({"distributed": False}))
  # Same numerics as the test suite (tests/conftest.py).
  jax.config.update("jax_default_matmul_precision", "highest")
  assert jax.device_count() == 8, jax.devices()
  t = log("start", t)
  res = {"data/epoch": epoch_indices(),
         "mesh/data8_block": np.asarray(sharding.process_batch_block(sharding.make_mesh(data=8)))}
  try:        # a 'model' axis over all devices replicates the batch across the processes: refused there
    sharding.process_batch_block(sharding.make_mesh(data=1, model=8))
    res["mesh/model8_refused"] = np.asarray(False)
  except ValueError:
    res["mesh/model8_refused"] = np.asarray(True)
  h_setup, h_loader = hysac(res)
  t = log("hysac", t)
  t_setup = tga(res)
  t = log("tga", t)
  states = {"hysac": h_setup.state, "tga": t_setup.state}
  if mode == "save":
    ckpt = ckpt_lib.Checkpointer(ckpt_dir)
    ckpt.save(2, arrays=states, json={"data": h_loader.get_state()})
    res["data/next"] = next(h_loader)["index"]
  else:
    t = log("waiting for the checkpoint", t)
    if not sys.stdin.readline().strip():
      raise SystemExit("reference run: no go-ahead on stdin (the multi-process run failed?)")
    ckpt = ckpt_lib.Checkpointer(ckpt_dir)
  restored = ckpt.restore(None, arrays=states, json=("data",))
  for name, setup in (("hysac", h_setup), ("tga", t_setup)):
    got = restored[name]
    want_sh = jax.tree.map(lambda x: x.sharding, states[name])
    assert jax.tree.all(jax.tree.map(lambda x, s: x.sharding == s, got, want_sh)), f"{name}: restored shardings"
    res.update(flat(f"restored/{name}", gather(got["params"], setup.mesh)))
    res[f"restored/{name}/step"] = np.asarray(gather(got["step"], setup.mesh))
  fresh = common.make_train_loader(QuadSource(HYSAC_ITEMS), None, HYSAC_BATCH, DATA_CFG, seed=1)
  fresh.set_state(restored["data"])
  res["data/restored_next"] = next(fresh)["index"]
  ckpt.close()
  t = log("checkpoint", t)
  np.savez(out, **res)
  if jax.process_count() > 1:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
