"""Ignite trainers (``monai.engines.Trainer`` subclasses) for the multi-network methods."""

from common.engines import distributed
from common.engines.autoencoder import AutoencoderKLTrainer
from common.engines.batches import PrepareKeys, RandomStates, attach_resume, epoch_lr_scheduler
from common.engines.constrained import ConstrainedClassifierTrainer
from common.engines.icam import (
    FeatureAttribution,
    ICAMTrainer,
    RejectionSamplingError,
    feature_attribution,
    is_content_discriminator_iteration,
    sample_attribute,
)
from common.engines.vagan import VAGANTrainer, critic_steps_for, gradient_penalty
from common.files import latest_checkpoint

__all__ = [
    "AutoencoderKLTrainer",
    "ConstrainedClassifierTrainer",
    "PrepareKeys",
    "RandomStates",
    "attach_resume",
    "distributed",
    "epoch_lr_scheduler",
    "latest_checkpoint",
    "VAGANTrainer",
    "FeatureAttribution",
    "ICAMTrainer",
    "RejectionSamplingError",
    "feature_attribution",
    "is_content_discriminator_iteration",
    "sample_attribute",
    "critic_steps_for",
    "gradient_penalty",
]
