"""The smallest input a network accepts, found by trying it."""

from __future__ import annotations

import torch
from torch import nn

from common.networks.modes import frozen


def minimum_input_size(
    network: nn.Module, spatial_dims: int, in_channels: int = 1, largest: int = 256, extra_axes: int = 0
) -> list[int]:
    """Smallest isotropic spatial size ``s`` (per axis, ``[s] * spatial_dims``) at which ``network`` runs.

    Strided convolutions and pooling need a minimum size that depends on the whole architecture;
    trying it on zeros (eval mode, no gradients, on the network's device) is exact where deriving it from
    the layers would have to know every block type. ``extra_axes`` trailing axes of size 1 are added to the
    probe and the result (ACAT's slice axis: a 2D network applied to each slice of a volume). Raises
    ``ValueError`` if nothing up to ``largest`` runs.
    """
    parameter = next(network.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    with frozen(network), torch.no_grad():
        for size in range(1, largest + 1):
            try:
                network(torch.zeros((1, in_channels) + (size,) * spatial_dims + (1,) * extra_axes, device=device))
            except (RuntimeError, ValueError):  # too small for a kernel or a pooling window
                continue
            return [size] * spatial_dims + [1] * extra_axes
    raise ValueError(f"{type(network).__name__} does not run on any {spatial_dims}D input up to {largest}")
