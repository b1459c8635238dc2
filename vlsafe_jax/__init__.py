"""vlsafe_jax: JAX/Flax (nnx) home for vision-language-model safety research.

Methods: HySAC (hyperbolic safety-aware CLIP), UWM (unsafe-weight manipulation), CMRM (cross-modality
representation manipulation) and TGA (text-guided alignment). See README.md.
"""
import flax as _flax

# Models carry *logical* sharding annotations only; trainers place state explicitly through
# vlsafe_jax.sharding. Eager variable sharding would demand a mesh at construction time, which breaks
# building models on a single CPU or under eval_shape without a mesh.
_flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"
