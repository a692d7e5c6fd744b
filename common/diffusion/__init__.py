"""Diffusion sampling shared by the bundles: feature-guided DDPM/DDIM (TVD-score paper, Eq. 8) on MONAI schedulers,
the evaluation of one feature with the TVD score from such samples, and the latent-diffusion glue around MONAI's
AutoencoderKL and LatentDiffusionInferer."""

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
from common.diffusion.latent import (
    LatentDecoder,
    LatentEncoder,
    LatentNoisePrepareBatch,
    LatentTrainingInferer,
    ReconstructionInferer,
    latent_scale_factor,
    latent_shape,
    read_latent_scale,
    training_latent_scale,
    write_latent_scale,
)

__all__ = [
    "ConditionalPredictions",
    "LatentDecoder",
    "LatentEncoder",
    "LatentNoisePrepareBatch",
    "LatentTrainingInferer",
    "ReconstructionInferer",
    "conditional_predictions",
    "feature_scores",
    "guided_sample",
    "guided_step",
    "latent_scale_factor",
    "latent_shape",
    "normalised_guidance",
    "piecewise_rho",
    "plot_local_scores",
    "predict_x0",
    "read_latent_scale",
    "reject_off_target",
    "sample_coverage",
    "scores_markdown",
    "training_latent_scale",
    "write_latent_scale",
]
