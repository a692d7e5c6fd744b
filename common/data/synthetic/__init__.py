"""Registry of the synthetic data sets with known ground truth.

Each entry generates one case at a time from its own RNG (``case_rng(seed, index)``), so a data
set is fully determined by (name, parameters, seed) and any case can be regenerated alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from common.data.synthetic import boxes, ellipses


@dataclass(frozen=True)
class SyntheticDataset:
    name: str
    description: str
    version: int  # bump when the recipe changes, so existing folders are regenerated
    defaults: dict
    make_case: Callable[[np.random.Generator, dict, int | None], tuple[dict, dict]]
    plan_labels: Callable[[int, int], np.ndarray] | None = None
    # Keys of make_case's arrays, in the order a preview shows them.
    array_keys: tuple[str, ...] = ("image",)
    scalar_keys: tuple[str, ...] = field(default_factory=tuple)


GENERATORS: dict[str, SyntheticDataset] = {
    "boxes": SyntheticDataset(
        name="boxes",
        description="VA-GAN boxes: 112x112 blurred noise, class 1 adds two 20x20 squares (subtypes A/B)",
        version=1,
        defaults=boxes.BOXES_DEFAULTS,
        make_case=boxes.make_case,
        plan_labels=boxes.plan_labels,
        array_keys=("image", "effect"),
        scalar_keys=("subtype",),
    ),
    "boxes3d": SyntheticDataset(
        name="boxes3d",
        description="3D VA-GAN boxes: 48^3 blurred noise, class 1 adds two cubes (subtypes A/B)",
        version=1,
        defaults=boxes.BOXES3D_DEFAULTS,
        make_case=boxes.make_case,
        plan_labels=boxes.plan_labels,
        array_keys=("image", "effect"),
        scalar_keys=("subtype",),
    ),
    "ellipses": SyntheticDataset(
        name="ellipses",
        description="TVD-score ellipses: 32x32 white ellipse, label from aspect ratio; size irrelevant",
        version=1,
        defaults=ellipses.ELLIPSES_DEFAULTS,
        make_case=ellipses.make_case,
        array_keys=("image",),
        scalar_keys=("aspect_ratio", "size"),
    ),
}


def get_generator(name: str) -> SyntheticDataset:
    if name not in GENERATORS:
        from common.errors import InputError

        raise InputError(f"unknown synthetic data set '{name}'; expected one of {sorted(GENERATORS)}")
    return GENERATORS[name]
