"""VA-GAN's synthetic "boxes" data (Baumgartner et al. 2018, section 4.2, and the authors' script).

Background: iid N(0, 50^2) noise, Gaussian blur (sigma 2.5), rescaled back to std 50. Class 1 adds
intensity 100 in a 20x20 square at the centre and a second 20x20 square offset by +32 px in every
axis (subtype A, lower right) or -32 px (subtype B, upper left), the offset jittered per axis by
an integer in [-5, 5]. Each image is min-max scaled to [-1, 1]; the ground-truth effect map is the
added intensity in those same scaled units, so it is exactly (diseased - healthy), and ``healthy``
(saved too) is that same image without the boxes, the pair ICAM's training needs. ``boxes3d`` is
the same recipe with cubes in a volume.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from common.data.synthetic._common import scale_to_unit_range

BOXES_DEFAULTS = {
    "n": 10000,
    "shape": [112, 112],
    "box": 20,
    "offset": 32,
    "jitter": 5,
    "effect": 100.0,
    "noise_std": 50.0,
    "blur_sigma": 2.5,
}

# The 3D variant keeps the 2D geometry relative to the image size (box/offset/jitter scaled by 48/112).
BOXES3D_DEFAULTS = {**BOXES_DEFAULTS, "n": 1000, "shape": [48, 48, 48], "box": 9, "offset": 14, "jitter": 2}

SUBTYPE_NONE, SUBTYPE_A, SUBTYPE_B = 0, 1, 2


def plan_labels(n: int, seed: int, params: dict | None = None) -> np.ndarray:
    """Exactly half of the images in each class, in random order."""
    labels = np.array([0] * (n // 2) + [1] * (n - n // 2))
    return np.random.default_rng(seed).permutation(labels)


def _add_box(effect: np.ndarray, corner: np.ndarray, size: int, value: float) -> None:
    region = tuple(slice(int(c), int(c) + size) for c in corner)
    effect[region] += value


def make_case(rng: np.random.Generator, params: dict, label: int) -> tuple[dict, dict]:
    shape = tuple(params["shape"])
    size, offset, jitter = int(params["box"]), int(params["offset"]), int(params["jitter"])
    noise = gaussian_filter(rng.normal(0.0, params["noise_std"], shape), params["blur_sigma"])
    noise *= params["noise_std"] / noise.std()
    effect = np.zeros(shape)
    fields = {"label": int(label), "subtype": SUBTYPE_NONE}
    if label == 1:
        subtype = int(rng.choice([SUBTYPE_A, SUBTYPE_B]))
        centre_corner = np.array(shape) // 2 - size // 2
        sign = 1 if subtype == SUBTYPE_A else -1
        shift = sign * offset + rng.integers(-jitter, jitter + 1, size=len(shape))
        corner = np.clip(centre_corner + shift, 0, np.array(shape) - size)
        _add_box(effect, centre_corner, size, params["effect"])
        _add_box(effect, corner, size, params["effect"])
        fields.update(subtype=subtype, offset=[int(s) for s in corner - centre_corner])
    image, _, gain = scale_to_unit_range(noise + effect)
    effect = effect * gain
    return {"image": image, "effect": effect, "healthy": image - effect}, fields
