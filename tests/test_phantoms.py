"""Brain phantoms: exact ground truth, landmarks and features that match their construction."""

import json

import nibabel as nib
import numpy as np
import pytest
from monai.data import Dataset
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from scipy.ndimage import binary_dilation

from common.data import load_datalist
from common.data.synthesize import synthesize
from common.data.synthetic import GENERATORS, brain
from common.data.synthetic._common import case_rng

# Small grids keep the suite fast; the recipes are the defaults otherwise.
SMALL = {
    "brain_lesions": {"n": 40, "shape": [64, 80]},
    "brain_atrophy": {"n": 12, "shape": [32, 40, 32]},
    "brain_tumour": {"n": 12, "shape": [32, 40, 32]},
    "brain_ms": {"n": 12, "shape": [48, 60, 48]},
    "ct_stroke": {"n": 24, "shape": [64, 64, 11]},
    "hippocampus_roi": {"n": 30, "shape": [32, 32, 32], "spacing": 2.0},
}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    out = {}
    for name, params in SMALL.items():
        datalist = synthesize(name, root / name, progress=False, workers=2, **params)
        items = [
            item
            for split in ("training", "validation", "test")
            for item in load_datalist(datalist, split, allowed_labels=None)
        ]
        out[name] = (datalist, items)
    return out


def _load(path):
    return np.asarray(nib.load(path).dataobj)


def _world(path, mask):
    """MNI coordinates (mm) of the voxels of ``mask`` in the file's grid."""
    affine = nib.load(path).affine
    index = np.argwhere(mask)
    if mask.ndim == 2:
        index = np.c_[index, np.zeros(len(index))]
    return index @ affine[:3, :3].T + affine[:3, 3]


@pytest.mark.parametrize("name", [n for n in SMALL if n != "hippocampus_roi"])
def test_effect_is_exactly_diseased_minus_healthy(phantoms, name):
    _, items = phantoms[name]
    patients = [item for item in items if item["label"] != 0]
    assert patients and len(patients) < len(items)
    for item in items:
        image, effect, mask = _load(item["image"]), _load(item["effect"]), _load(item["mask"])
        assert image.dtype == np.float32 and image.shape == effect.shape == mask.shape
        if item["label"] == 0:
            assert "healthy" not in item and not effect.any()
            assert mask.any() == (name == "brain_atrophy")  # atrophy's mask is the region it may act on
            continue
        healthy = _load(item["healthy"])
        assert np.array_equal(effect, image - healthy)
        assert mask.any() and np.abs(effect).max() > 0


@pytest.mark.parametrize("name", ["brain_lesions", "brain_tumour", "brain_ms", "ct_stroke"])
def test_masks_overlap_the_effect(phantoms, name):
    _, items = phantoms[name]
    for item in (i for i in items if i["label"] != 0):
        effect, mask = np.abs(_load(item["effect"])), _load(item["mask"]) > 0
        near = binary_dilation(mask, iterations=2)
        assert effect[near].sum() / effect.sum() > 0.95  # the effect lives at the lesion (blurred edge)
        assert (effect[mask] > 0).mean() > 0.9  # and the lesion is changed almost everywhere


def test_atrophy_changes_nothing_outside_its_regions(phantoms):
    _, items = phantoms["brain_atrophy"]
    severities = []
    for item in (i for i in items if i["label"] == 1):
        effect, regions = _load(item["effect"]), _load(item["mask"]) > 0
        assert not effect[~regions].any()  # the deformation is exactly zero beyond its reach
        assert np.abs(effect[regions]).max() > 0.05
        severities.append(item["severity"])
    low, high = GENERATORS["brain_atrophy"].defaults["severity_range"]
    assert all(low <= s <= high for s in severities)


def test_atrophy_enlarges_ventricles():
    params = {**GENERATORS["brain_atrophy"].defaults, "shape": [40, 50, 40], "noise_std": 0.0}
    # Same subject (same RNG stream up to the severity draw) at two severities.
    mild = brain.make_atrophy_case(case_rng(1, 0), {**params, "severity_range": [0.2, 0.2]}, 1)[0]
    strong = brain.make_atrophy_case(case_rng(1, 0), {**params, "severity_range": [1.0, 1.0]}, 1)[0]
    dark = lambda a: (a < 0.45) & (a > 0.05)  # noqa: E731  CSF-dark voxels inside the brain
    assert dark(strong["image"]).sum() > dark(mild["image"]).sum() > dark(mild["healthy"]).sum()


def test_lesions_sit_in_their_regions(phantoms):
    datalist, items = phantoms["brain_lesions"]
    patients = [i for i in items if i["label"] == 1]
    optional = [r for r in brain.LESION_REGIONS if r not in brain.ALWAYS_PRESENT]
    draws = [r in item["lesion_regions"] for item in patients for r in optional]
    assert 0.3 < np.mean(draws) < 0.7  # each optional region with p = 0.5
    radius = GENERATORS["brain_lesions"].defaults["lesion_radius_mm"]
    margin = 4 * GENERATORS["brain_lesions"].defaults["deform_mm"] + 0.1 * 100  # deformation + scaling
    for item in patients:
        assert set(brain.ALWAYS_PRESENT) <= set(item["lesion_regions"])
        mask = _load(item["mask"]) > 0
        if not mask.any():
            continue  # the slice may miss every lesion
        centres = np.array([brain.LESION_REGIONS[r] for r in item["lesion_regions"]])
        points = _world(item["image"], mask)
        nearest = np.min(np.linalg.norm(points[:, None, :] - centres[None], axis=2), axis=1)
        assert nearest.max() < radius + margin
    # 2D axial slices: the NIfTI holds a 2D image whose affine places it at the slice height.
    image = nib.load(patients[0]["image"])
    assert image.shape == (64, 80)
    assert abs(image.affine[2, 3] - 16.0) <= GENERATORS["brain_lesions"].defaults["slice_jitter"]


def test_lesions_are_csf_like(phantoms):
    _, items = phantoms["brain_lesions"]
    item = next(i for i in items if i["label"] == 1 and _load(i["mask"]).sum() > 20)
    image, healthy, mask = _load(item["image"]), _load(item["healthy"]), _load(item["mask"]) > 0
    assert image[mask].mean() < healthy[mask].mean() - 0.1  # darker than the cortex it replaces


def test_tumour_and_ms_are_hyperintense(phantoms):
    for name in ("brain_tumour", "brain_ms"):
        _, items = phantoms[name]
        patients = [i for i in items if i["label"] == 1]
        assert patients, name  # the loop below must not pass vacuously
        for item in patients:
            effect, mask = _load(item["effect"]), _load(item["mask"]) > 0
            assert effect[mask].mean() > 0


def test_stroke_regions_classes_and_sides(phantoms):
    _, items = phantoms["ct_stroke"]
    assert {item["label"] for item in items} == {0, 1, 2, 3}
    for item in items:
        image, mask, regions = _load(item["image"]), _load(item["mask"]) > 0, _load(item["regions"])
        assert image.shape == (64, 64, 11)
        assert set(np.unique(regions)) <= set(range(7))
        expected_count = {0: 0, 1: 1, 2: 1, 3: 2}[item["label"]]
        assert len(item["region"]) == expected_count
        assert item["stroke_class"] == brain.STROKE_CLASSES[item["label"]]
        if item["label"] == 0:
            assert not mask.any()
            continue
        assert set(np.unique(regions[mask]).astype(int)) == set(item["region"])
        # Territories follow the subject's anatomy, whose midline the deformation moves by a few mm.
        x = _world(item["image"], mask)[:, 0]
        if item["label"] == 1:
            assert item["region"][0] in (1, 2, 3) and (x < 8).all() and np.median(x) < 0
        if item["label"] == 2:
            assert item["region"][0] in (4, 5, 6) and (x > -8).all() and np.median(x) > 0
        lesion_hu = -_load(item["effect"])[mask]
        low, high = GENERATORS["ct_stroke"].defaults["lesion_hu"]
        assert 0 < np.median(lesion_hu) <= high + 1e-3
        assert (image[regions == 0] <= 1000.0 + 50).all()


def test_hippocampus_features_follow_the_rule(phantoms):
    datalist, items = phantoms["hippocampus_roi"]
    params = {**GENERATORS["hippocampus_roi"].defaults, **SMALL["hippocampus_roi"]}
    splits = json.loads(open(datalist).read())
    for split, members in splits.items():
        cases = {item["case"] for item in members}
        others = [item for s, m in splits.items() if s != split for item in m]
        assert not cases & {item["case"] for item in others}  # both ROIs of a subject in one split
    by_case = {}
    for item in items:
        mask = _load(item["mask"]) > 0
        assert item["volume"] == pytest.approx(mask.sum() * 8.0)  # 2 mm voxels
        by_case.setdefault(item["case"], []).append(item)
    for rois in by_case.values():
        assert sorted(r["side"] for r in rois) == ["L", "R"]
        mean_volume = np.mean([r["volume"] for r in rois])
        assert rois[0]["mean_volume"] == pytest.approx(mean_volume)
        assert rois[0]["label_probability"] == pytest.approx(brain.hippocampus_label_probability(mean_volume, params))
        assert rois[0]["label"] == rois[1]["label"]


def test_hippocampus_label_depends_on_volume():
    params = {**GENERATORS["hippocampus_roi"].defaults, "shape": [24, 24, 24], "spacing": 2.5}
    volumes, probabilities = [], []
    for i in range(40):
        rois = brain.make_hippocampus_case(case_rng(2, i), params)
        volumes.append(rois[0][1]["mean_volume"])
        probabilities.append(rois[0][1]["label_probability"])
    assert np.corrcoef(volumes, probabilities)[0, 1] < -0.5
    # More atrophy, smaller hippocampus.
    atrophy = [brain.make_hippocampus_case(case_rng(2, i), params)[0][1]["atrophy"] for i in range(10)]
    vols = volumes[:10]
    assert np.corrcoef(atrophy, vols)[0, 1] < 0


@pytest.mark.parametrize("name", list(SMALL))
def test_generation_is_deterministic(name):
    params = {**GENERATORS[name].defaults, **{k: v for k, v in SMALL[name].items() if k != "n"}}
    label = None if name == "hippocampus_roi" else 1
    first = GENERATORS[name].make_case(case_rng(9, 3), params, label)
    second = GENERATORS[name].make_case(case_rng(9, 3), params, label)
    other = GENERATORS[name].make_case(case_rng(10, 3), params, label)
    first, second, other = ([p] if isinstance(p, tuple) else p for p in (first, second, other))
    for (a, fa), (b, fb) in zip(first, second):
        assert all(np.array_equal(a[k], b[k]) for k in a)
        assert json.dumps(fa, default=str) == json.dumps(fb, default=str)
    assert not np.array_equal(first[0][0]["image"], other[0][0]["image"])


@pytest.mark.parametrize("name", list(SMALL))
def test_every_phantom_loads_through_monai(phantoms, name):
    datalist, _ = phantoms[name]
    items = json.loads(open(datalist).read())["training"]
    keys = [k for k in ("image", "mask", "effect", "regions") if k in items[0]]
    base = str(datalist).rsplit("/", 1)[0]
    data = [{k: f"{base}/{item[k]}" for k in keys} for item in items[:4]]
    loaded = Dataset(data, Compose([LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys)]))
    for sample in loaded:
        assert sample["image"].shape[0] == 1
        assert all(sample[k].shape == sample["image"].shape for k in keys)
        assert np.isfinite(sample["image"].numpy()).all()


def test_3d_affine_is_the_mni_grid(phantoms):
    _, items = phantoms["brain_tumour"]
    image = nib.load(items[0]["image"])
    spacing = brain.FOV_SIZE / np.array(SMALL["brain_tumour"]["shape"])
    np.testing.assert_allclose(np.diag(image.affine)[:3], spacing)
    np.testing.assert_allclose(image.affine[:3, 3], brain.FOV_ORIGIN + spacing / 2)


def test_sites_give_each_class_its_own_scanner():
    """Controls and patients acquired at different sites: noise and bias follow the class only."""
    sites = [{"noise_std": 0.01, "bias_strength": 0.0}, {"noise_std": 0.05, "bias_strength": 0.3}]
    params = {**GENERATORS["brain_tumour"].defaults, "spatial_dims": 2, "shape": [64, 80], "sites": sites}
    for label in (0, 1):
        arrays, meta = brain.make_tumour_case(case_rng(3, label), params, label)
        assert meta["label"] == label
        # The same subject with a noise-free scanner at that site: the difference is the noise.
        quiet = [{**site, "noise_std": 0.0} for site in sites]
        clean, _ = brain.make_tumour_case(case_rng(3, label), {**params, "sites": quiet}, label)
        noise = arrays["image"] - clean["image"]
        noise = noise[noise != 0]  # the scanner adds noise inside the head only
        assert abs(noise.std() - sites[label]["noise_std"]) < 0.2 * sites[label]["noise_std"], (label, noise.std())
        if label:
            # The patient's healthy counterpart is scanned at the same site, so the effect stays exact.
            np.testing.assert_allclose(arrays["effect"], arrays["image"] - arrays["healthy"], atol=1e-6)
            assert np.abs(arrays["effect"][arrays["mask"] == 0]).max() < np.abs(arrays["effect"]).max()

    # No bias field at the control site: the noise-free control is the contrast image times the gain.
    def quiet_control(bias_strength):
        control_site = {"noise_std": 0.0, "bias_strength": bias_strength}
        return brain.make_tumour_case(case_rng(3, 0), {**params, "sites": [control_site, sites[1]]}, 0)[0]

    bias_free, biased = quiet_control(0.0), quiet_control(0.3)
    inside = bias_free["image"] > 0.1
    assert np.ptp(biased["image"][inside] / bias_free["image"][inside]) > 0.3
    with pytest.raises(ValueError, match="unknown keys"):
        brain.make_tumour_case(case_rng(3, 0), {**params, "sites": [{"contrast": "t1"}, {}]}, 0)
