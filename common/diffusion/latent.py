"""Latent diffusion on MONAI's ``AutoencoderKL`` (Rombach et al. 2022; the TVD paper's brain-ROI set-up, appendix B.4).

MONAI provides the networks, ``LatentDiffusionInferer`` (encodes a batch with the frozen autoencoder, scales the
latents, noises them and predicts the noise) and ``DiffusionPrepareBatch``. What is here connects them to the
rest of the project:

- :class:`LatentNoisePrepareBatch`: ``DiffusionPrepareBatch`` draws noise shaped like the *images*; latent
  diffusion needs it shaped like the latents.
- :class:`LatentTrainingInferer`: ``SupervisedTrainer`` calls ``inferer(inputs, network, noise=..,
  timesteps=..)``, while ``LatentDiffusionInferer`` also wants the autoencoder; this holds it.
- the latent scale factor "from the data" (1 / sd of the training latents, as in Rombach et al. and MONAI's
  tutorials), computed once when the diffusion model is trained and saved next to it, so sampling
  uses the very number the model was trained with (:func:`latent_scale_factor`, :func:`write_latent_scale`,
  :func:`read_latent_scale`);
- :class:`LatentDecoder` / :class:`LatentEncoder`: the scaled latent <-> image maps as modules, so guided
  sampling can differentiate through the decoder and :func:`common.networks.modes.frozen` finds the autoencoder.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from monai.engines.utils import DiffusionPrepareBatch, default_prepare_batch
from monai.inferers import Inferer, LatentDiffusionInferer
from monai.utils import convert_to_tensor
from torch import nn

from common.errors import InputError
from common.files import write_text_atomic

__all__ = [
    "LatentNoisePrepareBatch",
    "LatentTrainingInferer",
    "ReconstructionInferer",
    "LatentDecoder",
    "LatentEncoder",
    "latent_shape",
    "latent_scale_factor",
    "write_latent_scale",
    "read_latent_scale",
    "training_latent_scale",
]


def latent_shape(spatial_size: Sequence[int], autoencoder_channels: Sequence[int], latent_channels: int) -> list[int]:
    """(C, *spatial) of the latents of ``AutoencoderKL``: it halves the size once per level after the first."""
    factor = 2 ** (len(autoencoder_channels) - 1)
    if any(int(s) % factor for s in spatial_size):
        raise InputError(
            f"spatial_size {list(spatial_size)} must be divisible by {factor} "
            f"(the autoencoder has {len(autoencoder_channels)} levels)"
        )
    return [int(latent_channels), *(int(s) // factor for s in spatial_size)]


class LatentNoisePrepareBatch(DiffusionPrepareBatch):
    """MONAI's ``DiffusionPrepareBatch`` with the noise (the regression target) in the latent shape."""

    def __init__(self, num_train_timesteps: int, latent_shape: Sequence[int], condition_name: str | None = None):
        super().__init__(num_train_timesteps, condition_name)
        self.latent_shape = tuple(int(s) for s in latent_shape)

    def get_noise(self, images: torch.Tensor) -> torch.Tensor:
        return torch.randn((images.shape[0], *self.latent_shape), device=images.device, dtype=images.dtype)


class LatentTrainingInferer(Inferer):
    """``inferer(inputs, diffusion_network, noise=, timesteps=)`` as ``SupervisedTrainer`` calls it, run by
    MONAI's ``LatentDiffusionInferer`` with the (frozen) autoencoder held here."""

    def __init__(self, scheduler, autoencoder: nn.Module, scale_factor: float):
        super().__init__()
        self.autoencoder = autoencoder
        self.latent_inferer = LatentDiffusionInferer(scheduler, scale_factor=float(scale_factor))

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        # The autoencoder samples z = mu + sigma * eps (encode_stage_2_inputs): the diffusion model learns the
        # latents the decoder was trained to decode, noise included (the paper's "noise infusion").
        self.autoencoder.eval()
        return self.latent_inferer(inputs, self.autoencoder, network, *args, **kwargs)


class ReconstructionInferer(Inferer):
    """``AutoencoderKL.reconstruct``: decode(posterior mean), the deterministic reconstruction validation scores
    (the network's own forward samples z and returns a tuple)."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        return network.reconstruct(inputs)


@torch.no_grad()
def latent_scale_factor(autoencoder: nn.Module, loader: Iterable, device=None, max_batches: int = 4) -> float:
    """1 / sd of the autoencoder's latents over the first ``max_batches`` training batches (unit-variance latents,
    the scale the noise schedule assumes)."""
    was_training = autoencoder.training
    autoencoder.eval()
    latents = []
    try:
        for i, batch in enumerate(loader):
            if i >= max_batches:
                break
            images, _ = default_prepare_batch(batch, device)
            latents.append(autoencoder.encode_stage_2_inputs(convert_to_tensor(images, track_meta=False)).float())
    finally:
        autoencoder.train(was_training)
    if not latents:
        raise InputError("the latent scale factor needs at least one training batch; the training split is empty")
    sd = float(torch.cat([z.flatten() for z in latents]).std())
    if not math.isfinite(sd) or sd <= 0:
        raise InputError(f"the autoencoder's latents have sd {sd}; expected a positive number (is it trained?)")
    return 1.0 / sd


def write_latent_scale(path: str | os.PathLike, scale_factor: float) -> float:
    """Save the scale factor the diffusion model is trained with (JSON, atomic); returns it."""
    write_text_atomic(path, json.dumps({"scale_factor": float(scale_factor)}, indent=1) + "\n")
    return float(scale_factor)


def training_latent_scale(
    path: str | os.PathLike, autoencoder: nn.Module, loader: Iterable, device=None, resume: bool = False
) -> float:
    """The scale factor a diffusion training uses: measured on the data and saved to ``path``, or, when resuming
    a run that saved one, read back (measuring again would give a slightly different number than the one the
    model has been trained with so far)."""
    if resume and Path(path).is_file():
        return read_latent_scale(path)
    return write_latent_scale(path, latent_scale_factor(autoencoder, loader, device))


def read_latent_scale(path: str | os.PathLike) -> float:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: latent scale factor not found; expected the output of train_diffusion.json")
    return float(json.loads(path.read_text())["scale_factor"])


class LatentDecoder(nn.Module):
    """Scaled latents -> images: ``autoencoder.decode_stage_2_outputs(z / scale_factor)``."""

    def __init__(self, autoencoder: nn.Module, scale_factor: float):
        super().__init__()
        self.autoencoder = autoencoder
        self.scale_factor = float(scale_factor)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode_stage_2_outputs(z / self.scale_factor)


class LatentEncoder(nn.Module):
    """Images -> scaled latents, the posterior mean (deterministic: a known region is pinned to one latent)."""

    def __init__(self, autoencoder: nn.Module, scale_factor: float):
        super().__init__()
        self.autoencoder = autoencoder
        self.scale_factor = float(scale_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z_mu, _ = self.autoencoder.encode(x)
        return z_mu * self.scale_factor
