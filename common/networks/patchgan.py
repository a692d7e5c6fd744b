"""The attribution-constraint paper's classifier: a PatchGAN whose patch logits are averaged.

Wargnier-Dauchelle et al. (IEEE TMI 2023) classify with the pix2pix PatchGAN discriminator:
C64-C128-C256-C512 (kernel 4, stride 2 except the last, batch norm on all but the first layer,
LeakyReLU 0.2) and a final convolution to one channel, pooled to one logit per image. MONAI's
``PatchDiscriminator`` (from MONAI GenerativeModels) is exactly that stack; this wrapper pools it.
"""

from __future__ import annotations

import torch
from monai.networks.nets import PatchDiscriminator
from torch import nn


class PatchGANClassifier(nn.Module):
    """One logit of pathology per image: the mean of the PatchGAN's patch logits."""

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, channels: int = 64, num_layers: int = 3):
        super().__init__()
        self.patchgan = PatchDiscriminator(
            spatial_dims=spatial_dims,
            channels=channels,
            in_channels=in_channels,
            out_channels=1,
            num_layers_d=num_layers,
        )

    def patch_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.patchgan(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_logits(x).flatten(2).mean(2)
