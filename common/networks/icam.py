"""ICAM networks (Bass et al., NeurIPS 2020, section 3 and appendix A.1, Fig. 5), 2D and 3D by ``spatial_dims``.

:class:`ContentEncoder` E^c and :class:`AttributeEncoder` E^a (a VAE encoder with a spatial latent of
``image size / 16``: 8x10 for 128x160 slices, 8x10x8 for 128x160x128 volumes) feed the
:class:`Generator` G; :class:`AttributeClassifier` is the fully connected layer on the attribute latent
(also used for rejection sampling); :class:`DomainDiscriminator` D (real/fake and class) and
:class:`ContentDiscriminator` D^c are the adversaries. Two bugs of the original code are avoided: its
discriminators were meant to use InstanceNorm but never applied it (a string comparison that was never
true), here ``norm="instance"`` really inserts it; and its classifier applied a softmax before a
BCE-with-logits loss, here every classifier and discriminator returns raw logits, so the loss owns the
sigmoid. Blocks come from MONAI (``Convolution`` = conv + norm + activation) where they fit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Act, Norm, Pool
from torch import nn

LEAKY = (Act.LEAKYRELU, {"negative_slope": 0.2})
# GroupNorm with one group normalises over channels and space together: DRIT/ICAM's layer norm.
LAYER_NORM = (Norm.GROUP, {"num_groups": 1})
# The original down-samples images by 16 into the attribute latent (128x160x128 -> 8x10x8).
ATTRIBUTE_DOWNSAMPLING = 16

_REFLECTION_PAD = {1: nn.ReflectionPad1d, 2: nn.ReflectionPad2d, 3: nn.ReflectionPad3d}


def _reflect(spatial_dims: int, pad: int) -> nn.Module:
    # MONAI's Pad factory has no reflection padding. The original reflects before its 3x3/4x4
    # convolutions: zero padding would add a false edge at the border for the generator to reproduce.
    return _REFLECTION_PAD[spatial_dims](pad)


def _padded_conv(
    spatial_dims: int,
    cin: int,
    cout: int,
    kernel_size: int = 3,
    strides: int = 1,
    norm=None,
    act=None,
    pad: int = 1,
) -> nn.Sequential:
    # Only InstanceNorm or nothing follows these convolutions; InstanceNorm removes a bias anyway.
    conv = Convolution(
        spatial_dims,
        cin,
        cout,
        strides=strides,
        kernel_size=kernel_size,
        padding=0,
        norm=norm,
        act=act,
        bias=norm is None,
    )
    return nn.Sequential(_reflect(spatial_dims, pad), conv)


def attribute_latent_size(image_size: Sequence[int]) -> tuple[int, ...]:
    """Spatial size of the attribute latent for an image of ``image_size`` (each side // 16)."""
    return tuple(int(s) // ATTRIBUTE_DOWNSAMPLING for s in image_size)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, sample: bool = True) -> torch.Tensor:
    """VAE reparameterisation: ``mu + eps * exp(logvar / 2)`` with ``eps ~ N(0, I)``, or ``mu`` if not ``sample``."""
    if not sample:
        return mu
    return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)


class GaussianNoise(nn.Module):
    """Adds ``N(0, std^2)`` noise in training only (paper 3.2: keeps the content space from collapsing to 0)."""

    def __init__(self, std: float = 1.0):
        super().__init__()
        self.std = std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.std > 0:
            return x + torch.randn_like(x) * self.std
        return x


class ResBlock(nn.Module):
    """Basic residual block ``conv-IN-ReLU-conv-IN + skip``; a 1x1 convolution projects the skip if widths differ.

    MONAI's ``ResidualUnit`` either activates its last convolution or drops its norm, so it does not fit.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int | None = None):
        super().__init__()
        d, out_channels = spatial_dims, out_channels or in_channels
        self.body = nn.Sequential(
            _padded_conv(d, in_channels, out_channels, norm=Norm.INSTANCE, act=Act.RELU),
            _padded_conv(d, out_channels, out_channels, norm=Norm.INSTANCE),
        )
        self.skip: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.skip = Convolution(d, in_channels, out_channels, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class ContentEncoder(nn.Module):
    """E^c: the class-irrelevant content at 1/4 resolution with ``channels[-1]`` (64) channels."""

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64),
        num_res_blocks: int = 4,
        noise_std: float = 1.0,
    ):
        super().__init__()
        d = spatial_dims
        layers: list[nn.Module] = [_padded_conv(d, in_channels, channels[0], act=LEAKY)]
        for cin, cout in zip(channels[:-1], channels[1:]):
            layers.append(_padded_conv(d, cin, cout, strides=2, norm=Norm.INSTANCE, act=Act.RELU))
        layers += [ResBlock(d, channels[-1]) for _ in range(num_res_blocks)]
        self.features = nn.Sequential(*layers)
        self.noise = GaussianNoise(noise_std)
        self.out_channels = channels[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.noise(self.features(x))


class DownResBlock(nn.Module):
    """Pre-activation residual block without normalisation that halves the size by mean pooling.

    Path: LeakyReLU, conv 3 (cin -> cin), LeakyReLU, conv 3 (cin -> cout), mean-pool 2;
    shortcut: mean-pool 2, conv 1 (cin -> cout).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        d = spatial_dims
        pool = Pool[Pool.AVG, d]
        self.body = nn.Sequential(
            Act[LEAKY[0]](**LEAKY[1]),
            _padded_conv(d, in_channels, in_channels, act=LEAKY),
            _padded_conv(d, in_channels, out_channels),
            pool(kernel_size=2),
        )
        self.skip = nn.Sequential(
            pool(kernel_size=2), Convolution(d, in_channels, out_channels, kernel_size=1, conv_only=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.skip(x)


class AttributeEncoder(nn.Module):
    """E^a: the VAE attribute encoder; returns ``(mu, logvar)``, each ``(B, latent_channels, *image_size / 16)``.

    A 4x4 stride-2 convolution (/2) and three mean-pooling residual blocks (/8) give the latent size
    exactly, so no adaptive pooling is needed; the latent stays spatial (paper A.1: a 1D latent lost
    class information to the content encoder).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 48, 48),
        latent_channels: int = 1,
    ):
        super().__init__()
        d = spatial_dims
        if len(channels) != 4:
            raise ValueError(f"channels={channels}: one stride-2 conv and three down blocks give the /16 latent")
        layers: list[nn.Module] = [_padded_conv(d, in_channels, channels[0], kernel_size=4, strides=2)]
        layers += [DownResBlock(d, cin, cout) for cin, cout in zip(channels[:-1], channels[1:])]
        layers.append(Act[LEAKY[0]](**LEAKY[1]))
        self.features = nn.Sequential(*layers)
        self.mu = Convolution(d, channels[-1], latent_channels, kernel_size=1, conv_only=True)
        self.logvar = Convolution(d, channels[-1], latent_channels, kernel_size=1, conv_only=True)
        self.latent_channels = latent_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.mu(h), self.logvar(h)

    def reparameterize(self, mu: torch.Tensor, logvar: torch.Tensor, sample: bool | None = None) -> torch.Tensor:
        """Sample ``z``; ``sample=None`` samples in training mode and returns ``mu`` in eval mode."""
        return reparameterize(mu, logvar, self.training if sample is None else sample)


class AttributeClassifier(nn.Module):
    """The fully connected layer on the flattened attribute latent: ONE raw logit per image.

    Give ``latent_size`` (spatial size of the latent) or ``image_size`` (the latent is ``image_size // 16``).
    ``regression=True`` adds a linear regression output, read with :meth:`regress` (ICAM's regression
    variant); :meth:`forward` always returns the classification logit, so rejection sampling is unchanged.
    """

    def __init__(
        self,
        latent_size: Sequence[int] | None = None,
        latent_channels: int = 1,
        image_size: Sequence[int] | None = None,
        regression: bool = False,
    ):
        super().__init__()
        if (latent_size is None) == (image_size is None):
            raise ValueError("give exactly one of latent_size and image_size")
        self.latent_size = tuple(latent_size) if latent_size is not None else attribute_latent_size(image_size)
        features = latent_channels
        for s in self.latent_size:
            features *= s
        self.classifier = nn.Linear(features, 1)
        self.regressor = nn.Linear(features, 1) if regression else None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # No sigmoid/softmax: the loss is BCE-with-logits (the original's softmax + BCE-with-logits was a bug).
        return self.classifier(z.flatten(1))

    def regress(self, z: torch.Tensor) -> torch.Tensor:
        if self.regressor is None:
            raise RuntimeError("this classifier was built with regression=False")
        return self.regressor(z.flatten(1))


class Generator(nn.Module):
    """G(content, z): an image of 4x the content size in [-1, 1] (Tanh).

    The paper says "several" residual blocks; two make the 3D encoder-generator 1.79M parameters, the
    paper's 1.8M (section 4.2), where four would make 2.2M.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        out_channels: int = 1,
        content_channels: int = 64,
        latent_channels: int = 1,
        up_channels: Sequence[int] = (32, 16),
        num_res_blocks: int = 2,
    ):
        super().__init__()
        d = spatial_dims
        if num_res_blocks < 1:
            raise ValueError("at least one residual block is needed to merge content and attribute")
        res: list[nn.Module] = [ResBlock(d, content_channels + latent_channels, content_channels)]
        res += [ResBlock(d, content_channels) for _ in range(num_res_blocks - 1)]
        self.merge = nn.Sequential(*res)
        ups: list[nn.Module] = []
        cin = content_channels
        for cout in up_channels:
            # Kernel 4, stride 2, padding 1 doubles the size exactly, so the original's average pooling
            # (which only trimmed the transposed convolution's overhang) is not needed.
            ups.append(
                Convolution(
                    d,
                    cin,
                    cout,
                    strides=2,
                    kernel_size=4,
                    padding=1,
                    output_padding=0,
                    is_transposed=True,
                    norm=LAYER_NORM,
                    act=Act.RELU,
                )
            )
            cin = cout
        self.up = nn.Sequential(*ups)
        self.output = nn.Sequential(Convolution(d, cin, out_channels, kernel_size=1, conv_only=True), nn.Tanh())

    def forward(self, content: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # x4 nearest upsampling when sizes divide by 16 (the paper's inputs); resizing to the content size
        # also covers sides that are only divisible by 4, such as 40 (latent 2, content 10).
        z = F.interpolate(z, size=content.shape[2:], mode="nearest")
        return self.output(self.up(self.merge(torch.cat([content, z], dim=1))))


def _strided_depth(size: Sequence[int] | None, max_layers: int, min_size: int = 2) -> int:
    """How many k3/s2/p1 layers keep every side >= ``min_size`` (InstanceNorm needs more than one voxel)."""
    if size is None:
        return max_layers
    size, n = list(size), 0
    while n < max_layers:
        size = [(s + 1) // 2 for s in size]
        if min(size) < min_size:
            break
        n += 1
    if n == 0:
        raise ValueError(f"input size {tuple(size)} is too small for a stride-2 layer")
    return n


def _norm_arg(norm: str | None):
    if norm is None:
        return None
    if norm.lower() != "instance":
        raise ValueError(f"norm '{norm}' is unknown; expected 'instance' or None")
    return Norm.INSTANCE


class DomainDiscriminator(nn.Module):
    """D: returns raw ``(real_fake_logit, class_logit)``, each ``(B, 1)``.

    Up to six k3/s2 convolutions (``channels``) with LeakyReLU 0.2 and, with ``norm="instance"``,
    InstanceNorm on each; two 1x1 convolution heads, each averaged over space. ``image_size`` drops the
    last layers whose output would shrink below 2 voxels a side (six layers for 128x128 or
    128x160x128, four for 32x32).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128, 256, 256),
        norm: str | None = "instance",
        image_size: Sequence[int] | None = None,
    ):
        super().__init__()
        d, norm_type = spatial_dims, _norm_arg(norm)
        depth = _strided_depth(image_size, len(channels))
        layers: list[nn.Module] = []
        cin = in_channels
        for cout in channels[:depth]:
            layers.append(
                Convolution(
                    d, cin, cout, strides=2, kernel_size=3, padding=1, norm=norm_type, act=LEAKY, bias=norm is None
                )
            )
            cin = cout
        self.features = nn.Sequential(*layers)
        self.real_fake = Convolution(d, cin, 1, kernel_size=1, conv_only=True)
        self.domain = Convolution(d, cin, 1, kernel_size=1, conv_only=True)
        self.pool = Pool[Pool.ADAPTIVEAVG, d](1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.pool(self.real_fake(h)).flatten(1), self.pool(self.domain(h)).flatten(1)


class ContentDiscriminator(nn.Module):
    """D^c: one raw logit per content tensor, for the class the content came from.

    Three k3/s2 convolutions (LeakyReLU 0.2, InstanceNorm), a k4 convolution, global average pooling and
    a linear layer. ``content_size`` drops strided layers whose output would shrink below 2 a side, so
    the k4 convolution (padding 1) always has something to see.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 64,
        channels: int = 64,
        num_layers: int = 3,
        norm: str | None = "instance",
        content_size: Sequence[int] | None = None,
    ):
        super().__init__()
        d, norm_type = spatial_dims, _norm_arg(norm)
        depth = _strided_depth(content_size, num_layers)
        layers: list[nn.Module] = []
        cin = in_channels
        for _ in range(depth):
            layers.append(
                Convolution(
                    d, cin, channels, strides=2, kernel_size=3, padding=1, norm=norm_type, act=LEAKY, bias=norm is None
                )
            )
            cin = channels
        # No norm here: its output can be a single voxel, where InstanceNorm is undefined.
        layers.append(Convolution(d, channels, channels, kernel_size=4, padding=1, norm=None, act=LEAKY))
        layers += [Pool[Pool.ADAPTIVEAVG, d](1), nn.Flatten(), nn.Linear(channels, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, content: torch.Tensor) -> torch.Tensor:
        return self.net(content)
