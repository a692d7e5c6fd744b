"""Losses that need more than (prediction, target): attribution constraints, adversarial terms."""

from common.losses.attribution_constraint import CONSTRAINT_MODES, AttributionConstraintLoss
from common.losses.autoencoder import AutoencoderKLLoss
from common.losses.classification import balanced_class_weights
from common.losses.icam import ICAMLossWeights

__all__ = [
    "CONSTRAINT_MODES",
    "AttributionConstraintLoss",
    "AutoencoderKLLoss",
    "ICAMLossWeights",
    "balanced_class_weights",
]
