"""Brain phantoms on real anatomy: the MNI152 2009 template and tissue maps shipped in nilearn.

A *subject* is the template seen through a random smooth deformation and a global scaling, with a
smooth multiplicative bias field, a global intensity gain and Gaussian noise. A disease effect is
applied to the *same* subject (same deformation, bias and noise), so the ground-truth effect map is
exactly ``diseased - healthy`` of the two saved images, as with VA-GAN's MCI->AD converters.

Geometry. Every case is sampled on a grid in MNI space: 3D grids cover a fixed field of view of
160 x 200 x 160 mm (x: -80..80, y: -116..84, z: -74..86, i.e. the brain with a margin) at the
requested ``shape`` (e.g. 64x80x64, spacing 2.5 mm) or ``spacing`` (1 or 2 mm); 2D cases are
axial slices of the same field of view at height ``slice_z`` mm (jittered per subject by
``slice_jitter`` mm). Affines are the true voxel-to-MNI mm maps. Anatomical landmarks (lesion
regions, ventricles, hippocampi, vascular territories) are defined in template (MNI) coordinates
and follow each subject's deformation, so a region mask is exact in every subject.

Contrasts. ``t1``: the template intensities. ``flair``: a FLAIR-like mix of the tissue maps
(grey > white matter, dark CSF) modulated by the template's texture. ``ct``: Hounsfield units
(grey matter 40, white matter 30, CSF 8, a 1000 HU skull shell, -1000 HU air), no bias field.

The phantoms (see :data:`PHANTOM_DEFAULTS` for every parameter):

- ``brain_lesions`` (ICAM, HCP simulation, appendix A.3): cortical lesions in 8 regions (medial
  temporal MT, posterior opercular OP1, posterior cingulate v23ab and medial prefrontal 9a, left and
  right). In each region the lesion is the cortical ribbon (grey-matter probability > 0.4) within a
  sphere, set to the CSF intensity and blurred. MT left/right are present in every patient, the
  other six each with p = 0.5. Items: ``mask`` (lesion voxels), ``effect``, ``healthy`` (the
  subject without lesions), ``lesion_regions``.
- ``brain_atrophy`` (VA-GAN / ICAM ADNI evaluation): AD-like atrophy as a local deformation of
  random ``severity``: the lateral ventricles enlarge (up to ``ventricle_growth``) and the
  hippocampi shrink (up to ``hippocampus_shrink``). ``mask`` marks the hippocampal and
  ventricular regions the deformation acts on; ``effect`` is the paired difference.
- ``brain_tumour`` (attribution constraint, BraTS analogue): FLAIR-like, one hyperintense blob with
  an irregular boundary (radius ``tumour_radius`` mm) in the brain; ``mask`` = the tumour.
- ``brain_ms`` (attribution constraint, MS analogue): FLAIR-like, several small periventricular
  ovoids in white matter, long axis pointing away from the ventricles; ``mask`` = the lesions.
- ``ct_stroke`` (ACAT, IST-3 analogue): CT, 11 axial slices; subtle hypodense lesions (``lesion_hu``
  below the tissue) inside one of 6 territories (left/right x anterior/middle/posterior); classes
  0 none, 1 left, 2 right, 3 both. ``regions`` is the territory label image (1..6: left anterior,
  left middle, left posterior, right anterior, right middle, right posterior), ``region`` the list
  of territories holding a lesion.
- ``hippocampus_roi`` (TVD score, OASIS-3 analogue): 64^3 ROIs at 1 mm centred on each hippocampus
  (the right one mirrored to look like a left one), two items per subject. The hippocampus shrinks
  by a random ``atrophy`` factor and the tissue it loses becomes CSF (version 3; before, grey matter
  around the template's hippocampus filled it and the volume was barely visible: the bundle's regressor
  reached a validation R^2 of 0.13-0.19 on 16^3 inputs, 0.89 after 60 epochs with the CSF); ``mask`` is the hippocampus, ``volume`` its volume in mm^3
  (counted from the mask). The lateral ventricles (the atrium most, the frontal horn partly) reach
  into the ROI and grow by a random ``ventricle_growth`` drawn independently of the atrophy and the
  label; ``ventricle_volume`` is their volume inside the ROI in mm^3 (voxels inside a ventricle
  ellipsoid with CSF probability > 0.3). Ground truth: the label depends on the subject's mean
  hippocampal volume only, P(label = 1) = sigmoid((volume_threshold - mean volume) / volume_scale),
  so the true dependence of the label on the feature is known. The ventricle volume is a nuisance
  feature the label does not depend on. It is not exactly independent of the hippocampal volume:
  the ROI's upper border cuts through the ventricles, so the head scale and the deformation, which
  also set the hippocampal volume, change how much of them lies inside (a larger head pushes more
  of them out), and the two volumes correlate at about -0.2. ``head_scale`` (the global scaling) is
  recorded too.
"""

from __future__ import annotations

import functools

import numpy as np
from scipy.ndimage import binary_dilation, gaussian_filter, map_coordinates

FOV_ORIGIN = np.array([-80.0, -116.0, -74.0])  # mm, MNI
FOV_SIZE = np.array([160.0, 200.0, 160.0])  # mm
BRAIN_CENTRE = np.array([0.0, -17.0, 5.0])

# ICAM's eight HCP regions, approximate MNI centroids (mm) near the centre slab of the brain.
LESION_REGIONS = {
    "MT_L": (-46.0, -66.0, 10.0),
    "MT_R": (46.0, -66.0, 10.0),
    "OP1_L": (-50.0, -26.0, 18.0),
    "OP1_R": (50.0, -26.0, 18.0),
    "v23ab_L": (-8.0, -54.0, 24.0),
    "v23ab_R": (8.0, -54.0, 24.0),
    "9a_L": (-10.0, 50.0, 22.0),
    "9a_R": (10.0, 50.0, 22.0),
}
ALWAYS_PRESENT = ("MT_L", "MT_R")

# Ellipsoids in MNI mm: (centre, semi-axes). The lateral ventricles are three per side (frontal
# horn, body, atrium), each centred in the template's CSF (probability > 0.75), found by k-means
# of the template's ventricular CSF voxels.
VENTRICLES = [
    (centre, axes)
    for sign in (-1.0, 1.0)
    for centre, axes in (
        ((sign * 6.0, 12.0, 14.0), (5.0, 10.0, 7.0)),
        ((sign * 10.0, -11.0, 22.0), (6.0, 14.0, 6.0)),
        ((sign * 16.0, -35.0, 14.0), (8.0, 8.0, 8.0)),
    )
]
HIPPOCAMPI = {"L": ((-28.0, -22.0, -14.0), (6.0, 18.0, 7.0)), "R": ((28.0, -22.0, -14.0), (6.0, 18.0, 7.0))}
ATROPHY_REACH = 1.6  # ellipsoid radii beyond which the atrophy deformation is exactly zero
TERRITORY_NAMES = (
    "left anterior",
    "left middle",
    "left posterior",
    "right anterior",
    "right middle",
    "right posterior",
)
TERRITORY_Y_MM = (10.0, -30.0)  # anterior: y > 10, middle: -30 < y <= 10, posterior: y <= -30

_BASE = {
    "spatial_dims": 3,
    "shape": [64, 80, 64],
    "spacing": None,
    "slice_z": 16.0,
    "slice_jitter": 4.0,
    "deform_mm": 2.5,
    "deform_smooth_mm": 12.0,
    "scale_range": [0.92, 1.08],
    "bias_strength": 0.15,
    "gain_range": [0.9, 1.1],
    "noise_std": 0.02,
    "patient_fraction": 0.5,
    "sites": None,
}

PHANTOM_DEFAULTS = {
    "brain_lesions": {
        **_BASE,
        "n": 1000,
        "spatial_dims": 2,
        "shape": [128, 160],
        "contrast": "t1",
        "lesion_radius_mm": 12.0,
        "lesion_blur_mm": 1.0,
        "optional_p": 0.5,
    },
    "brain_atrophy": {
        **_BASE,
        "n": 200,
        "contrast": "t1",
        "ventricle_growth": 0.45,
        "hippocampus_shrink": 0.35,
        "severity_range": [0.4, 1.0],
    },
    "brain_tumour": {
        **_BASE,
        "n": 200,
        "contrast": "flair",
        "tumour_radius": [8.0, 18.0],
        "tumour_intensity": [1.25, 1.6],
    },
    "brain_ms": {
        **_BASE,
        "n": 200,
        "contrast": "flair",
        "lesion_count": [3, 10],
        "lesion_axes_mm": [[2.0, 3.5], [4.0, 8.0]],
        "lesion_intensity": [1.2, 1.5],
    },
    "ct_stroke": {
        **_BASE,
        "n": 400,
        "shape": [128, 128, 11],
        "slab_z": [-15.0, 35.0],
        "contrast": "ct",
        "noise_std": 4.0,
        "lesion_radius": [8.0, 18.0],
        "lesion_hu": [3.0, 8.0],
        "class_probabilities": [0.4, 0.2, 0.2, 0.2],
    },
    "hippocampus_roi": {
        **_BASE,
        "n": 400,
        "shape": [64, 64, 64],
        "spacing": 1.0,
        "contrast": "t1",
        "atrophy_range": [0.0, 0.45],
        # At 0.6 the template's lateral-ventricle volume inside the ROI grows 1.75-fold (visible,
        # within the spread of elderly ventricles) and the deformation does not fold (Jacobian > 0.07).
        "ventricle_growth_range": [0.0, 0.6],
        "volume_threshold": 1750.0,
        "volume_scale": 80.0,
    },
}


# ----------------------------------------------------------------------------------------------
# The template


@functools.lru_cache(maxsize=2)
def template(resolution: int = 2) -> dict:
    """Template T1 and tissue probability maps (float32) with the voxel-to-MNI affine."""
    from nilearn import datasets

    t1 = datasets.load_mni152_template(resolution=resolution)
    maps = {
        "t1": t1.get_fdata(dtype=np.float32),
        "gm": datasets.load_mni152_gm_template(resolution=resolution).get_fdata(dtype=np.float32),
        "wm": datasets.load_mni152_wm_template(resolution=resolution).get_fdata(dtype=np.float32),
        "brain": datasets.load_mni152_brain_mask(resolution=resolution).get_fdata(dtype=np.float32),
    }
    maps["csf"] = np.clip(maps["brain"] - maps["gm"] - maps["wm"], 0.0, 1.0)
    return {"maps": maps, "affine": t1.affine.copy(), "inverse": np.linalg.inv(t1.affine)}


def sample(volume: np.ndarray, world: np.ndarray, inverse_affine: np.ndarray, order: int = 1) -> np.ndarray:
    """Values of a template volume at MNI coordinates ``world`` (3, *grid)."""
    shape = world.shape[1:]
    flat = world.reshape(3, -1)
    index = inverse_affine[:3, :3] @ flat + inverse_affine[:3, 3:4]
    return map_coordinates(volume, index, order=order, mode="constant", cval=0.0).reshape(shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Grids and subjects


def make_grid(params: dict, z_mm: float | None = None, origin=None, size=None) -> tuple[np.ndarray, np.ndarray, tuple]:
    """(MNI coordinates (3, *shape), affine, spacing) of the case grid.

    3D: the field of view (``origin``/``size``, default the brain FOV) at ``shape`` or ``spacing``.
    2D: the axial plane at height ``z_mm`` of the same in-plane field of view.
    """
    origin = FOV_ORIGIN if origin is None else np.asarray(origin, float)
    size = FOV_SIZE if size is None else np.asarray(size, float)
    dims = int(params["spatial_dims"])
    axes_n = dims if dims == 3 else 2
    if params.get("spacing"):
        spacing = np.full(axes_n, float(params["spacing"]))
        shape = tuple(int(round(s)) for s in size[:axes_n] / spacing)
    else:
        shape = tuple(int(s) for s in params["shape"])
        if len(shape) != axes_n:
            raise ValueError(f"shape {list(shape)} has {len(shape)} axes; expected {axes_n} for spatial_dims={dims}")
        spacing = size[:axes_n] / np.array(shape)
    # Voxel centres: origin + (i + 0.5) * spacing.
    axes = [origin[a] + (np.arange(shape[a]) + 0.5) * spacing[a] for a in range(axes_n)]
    if dims == 3:
        world = np.stack(np.meshgrid(*axes, indexing="ij"))
    else:
        x, y = np.meshgrid(*axes, indexing="ij")
        world = np.stack([x, y, np.full_like(x, z_mm)])
    affine = np.eye(4)
    affine[0, 0], affine[1, 1] = spacing[0], spacing[1]
    affine[2, 2] = spacing[2] if dims == 3 else 1.0
    affine[:3, 3] = world.reshape(3, -1)[:, 0]
    return world, affine, tuple(spacing)


def smooth_field(rng: np.random.Generator, shape: tuple, sigma_vox, amplitude: float, components: int = 1):
    """Random smooth field(s): Gaussian-filtered noise, scaled to a standard deviation of ``amplitude``.

    Made on a grid 4x coarser and upsampled linearly, which keeps 3D generation fast.
    """
    from scipy.ndimage import zoom

    coarse = tuple(max(2, s // 4) for s in shape)
    fields = []
    for _ in range(components):
        noise = gaussian_filter(rng.standard_normal(coarse), np.maximum(np.asarray(sigma_vox) / 4.0, 0.5))
        # Centred before scaling: a heavily smoothed field is nearly constant, and scaling its
        # mean up with its small spread would turn it into a large global offset.
        noise -= noise.mean()
        noise *= amplitude / (noise.std() + 1e-12)
        fields.append(zoom(noise, np.array(shape) / np.array(coarse), order=1, mode="nearest"))
    return np.stack(fields).astype(np.float64)


def subject_coordinates(rng: np.random.Generator, world: np.ndarray, spacing, params: dict) -> tuple[np.ndarray, float]:
    """Template coordinates seen by each voxel of a random subject, and the subject's head scale.

    The subject is the template scaled by ``scale`` about the brain centre and displaced by a
    smooth random field (``deform_mm`` standard deviation, ``deform_smooth_mm`` correlation).
    """
    scale = float(rng.uniform(*params["scale_range"]))
    grid_shape = world.shape[1:]
    sigma = np.asarray(params["deform_smooth_mm"]) / np.asarray(spacing)
    displacement = smooth_field(rng, grid_shape, sigma, params["deform_mm"], components=3)
    if params["spatial_dims"] == 2:
        displacement[2] *= 0.0  # an axial slice stays axial
    centre = BRAIN_CENTRE.reshape(3, *([1] * len(grid_shape)))
    return centre + (world - centre) / scale + displacement, scale


@functools.lru_cache(maxsize=2)
def template_csf_level(resolution: int = 2) -> float:
    """The template's T1 intensity of CSF (median where the CSF probability exceeds 0.8): a constant of the
    template, so an effect painted with it does not depend on what else a subject's image holds."""
    maps = template(resolution)["maps"]
    return float(np.median(maps["t1"][maps["csf"] > 0.8]))


def tissue_maps(coords: np.ndarray, spacing) -> dict[str, np.ndarray]:
    """Template T1 and tissue maps sampled at subject coordinates.

    The 1 mm template is used for grids finer than 1.5 mm, the 2 mm one otherwise.
    """
    base = template(1 if min(spacing) < 1.5 else 2)
    return {name: sample(vol, coords, base["inverse"]) for name, vol in base["maps"].items()}


def contrast_image(maps: dict[str, np.ndarray], contrast: str) -> np.ndarray:
    """Noise-free intensities of the subject in the requested contrast."""
    if contrast == "t1":
        return maps["t1"]
    if contrast == "flair":
        texture = maps["t1"] / (0.6 * maps["wm"] + 0.65 * maps["gm"] + 0.36 * maps["csf"] + 1e-3)
        texture = np.clip(texture, 0.7, 1.3) * (maps["brain"] > 0.05)
        return (0.45 * maps["wm"] + 0.62 * maps["gm"] + 0.08 * maps["csf"]) * np.where(texture > 0, texture, 1.0)
    if contrast == "ct":
        brain = maps["brain"]
        skull = binary_dilation(brain > 0.5, iterations=3) & ~(brain > 0.5)
        head = binary_dilation(skull, iterations=2) | (brain > 0.5)
        hu = 40.0 * maps["gm"] + 30.0 * maps["wm"] + 8.0 * maps["csf"]
        hu = np.where(skull, 1000.0, hu)
        hu = np.where(head | (brain > 0.05), hu, -1000.0)
        return hu.astype(np.float32)
    raise ValueError(f"contrast '{contrast}' is unknown; expected t1, flair or ct")


def acquire(anatomy: np.ndarray, rng_state: dict, params: dict, brain: np.ndarray) -> np.ndarray:
    """Scanner model applied identically to the healthy and the diseased anatomy."""
    if params["contrast"] == "ct":
        return (anatomy + rng_state["noise"] * (anatomy > -500)).astype(np.float32)
    image = anatomy * rng_state["gain"] * rng_state["bias"] + rng_state["noise"] * (brain > 0.05)
    return image.astype(np.float32)


def scanner_state(rng: np.random.Generator, shape: tuple, spacing, params: dict) -> dict:
    """Bias field, gain and noise of one acquisition, drawn once per subject."""
    sigma = 60.0 / np.asarray(spacing)
    bias = np.exp(smooth_field(rng, shape, sigma, params["bias_strength"])[0])
    if params["contrast"] == "ct":
        bias = np.ones(shape)
    return {
        "gain": float(rng.uniform(*params["gain_range"])) if params["contrast"] != "ct" else 1.0,
        "bias": bias,
        "noise": rng.normal(0.0, params["noise_std"], shape),
    }


def ellipsoid_distance(coords: np.ndarray, centre, axes) -> np.ndarray:
    """Normalised ellipsoid distance (1 on the surface) of template coordinates."""
    c = np.asarray(centre, float).reshape(3, *([1] * (coords.ndim - 1)))
    a = np.asarray(axes, float).reshape(3, *([1] * (coords.ndim - 1)))
    return np.sqrt((((coords - c) / a) ** 2).sum(0))


def _blur(mask: np.ndarray, blur_mm: float, spacing) -> np.ndarray:
    sigma = blur_mm / np.asarray(spacing, float)
    return gaussian_filter(mask.astype(np.float64), sigma[: mask.ndim]) if blur_mm > 0 else mask.astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Disease effects: each returns the diseased anatomy (noise-free) and the lesion/ROI mask.


def lesion_effect(rng, coords, maps, anatomy, spacing, params, present: list[str]):
    csf_level = float(np.median(maps["t1"][maps["csf"] > 0.8])) if (maps["csf"] > 0.8).any() else 0.36
    ribbon = maps["gm"] > 0.4
    lesion = np.zeros(anatomy.shape, bool)
    for name in present:
        lesion |= (ellipsoid_distance(coords, LESION_REGIONS[name], [params["lesion_radius_mm"]] * 3) < 1.0) & ribbon
    weight = np.clip(_blur(lesion, params["lesion_blur_mm"], spacing), 0.0, 1.0)
    diseased = anatomy * (1.0 - weight) + csf_level * weight
    return diseased.astype(np.float32), lesion


def atrophy_coordinates(coords: np.ndarray, severity: float, params: dict) -> np.ndarray:
    """Template coordinates of the atrophied subject: ventricles grow, hippocampi shrink.

    Sampling closer to a structure's centre enlarges it; sampling further away shrinks it. The
    displacement fades smoothly to zero at ``ATROPHY_REACH`` ellipsoid radii, (1 - (d/R)^2)^2,
    so the anatomy stays continuous and nothing outside that reach changes.
    """
    shifted = coords.copy()
    for (centre, axes), strength in (
        *((v, -params["ventricle_growth"]) for v in VENTRICLES),
        *((h, params["hippocampus_shrink"]) for h in HIPPOCAMPI.values()),
    ):
        d = ellipsoid_distance(coords, centre, axes)
        profile = np.clip(1.0 - (d / ATROPHY_REACH) ** 2, 0.0, None) ** 2
        c = np.asarray(centre, float).reshape(3, *([1] * (coords.ndim - 1)))
        shifted += severity * strength * profile * (coords - c)
    return shifted


def tumour_effect(rng, coords, maps, anatomy, spacing, params):
    brain = maps["brain"] > 0.5
    # In 2D the centre lies in the slice, so the tumour is always visible.
    candidates = np.argwhere(brain & (maps["csf"] < 0.3))
    centre_index = tuple(candidates[rng.integers(len(candidates))])
    centre = coords[(slice(None), *centre_index)]
    radius = float(rng.uniform(*params["tumour_radius"]))
    # Irregular boundary: the radius is modulated by a smooth field.
    wobble = smooth_field(rng, anatomy.shape, 8.0 / np.asarray(spacing)[: anatomy.ndim], 0.18)[0]
    d = ellipsoid_distance(coords, centre, [radius] * 3) - wobble
    tumour = (d < 1.0) & brain
    intensity = float(rng.uniform(*params["tumour_intensity"])) * float(np.median(anatomy[maps["wm"] > 0.8]))
    weight = np.clip(_blur(tumour, 1.5, spacing), 0, 1)
    diseased = anatomy * (1 - weight) + intensity * weight
    return diseased.astype(np.float32), tumour


def ms_effect(rng, coords, maps, anatomy, spacing, params):
    wm = maps["wm"] > 0.5
    # Periventricular white matter: just outside the ventricle ellipsoids.
    inside = np.zeros(anatomy.shape, bool)
    near = np.zeros(anatomy.shape, bool)
    for centre, axes in VENTRICLES:
        d = ellipsoid_distance(coords, centre, axes)
        inside |= d <= 1.0
        near |= d < 1.8
    near &= ~inside
    candidates = np.argwhere(near & wm)
    if len(candidates) == 0:
        candidates = np.argwhere(wm)
    lesions = np.zeros(anatomy.shape, bool)
    count = int(rng.integers(params["lesion_count"][0], params["lesion_count"][1] + 1))
    for _ in range(count):
        index = tuple(candidates[rng.integers(len(candidates))])
        centre = coords[(slice(None), *index)]
        nearest = min(VENTRICLES, key=lambda v: float(ellipsoid_distance(centre.reshape(3, 1), *v)[0]))
        radial = centre - np.asarray(nearest[0])
        radial /= np.linalg.norm(radial) + 1e-9
        short = float(rng.uniform(*params["lesion_axes_mm"][0]))
        long = float(rng.uniform(*params["lesion_axes_mm"][1]))
        rel = coords - centre.reshape(3, *([1] * (coords.ndim - 1)))
        along = np.tensordot(radial, rel, axes=1)
        across = np.sqrt(np.maximum((rel**2).sum(0) - along**2, 0.0))
        lesions |= (along / long) ** 2 + (across / short) ** 2 < 1.0
    lesions &= maps["brain"] > 0.5
    intensity = float(rng.uniform(*params["lesion_intensity"])) * float(np.median(anatomy[maps["wm"] > 0.8]))
    weight = np.clip(_blur(lesions, 0.7, spacing), 0, 1)
    diseased = anatomy * (1 - weight) + intensity * weight
    return diseased.astype(np.float32), lesions


def territories(coords: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Territory labels 1..6 (see :data:`TERRITORY_NAMES`) inside the brain, 0 elsewhere."""
    x, y = coords[0], coords[1]
    band = np.where(y > TERRITORY_Y_MM[0], 0, np.where(y > TERRITORY_Y_MM[1], 1, 2))
    labels = np.where(x < 0, 1 + band, 4 + band)
    return np.where(brain, labels, 0).astype(np.int16)


def stroke_effect(rng, coords, maps, anatomy, spacing, params, regions: list[int], territory_map: np.ndarray):
    tissue = (maps["brain"] > 0.5) & (maps["csf"] < 0.3)
    lesions = np.zeros(anatomy.shape, bool)
    delta = np.zeros(anatomy.shape)
    for region in regions:
        candidates = np.argwhere(tissue & (territory_map == region))
        index = tuple(candidates[rng.integers(len(candidates))])
        centre = coords[(slice(None), *index)]
        radius = float(rng.uniform(*params["lesion_radius"]))
        wobble = smooth_field(rng, anatomy.shape, 8.0 / np.asarray(spacing), 0.15)[0]
        lesion = (ellipsoid_distance(coords, centre, [radius, radius, radius]) - wobble < 1.0) & tissue
        lesion &= territory_map == region
        hu = float(rng.uniform(*params["lesion_hu"]))
        delta -= hu * np.clip(_blur(lesion, 2.0, spacing), 0, 1) * tissue
        lesions |= lesion
    return (anatomy + delta).astype(np.float32), lesions


# ----------------------------------------------------------------------------------------------
# Cases


def plan_patients(n: int, seed: int, fraction: float = 0.5) -> np.ndarray:
    labels = np.zeros(n, int)
    labels[: int(round(n * fraction))] = 1
    return np.random.default_rng(seed).permutation(labels)


def _subject(rng, params, z_mm=None, origin=None, size=None):
    world, affine, spacing = make_grid(params, z_mm=z_mm, origin=origin, size=size)
    coords, scale = subject_coordinates(rng, world, spacing, params)
    maps = tissue_maps(coords, spacing)
    return world, affine, spacing, coords, scale, maps


def _slice_height(rng, params) -> float | None:
    if params["spatial_dims"] != 2:
        return None
    return float(params["slice_z"] + rng.uniform(-params["slice_jitter"], params["slice_jitter"]))


def site_params(params: dict, label: int) -> dict:
    """The acquisition parameters of the site that scanned a subject of class ``label``.

    ``sites`` (default None or an empty list: one site for everyone) is a list with one dict per class of overrides
    of the scanner model (``bias_strength``, ``gain_range``, ``noise_std``). It mimics data sets in
    which controls and patients come from different sources, as in the attribution-constraint
    paper (healthy: MPI, kirby21, IBC, bias-corrected; tumours: BraTS, not bias-corrected), which
    gives an unconstrained classifier an acquisition shortcut besides the lesion.
    """
    sites = params.get("sites")
    if not sites:
        return params
    allowed = {"bias_strength", "gain_range", "noise_std"}
    site = sites[int(label)]
    unknown = set(site) - allowed
    if unknown:
        raise ValueError(f"sites[{label}] has unknown keys {sorted(unknown)}; expected some of {sorted(allowed)}")
    return {**params, **site}


def _finish(rng, params, spacing, maps, healthy_anatomy, diseased_anatomy, mask, label, fields, affine, extra=None):
    # The patient's healthy counterpart is acquired at the patient's site, so the effect stays exact.
    params = site_params(params, label)
    state = scanner_state(rng, healthy_anatomy.shape, spacing, params)
    healthy = acquire(healthy_anatomy, state, params, maps["brain"])
    diseased = acquire(diseased_anatomy, state, params, maps["brain"]) if label else healthy
    arrays = {
        "image": diseased,
        "effect": (diseased - healthy).astype(np.float32),
        "mask": mask.astype(np.float32),
    }
    if label:
        arrays["healthy"] = healthy
    if extra:
        arrays.update(extra)
    return arrays, {"label": int(label), **fields, "affine": affine}


def make_lesions_case(rng, params, label):
    z = _slice_height(rng, params)
    world, affine, spacing, coords, scale, maps = _subject(rng, params, z_mm=z)
    anatomy = contrast_image(maps, params["contrast"])
    present = []
    if label:
        present = [*ALWAYS_PRESENT] + [
            r for r in LESION_REGIONS if r not in ALWAYS_PRESENT and rng.random() < params["optional_p"]
        ]
        diseased, mask = lesion_effect(rng, coords, maps, anatomy, spacing, params, present)
    else:
        diseased, mask = anatomy, np.zeros(anatomy.shape, bool)
    return _finish(rng, params, spacing, maps, anatomy, diseased, mask, label, {"lesion_regions": present}, affine)


def make_atrophy_case(rng, params, label):
    z = _slice_height(rng, params)
    world, affine, spacing, coords, scale, maps = _subject(rng, params, z_mm=z)
    anatomy = contrast_image(maps, params["contrast"])
    severity = float(rng.uniform(*params["severity_range"])) if label else 0.0
    regions = np.zeros(anatomy.shape, bool)
    for centre, axes in (*VENTRICLES, *HIPPOCAMPI.values()):
        regions |= ellipsoid_distance(coords, centre, axes) < ATROPHY_REACH
    if label:
        atrophied = tissue_maps(atrophy_coordinates(coords, severity, params), spacing)
        diseased = contrast_image(atrophied, params["contrast"])
    else:
        diseased = anatomy
    return _finish(rng, params, spacing, maps, anatomy, diseased, regions, label, {"severity": severity}, affine)


def _masked_lesion_case(effect):
    """A case maker for phantoms whose patients get ``effect`` (diseased anatomy, lesion mask)."""

    def make_case(rng, params, label):
        z = _slice_height(rng, params)
        world, affine, spacing, coords, scale, maps = _subject(rng, params, z_mm=z)
        anatomy = contrast_image(maps, params["contrast"])
        if label:
            diseased, mask = effect(rng, coords, maps, anatomy, spacing, params)
        else:
            diseased, mask = anatomy, np.zeros(anatomy.shape, bool)
        return _finish(rng, params, spacing, maps, anatomy, diseased, mask, label, {}, affine)

    return make_case


make_tumour_case = _masked_lesion_case(tumour_effect)
make_ms_case = _masked_lesion_case(ms_effect)


STROKE_CLASSES = ("none", "left", "right", "both")


def plan_stroke(n: int, seed: int, probabilities) -> np.ndarray:
    counts = np.floor(np.asarray(probabilities) * n).astype(int)
    counts[0] += n - counts.sum()
    labels = np.concatenate([np.full(c, k) for k, c in enumerate(counts)])
    return np.random.default_rng(seed).permutation(labels)


def make_stroke_case(rng, params, label):
    shape = tuple(params["shape"])
    z0, z1 = params["slab_z"]
    origin = np.array([FOV_ORIGIN[0], FOV_ORIGIN[1], z0])
    size = np.array([FOV_SIZE[0], FOV_SIZE[1], z1 - z0])
    world, affine, spacing = make_grid({**params, "spatial_dims": 3}, origin=origin, size=size)
    coords, scale = subject_coordinates(rng, world, spacing, {**params, "spatial_dims": 3})
    maps = tissue_maps(coords, spacing)
    anatomy = contrast_image(maps, "ct")
    territory_map = territories(coords, maps["brain"] > 0.5)
    regions = []
    if label in (1, 3):
        regions.append(int(rng.integers(1, 4)))
    if label in (2, 3):
        regions.append(int(rng.integers(4, 7)))
    if regions:
        diseased, mask = stroke_effect(rng, coords, maps, anatomy, spacing, params, regions, territory_map)
    else:
        diseased, mask = anatomy, np.zeros(shape, bool)
    fields = {"region": regions, "stroke_class": STROKE_CLASSES[label]}
    return _finish(
        rng,
        params,
        spacing,
        maps,
        anatomy,
        diseased,
        mask,
        label,
        fields,
        affine,
        extra={"regions": territory_map.astype(np.float32)},
    )


def make_hippocampus_case(rng, params, label=None) -> list[tuple[dict, dict]]:
    """Both ROIs of one subject, [(arrays, fields)] for the left and the mirrored right side.

    Both ROIs share the subject's deformation (drawn once on the whole-brain field of view at
    4 mm and interpolated into each ROI), head scale, atrophy, ventricle growth and scanner. Each
    ROI grid is the 64 mm cube around the *left* hippocampus; the right ROI samples the mirrored
    (x -> -x) coordinates, so it is stored in the left ROI's frame, as the TVD paper mirrored it.
    """
    atrophy = float(rng.uniform(*params["atrophy_range"]))
    # From a child stream (spawning does not advance ``rng``), so every other draw is the one of
    # version 1 and the growth is independent of the atrophy and the label by construction.
    ventricle_growth = float(rng.spawn(1)[0].uniform(*params["ventricle_growth_range"]))
    scale = float(rng.uniform(*params["scale_range"]))
    coarse_world, _, _ = make_grid({**params, "spatial_dims": 3, "spacing": 4.0})
    sigma = np.asarray(params["deform_smooth_mm"]) / 4.0
    field = smooth_field(rng, coarse_world.shape[1:], sigma, params["deform_mm"], components=3)
    size = np.array(params["shape"], float) * float(params["spacing"])
    origin = np.asarray(HIPPOCAMPI["L"][0]) - size / 2
    world, affine, spacing = make_grid({**params, "spatial_dims": 3}, origin=origin, size=size)
    centre = BRAIN_CENTRE.reshape(3, 1, 1, 1)
    state = scanner_state(rng, world.shape[1:], spacing, params)
    rois = []
    for side, mirror in (("L", 1.0), ("R", -1.0)):
        side_world = world.copy()
        side_world[0] *= mirror
        index = (side_world - FOV_ORIGIN.reshape(3, 1, 1, 1)) / 4.0 - 0.5
        displacement = np.stack([map_coordinates(f, index.reshape(3, -1), order=1, mode="nearest") for f in field])
        coords = centre + (side_world - centre) / scale + displacement.reshape(world.shape)
        # The ventricles' deformation reach ends above z = 1.2 mm, the hippocampi's below z = -2.8 mm, so
        # the growth leaves the hippocampal coordinates (and volume) exactly as without it.
        growth = {"ventricle_growth": ventricle_growth, "hippocampus_shrink": atrophy}
        shrunk = atrophy_coordinates(coords, 1.0, growth)
        maps = tissue_maps(shrunk, spacing)
        anatomy = contrast_image(maps, params["contrast"])
        # Around the template's hippocampus there is grey matter too, so the shrinkage alone would replace
        # grey by grey and leave the volume all but invisible. Atrophied tissue is replaced by CSF, as the
        # widening temporal horn and fissures show it on real T1 scans: the ring the hippocampus left.
        lost = (ellipsoid_distance(coords, *HIPPOCAMPI[side]) < 1.0) & ~(
            ellipsoid_distance(shrunk, *HIPPOCAMPI[side]) < 1.0
        )
        csf_level = template_csf_level(1 if min(spacing) < 1.5 else 2)
        weight = np.clip(_blur(lost & (maps["brain"] > 0.5), 1.0, spacing), 0.0, 1.0)
        anatomy = anatomy * (1 - weight) + csf_level * weight
        image = acquire(anatomy, state, params, maps["brain"])
        hippocampus = (ellipsoid_distance(shrunk, *HIPPOCAMPI[side]) < 1.0) & (maps["gm"] > 0.3)
        volume = float(hippocampus.sum() * np.prod(spacing))
        ventricles = np.zeros(hippocampus.shape, bool)
        for ventricle in VENTRICLES:
            ventricles |= ellipsoid_distance(shrunk, *ventricle) < 1.0
        # The ellipsoids are coarser than the ventricles; 0.3 (like the hippocampus's grey matter)
        # gives the same mm^3 on the 1 mm and the 2 mm template, where 0.5 loses partial volumes.
        ventricles &= maps["csf"] > 0.3
        fields = {
            "side": side,
            "volume": volume,
            "ventricle_volume": float(ventricles.sum() * np.prod(spacing)),
            "atrophy": atrophy,
            "ventricle_growth": ventricle_growth,
            "head_scale": scale,
            "affine": affine,
        }
        rois.append(({"image": image, "mask": hippocampus.astype(np.float32)}, fields))
    mean_volume = float(np.mean([f["volume"] for _, f in rois]))
    probability = hippocampus_label_probability(mean_volume, params)
    label = int(rng.random() < probability)
    for _, fields in rois:
        fields.update(label=label, label_probability=probability, mean_volume=mean_volume)
    return rois


def hippocampus_label_probability(mean_volume: float, params: dict) -> float:
    """P(label = 1 | mean hippocampal volume): the documented rule the labels are drawn from."""
    return float(1.0 / (1.0 + np.exp(-(params["volume_threshold"] - mean_volume) / params["volume_scale"])))
