"""Baseline attributions (Captum) and differentiable attributions for training-time constraints."""

from common.attribution.baselines import METHODS, ClassScore, attribute, last_conv_layer
from common.attribution.differentiable import TRAINING_METHODS, class_logit, differentiable_attribution
from common.attribution.transforms import PAPER_NAMES, Attributiond

__all__ = [
    "Attributiond",
    "PAPER_NAMES",
    "METHODS",
    "TRAINING_METHODS",
    "ClassScore",
    "attribute",
    "class_logit",
    "differentiable_attribution",
    "last_conv_layer",
]
