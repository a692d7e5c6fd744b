"""ICAM bundle end to end through its real configs: train, baseline classifier, inference, evaluate, resume, 3D."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from common.data import load_datalist
from common.losses import ICAMLossWeights
from tests import bundle_runner
from tests.bundle_runner import LPS, REPO, check_resume

# Tiny 2D lesion slices: 32x32 pixels (attribute latent 2x2), 24 cases, so a run takes seconds.
TINY = {"spatial_dims": 2, "shape": [32, 32], "n": 24}
MAPS = ("fa_mean", "fa_variance", "translated")
METHODS = {"icam", "grad_cam", "integrated_gradients", "occlusion"}
# The tiny model is not confident: let sampling fall back from p > 0.9 to p > 0.5, then to any latent.
FALLBACK = ("fallback_thresholds", [0.5, 0.0])


def run_bundle(configs, *overrides, expect_ok=True):
    return bundle_runner.run_bundle("icam", configs, *overrides, expect_ok=expect_ok)


def write_scan(path, shape, seed=0):
    image = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(image, LPS), path)
    return image


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("icam")
    common = [
        ("dataset_dir", str(root / "data")),
        ("synthetic_params", TINY),
        ("bundle_root", str(root / "bundle")),
        ("spatial_size", [32, 32]),
    ]
    schedule = [("epoch_length", 6), ("max_epochs", 2), ("val_n_samples", 3), ("log_interval", 3)]
    train = run_bundle(["train.json"], *common, *schedule)
    run_bundle(["train_classifier.json"], *common, ("max_epochs", 1), ("batch_size", 4))
    return root, common, schedule, train


def test_the_defaults_are_the_papers():
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "icam" / "configs" / "train.json"))
    assert parser.get_parsed_content("loss_weights") == ICAMLossWeights()  # A.7: every lambda
    assert parser["learning_rate"] == 1e-4 and parser["content_learning_rate"] == 4e-5
    assert parser["adam_betas"] == [0.5, 0.999] and parser["weight_decay"] == 1e-4
    assert parser["batch_size"] == 1  # one image of each class per update
    assert all(s % 16 == 0 for s in parser["spatial_size"])  # the attribute latent is image size / 16
    inference = ConfigParser()
    inference.read_config(str(REPO / "bundles" / "icam" / "configs" / "inference.json"))
    assert inference["n_samples"] == 50 and inference["sample_threshold"] == 0.9


def test_training_writes_the_best_and_latest_checkpoints(trained):
    root, _, _, train = trained
    models = root / "bundle" / "models"
    best = torch.load(models / "model.pt", weights_only=True)  # best validation NCC(-)
    assert set(best) == {"content_encoder", "attribute_encoder", "generator", "classifier"}
    latest = torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)  # everything, for resume
    assert {"domain_discriminator", "content_discriminator", "content_optimizer", "trainer"} <= set(latest)
    assert (models / "classifier_dense.pt").is_file()
    log = train.stdout + train.stderr
    for name in ("val_ncc_minus", "val_ncc_plus", "val_accuracy", "generator_loss", "attribute_bce"):
        assert name in log, name
    assert list((root / "bundle" / "logs").glob("events.out.tfevents*"))
    assert (root / "data" / "manifest.json").is_file()  # the embedded default was generated


def test_inference_writes_maps_in_the_input_space(trained, tmp_path):
    root, _, _, _ = trained
    image = write_scan(tmp_path / "scan.nii.gz", (37, 45))
    out = tmp_path / "out"
    run_bundle(
        ["inference.json"],
        ("bundle_root", str(root / "bundle")),
        ("spatial_size", [32, 32]),
        ("input_image", str(tmp_path / "scan.nii.gz")),
        ("output_dir", str(out)),
        ("n_samples", 4),
        FALLBACK,
    )
    for name in MAPS:
        written = nib.load(out / f"scan_{name}.nii.gz")
        assert written.shape == image.shape
        np.testing.assert_allclose(written.affine, LPS, atol=1e-5)
        assert (out / f"scan_{name}.png").is_file()
    variance = np.asarray(nib.load(out / "scan_fa_variance.nii.gz").dataobj)
    assert variance.min() >= 0.0 and variance.max() > 0.0  # the samples differ
    (row,) = list(csv.reader((out / "probabilities.csv").open()))
    assert row[0].endswith("scan.nii.gz") and float(row[1]) in (0.0, 1.0) and 0.0 <= float(row[2]) <= 1.0
    assert (float(row[2]) > 0.5) == (float(row[1]) == 1.0)
    assert not list(out.glob(".*partial*"))


def test_inference_stops_when_rejection_sampling_fails(trained, tmp_path):
    root, _, _, _ = trained
    write_scan(tmp_path / "scan.nii.gz", (32, 32))
    proc = run_bundle(
        ["inference.json"],
        ("bundle_root", str(root / "bundle")),
        ("spatial_size", [32, 32]),
        ("input_image", str(tmp_path / "scan.nii.gz")),
        ("output_dir", str(tmp_path / "out")),
        ("n_samples", 4),
        ("sample_max_draws", 1),  # one draw cannot give four latents
        expect_ok=False,
    )
    assert proc.returncode != 0
    assert "rejection sampling found" in proc.stdout + proc.stderr
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_evaluate_reports_icam_and_every_baseline(trained):
    root, common, _, _ = trained
    run_bundle(
        ["train.json", "evaluate.json"],
        *common,
        ("n_samples", 3),
        ("ig_steps", 4),
        ("occlusion_window", 8),
        ("occlusion_stride", 8),
    )
    results = json.loads((root / "bundle" / "eval" / "metrics.json").read_text())
    assert set(results) == METHODS
    for method, result in results.items():
        assert 0.0 <= result["accuracy"] <= 1.0, method
        assert -1.0 <= result["ncc_minus"] <= 1.0 and -1.0 <= result["ncc_plus"] <= 1.0, method
        assert result["ncc_minus_sd"] is not None and result["n"] > 0, method
    assert results["icam"]["ncc_minus_paper"] == 0.435 and results["icam"]["ncc_plus_paper"] == 0.332
    assert results["icam"]["accuracy_paper"] == 0.95
    # The baselines share one classifier, hence one accuracy.
    assert results["grad_cam"]["accuracy"] == results["occlusion"]["accuracy"]
    table = (root / "bundle" / "eval" / "metrics.md").read_text()
    assert "| occlusion |" in table and "(paper 0.435)" in table
    assert (root / "bundle" / "eval" / "examples.png").stat().st_size > 1000


def test_latent_space_embedding_and_interpolation(trained):
    root, common, _, _ = trained
    steps = 5
    run_bundle(["train.json", "latent.json"], *common, ("interpolation_steps", steps))
    out = root / "bundle" / "eval"
    for name in ("latent_embedding.png", "latent_interpolation.png"):
        assert 1000 < (out / name).stat().st_size < 300_000, name
    # One row per test image, in the datalist's order, with its label; PCA coordinates are centred.
    items = load_datalist(root / "data" / "datalist.json", "test")
    rows = list(csv.DictReader((out / "latent_embedding.csv").open()))
    assert [int(r["label"]) for r in rows] == [int(item["label"]) for item in items]
    assert [r["file"] for r in rows] == [str(item["image"]) for item in items]
    xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    assert np.isfinite(xy).all() and xy.std() > 0
    np.testing.assert_allclose(xy.mean(0), 0.0, atol=1e-5)
    p_image = [float(r["probability"]) for r in rows]
    # Interpolation: the first control and the first patient, `steps` latents per strip.
    strips = {}
    for r in csv.DictReader((out / "latent_interpolation.csv").open()):
        strips.setdefault(r["strip"], []).append(r)
    assert set(strips) == {"between", "within"}
    labels = [int(r["label"]) for r in rows]
    control, patient = labels.index(0), labels.index(1)
    for kind, strip in strips.items():
        assert [int(r["step"]) for r in strip] == list(range(steps)), kind  # the number of panels
        assert {(int(r["control"]), int(r["patient"])) for r in strip} == {(control, patient)}, kind
        p = np.array([float(r["probability"]) for r in strip])
        # The classifier is linear in the latent, so p(class 1) is monotone along a straight line.
        assert np.all(np.diff(p) * np.sign(p[-1] - p[0]) >= -1e-6), (kind, p)
    between = np.array([float(r["probability"]) for r in strips["between"]])
    # The between-class line runs from the control's attribute mean to the patient's.
    np.testing.assert_allclose(between[[0, -1]], [p_image[control], p_image[patient]], atol=2e-6)
    if p_image[patient] > p_image[control] + 1e-4:  # the tiny model separates this pair
        assert between[-1] > between[0]


def test_resume_continues_from_the_latest_checkpoint(trained):
    root, common, schedule, _ = trained
    check_resume("icam", root, common, schedule)


def test_3d_preset_trains_and_infers_in_the_input_space(tmp_path):
    size = [16, 32, 16]  # attribute latent 1x2x1
    run_bundle(
        ["train.json", "brain3d.json"],
        ("dataset_dir", str(tmp_path / "data")),
        ("synthetic_params", {"n": 10, "shape": size}),
        ("bundle_root", str(tmp_path / "bundle")),
        ("spatial_size", size),
        ("epoch_length", 3),
        ("max_epochs", 1),
        ("val_n_samples", 2),
    )
    volume = write_scan(tmp_path / "volume.nii.gz", (21, 19, 17), seed=1)
    out = tmp_path / "out"
    run_bundle(
        ["inference.json", "brain3d.json"],
        ("bundle_root", str(tmp_path / "bundle")),
        ("spatial_size", size),
        ("input_image", str(tmp_path / "volume.nii.gz")),
        ("output_dir", str(out)),
        ("n_samples", 3),
        FALLBACK,
    )
    for name in MAPS:
        written = nib.load(out / f"volume_{name}.nii.gz")
        assert written.shape == volume.shape
        np.testing.assert_allclose(written.affine, LPS, atol=1e-5)
