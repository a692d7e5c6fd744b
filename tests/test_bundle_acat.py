"""ACAT bundle end to end: the documented pipeline command (classifier -> autoencoder -> saliency ->
ACAT -> evaluate) through the real configs at tiny size, then inference on a non-RAS NIfTI."""

import csv
import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigParser

from common.data import load_datalist, load_resplit
from tests import bundle_runner
from tests.bundle_runner import LPS, REPO

# 30 CT volumes of 32x32x3 (the default is 400 of 64x64x11): the whole pipeline takes seconds.
TINY = {"n": 30, "shape": [32, 32, 3]}
METHODS = {"counterfactual", "latent_shift", "gradient", "grad_cam"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("acat")
    common = [
        ("dataset_dir", str(root / "data")),
        ("synthetic_params", TINY),
        ("bundle_root", str(root / "bundle")),
        ("spatial_size", [32, 32, 3]),
    ]
    args = [sys.executable, "-m", "common.pipeline", "bundles/acat"]
    for key, value in [*common, ("max_epochs", 1), ("batch_size", 4), ("cf_steps", 3)]:
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, common


def test_the_defaults_are_the_papers():
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "acat" / "configs" / "saliency.json"))
    assert parser["cf_alpha"] == 100 and parser["cf_steps"] == 20  # Eq. 4: alpha = 100, 20 steps
    train = ConfigParser()
    train.read_config(str(REPO / "bundles" / "acat" / "configs" / "train.json"))
    assert train["split_fractions"] == [0.7, 0.15, 0.15] and train["spatial_size"][-1] == 11
    assert train["attention_layers"] == [1, 3, 5]  # after the first, third and fifth convolution
    assert train["network_def"]["_target_"] == "common.networks.ACATClassifier"
    evaluate = ConfigParser()
    evaluate.read_config(str(REPO / "bundles" / "acat" / "configs" / "evaluate.json"))
    # section 4.4: negative counterfactuals, and the comparators explain the same class ("none")
    assert evaluate["localisation_targets"] == [0] and evaluate["comparator_target"] == 0
    stages = json.loads((REPO / "bundles" / "acat" / "configs" / "pipeline.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["classifier", "autoencoder", "saliency", "acat", "evaluate"]


def test_every_stage_writes_its_model(pipeline):
    root, _ = pipeline
    models = root / "bundle" / "models"
    for name in ("classifier.pt", "autoencoder.pt", "model.pt"):
        assert (models / name).is_file(), name
    times = json.loads((root / "bundle" / "pipeline_times.json").read_text())
    assert set(times) == {"classifier", "autoencoder", "saliency", "acat", "evaluate", "total"}


def test_saliency_maps_cover_every_item_in_its_space(pipeline):
    root, _ = pipeline
    data = root / "data"
    saliency_datalist = data / "datalist_saliency_seed0.json"
    original = json.loads((data / "datalist.json").read_text())
    written = json.loads(saliency_datalist.read_text())
    assert {k: len(v) for k, v in written.items()} == {k: len(v) for k, v in original.items()}
    for split in written:
        items = load_datalist(saliency_datalist, split, required_keys=("image", "saliency"), allowed_labels=range(4))
        for item in items:
            image, saliency = nib.load(item["image"]), nib.load(item["saliency"])
            assert saliency.shape == image.shape
            np.testing.assert_allclose(saliency.affine, image.affine, atol=1e-5)
            values = np.asarray(saliency.dataobj)
            assert values.min() >= 0.0 and values.max() <= 1.0 + 1e-6 and values.max() > 0


def test_evaluation_reports_both_classifiers_and_every_saliency_method(pipeline):
    root, _ = pipeline
    out = root / "bundle" / "eval"
    classification = json.loads((out / "classification_metrics.json").read_text())
    assert set(classification) == {"baseline", "acat"}
    for result in classification.values():
        assert 0.0 <= result["accuracy"] <= 1.0
        assert {f"sens {c}" for c in ("none", "left", "right", "both")} <= set(result)
    assert classification["baseline"]["accuracy_paper"] == pytest.approx(0.7139)
    saliency = json.loads((out / "saliency_metrics.json").read_text())
    assert set(saliency) == METHODS
    # the positive scans of the seed's test split (the split is re-drawn by the seed, 70/15/15)
    test = load_resplit(root / "data" / "datalist_saliency_seed0.json", "test", seed=0, allowed_labels=range(4))
    for result in saliency.values():
        assert result["n"] == sum(i["label"] > 0 for i in test) > 0
        assert 0.0 <= result["localisation"] <= 1.0 and 0.0 <= result["dice"] <= 1.0
    assert saliency["counterfactual"]["localisation_paper"] == pytest.approx(0.6505)
    assert (out / "saliency_examples.png").stat().st_size > 1000
    assert "Localisation" in (out / "saliency_metrics.md").read_text()


def test_localisation_benchmark_reruns_the_evaluation_per_protocol_variant(pipeline, tmp_path):
    """benchmarks/acat_localisation.py: its 'default' variant is the pipeline's own evaluation
    (same models, same seed: the same scores); a variant runs only the methods it changes."""
    root, common = pipeline
    out = tmp_path / "localisation.md"
    args = [sys.executable, "benchmarks/acat_localisation.py", str(root / "bundle"), "--seeds", "0", "--out", str(out)]
    args += ["--variants", "default", "grad_cam_volume"]
    for key, value in [*common, ("cf_steps", 3)]:
        args += [f"--{key}", bundle_runner.cli_value(value)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    variants = root / "bundle" / "eval_localisation"
    default = json.loads((variants / "default" / "saliency_metrics.json").read_text())
    pipeline_eval = json.loads((root / "bundle" / "eval" / "saliency_metrics.json").read_text())
    assert {m: r["localisation"] for m, r in default.items()} == {
        m: r["localisation"] for m, r in pipeline_eval.items()
    }
    changed = json.loads((variants / "grad_cam_volume" / "saliency_metrics.json").read_text())
    assert set(changed) == {"grad_cam"}
    table = out.read_text()
    assert "| default |" in table and "| grad_cam_volume |" in table and "as default" in table


def test_inference_writes_the_saliency_map_in_the_input_space(pipeline, tmp_path):
    root, _ = pipeline
    scan = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(30, 10, (37, 41, 5)).astype(np.float32), LPS), scan)
    out = tmp_path / "out"
    bundle_runner.run_bundle(
        "acat",
        ["inference.json"],
        ("bundle_root", str(root / "bundle")),
        ("spatial_size", [32, 32, 3]),
        ("cf_steps", 3),
        ("input_image", str(scan)),
        ("output_dir", str(out)),
    )
    written = nib.load(out / "ct_saliency.nii.gz")
    assert written.shape == (37, 41, 5)
    np.testing.assert_allclose(written.affine, LPS, atol=1e-5)
    assert (out / "ct_saliency.png").is_file()
    rows = list(csv.reader(open(out / "probabilities.csv")))
    assert len(rows) == 1 and rows[0][0].endswith("ct.nii.gz")
    assert sum(float(v) for v in rows[0][1:]) == pytest.approx(1.0, abs=1e-4)


def test_acat_without_a_baseline_fails_naming_the_file(pipeline, tmp_path):
    root, common = pipeline
    proc = bundle_runner.run_bundle(
        "acat", ["train.json"], *common, ("ckpt_dir", str(tmp_path / "empty")), expect_ok=False
    )
    assert proc.returncode != 0
    assert f"{tmp_path / 'empty' / 'classifier.pt'}: baseline classifier not found" in proc.stderr
