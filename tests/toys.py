"""Toy models shared by the tests."""

import torch
from torch import nn


class LinearScore(nn.Module):
    """score = sum(w * x): its input gradient is w everywhere, so attributions have closed forms."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.randn(1, *shape))

    def forward(self, x):
        return (self.w * x).flatten(1).sum(1, keepdim=True)


def tiny_diffusion_unet(spatial_dims: int = 2):
    """MONAI's DiffusionModelUNet at the smallest size it allows: interface checks, not sample quality."""
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    return DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        attention_levels=(False, False),
        num_res_blocks=1,
        norm_num_groups=8,
    )


def tiny_autoencoder_kl(spatial_dims: int = 2, seed: int | None = 0):
    """MONAI's AutoencoderKL at the smallest size it allows (x2 down-sampling, one latent channel); ``seed=None``
    leaves the caller's random state as it is."""
    from monai.networks.nets import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    return AutoencoderKL(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=1,
        channels=(8, 8),
        latent_channels=1,
        num_res_blocks=1,
        norm_num_groups=8,
        attention_levels=(False, False),
        with_encoder_nonlocal_attn=False,
        with_decoder_nonlocal_attn=False,
    )


class PrecisionRecorder(nn.Module):
    """Wraps a network and records, per call, whether it ran under bfloat16 autocast."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.calls: list[bool] = []

    def forward(self, x, *args, **kwargs):
        device = x.device.type
        self.calls.append(torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16)
        return self.net(x, *args, **kwargs)
