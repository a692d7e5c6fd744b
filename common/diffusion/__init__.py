"""Diffusion sampling shared by the bundles: feature-guided DDPM/DDIM (TVD-score paper, Eq. 8) on MONAI schedulers,
and the evaluation of one feature with the TVD score from such samples."""

from common.diffusion.evaluation import (
    ConditionalPredictions,
    conditional_predictions,
    feature_scores,
    plot_local_scores,
    sample_coverage,
    scores_markdown,
)
from common.diffusion.guided import (
    guided_sample,
    guided_step,
    normalised_guidance,
    piecewise_rho,
    predict_x0,
    reject_off_target,
)

__all__ = [
    "ConditionalPredictions",
    "conditional_predictions",
    "feature_scores",
    "guided_sample",
    "guided_step",
    "normalised_guidance",
    "piecewise_rho",
    "plot_local_scores",
    "predict_x0",
    "reject_off_target",
    "sample_coverage",
    "scores_markdown",
]
