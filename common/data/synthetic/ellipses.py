"""The ellipse data of the TVD-score paper (section 4.1): one white ellipse on black, 32x32.

Position, orientation, size and aspect ratio vary independently; the label is set by the aspect
ratio alone (``aspect_ratio > label_threshold``), so the aspect ratio is the only class-relevant
feature and the size an irrelevant one. Both are saved per image (``aspect_ratio`` = major/minor
axis, ``size`` = area in pixels). The paper used Jin's ``ellipse`` package, whose exact parameter
ranges it does not give; the ranges here are chosen so that the classes are balanced (log-uniform
aspect ratio symmetric about the threshold) and every ellipse fits inside the image. Edges are
anti-aliased by 4x4 supersampling; intensities are in [0, 1].
"""

from __future__ import annotations

import numpy as np

ELLIPSES_DEFAULTS = {
    "n": 10000,
    "shape": [32, 32],
    "aspect_ratio_range": [1.0, 4.0],
    "label_threshold": 2.0,
    "size_range": [20.0, 120.0],
    "margin": 1.0,
    "supersample": 4,
}


def render_ellipse(shape, centre, semi_axes, angle, supersample: int = 4) -> np.ndarray:
    """Fraction of each pixel covered by the ellipse (pixel i spans [i, i + 1))."""
    sub = (np.arange(supersample) + 0.5) / supersample
    rows = (np.arange(shape[0])[:, None] + sub[None, :]).reshape(-1)
    cols = (np.arange(shape[1])[:, None] + sub[None, :]).reshape(-1)
    dr, dc = np.meshgrid(rows - centre[0], cols - centre[1], indexing="ij")
    cos, sin = np.cos(angle), np.sin(angle)
    u = (dr * cos + dc * sin) / semi_axes[0]
    v = (-dr * sin + dc * cos) / semi_axes[1]
    inside = (u**2 + v**2 <= 1.0).astype(np.float64)
    return inside.reshape(shape[0], supersample, shape[1], supersample).mean(axis=(1, 3))


def make_case(rng: np.random.Generator, params: dict, label=None) -> tuple[dict, dict]:
    shape = tuple(params["shape"])
    lo, hi = np.log(params["aspect_ratio_range"])
    aspect_ratio = float(np.exp(rng.uniform(lo, hi)))
    area = float(rng.uniform(*params["size_range"]))
    minor = np.sqrt(area / (np.pi * aspect_ratio))
    major = aspect_ratio * minor
    angle = float(rng.uniform(0.0, np.pi))
    # Half extents of the rotated ellipse's bounding box, to keep it inside the image.
    half_r = np.sqrt((major * np.cos(angle)) ** 2 + (minor * np.sin(angle)) ** 2)
    half_c = np.sqrt((major * np.sin(angle)) ** 2 + (minor * np.cos(angle)) ** 2)
    margin = params["margin"]
    centre = (
        float(rng.uniform(half_r + margin, shape[0] - half_r - margin)),
        float(rng.uniform(half_c + margin, shape[1] - half_c - margin)),
    )
    image = render_ellipse(shape, centre, (major, minor), angle, int(params["supersample"]))
    fields = {
        "label": int(aspect_ratio > params["label_threshold"]),
        "aspect_ratio": aspect_ratio,
        "size": area,
        "angle": angle,
        "centre": list(centre),
    }
    return {"image": image}, fields
