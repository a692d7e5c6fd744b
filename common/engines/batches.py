"""Batch preparation, checkpoint resume and learning-rate schedules shared by the engines."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from monai.utils import convert_to_tensor

from common.errors import InputError
from common.files import latest_checkpoint


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


def _randomizable_transforms(transform) -> list:
    """The ``Randomizable`` objects inside ``transform`` (a ``Compose`` tree, a list, or one transform), nested ones
    included: ``RandAffined`` draws from its own generator and from those of the ``RandAffine`` and
    ``RandAffineGrid`` it holds."""
    from monai.transforms import Randomizable

    found, seen, stack = [], set(), [transform]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, (list, tuple)):
            stack.extend(reversed(item))
            continue
        if isinstance(item, Randomizable) and isinstance(getattr(item, "R", None), np.random.RandomState):
            found.append(item)
        members = (
            [v for v in vars(item).values() if isinstance(v, (Randomizable, list, tuple))]
            if hasattr(item, "__dict__")
            else []
        )
        stack.extend(reversed(members))
    return found


def _numpy_state(state: tuple) -> dict:
    name, keys, position, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.as_tensor(keys.astype("int64")),
        "pos": int(position),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _numpy_state_tuple(state: dict) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]


class RandomStates:
    """The random number generators a training run draws from, as a checkpointable object (``state_dict`` /
    ``load_state_dict``), so a resumed run continues the killed run's random sequence: the data order (the
    ``DataLoader``'s sampler draws its permutation from torch's global generator each epoch), the augmentations
    (each random MONAI transform of ``transform`` has its own ``numpy`` generator), noise and dropout.

    Saved with the epoch-end checkpoint and restored when the resumed trainer starts, after the config has been
    built (which draws from the generators, network initialisation included), so the next epoch sees the
    generators exactly where the uninterrupted run had them. Everything is stored as tensors, ints and lists,
    so the checkpoint still loads with ``weights_only=True``. One process's generators: each DDP process saves
    nothing of its own (rank 0 writes the checkpoint), so a resumed multi-process run restores rank 0's on all.
    """

    def __init__(self, transform=None):
        self.transforms = _randomizable_transforms(transform) if transform is not None else []

    def state_dict(self) -> dict:
        import random

        python_version, python_state, gauss = random.getstate()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": _numpy_state(np.random.get_state()),  # noqa: NPY002 - the legacy global one is what set_determinism seeds
            "python": {"version": python_version, "state": list(python_state), "gauss": gauss},
            "transforms": [_numpy_state(t.R.get_state()) for t in self.transforms],
        }

    def load_state_dict(self, state: dict) -> None:
        import random

        if len(state["transforms"]) != len(self.transforms):
            raise InputError(
                f"the checkpoint holds the random states of {len(state['transforms'])} random transforms, this "
                f"run's training transform has {len(self.transforms)}; expected the configuration of the run it resumes"
            )
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        np.random.set_state(_numpy_state_tuple(state["numpy"]))  # noqa: NPY002 - as in state_dict
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
        for t, t_state in zip(self.transforms, state["transforms"]):
            t.R.set_state(_numpy_state_tuple(t_state))


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
        to_load = dict(objects)
        if "random_states" in to_load and "random_states" not in state:
            # a checkpoint from before random states were saved: everything else resumes, the draws start afresh
            logging.getLogger(__name__).warning("%s holds no random states; the resumed data order starts afresh", path)
            del to_load["random_states"]
        try:
            Checkpoint.load_objects(to_load=to_load, checkpoint=state)
        except InputError as error:  # the objects know what does not fit, only this knows the file
            raise InputError(f"{path}: {error}") from None
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
