"""Registry of the synthetic data sets with known ground truth.

Each entry generates one case at a time from its own RNG (``case_rng(seed, index)``), so a data
set is fully determined by (name, parameters, seed) and any case can be regenerated alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from common.data.synthetic import boxes, brain, ellipses


@dataclass(frozen=True)
class SyntheticDataset:
    name: str
    description: str
    version: int  # bump when the recipe changes, so existing folders are regenerated
    defaults: dict
    # (rng, params, planned label) -> (arrays, fields), or a list of them for multi-item cases.
    make_case: Callable[[np.random.Generator, dict, int | None], tuple[dict, dict] | list]
    # (n, seed, params) -> the label of every case, when the recipe fixes class proportions.
    plan_labels: Callable[[int, int, dict], np.ndarray] | None = None
    # Keys of make_case's arrays, in the order a preview shows them.
    array_keys: tuple[str, ...] = ("image",)
    scalar_keys: tuple[str, ...] = field(default_factory=tuple)


GENERATORS: dict[str, SyntheticDataset] = {
    "boxes": SyntheticDataset(
        name="boxes",
        description="VA-GAN boxes: 112x112 blurred noise, class 1 adds two 20x20 squares (subtypes A/B)",
        version=2,  # 2: the healthy image is saved too (ICAM pairs each patient with it)
        defaults=boxes.BOXES_DEFAULTS,
        make_case=boxes.make_case,
        plan_labels=boxes.plan_labels,
        array_keys=("image", "effect", "healthy"),
        scalar_keys=("subtype",),
    ),
    "boxes3d": SyntheticDataset(
        name="boxes3d",
        description="3D VA-GAN boxes: 48^3 blurred noise, class 1 adds two cubes (subtypes A/B)",
        version=2,  # 2: the healthy image is saved too (ICAM pairs each patient with it)
        defaults=boxes.BOXES3D_DEFAULTS,
        make_case=boxes.make_case,
        plan_labels=boxes.plan_labels,
        array_keys=("image", "effect", "healthy"),
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


def _patients(n: int, seed: int, params: dict) -> np.ndarray:
    return brain.plan_patients(n, seed, params["patient_fraction"])


def _stroke_classes(n: int, seed: int, params: dict) -> np.ndarray:
    return brain.plan_stroke(n, seed, params["class_probabilities"])


_PHANTOMS = {
    "brain_lesions": ("ICAM HCP-style cortical lesions in 8 regions (2D axial slices by default)", brain.make_lesions_case),
    "brain_atrophy": ("AD-like ventricle enlargement and hippocampal shrinkage (3D, 64x80x64)", brain.make_atrophy_case),
    "brain_tumour": ("FLAIR-like tumour blob with mask, healthy controls (3D, 64x80x64)", brain.make_tumour_case),
    "brain_ms": ("FLAIR-like periventricular MS ovoids with masks, healthy controls (3D)", brain.make_ms_case),
}
for _name, (_description, _make) in _PHANTOMS.items():
    GENERATORS[_name] = SyntheticDataset(
        name=_name,
        description=_description,
        version=1,
        defaults=brain.PHANTOM_DEFAULTS[_name],
        make_case=_make,
        plan_labels=_patients,
        array_keys=("healthy", "image", "effect", "mask"),
    )
GENERATORS["ct_stroke"] = SyntheticDataset(
    name="ct_stroke",
    description="CT hypodense stroke lesions in 6 territories, classes none/left/right/both, 11 slices",
    version=1,
    defaults=brain.PHANTOM_DEFAULTS["ct_stroke"],
    make_case=brain.make_stroke_case,
    plan_labels=_stroke_classes,
    array_keys=("healthy", "image", "effect", "mask", "regions"),
    scalar_keys=("stroke_class", "region"),
)
GENERATORS["hippocampus_roi"] = SyntheticDataset(
    name="hippocampus_roi",
    description=(
        "64^3 1 mm ROIs on both hippocampi; label drawn from hippocampal volume, ventricle volume an independent "
        "nuisance (2 items per subject)"
    ),
    version=3,
    defaults=brain.PHANTOM_DEFAULTS["hippocampus_roi"],
    make_case=brain.make_hippocampus_case,
    array_keys=("image", "mask"),
    scalar_keys=("volume", "ventricle_volume", "side"),
)


def get_generator(name: str) -> SyntheticDataset:
    if name not in GENERATORS:
        from common.errors import InputError

        raise InputError(f"unknown synthetic data set '{name}'; expected one of {sorted(GENERATORS)}")
    return GENERATORS[name]
