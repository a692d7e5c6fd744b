"""Bad input at every entry point (issue 10), through the real configs as a user runs them: inference on a
file, a folder or a datalist, and a training datalist. Each kind must end the run with a non-zero status and
one ``error:`` line naming the file, the problem and what was expected, and leave no output behind; folder
inference can instead skip the bad files and list them at the end.

The attribution-constraint bundle (untrained weights) stands for the entry points every bundle shares
(``common.data.inference_items``, ``common.data.load_datalist``, ``common.data.transforms.image_transforms``);
one test per other bundle checks that its inference config is wired to them."""

import csv
import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from common.errors import FULL_TRACEBACK_ENV, ImageFileError, InputError, _report_input_error, input_error_in
from common.networks import PatchGANClassifier, minimum_input_size
from tests import bundle_runner
from tests.bundle_runner import LPS
from tests.untrained import CASES, write_untrained_bundle

SIZE_2D, SIZE_3D = (32, 40), (24, 28, 20)


def write(path, array, affine=LPS):
    nib.save(nib.Nifti1Image(np.asarray(array, np.float32), affine), path)
    return path


def good(path, shape=SIZE_2D):
    return write(path, np.random.default_rng(0).normal(size=shape))


def truncated(path):
    good(path)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[: len(raw) // 2]))  # header intact, voxel data cut short
    return path


def not_nifti(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))  # a PNG saved under a NIfTI name
    return path


def with_non_finite(path):
    image = np.random.default_rng(0).normal(size=SIZE_2D)
    image[3, 4], image[5, 6] = np.nan, np.inf
    return write(path, image)


# kind -> (make the file, configs merged on inference.json's directory, overrides, what the error line says).
# The 3D kinds run the 3D preset; "too small" keeps the image grid (spatial_size -1), where the network's
# minimum binds (a fixed spatial_size pads any image up to it).
THREE_D = (["inference.json", "brain3d.json"], [("spatial_size", list(SIZE_3D))])
KINDS = {
    "truncated NIfTI": (truncated, None, ["truncated or corrupt voxel data", "expected a readable NIfTI file"]),
    "non-NIfTI under a NIfTI name": (not_nifti, None, ["unreadable NIfTI", "expected a readable NIfTI file"]),
    "missing file": (None, None, ["file not found", "expected a readable NIfTI file"]),
    "NaN/Inf voxels": (with_non_finite, None, ["NaN or Inf voxels", "expected finite intensities"]),
    "4D where 3D is expected": (
        lambda p: good(p, SIZE_3D + (6,)),
        THREE_D,
        ["has 6 channels", "expected 1 (a single 3D image per file)"],
    ),
    "wrong channel count": (
        lambda p: good(p, SIZE_3D + (2,)),
        THREE_D,
        ["has 2 channels", "expected 1"],
    ),
    "2D image to a 3D model": (good, THREE_D, ["2 spatial dimensions", "expected a 3D image"]),
    "3D image to a 2D model": (lambda p: good(p, SIZE_3D), None, ["3 spatial dimensions", "expected a 2D image"]),
    "smaller than the network minimum": (
        lambda p: good(p, (5, 6)),
        (["inference.json"], [("spatial_size", [-1, -1])]),
        ["image size (5, 6) is smaller than the network minimum"],
    ),
}


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """attr_constraint's bundle_root with untrained 2D and 3D classifiers (the 3D preset reads its own folder)."""
    root = tmp_path_factory.mktemp("untrained")
    write_untrained_bundle("attr_constraint", root / "bundle2d")
    write_untrained_bundle("attr_constraint", root / "bundle3d", configs=["inference.json", "brain3d.json"])
    return root


def run_inference(untrained, configs=("inference.json",), *overrides, expect_ok=False):
    root = untrained / ("bundle3d" if "brain3d.json" in configs else "bundle2d")
    return bundle_runner.run_bundle(
        "attr_constraint", list(configs), ("bundle_root", str(root)), *overrides, expect_ok=expect_ok
    )


def error_line(proc) -> str:
    """The run's one error line; the run failed and printed no traceback."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert FULL_TRACEBACK_ENV in proc.stderr  # says how to see the traceback
    return errors[0]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_file_fails_with_one_line_and_writes_nothing(untrained, tmp_path, kind):
    make, preset, expected = KINDS[kind]
    configs, overrides = preset or (["inference.json"], [])
    scan = tmp_path / "scan.nii.gz"
    if make is not None:
        make(scan)
    out = tmp_path / "out"
    proc = run_inference(untrained, configs, ("input_image", str(scan)), ("output_dir", str(out)), *overrides)
    line = error_line(proc)
    assert str(scan) in line, line
    for fragment in expected:
        assert fragment in line, line
    assert not out.exists()


@pytest.fixture
def mixed_folder(tmp_path):
    """One good scan first in name order, then one file of each bad kind a 2D model can meet."""
    folder = tmp_path / "scans"
    folder.mkdir()
    good(folder / "a_good.nii.gz")
    bad = {
        "b_truncated.nii.gz": truncated,
        "c_png.nii": not_nifti,
        "d_nan.nii.gz": with_non_finite,
        "e_volume.nii.gz": lambda p: good(p, SIZE_3D),
        "f_tiny.nii.gz": lambda p: good(p, (5, 6)),
    }
    for name, make in bad.items():
        make(folder / name)
    return folder, sorted(bad)


def test_folder_with_bad_files_fails_before_writing_anything(untrained, mixed_folder, tmp_path):
    folder, _ = mixed_folder
    out = tmp_path / "out"
    proc = run_inference(untrained, ["inference.json"], ("input_dir", str(folder)), ("output_dir", str(out)))
    assert "b_truncated.nii.gz" in error_line(proc)
    assert not out.exists()  # the good scan, first in order, was not written either: every file is checked first


def test_folder_inference_can_skip_bad_files_and_lists_them_at_the_end(untrained, mixed_folder, tmp_path):
    folder, bad = mixed_folder
    out = tmp_path / "out"
    proc = run_inference(
        untrained,
        ["inference.json"],
        ("input_dir", str(folder)),
        ("output_dir", str(out)),
        ("spatial_size", [-1, -1]),
        ("skip_bad_inputs", True),
        expect_ok=True,
    )
    assert (out / "a_good_attribution.nii.gz").is_file() and (out / "a_good_segmentation.nii.gz").is_file()
    with open(out / "probabilities.csv") as f:  # MONAI's ClassificationSaver: file,probability; no header
        assert [row[0] for row in csv.reader(f)] == [str(folder / "a_good.nii.gz")]
    with open(out / "skipped_inputs.csv") as f:
        skipped = list(csv.DictReader(f))
    assert sorted(row["file"].rsplit("/", 1)[-1] for row in skipped) == bad
    problems = {row["file"].rsplit("/", 1)[-1]: row["problem"] for row in skipped}
    assert "NaN or Inf" in problems["d_nan.nii.gz"] and "smaller than the network minimum" in problems["f_tiny.nii.gz"]
    assert "expected a 2D image" in problems["e_volume.nii.gz"]
    # the list comes again at the end of the log, after the last case
    log = proc.stdout + proc.stderr
    summary = log.rindex(f"{len(bad)} input(s) skipped")
    assert all(log.rindex(name) > summary for name in bad)
    outputs = {"a_good_attribution.nii.gz", "a_good_attribution.png", "a_good_segmentation.nii.gz"}
    assert {p.name for p in out.iterdir()} == outputs | {"probabilities.csv", "skipped_inputs.csv"}


def test_a_run_with_nothing_usable_fails(untrained, tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    with_non_finite(folder / "nan.nii.gz")
    out = tmp_path / "out"
    proc = run_inference(
        untrained, ["inference.json"], ("input_dir", str(folder)), ("output_dir", str(out)), ("skip_bad_inputs", True)
    )
    assert "all 1 inputs are unusable" in error_line(proc)
    assert not out.exists()


def test_inference_datalist_names_the_bad_item(untrained, tmp_path):
    good(tmp_path / "one.nii.gz")
    with_non_finite(tmp_path / "two.nii.gz")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [{"image": "one.nii.gz"}, {"image": "two.nii.gz"}]}))
    out = tmp_path / "out"
    proc = run_inference(untrained, ["inference.json"], ("input_datalist", str(datalist)), ("output_dir", str(out)))
    line = error_line(proc)
    assert str(tmp_path / "two.nii.gz") in line and "NaN or Inf" in line
    assert not out.exists()


def training_datalist(tmp_path, training):
    """A datalist with ``training`` items (image file names in ``tmp_path``) and one valid validation split."""
    for name in ("healthy.nii.gz", "patient.nii.gz"):
        good(tmp_path / name)
    validation = [{"image": "healthy.nii.gz", "label": 0}, {"image": "patient.nii.gz", "label": 1}]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": training, "validation": validation}))
    return datalist


def train_on(datalist, bundle_root, expect_ok):
    """One epoch of attr_constraint's train.json on a user datalist (images next to it)."""
    return bundle_runner.run_bundle(
        "attr_constraint",
        ["train.json"],
        ("datalist", str(datalist)),
        ("dataset_dir", str(datalist.parent)),
        ("bundle_root", str(bundle_root)),
        ("spatial_size", list(SIZE_2D)),
        ("batch_size", 2),
        ("max_epochs", 1),
        expect_ok=expect_ok,
    )


def test_training_datalist_without_masks_trains_the_unsupervised_constraint(tmp_path):
    # masks are optional for the unsupervised constraint (they are needed by the evaluation and the supervised one)
    training = [{"image": "healthy.nii.gz", "label": 0}, {"image": "patient.nii.gz", "label": 1}] * 2
    train_on(training_datalist(tmp_path, training), tmp_path / "bundle", expect_ok=True)
    assert (tmp_path / "bundle" / "models" / "model.pt").is_file()


TRAINING_KINDS = {
    "empty split": ([], ["training", "empty"]),
    "label outside the allowed set": (
        [{"image": "healthy.nii.gz", "label": 0}, {"image": "patient.nii.gz", "label": 2}],
        ["training[1]", "patient.nii.gz", "label 2"],
    ),
    "missing file": (
        [{"image": "healthy.nii.gz", "label": 0}, {"image": "gone.nii.gz", "label": 1}],
        ["training[1]", "gone.nii.gz", "file not found"],
    ),
    "NaN/Inf voxels": (
        [{"image": "healthy.nii.gz", "label": 0}, {"image": "nan.nii.gz", "label": 1}],
        ["nan.nii.gz", "NaN or Inf voxels"],
    ),
}


@pytest.mark.parametrize("kind", TRAINING_KINDS)
def test_bad_training_datalist_fails_with_one_line_and_writes_nothing(tmp_path, kind):
    training, expected = TRAINING_KINDS[kind]
    with_non_finite(tmp_path / "nan.nii.gz")
    datalist = training_datalist(tmp_path, training)
    bundle_root = tmp_path / "bundle"
    line = error_line(train_on(datalist, bundle_root, expect_ok=False))
    assert str(datalist) in line or str(tmp_path) in line, line
    for fragment in expected:
        assert fragment in line, line
    assert not (bundle_root / "models").exists() or not any((bundle_root / "models").iterdir())


@pytest.mark.parametrize("bundle", ["vagan", "icam", "acat"])
def test_other_bundles_skip_and_list_bad_folder_files(bundle, tmp_path):
    case = CASES[bundle]
    write_untrained_bundle(bundle, tmp_path / "bundle")
    folder = tmp_path / "scans"
    folder.mkdir()
    good(folder / "a_good.nii.gz", case.scan_shape)
    image = np.random.default_rng(0).normal(size=case.scan_shape)
    image[1, 1] = np.nan
    write(folder / "b_nan.nii.gz", image)
    out = tmp_path / "out"
    common = [("bundle_root", str(tmp_path / "bundle")), ("input_dir", str(folder)), ("output_dir", str(out))]
    common += case.run_overrides
    line = error_line(bundle_runner.run_bundle(bundle, case.configs, *common, expect_ok=False))
    assert str(folder / "b_nan.nii.gz") in line and "NaN or Inf" in line
    assert not out.exists()
    bundle_runner.run_bundle(bundle, case.configs, *common, ("skip_bad_inputs", True))
    assert (out / case.output.replace("scan", "a_good")).is_file()
    with open(out / "skipped_inputs.csv") as f:
        assert [row["file"] for row in csv.DictReader(f)] == [str(folder / "b_nan.nii.gz")]


def test_tvd_inference_names_a_bad_image(tmp_path):
    case = CASES["tvd_score"]
    write_untrained_bundle("tvd_score", tmp_path / "bundle")
    image = np.random.default_rng(0).normal(size=case.scan_shape)
    image[1, 2, 3] = np.inf
    scan = write(tmp_path / "scan.nii.gz", image)
    out = tmp_path / "out"
    overrides = [("bundle_root", str(tmp_path / "bundle")), ("input_image", str(scan)), ("output_dir", str(out))]
    proc = bundle_runner.run_bundle("tvd_score", case.configs, *overrides, *case.run_overrides, expect_ok=False)
    line = error_line(proc)
    assert str(scan) in line and "NaN or Inf" in line
    assert not out.exists()


# Units behind the runs above.


def test_input_error_is_found_behind_monai_wrappers():
    problem = ImageFileError("scan.nii.gz: image contains NaN")
    try:
        try:
            raise problem
        except ImageFileError as err:
            raise RuntimeError("applying transform <CheckImaged>") from err
    except RuntimeError as wrapped:
        try:
            raise RuntimeError("Failed to evaluate data") from wrapped
        except RuntimeError as outer:
            assert input_error_in(outer) is problem
    assert input_error_in(RuntimeError("other")) is None


def test_report_prints_one_line_and_leaves_other_errors_to_the_default(capsys, monkeypatch):
    seen = []
    monkeypatch.delenv(FULL_TRACEBACK_ENV, raising=False)
    wrapped = RuntimeError("Failed to evaluate")
    wrapped.__cause__ = InputError("scan.nii.gz: file not found")
    _report_input_error(RuntimeError, wrapped, None, fallback=lambda *a: seen.append(a))
    assert capsys.readouterr().err.splitlines()[0] == "error: scan.nii.gz: file not found" and not seen
    _report_input_error(KeyError, KeyError("x"), None, fallback=lambda *a: seen.append(a))
    assert len(seen) == 1  # not an input error: the normal traceback
    monkeypatch.setenv(FULL_TRACEBACK_ENV, "1")
    _report_input_error(RuntimeError, wrapped, None, fallback=lambda *a: seen.append(a))
    assert len(seen) == 2 and capsys.readouterr().err == ""


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_minimum_input_size_is_the_smallest_size_that_runs(spatial_dims):
    network = PatchGANClassifier(spatial_dims=spatial_dims)
    size = minimum_input_size(network, spatial_dims)
    assert len(size) == spatial_dims and size[0] > 1
    network.eval()
    with torch.no_grad():
        network(torch.zeros((1, 1, *size)))
        with pytest.raises((RuntimeError, ValueError)):
            network(torch.zeros((1, 1) + (size[0] - 1,) * spatial_dims))
