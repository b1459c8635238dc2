"""UWM (Unsafe Weights Manipulation, uwm.md): saliency scores, selection/edit, calibration pass, baselines."""
from vlsafe_jax.methods.uwm.edit import (LLAVA_VISION_TAU, MaskedDense, TowerConfig, UWMConfig, apply,
                                         find_targets, masked_kernel, select, select_all)
from vlsafe_jax.methods.uwm.saliency import NonFiniteRatioError, ScoreConfig, finalize_all
# The function `calibrate.calibrate` is not re-exported: the name would shadow the submodule `uwm.calibrate`.
from vlsafe_jax.methods.uwm.calibrate import (CalibrationResult, UWMResult, clip_encode_fn, masked_model,
                                              set_alpha, set_masks, uwm_clip, uwm_params)

__all__ = [
    "LLAVA_VISION_TAU", "MaskedDense", "TowerConfig", "UWMConfig", "apply", "find_targets", "masked_kernel",
    "select", "select_all", "NonFiniteRatioError", "ScoreConfig", "finalize_all", "CalibrationResult", "UWMResult",
    "clip_encode_fn", "masked_model", "set_alpha", "set_masks", "uwm_clip", "uwm_params",
]
