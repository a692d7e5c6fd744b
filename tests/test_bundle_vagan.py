"""VA-GAN bundle end to end through its real configs: train, classifiers, inference, evaluate, resume, 3D."""

import json

import nibabel as nib
import numpy as np
import pytest

from common.files import EVALUATION_PROGRESS_DIR
from tests import bundle_runner
from tests.bundle_runner import LPS, check_resume

# Tiny boxes: 32x32 images with 6-pixel squares, so a few iterations run in seconds.
TINY_BOXES = {"n": 48, "shape": [32, 32], "box": 6, "offset": 9, "jitter": 1}


def run_bundle(configs, *overrides, expect_ok=True):
    return bundle_runner.run_bundle("vagan", configs, *overrides, expect_ok=expect_ok)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("vagan")
    common = [
        ("dataset_dir", str(root / "data")),
        ("synthetic_params", TINY_BOXES),
        ("bundle_root", str(root / "bundle")),
        ("spatial_size", [32, 32]),
        ("batch_size", 4),
    ]
    schedule = [("epoch_length", 2), ("max_epochs", 2), ("critic_steps_boost", 2), ("boost_first", 1)]
    train = run_bundle(["train.json"], *common, *schedule)
    for head in ("dense", "cam"):
        run_bundle(["train_classifier.json"], *common, ("max_epochs", 1), ("classifier_head", head))
    return root, common, schedule, train


def test_training_writes_the_best_and_latest_checkpoints(trained):
    root, _, _, train = trained
    models = root / "bundle" / "models"
    assert (models / "model.pt").is_file()  # best validation NCC
    assert (models / "checkpoint_epoch=2.pt").is_file()  # latest state, for resume
    assert (models / "classifier_dense.pt").is_file() and (models / "classifier_cam.pt").is_file()
    log = train.stdout + train.stderr
    assert "val_ncc" in log and "wasserstein" in log
    assert list((root / "bundle" / "logs").glob("events.out.tfevents*"))
    assert (root / "data" / "manifest.json").is_file()  # the embedded default was generated


def test_inference_keeps_the_input_space(trained, tmp_path):
    root, _, _, _ = trained
    scan = tmp_path / "scan.nii.gz"
    image = np.random.default_rng(0).normal(size=(37, 41)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, LPS), scan)
    out = tmp_path / "out"
    run_bundle(
        ["inference.json"],
        ("bundle_root", str(root / "bundle")),
        ("spatial_size", [32, 32]),
        ("input_image", str(scan)),
        ("output_dir", str(out)),
    )
    for name in ("effect", "counterfactual"):
        written = nib.load(out / f"scan_{name}.nii.gz")
        assert written.shape == image.shape
        np.testing.assert_allclose(written.affine, LPS, atol=1e-5)
        assert (out / f"scan_{name}.png").is_file()
    assert not list(out.glob(".*partial*"))


def test_inference_rejects_a_bad_file(trained, tmp_path):
    root, _, _, _ = trained
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    proc = run_bundle(
        ["inference.json"],
        ("bundle_root", str(root / "bundle")),
        ("input_image", str(bad)),
        ("output_dir", str(tmp_path / "out")),
        expect_ok=False,
    )
    assert proc.returncode != 0
    assert f"{bad}: unreadable NIfTI" in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


def test_evaluate_reports_every_method(trained):
    root, common, _, _ = trained
    run_bundle(["train.json", "evaluate.json"], *common, ("ig_steps", 4))
    results = json.loads((root / "bundle" / "eval" / "metrics.json").read_text())
    assert set(results) == {"vagan", "gradient", "guided_backprop", "integrated_gradients", "cam"}
    for method, result in results.items():
        assert -1.0 <= result["ncc"] <= 1.0 and result["n"] > 0, method
    assert results["vagan"]["ncc_paper"] == 0.94
    table = (root / "bundle" / "eval" / "metrics.md").read_text()
    assert "| integrated_gradients |" in table
    assert (root / "bundle" / "eval" / "examples.png").stat().st_size > 1000


def test_a_stopped_evaluation_goes_on_from_its_records(trained, tmp_path):
    """The report cannot be written (a folder where metrics.json goes), so the run fails after recording every
    batch; with --resume True the maps come from the records and the report equals the uninterrupted run's."""
    root, common, _, _ = trained
    out = tmp_path / "eval"
    (out / "metrics.json").mkdir(parents=True)
    records = out / EVALUATION_PROGRESS_DIR / "test"
    records.mkdir(parents=True)
    (records / "batch_000099.pt").write_bytes(b"an older run's record")  # a run without resume starts without them
    overrides = [*common, ("ig_steps", 4), ("output_dir", str(out))]
    stopped = run_bundle(["train.json", "evaluate.json"], *overrides, expect_ok=False)
    assert stopped.returncode != 0 and not (records / "batch_000099.pt").exists()
    recorded = len(list(records.glob("batch_*.pt")))
    assert recorded > 0
    (out / "metrics.json").rmdir()
    resumed = run_bundle(["train.json", "evaluate.json"], *overrides, ("resume", True))
    assert f"{records}: {recorded} batches from records, 0 computed" in resumed.stdout + resumed.stderr
    run_bundle(["train.json", "evaluate.json"], *common, ("ig_steps", 4), ("output_dir", str(tmp_path / "whole")))
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())  # a run that never stopped
    assert json.loads((out / "metrics.json").read_text()) == whole
    assert not records.exists()


def test_resume_continues_from_the_latest_checkpoint(trained):
    root, common, schedule, _ = trained
    check_resume("vagan", root, common, schedule)


def test_3d_preset_trains_and_infers_in_the_input_space(tmp_path):
    common = [
        ("dataset_dir", str(tmp_path / "data")),
        ("synthetic_params", {"n": 10, "shape": [16, 24, 16]}),
        ("bundle_root", str(tmp_path / "bundle")),
        ("spatial_size", [16, 24, 16]),
        ("batch_size", 2),
        ("accumulation_steps", 2),
    ]
    run_bundle(
        ["train.json", "brain3d.json"],
        *common,
        ("epoch_length", 1),
        ("max_epochs", 1),
        ("critic_steps_boost", 1),
        ("boost_first", 1),
    )
    scan = tmp_path / "volume.nii.gz"
    volume = np.random.default_rng(1).normal(size=(21, 19, 17)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, LPS), scan)
    run_bundle(
        ["inference.json", "brain3d.json"],
        ("bundle_root", str(tmp_path / "bundle")),
        ("spatial_size", [16, 24, 16]),
        ("input_image", str(scan)),
        ("output_dir", str(tmp_path / "out")),
    )
    written = nib.load(tmp_path / "out" / "volume_effect.nii.gz")
    assert written.shape == volume.shape
    np.testing.assert_allclose(written.affine, LPS, atol=1e-5)
