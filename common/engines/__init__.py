"""Ignite trainers (``monai.engines.Trainer`` subclasses) for the multi-network methods."""

from common.engines.batches import PrepareKeys, attach_resume, latest_checkpoint
from common.engines.constrained import ConstrainedClassifierTrainer
from common.engines.vagan import VAGANTrainer, critic_steps_for, gradient_penalty

__all__ = [
    "ConstrainedClassifierTrainer",
    "PrepareKeys",
    "attach_resume",
    "latest_checkpoint",
    "VAGANTrainer",
    "critic_steps_for",
    "gradient_penalty",
]
