"""Batch preparation, checkpoint resume and learning-rate schedules shared by the engines."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.utils import convert_to_tensor

from common.errors import InputError


class PrepareKeys:
    """``prepare_batch`` returning ``(batch[image_key], batch[target_key])`` on the device.

    E.g. VA-GAN's validation compares the predicted map with the ``effect`` map, not the label.
    With ``extra_keys`` it returns MONAI's 4-tuple ``(inputs, targets, args, kwargs)``, so the
    network is called as ``network(image, *extras)`` (ACAT: the image and its saliency map).
    """

    def __init__(self, image_key: str = "image", target_key: str = "label", extra_keys: Sequence[str] = ()):
        self.image_key = image_key
        self.target_key = target_key
        self.extra_keys = tuple(extra_keys)

    def __call__(self, batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
        def get(key):
            return convert_to_tensor(batchdata[key], track_meta=False).to(
                device=device, non_blocking=non_blocking, **kwargs
            )

        image, target = get(self.image_key), get(self.target_key)
        if not self.extra_keys:
            return image, target
        return image, target, tuple(get(key) for key in self.extra_keys), {}


def latest_checkpoint(ckpt_dir: str) -> str:
    """The newest ``checkpoint_epoch=N.pt`` that a ``CheckpointSaver`` wrote in ``ckpt_dir`` (for resume)."""
    import re
    from pathlib import Path

    from common.errors import InputError

    found = sorted(
        (int(m.group(1)), path)
        for path in Path(ckpt_dir).glob("*checkpoint_epoch=*.pt")
        if (m := re.search(r"checkpoint_epoch=(\d+)\.pt$", path.name))
    )
    if not found:
        raise InputError(f"{ckpt_dir}: no checkpoint_epoch=N.pt to resume from; expected a previous training run there")
    return str(found[-1][1])


def attach_resume(trainer, ckpt_dir: str, objects: dict, map_location=None) -> str:
    """Restore ``objects`` (networks, optimisers, the trainer's counters) from the newest checkpoint
    in ``ckpt_dir`` when ``trainer`` starts; returns the checkpoint path. Loads with ``weights_only``."""
    import torch
    from ignite.engine import Events
    from ignite.handlers import Checkpoint

    path = latest_checkpoint(ckpt_dir)

    def _load(engine):
        requested = engine.state.max_epochs
        state = torch.load(path, map_location=map_location, weights_only=True)
        Checkpoint.load_objects(to_load=objects, checkpoint=state)
        # The checkpoint carries the old run's max_epochs; the new run may train for longer.
        engine.state.max_epochs = max(requested or 0, engine.state.max_epochs or 0)

    trainer.add_event_handler(Events.STARTED, _load)
    return path


LR_SCHEDULES = ("cosine", "constant")


def epoch_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, epochs: int):
    """A per-epoch learning-rate scheduler chosen by name, so a config can switch it with one id.

    ``cosine`` anneals to zero over ``epochs``; ``constant`` keeps the learning rate (a scheduler all
    the same, so checkpoints and resume have the same objects either way).
    """
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, int(epochs)))
    if schedule == "constant":
        return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    raise InputError(f"lr_schedule '{schedule}' is unknown; expected one of {', '.join(LR_SCHEDULES)}")
