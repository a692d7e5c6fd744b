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
