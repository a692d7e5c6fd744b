"""Class-paired data for translation-style methods (VA-GAN, ICAM): one control and one patient.

:class:`ClassPairDataset` yields ``{"image_0": control, "image_1": patient}`` where the patient
runs over the data set and the control is drawn at random (torch's RNG, so ``set_determinism`` and
DataLoader worker seeding make it reproducible). Loading and pre-processing go through MONAI
``CacheDataset`` objects, one per class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.data import CacheDataset

from common.errors import DatalistError

PAIR_KEYS = ("image_0", "image_1")


class ClassPairDataset(torch.utils.data.Dataset):
    """Pairs every patient (``label == positive``) with a random control (``label == negative``).

    Args:
        data: datalist items (``image`` and ``label``), e.g. from :func:`common.data.load_datalist`.
        transform: the pre-processing of one item (a MONAI dict transform on ``image``).
        positive, negative: the two labels.
        cache_rate: fraction of each class kept in memory after pre-processing (MONAI ``CacheDataset``).
        num_workers: workers that fill the cache.
        image_key: the key to pair.
    """

    def __init__(
        self,
        data: Sequence[dict],
        transform: Callable,
        positive: int = 1,
        negative: int = 0,
        cache_rate: float = 1.0,
        num_workers: int = 0,
        image_key: str = "image",
    ):
        self.image_key = image_key
        controls = [item for item in data if item.get("label") == negative]
        patients = [item for item in data if item.get("label") == positive]
        for name, members, label in (("controls", controls, negative), ("patients", patients, positive)):
            if not members:
                raise DatalistError(f"no {name} (label {label}) among {len(data)} items; expected both classes")
        kwargs = dict(transform=transform, cache_rate=cache_rate, num_workers=num_workers, progress=False)
        self.controls = CacheDataset(controls, **kwargs)
        self.patients = CacheDataset(patients, **kwargs)

    def __len__(self) -> int:
        return len(self.patients)

    def __getitem__(self, index: int) -> dict:
        control = int(torch.randint(len(self.controls), (1,)))
        return {"image_0": self.controls[control][self.image_key], "image_1": self.patients[index][self.image_key]}


def prepare_pair_batch(batchdata: dict, device=None, non_blocking: bool = False, **kwargs):
    """(controls, patients) tensors on ``device`` from a batch of :class:`ClassPairDataset` items."""
    from common.engines.batches import PrepareKeys

    return PrepareKeys(*PAIR_KEYS)(batchdata, device, non_blocking, **kwargs)
