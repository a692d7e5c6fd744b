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


class TensorBoardAttributionMaps:
    """After every epoch, write the attribution maps of a few fixed validation patients to TensorBoard.

    The maps come from :func:`common.attribution.attribute` on ``network`` (e.g. ``gradient``,
    the map the attribution constraint shapes), next to the images and, if present, their masks.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        dataset,
        log_dir: str,
        method: str = "gradient",
        n_images: int = 4,
        image_key: str = "image",
        label_key: str = "label",
        mask_key: str = "mask",
        device: torch.device | str = "cpu",
    ):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)
        self.network = network
        self.method = method
        patients = []
        for i in range(len(dataset)):
            if len(patients) == n_images:
                break
            item = dataset[i]
            if int(item[label_key]) == 1:
                patients.append(item)
        self.images = torch.stack([torch.as_tensor(item[image_key]) for item in patients]).to(device)
        masks = [item.get(mask_key) for item in patients]
        self.masks = None if any(m is None for m in masks) else torch.stack([torch.as_tensor(m) for m in masks])

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine) -> None:
        from common.attribution import attribute

        was_training = self.network.training
        self.network.eval()
        maps = attribute(self.network, self.images.as_subclass(torch.Tensor), self.method)
        self.network.train(was_training)
        step = engine.state.epoch
        self.writer.add_images("validation/image", _as_grid(self.images), step)
        self.writer.add_images(f"validation/{self.method}", _as_grid(maps), step)
        if self.masks is not None:
            self.writer.add_images("validation/mask", _as_grid(self.masks), step)
        self.writer.flush()
