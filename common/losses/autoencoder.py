"""Loss of the TVD-score autoencoder stage: a KL-regularised VAE (``monai.networks.nets.AutoencoderKL``).

    L = L1(x_hat, x) + kl_weight * KL(N(mu, sigma^2) || N(0, I)) + perceptual_weight * L_perc(x_hat, x)

MONAI ships :class:`monai.losses.PerceptualLoss` and :class:`monai.losses.PatchAdversarialLoss` but no loss
for the KL-VAE itself (its generative tutorials write it inline in the training loop), so it lives here. The
KL term has the closed form of a diagonal Gaussian against the standard normal,

    KL = 0.5 * sum_latent (mu^2 + sigma^2 - log sigma^2 - 1),

summed over every latent dimension (channels and space) of an image and averaged over the batch, the
convention of MONAI's tutorials and of the paper's VAE (kl_weight 1e-7). The perceptual term (weight 1e-3 in
the paper) is optional and off by default: MONAI's PerceptualLoss needs pretrained weights downloaded at
construction time. The adversarial term belongs to the trainer (:class:`common.engines.AutoencoderKLTrainer`),
which owns the discriminator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_kl(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over all non-batch dimensions, averaged over the batch."""
    z_mu, z_sigma = z_mu.float(), z_sigma.float()
    # 2 log sigma rather than log(sigma^2): sigma^2 underflows sooner than sigma for very small sigma.
    per_element = z_mu.pow(2) + z_sigma.pow(2) - 2.0 * torch.log(z_sigma) - 1.0
    return 0.5 * per_element.flatten(1).sum(1).mean()


class AutoencoderKLLoss(nn.Module):
    """L1 reconstruction + weighted KL (+ weighted perceptual) loss of a KL-VAE.

    Args:
        kl_weight: weight of the KL term (1e-7, the paper's).
        perceptual_loss: optional module called as ``perceptual_loss(reconstruction, target)`` returning a
            scalar, e.g. :class:`monai.losses.PerceptualLoss`; ``None`` (default) leaves the term out.
        perceptual_weight: weight of the perceptual term (1e-3, the paper's); unused without ``perceptual_loss``.

    ``forward`` returns a dict of scalar tensors: ``loss`` (the weighted total, differentiable), and the
    unweighted terms ``l1`` (mean absolute error), ``kl`` (see :func:`gaussian_kl`) and ``perceptual``
    (a zero tensor without a perceptual loss).
    """

    def __init__(
        self, kl_weight: float = 1e-7, perceptual_loss: nn.Module | None = None, perceptual_weight: float = 1e-3
    ):
        super().__init__()
        if kl_weight < 0:
            raise ValueError(f"kl_weight={kl_weight}; expected a non-negative weight")
        if perceptual_weight < 0:
            raise ValueError(f"perceptual_weight={perceptual_weight}; expected a non-negative weight")
        self.kl_weight = float(kl_weight)
        self.perceptual_loss = perceptual_loss
        self.perceptual_weight = float(perceptual_weight)

    def forward(
        self, reconstruction: torch.Tensor, z_mu: torch.Tensor, z_sigma: torch.Tensor, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        if reconstruction.shape != target.shape:
            # l1_loss would broadcast (with only a warning) and return a meaningless value.
            raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} differ")
        if z_mu.shape != z_sigma.shape:
            raise ValueError(f"z_mu {tuple(z_mu.shape)} and z_sigma {tuple(z_sigma.shape)} differ")
        # Float32 terms: under autocast the sums over a 3D latent would lose precision in float16.
        l1 = F.l1_loss(reconstruction.float(), target.float())
        kl = gaussian_kl(z_mu, z_sigma)
        total = l1 + self.kl_weight * kl
        if self.perceptual_loss is not None:
            perceptual = self.perceptual_loss(reconstruction, target).float().mean()
            total = total + self.perceptual_weight * perceptual
        else:
            perceptual = torch.zeros((), device=l1.device, dtype=l1.dtype)
        return {"loss": total, "l1": l1, "kl": kl, "perceptual": perceptual}
