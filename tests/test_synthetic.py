"""The synthetic data sets: recipes, determinism, manifest reuse and the command line."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from common.data import ensure_dataset, load_datalist
from common.data.synthesize import MANIFEST_NAME, synthesize
from common.data.synthetic import GENERATORS
from common.data.synthetic._common import case_rng
from common.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def _load(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float64)


def _all_items(datalist):
    return [item for split in ("training", "validation", "test") for item in load_datalist(datalist, split)]


@pytest.fixture(scope="module")
def boxes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("boxes") / "boxes"
    proc = subprocess.run(
        [sys.executable, "-m", "common.data.synthesize", "boxes", "--out", str(out), "--n", "200", "--preview"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return out


def test_boxes_splits_are_stratified_80_20_then_80_20(boxes_dir):
    datalist = json.loads((boxes_dir / "datalist.json").read_text())
    assert {k: len(v) for k, v in datalist.items()} == {"training": 128, "validation": 32, "test": 40}
    for split, items in datalist.items():
        labels = [item["label"] for item in items]
        assert labels.count(1) == labels.count(0), split
    names = [item["image"] for items in datalist.values() for item in items]
    assert len(set(names)) == 200
    assert (boxes_dir / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((boxes_dir / MANIFEST_NAME).read_text())
    assert manifest["generator"] == "boxes" and manifest["seed"] == 0 and manifest["params"]["n"] == 200


def test_boxes_recipe(boxes_dir):
    params = json.loads((boxes_dir / MANIFEST_NAME).read_text())["params"]
    items = _all_items(boxes_dir / "datalist.json")
    subtypes = set()
    for item in items:
        image, effect = _load(item["image"]), _load(item["effect"])
        assert image.shape == (112, 112) and effect.shape == (112, 112)
        np.testing.assert_allclose(_load(item["healthy"]), image - effect, atol=1e-6)  # ICAM's pair
        assert image.min() == pytest.approx(-1.0, abs=1e-6) and image.max() == pytest.approx(1.0, abs=1e-6)
        if item["label"] == 0:
            assert not effect.any() and item["subtype"] == 0
            continue
        subtypes.add(item["subtype"])
        labelled, count = ndimage.label(effect > 0)
        assert count == 2
        boxes = ndimage.find_objects(labelled)
        assert all(b[0].stop - b[0].start == 20 and b[1].stop - b[1].start == 20 for b in boxes)
        corners = sorted((b[0].start, b[1].start) for b in boxes)
        assert (46, 46) in corners  # the centre square, 20x20 around (56, 56)
        other = next(c for c in corners if c != (46, 46))
        shift = np.array(other) - 46
        sign = 1 if item["subtype"] == 1 else -1
        assert np.all(np.abs(sign * shift - 32) <= 5), shift
        assert list(shift) == item["offset"]
        # The effect is one constant (100 raw units) in the image's scaled units and exactly what
        # was added: image - effect is the same subject's healthy image (up to the linear scaling).
        values = np.unique(np.round(effect[effect > 0], 6))
        assert values.size == 1
        index = int(Path(item["image"]).name.split(".")[0])
        healthy, _ = GENERATORS["boxes"].make_case(case_rng(0, index), {**params, "effect": 0.0}, 1)
        assert np.corrcoef((image - effect).ravel(), healthy["image"].ravel())[0, 1] > 1 - 1e-6
        assert image[effect > 0].mean() - image[effect == 0].mean() > 0.5 * effect.max()
    assert subtypes == {1, 2}


def test_boxes_background_is_blurred_noise():
    gen = GENERATORS["boxes"]
    raw = []
    for i in range(20):
        arrays, fields = gen.make_case(case_rng(3, i), {**gen.defaults, "effect": 0.0}, 0)
        raw.append(arrays["image"])
    # Blurred with sigma 2.5: neighbouring pixels are strongly correlated, unlike white noise.
    lag1 = np.mean([np.corrcoef(a[:, :-1].ravel(), a[:, 1:].ravel())[0, 1] for a in raw])
    assert lag1 > 0.9


def test_generation_is_deterministic_by_seed(tmp_path):
    a = synthesize("boxes", tmp_path / "a", n=20, seed=5, progress=False)
    b = synthesize("boxes", tmp_path / "b", n=20, seed=5, progress=False)
    c = synthesize("boxes", tmp_path / "c", n=20, seed=6, progress=False)
    items_a, items_b, items_c = _all_items(a), _all_items(b), _all_items(c)
    assert [Path(i["image"]).name for i in items_a] == [Path(i["image"]).name for i in items_b]
    for ia, ib in zip(items_a, items_b):
        assert np.array_equal(_load(ia["image"]), _load(ib["image"]))
        assert ia["label"] == ib["label"]
    assert not np.array_equal(_load(items_a[0]["image"]), _load(items_c[0]["image"]))


def test_manifest_reuses_and_regenerates(tmp_path):
    out = tmp_path / "ds"
    datalist = synthesize("ellipses", out, n=20, seed=1, progress=False)
    stamp = (out / MANIFEST_NAME).stat().st_mtime_ns
    synthesize("ellipses", out, n=20, seed=1, progress=False)
    assert (out / MANIFEST_NAME).stat().st_mtime_ns == stamp  # reused, not rewritten
    synthesize("ellipses", out, n=30, seed=1, progress=False)
    assert json.loads((out / MANIFEST_NAME).read_text())["params"]["n"] == 30
    assert sum(len(v) for v in json.loads(Path(datalist).read_text()).values()) == 30
    assert len(list((out / "images").iterdir())) == 30
    assert not list(tmp_path.glob(".ds.partial-*"))


def test_ensure_dataset_leaves_user_data_alone(tmp_path):
    user = tmp_path / "user"
    synthesize("ellipses", user, n=12, progress=False)
    (user / MANIFEST_NAME).unlink()  # now it looks like the user's own data set
    before = (user / "datalist.json").read_text()
    assert ensure_dataset("boxes", user) == str(user / "datalist.json")
    assert (user / "datalist.json").read_text() == before
    generated = ensure_dataset("ellipses", tmp_path / "fresh", n=12, progress=False)
    assert Path(generated).is_file()
    explicit = ensure_dataset("boxes", tmp_path / "unused", datalist=str(user / "datalist.json"))
    assert explicit == str(user / "datalist.json") and not (tmp_path / "unused").exists()
    with pytest.raises(InputError, match="datalist file not found"):
        ensure_dataset("boxes", tmp_path, datalist=str(tmp_path / "nope.json"))


def test_synthesize_refuses_a_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    proc = subprocess.run(
        [sys.executable, "-m", "common.data.synthesize", "boxes", "--out", str(foreign), "--n", "20"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(foreign) in lines[0] and "expected an empty or new folder" in lines[0]
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_unknown_parameter_is_rejected(tmp_path):
    with pytest.raises(InputError, match="unknown parameter"):
        synthesize("boxes", tmp_path / "x", n=20, box_size=3)


def test_boxes3d_cubes(tmp_path):
    datalist = synthesize("boxes3d", tmp_path / "b3", n=12, progress=False)
    for item in _all_items(datalist):
        effect = _load(item["effect"])
        assert effect.shape == (48, 48, 48)
        if item["label"] == 1:
            labelled, count = ndimage.label(effect > 0)
            assert count == 2
            assert all(all(s.stop - s.start == 9 for s in box) for box in ndimage.find_objects(labelled))


def test_ellipses_recipe(tmp_path):
    datalist = synthesize("ellipses", tmp_path / "e", n=200, progress=False)
    items = _all_items(datalist)
    labels = np.array([item["label"] for item in items])
    assert 0.35 < labels.mean() < 0.65
    for item in items:
        image = _load(item["image"])
        assert image.shape == (32, 32) and image.min() >= 0.0 and image.max() <= 1.0
        assert item["label"] == int(item["aspect_ratio"] > 2.0)
        # The saved size is the area, recovered from the anti-aliased coverage.
        assert image.sum() == pytest.approx(item["size"], rel=0.08)
        # The saved aspect ratio matches the image's second moments (for ellipses big enough to measure).
        if item["size"] > 50:
            rows, cols = np.indices(image.shape)
            w = image / image.sum()
            mr, mc = (w * rows).sum(), (w * cols).sum()
            cov = np.array(
                [
                    [(w * (rows - mr) ** 2).sum(), (w * (rows - mr) * (cols - mc)).sum()],
                    [(w * (rows - mr) * (cols - mc)).sum(), (w * (cols - mc) ** 2).sum()],
                ]
            )
            eig = np.linalg.eigvalsh(cov)
            assert np.sqrt(eig[1] / eig[0]) == pytest.approx(item["aspect_ratio"], rel=0.12)


@pytest.mark.slow
def test_full_boxes_data_set(tmp_path):
    """The acceptance run: 10,000 images of 112x112 with datalist and preview."""
    out = tmp_path / "boxes"
    proc = subprocess.run(
        [sys.executable, "-m", "common.data.synthesize", "boxes", "--out", str(out), "--preview"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    datalist = json.loads((out / "datalist.json").read_text())
    assert {k: len(v) for k, v in datalist.items()} == {"training": 6400, "validation": 1600, "test": 2000}
    assert len(list((out / "images").iterdir())) == 10000
    assert nib.load(out / datalist["test"][0]["image"]).shape == (112, 112)
    assert (out / "preview.png").stat().st_size > 10_000
