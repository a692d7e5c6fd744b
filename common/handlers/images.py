"""TensorBoard image logging for map-producing trainers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from ignite.engine import Events


def _as_grid(images: torch.Tensor) -> torch.Tensor:
    """(N, 1, *spatial) -> (N, 1, H, W) min-max scaled, the middle axial slice for volumes."""
    images = images.detach().float().cpu()
    if images.ndim == 5:
        images = images[..., images.shape[-1] // 2]
    lo = images.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = images.flatten(1).max(1).values.view(-1, 1, 1, 1)
    return (images - lo) / (hi - lo).clamp_min(1e-8)


class TensorBoardOutputImages:
    """Every ``interval`` iterations, write ``engine.state.output[key]`` images to TensorBoard.

    VA-GAN logs ``image`` (x), ``map`` (M(x)) and ``counterfactual`` (x + M(x)) side by side.
    """

    def __init__(self, log_dir: str, keys: Sequence[str] = ("image", "map", "counterfactual"), interval: int = 50):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)
        self.keys = list(keys)
        self.interval = interval

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine) -> None:
        output = engine.state.output
        for key in self.keys:
            if isinstance(output, dict) and isinstance(output.get(key), torch.Tensor):
                self.writer.add_images(f"train/{key}", _as_grid(output[key]), engine.state.iteration)
        self.writer.flush()
