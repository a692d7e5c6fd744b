"""The small CNN of the TVD-score paper's ellipse experiment (Jin, Zhu & Fletcher, MIDL 2025, appendix B.1).

Table 6 / 7: four blocks of (3x3 convolution, ReLU, 2x2 max pooling) with 32, 64, 64, 64 channels, then
flatten, a linear layer to 64 with ReLU, and a linear output. The paper uses the same architecture for the
classifier under study (one sigmoid output) and for the regressors g of the aspect ratio and the size. Here
the classifier has ``num_classes`` logits (cross-entropy on two logits is the same model as a sigmoid on one)
and the regressor one output per feature. :meth:`FeatureCNN.embed` is the 64-wide penultimate layer, the
embedding the TVD bundle measures sample coverage in. ``spatial_dims=3`` gives the 3D counterpart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers import Act
from monai.networks.layers.factories import Pool
from torch import nn

__all__ = ["FeatureCNN"]


class FeatureCNN(nn.Module):
    """Paper Table 6: conv-ReLU-maxpool blocks, flatten, linear + ReLU (the embedding), linear output.

    Args:
        spatial_dims: 2 (the ellipses) or 3.
        in_channels: image channels.
        out_channels: class logits (classifier) or feature values (regressor).
        spatial_size: the input's spatial size; each dimension must be divisible by 2 ** len(channels) (the
            flattened size depends on it: 64 x 2 x 2 = 256 for 32x32 inputs, as in Table 6).
        channels: output channels of the convolution blocks (paper: 32, 64, 64, 64).
        hidden: width of the penultimate linear layer (paper: 64).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        spatial_size: Sequence[int] = (32, 32),
        channels: Sequence[int] = (32, 64, 64, 64),
        hidden: int = 64,
    ):
        super().__init__()
        spatial_size = tuple(int(s) for s in spatial_size)
        if len(spatial_size) != spatial_dims:
            raise ValueError(f"spatial_size {spatial_size} has {len(spatial_size)} dimensions; expected {spatial_dims}")
        divisor = 2 ** len(channels)
        if any(s % divisor for s in spatial_size):
            raise ValueError(f"spatial_size {spatial_size} must be divisible by {divisor} ({len(channels)} poolings)")
        self.spatial_size = spatial_size
        blocks: list[nn.Module] = []
        cin = in_channels
        for c in channels:
            blocks += [
                Convolution(spatial_dims, cin, c, kernel_size=3, act=Act.RELU, norm=None, bias=True),
                Pool[Pool.MAX, spatial_dims](kernel_size=2),
            ]
            cin = c
        self.features = nn.Sequential(*blocks)
        flat = channels[-1] * math.prod(s // divisor for s in spatial_size)
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, out_channels)

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape[2:]) != self.spatial_size:
            raise ValueError(
                f"input of spatial size {tuple(x.shape[2:])}; this network was built for {self.spatial_size}"
            )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate (linear + ReLU) features, (B, hidden)."""
        self._check(x)
        return self.hidden(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))
