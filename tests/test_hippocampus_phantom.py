"""hippocampus_roi: the ventricle volume is a nuisance feature that leaves the hippocampus untouched (v2), and the
atrophied hippocampal tissue becomes CSF, so the volume that decides the label shows in the image (v3)."""

import numpy as np

from common.data import load_datalist
from common.data.synthesize import synthesize
from common.data.synthetic import GENERATORS, brain
from common.data.synthetic._common import case_rng

# The bundle's CPU setting: the same 64 mm ROI at 2 mm, about 0.05 s per subject.
SMALL = {"shape": [32, 32, 32], "spacing": 2.0}


def _params(**overrides) -> dict:
    return {**GENERATORS["hippocampus_roi"].defaults, **SMALL, **overrides}


def test_ventricle_fields_are_present_and_finite(tmp_path):
    generator = GENERATORS["hippocampus_roi"]
    assert generator.version == 3
    assert "ventricle_volume" in generator.scalar_keys
    low, high = generator.defaults["ventricle_growth_range"]
    datalist = synthesize("hippocampus_roi", tmp_path / "hippocampus", progress=False, workers=1, n=10, **SMALL)
    items = [
        item
        for split in ("training", "validation", "test")
        for item in load_datalist(datalist, split, allowed_labels=None)
    ]
    assert len(items) == 20
    for item in items:
        assert np.isfinite(item["ventricle_volume"]) and item["ventricle_volume"] > 0
        assert low <= item["ventricle_growth"] <= high
    by_case = {}
    for item in items:
        by_case.setdefault(item["case"], []).append(item)
    assert all(len({r["ventricle_growth"] for r in rois}) == 1 for rois in by_case.values())  # one draw per subject
    assert len({item["ventricle_growth"] for item in items}) == 10


def test_ventricle_volume_grows_and_the_hippocampus_does_not_change():
    cases = [
        brain.make_hippocampus_case(case_rng(4, 1), _params(ventricle_growth_range=[g, g])) for g in (0.0, 0.3, 0.6)
    ]
    for side in range(2):
        rois = [case[side] for case in cases]
        ventricle = [fields["ventricle_volume"] for _, fields in rois]
        assert ventricle[0] < ventricle[1] < ventricle[2]
        assert ventricle[2] > 1.3 * ventricle[0]  # visibly bigger at the default upper growth
        (first, first_fields), *others = rois
        for arrays, fields in others:
            assert np.array_equal(arrays["mask"], first["mask"])
            for key in ("volume", "atrophy", "head_scale", "label", "label_probability", "mean_volume"):
                assert fields[key] == first_fields[key], key
            hippocampus = first["mask"] > 0
            assert np.array_equal(arrays["image"][hippocampus], first["image"][hippocampus])
            assert not np.array_equal(arrays["image"], first["image"])
    # The growth comes from a child stream, so the subject's own draws are those of version 1.
    rng, params = case_rng(4, 1), _params()
    expected = {"atrophy": rng.uniform(*params["atrophy_range"]), "head_scale": rng.uniform(*params["scale_range"])}
    for _, fields in cases[0]:
        assert {key: fields[key] for key in expected} == expected


def test_ventricle_growth_leaves_hippocampal_coordinates_exact():
    params = _params()
    size = np.array(params["shape"], float) * params["spacing"]
    origin = np.asarray(brain.HIPPOCAMPI["L"][0]) - size / 2
    world, _, _ = brain.make_grid({**params, "spatial_dims": 3}, origin=origin, size=size)
    # Mirrored as well, so the right ROI's ventricles are checked too.
    grids = (world, world * np.array([-1.0, 1.0, 1.0]).reshape(3, 1, 1, 1))
    atrophy = 0.37
    for grid in grids:
        # Version 1 called it with severity = atrophy and unit shrink; version 2 with severity 1.
        before = brain.atrophy_coordinates(grid, atrophy, {"ventricle_growth": 0.0, "hippocampus_shrink": 1.0})
        after = brain.atrophy_coordinates(grid, 1.0, {"ventricle_growth": 0.6, "hippocampus_shrink": atrophy})
        near = np.zeros(grid.shape[1:], bool)
        for ellipsoid in brain.HIPPOCAMPI.values():
            near |= brain.ellipsoid_distance(grid, *ellipsoid) < brain.ATROPHY_REACH
        assert near.any() and np.array_equal(after[:, near], before[:, near])
        assert not np.array_equal(after, before)
        for side in brain.HIPPOCAMPI:
            inside_before = brain.ellipsoid_distance(before, *brain.HIPPOCAMPI[side]) < 1.0
            inside_after = brain.ellipsoid_distance(after, *brain.HIPPOCAMPI[side]) < 1.0
            assert np.array_equal(inside_after, inside_before)


def test_ventricle_volume_follows_the_growth():
    params = _params()
    rows = [
        (fields["ventricle_growth"], fields["ventricle_volume"], fields["atrophy"])
        for i in range(20)
        for _, fields in brain.make_hippocampus_case(case_rng(6, i), params)
    ]
    growth, ventricle, atrophy = np.array(rows).T
    assert np.corrcoef(growth, ventricle)[0, 1] > 0.3
    assert abs(np.corrcoef(growth[::2], atrophy[::2])[0, 1]) < 0.5  # drawn apart; 20 subjects are noisy
    assert ventricle.min() > 0 and np.isfinite(ventricle).all()
    assert growth.min() < 0.15 and growth.max() > 0.45  # spread over most of the default [0, 0.6]


def test_the_tissue_the_hippocampus_loses_becomes_csf():
    rois = {a: brain.make_hippocampus_case(case_rng(4, 1), _params(atrophy_range=[a, a])) for a in (0.0, 0.4)}
    (healthy, healthy_fields), (atrophied, atrophied_fields) = rois[0.0][0], rois[0.4][0]
    assert atrophied_fields["volume"] < 0.8 * healthy_fields["volume"]
    # where the healthy hippocampus was and the atrophied one is not, the image is darker (CSF on T1)
    ring = (healthy["mask"] > 0) & ~(atrophied["mask"] > 0)
    assert ring.sum() > 10
    assert atrophied["image"][ring].mean() < healthy["image"][ring].mean() - 0.1
