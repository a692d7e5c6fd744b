"""VA-GAN networks (Baumgartner et al., CVPR 2018, section 3.4 and supplementary Fig. 1-2).

- :class:`MapGenerator` M: a U-Net with batch norm on every layer but the last, feature maps
  reduced 4x from the 3D U-Net: encoder 16,16 | 32,32 | 64,64 | 128,128 (max-pool between levels);
  every up-convolution (kernel 4, stride 2) outputs 16 maps that are concatenated with the skip;
  decoder 64,64 | 32,32 | 16; a final linear 3x3 convolution to one channel. y = x + M(x).
- :class:`Critic` D: C3D-like, no batch norm: conv16, pool, conv32, pool, conv64 x2, pool,
  conv128 x2, pool, conv256 x2, one more conv256, a 1x1 convolution to one map, global average
  pooling.
- :class:`Classifier`: the paper's classifier for the baselines: the critic's layers with batch
  norm everywhere, the 1x1 convolution and pooling replaced by two dense layers (``head="dense"``);
  or the CAM design (``head="cam"``): the last two max-poolings omitted and global average pooling
  followed by one linear layer, so class activation maps have a finer resolution.

All three take ``spatial_dims`` 2 or 3 (the 2D synthetic experiments replaced every 3D operation by
its 2D counterpart). Blocks come from MONAI (``Convolution`` = conv + norm + activation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers import Act, Norm
from monai.networks.layers.factories import Pool
from torch import nn


def _conv(spatial_dims: int, cin: int, cout: int, norm: bool, kernel_size: int = 3, act=Act.RELU) -> Convolution:
    return Convolution(
        spatial_dims, cin, cout, kernel_size=kernel_size, act=act, norm=Norm.BATCH if norm else None, bias=not norm
    )


class MapGenerator(nn.Module):
    """VA-GAN's map generator M(x); the counterfactual is ``x + M(x)``."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        up_channels: int = 16,
    ):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"channels={channels}: the VA-GAN U-Net has 4 levels")
        d = spatial_dims
        self.divisor = 2 ** (len(channels) - 1)
        self.encoder = nn.ModuleList()
        cin = in_channels
        for c in channels:
            self.encoder.append(nn.Sequential(_conv(d, cin, c, True), _conv(d, c, c, True)))
            cin = c
        self.pool = Pool[Pool.MAX, d](kernel_size=2)
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        below = channels[-1]
        for level in range(len(channels) - 2, -1, -1):
            self.up.append(
                Convolution(
                    d,
                    below,
                    up_channels,
                    strides=2,
                    kernel_size=4,
                    padding=1,
                    output_padding=0,
                    is_transposed=True,
                    norm=Norm.BATCH,
                    bias=False,
                )
            )
            width = channels[level]
            convs = [_conv(d, width + up_channels, width, True)]
            if level > 0:  # the top level has a single 16-map convolution before the output
                convs.append(_conv(d, width, width, True))
            self.decoder.append(nn.Sequential(*convs))
            below = width
        self.output = Convolution(d, below, out_channels, kernel_size=3, act=None, norm=None, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A loop and list(): TorchScript compiles neither any() over a generator nor tuple() of a shape.
        for size in x.shape[2:]:
            if size % self.divisor != 0:
                raise ValueError(f"spatial size {list(x.shape[2:])} must be divisible by {self.divisor}")
        skips = []
        for level, block in enumerate(self.encoder):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, block in zip(self.up, self.decoder):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return self.output(x)


def _c3d_features(spatial_dims: int, in_channels: int, norm: bool, pool_after: Sequence[bool]) -> nn.Sequential:
    """C3D-like stack: conv16 | conv32 | conv64 x2 | conv128 x2 | conv256 x2, pooling after the first four groups."""
    d = spatial_dims
    groups = [(16,), (32,), (64, 64), (128, 128), (256, 256)]
    layers: list[nn.Module] = []
    cin = in_channels
    for i, group in enumerate(groups):
        for cout in group:
            layers.append(_conv(d, cin, cout, norm))
            cin = cout
        if i < len(pool_after) and pool_after[i]:
            layers.append(Pool[Pool.MAX, d](kernel_size=2))
    return nn.Sequential(*layers)


class Critic(nn.Module):
    """VA-GAN's WGAN critic: fully convolutional, 4 poolings, no normalisation, one score per image."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1):
        super().__init__()
        d = spatial_dims
        self.features = _c3d_features(d, in_channels, norm=False, pool_after=(True, True, True, True))
        self.extra = _conv(d, 256, 256, norm=False)
        self.score = Convolution(d, 256, 1, kernel_size=1, act=None, norm=None, conv_only=True)
        self.pool = Pool[Pool.ADAPTIVEAVG, d](1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.score(self.extra(self.features(x)))).flatten(1)


class Classifier(nn.Module):
    """The paper's classifier for the attribution baselines (logits for ``num_classes`` classes).

    ``head="dense"``: critic layers with batch norm, then two dense layers (the paper's backprop
    baselines). ``head="cam"``: the last two poolings omitted, global average pooling and one linear
    layer (the paper's CAM network); Grad-CAM on its last convolution is CAM.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_classes: int = 2, head: str = "dense"):
        super().__init__()
        d = spatial_dims
        if head == "dense":
            self.features = nn.Sequential(
                _c3d_features(d, in_channels, norm=True, pool_after=(True, True, True, True)),
                _conv(d, 256, 256, norm=True),
            )
            # The paper flattened into the dense layers; average pooling first keeps the network
            # independent of the input size (2D slices and 3D volumes of any shape).
            self.head = nn.Sequential(
                Pool[Pool.ADAPTIVEAVG, d](1),
                nn.Flatten(),
                nn.Linear(256, 256),
                nn.BatchNorm1d(256),
                nn.ReLU(),
                nn.Linear(256, num_classes),
            )
        elif head == "cam":
            self.features = _c3d_features(d, in_channels, norm=True, pool_after=(True, True, False, False))
            self.head = nn.Sequential(Pool[Pool.ADAPTIVEAVG, d](1), nn.Flatten(), nn.Linear(256, num_classes))
        else:
            raise ValueError(f"head '{head}' is unknown; expected 'dense' or 'cam'")
        self.head_type = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class EffectMap(nn.Module):
    """The disease effect VA-GAN estimates for an image: ``-M(x)``, what the generator removes.

    ``x + M(x)`` looks like a control, so ``-M(x)`` is the patient-minus-control difference, the
    same sign convention as the ground-truth effect maps.
    """

    def __init__(self, generator: MapGenerator):
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.generator(x)


class CounterfactualMaps(nn.Module):
    """Inference output of VA-GAN: channels ``[effect, counterfactual]`` = ``[-M(x), x + M(x)]``."""

    def __init__(self, generator: MapGenerator):
        super().__init__()
        self.generator = generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        change = self.generator(x)
        return torch.cat([-change, x + change], dim=1)
