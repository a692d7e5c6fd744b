"""Attribution-constraint bundle end to end through its real configs: train (constrained and
unconstrained), evaluate (thresholds, every method and metric), inference in the input's space."""

import json
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from common.networks import PatchGANClassifier
from tests import bundle_runner
from tests.bundle_runner import LPS, REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from lesion_reliance import main as lesion_reliance_main  # noqa: E402

# Tiny 2D tumour slices: 32x40 pixels, 40 cases, so a training epoch takes seconds.
TINY = {"spatial_dims": 2, "shape": [32, 40], "n": 40}
METHODS = {"constrained", "constrained_EG", "constrained_IG", "NoConsG", "NoConsGC", "NoCons_EG"}
COLUMNS = ("tpr", "tnr", "dice", "auroc", "auroc10", "auprc")


def run_bundle(configs, *overrides, expect_ok=True):
    return bundle_runner.run_bundle("attr_constraint", configs, *overrides, expect_ok=expect_ok)


def _tiny(root):
    """Overrides for a tiny run in ``root`` (its own data and bundle folders)."""
    return [
        ("dataset_dir", str(root / "data")),
        ("synthetic_params", TINY),
        ("bundle_root", str(root / "bundle")),
        ("spatial_size", [32, 40]),
        ("batch_size", 4),
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("attr_constraint")
    common = _tiny(root)
    models = root / "bundle" / "models"
    train = run_bundle(["train.json"], *common, ("max_epochs", 2), ("alpha_A", 10.0), ("lr_schedule", "cosine"))
    run_bundle(
        ["train.json"], *common, ("max_epochs", 1), ("alpha_A", 0.0), ("ckpt_dir", str(models / "unconstrained"))
    )
    return root, common, train


def test_training_logs_the_constraint_and_keeps_checkpoints(trained):
    root, _, train = trained
    models = root / "bundle" / "models"
    assert (models / "model.pt").is_file()  # best validation accuracy
    assert (models / "checkpoint_epoch=2.pt").is_file()  # latest state, for resume
    # the schedule is stepped once per epoch and saved for resume: cosine over 2 epochs reaches 0,
    # the default (constant) keeps the learning rate
    schedule = torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)["lr_scheduler"]
    assert schedule["last_epoch"] == 2 and schedule["_last_lr"][0] < 1e-6
    constant = torch.load(models / "unconstrained" / "checkpoint_epoch=1.pt", weights_only=True)["lr_scheduler"]
    assert constant["last_epoch"] == 1 and constant["_last_lr"] == [1e-3]
    assert (models / "unconstrained" / "model.pt").is_file()
    log = train.stdout + train.stderr
    assert "val_accuracy" in log and "val_tpr" in log and "attribution_loss" in log
    # the warm-up (to epoch 30) outlasts this 2-epoch run: epoch 1 is not validated, the last epoch always is
    validated = [line.split("Epoch[")[1].split("]")[0] for line in log.splitlines() if "Metrics -- val_acc" in line]
    assert validated == ["2"]
    # alpha_A > 0: the logged attribution loss is the BCE of healthy-voxel attributions (log 2 at zero).
    losses = [
        float(line.split("attribution_loss: ")[1].split()[0])
        for line in log.splitlines()
        if "attribution_loss: " in line
    ]
    assert losses and all(0.0 < v < 5.0 for v in losses)
    assert list((root / "bundle" / "logs").glob("events.out.tfevents*"))


def test_selection_warm_up_keeps_a_model_from_after_it(tmp_path):
    root = tmp_path
    common = _tiny(root)
    # validated every epoch, patience 1 could stop at epoch 2; with the warm-up to epoch 3 neither early stopping
    # nor the best-model checkpoint may act before it, so model.pt is the epoch-3 network (the default keeps the
    # moving average of the weights, which changes every step, so an earlier epoch's would differ)
    run_bundle(
        ["train.json"],
        *common,
        ("max_epochs", 3),
        ("early_stop_patience", 1),
        ("selection_start_epoch", 3),
        ("warmup_val_interval", 1),
    )
    models = root / "bundle" / "models"
    kept = torch.load(models / "model.pt", weights_only=True)
    last = torch.load(models / "checkpoint_epoch=3.pt", weights_only=True)["classifier_ema"]
    assert kept.keys() == last.keys() and all(torch.equal(kept[k], last[k]) for k in kept)


def test_weight_averaging_validates_and_keeps_the_moving_average(tmp_path):
    root = tmp_path
    common = _tiny(root)
    run_bundle(["train.json"], *common, ("max_epochs", 2), ("selection_start_epoch", 2), ("weight_averaging", True))
    models = root / "bundle" / "models"
    kept = torch.load(models / "model.pt", weights_only=True)
    state = torch.load(models / "checkpoint_epoch=2.pt", weights_only=True)
    # model.pt (epoch 2, the only selectable one) is the average, which the state keeps beside the online weights
    assert all(torch.equal(kept[k], state["classifier_ema"][k]) for k in kept)
    assert any(not torch.equal(kept[k], state["classifier"][k]) for k in kept if kept[k].is_floating_point())


def test_only_a_constrained_model_waits_for_its_constraint_and_averages_its_weights():
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "attr_constraint" / "configs" / "train.json"))
    assert parser.get_parsed_content("selection_start_epoch") == 30 < parser["max_epochs"]
    assert parser.get_parsed_content("weight_averaging") is True
    parser["alpha_A"] = 0.0  # the unconstrained comparator: online weights, best validation accuracy from epoch 1
    assert parser.get_parsed_content("selection_start_epoch") == 1
    assert parser.get_parsed_content("weight_averaging") is False


@pytest.fixture(scope="module")
def evaluated(trained):
    root, common, _ = trained
    run_bundle(["train.json", "evaluate.json"], *common, ("eg_samples", 4), ("ig_steps", 4), ("eg_reference_count", 4))
    return root


def test_evaluate_reports_every_method_and_saves_thresholds(evaluated):
    root = evaluated
    results = json.loads((root / "bundle" / "eval" / "metrics.json").read_text())
    assert set(results) == METHODS
    for method, result in results.items():
        for column in COLUMNS:
            assert 0.0 <= result[column] <= 1.0, (method, column)
        assert result["n"] > 0
    assert results["constrained"]["dice_paper"] == 0.51 and results["NoConsG"]["auprc_paper"] == 0.16
    # G and EG of one model are correlated, not identical.
    assert -1.0 <= results["constrained_EG"]["pearson_g_eg"] < 1.0
    # Both models share the same test images: the unconstrained rows report the same rates.
    assert results["NoConsG"]["tpr"] == results["NoConsGC"]["tpr"]
    thresholds = json.loads((root / "bundle" / "models" / "thresholds.json").read_text())
    assert set(thresholds) == {"G", "IG", "EG"}
    table = (root / "bundle" / "eval" / "metrics.md").read_text()
    assert "| NoConsGC |" in table and "(paper 0.51)" in table
    assert (root / "bundle" / "eval" / "examples.png").stat().st_size > 1000


def write_scan(path, shape, affine):
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(image, affine), path)
    return image


def check_outputs(out, stem, image):
    for name in ("attribution", "segmentation"):
        written = nib.load(out / f"{stem}_{name}.nii.gz")
        assert written.shape == image.shape
        np.testing.assert_allclose(written.affine, LPS, atol=1e-5)
    segmentation = np.asarray(nib.load(out / f"{stem}_segmentation.nii.gz").dataobj)
    assert set(np.unique(segmentation)) <= {0, 1}
    rows = (out / "probabilities.csv").read_text().strip().splitlines()
    assert len(rows) == 1 and stem in rows[0] and 0.0 <= float(rows[0].split(",")[-1]) <= 1.0
    assert (out / f"{stem}_attribution.png").is_file()
    assert not list(out.glob(".*partial*"))


def test_inference_keeps_the_input_space_and_uses_the_saved_threshold(evaluated, tmp_path):
    root = evaluated
    scan = tmp_path / "scan.nii.gz"
    image = write_scan(scan, (37, 45), LPS)
    out = tmp_path / "out"
    args = [("bundle_root", str(root / "bundle")), ("spatial_size", [32, 40]), ("input_image", str(scan))]
    run_bundle(["inference.json"], *args, ("output_dir", str(out)))
    check_outputs(out, "scan", image)
    # A threshold below every attribution value segments the whole (padded-back) image.
    run_bundle(["inference.json"], *args, ("output_dir", str(tmp_path / "all")), ("segmentation_threshold", -1e9))
    assert np.asarray(nib.load(tmp_path / "all" / "scan_segmentation.nii.gz").dataobj).all()
    # Expected gradients at inference, references from the training datalist.
    run_bundle(
        ["inference.json"],
        *args,
        ("output_dir", str(tmp_path / "eg")),
        ("inference_method", "EG"),
        ("eg_samples", 4),
        ("eg_reference_count", 4),
        ("eg_reference_datalist", str(root / "data" / "datalist.json")),
        ("dataset_dir", str(root / "data")),
    )
    check_outputs(tmp_path / "eg", "scan", image)


def test_3d_preset_inference_on_a_non_ras_volume(tmp_path):
    # The 3D preset's network with random weights: this checks geometry, not accuracy.
    models = tmp_path / "bundle" / "models"
    models.mkdir(parents=True)
    torch.save(PatchGANClassifier(spatial_dims=3).state_dict(), models / "model.pt")
    scan = tmp_path / "volume.nii.gz"
    image = write_scan(scan, (30, 37, 26), LPS)
    out = tmp_path / "out"
    run_bundle(
        ["inference.json", "brain3d.json"],
        ("bundle_root", str(tmp_path / "bundle")),
        ("spatial_size", [32, 40, 32]),
        ("input_image", str(scan)),
        ("output_dir", str(out)),
        ("segmentation_threshold", 0.0),
    )
    check_outputs(out, "volume", image)


def run_untrained_inference(tmp_path, *overrides):
    """Inference with an untrained classifier (no thresholds file) on a small LPS scan; expected to fail."""
    models = tmp_path / "bundle" / "models"
    models.mkdir(parents=True)
    torch.save(PatchGANClassifier(spatial_dims=2).state_dict(), models / "model.pt")
    scan = tmp_path / "scan.nii.gz"
    write_scan(scan, (32, 40), LPS)
    return run_bundle(
        ["inference.json"],
        ("bundle_root", str(tmp_path / "bundle")),
        ("input_image", str(scan)),
        ("output_dir", str(tmp_path / "out")),
        *overrides,
        expect_ok=False,
    )


def test_inference_without_thresholds_says_what_to_do(tmp_path):
    proc = run_untrained_inference(tmp_path)
    assert proc.returncode != 0
    assert (
        "thresholds.json: no segmentation thresholds; run the bundle's evaluate.json first" in proc.stdout + proc.stderr
    )
    assert not (tmp_path / "out").exists()


def test_ms_preset_trains(tmp_path):
    # The MS preset through the real configs on a tiny grid: brain_ms slices, one epoch.
    proc = run_bundle(
        ["train.json", "ms.json"],
        ("dataset_dir", str(tmp_path / "data")),
        ("synthetic_params", {"spatial_dims": 2, "shape": [32, 40], "n": 24}),
        ("bundle_root", str(tmp_path / "bundle")),
        ("spatial_size", [32, 40]),
        ("batch_size", 4),
        ("max_epochs", 1),
    )
    assert json.loads((tmp_path / "data" / "manifest.json").read_text())["generator"] == "brain_ms"
    assert (tmp_path / "bundle" / "models" / "model.pt").is_file()
    assert "val_accuracy" in proc.stdout + proc.stderr
    # the lesion-reliance check through the same configs: every test case classified, patients twice
    model = tmp_path / "bundle" / "models" / "model.pt"
    out = tmp_path / "reliance.md"
    argv = ["--bundle_root", str(tmp_path / "bundle"), "--preset", "ms.json", "--dataset_dir", str(tmp_path / "data")]
    argv += ["--set", "spatial_size=[32, 40]", "--models", f"constrained={model}", "--out", str(out)]
    manifest = (tmp_path / "data" / "manifest.json").read_text()
    assert lesion_reliance_main(argv) == 0
    test_split = json.loads((tmp_path / "data" / "datalist.json").read_text())["test"]
    patients = sum(item["label"] == 1 for item in test_split)
    result = json.loads(out.with_suffix(".json").read_text())["constrained"]
    assert result["with_lesions"]["n"] == result["without_lesions"]["n"] == patients > 0
    assert result["controls"]["n"] == len(test_split) - patients > 0
    assert f"| {patients} / {len(test_split) - patients} |" in out.read_text()
    assert (tmp_path / "data" / "manifest.json").read_text() == manifest  # read as it was, not generated again


def test_each_data_set_reports_the_papers_figures_for_its_own_pathology():
    # Table IV: the report's paper column is BraTS 2 mm by default and the MS 1 mm rows with the MS preset
    configs = REPO / "bundles" / "attr_constraint" / "configs"
    tumour, ms = ConfigParser(), ConfigParser()
    tumour.read_config([str(configs / "train.json"), str(configs / "evaluate.json")])
    ms.read_config([str(configs / "train.json"), str(configs / "evaluate.json"), str(configs / "ms.json")])
    assert tumour["paper"]["constrained"]["Dice"] == 0.51 and tumour["paper"]["NoConsG"]["Dice"] == 0.29
    assert ms["paper"]["constrained"] == {
        "Dice": 0.25,
        "AUROC": 0.60,
        "AUROC10": 0.51,
        "AUPRC": 0.20,
        "TPR": 0.89,
        "TNR": 0.91,
    }
    assert ms["paper"]["NoConsG"]["Dice"] == 0.001 and ms["paper"]["NoConsGC"]["AUPRC"] == 0.002


def test_expected_gradients_inference_without_references_says_what_to_do(tmp_path):
    proc = run_untrained_inference(tmp_path, ("inference_method", "EG"), ("segmentation_threshold", 0.0))
    assert proc.returncode != 0
    assert "expected gradients at inference need reference images: pass --eg_reference_datalist" in (
        proc.stdout + proc.stderr
    )
    assert not (tmp_path / "out").exists()
