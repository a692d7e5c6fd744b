"""Diffusion sampling shared by the bundles: feature-guided DDPM/DDIM (TVD-score paper, Eq. 8) on MONAI schedulers."""

from common.diffusion.guided import (
    guided_sample,
    guided_step,
    normalised_guidance,
    piecewise_rho,
    predict_x0,
    reject_off_target,
)

__all__ = [
    "guided_sample",
    "guided_step",
    "normalised_guidance",
    "piecewise_rho",
    "predict_x0",
    "reject_off_target",
]
