"""DEMO of the Lorentz geometry and the seven-term HySAC loss on free (encoder-less) embeddings.

  python -m vlsafe_jax.train --config configs/lorentz_demo.py [steps=300 dim=16 ...]

Runs in ~1 minute on 2 CPU cores. It is a demonstration of `vlsafe_jax.geometry.lorentz` and
`vlsafe_jax.methods.hysac.losses`, not HySAC training: there are no encoders and no data, only four learnable
tables of feature vectors (safe/unsafe images and captions of N quadruplets) lifted to the hyperboloid. Expected:
with the entailment terms the mean root distances order as T < I < T* < I*; the "w/o Ent" ablation shows no such
order.
"""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.name = "lorentz_demo"
  c.trainer = "lorentz_demo"
  c.seed = 0
  c.n_quadruplets = 256
  c.dim = 16
  c.batch_size = 64
  c.steps = 300 if arg != "smoke" else 20
  c.lr = 1e-2
  c.negatives = "global"
  c.ablations = ("hysac", "wo_ent", "wo_sent")
  return c
