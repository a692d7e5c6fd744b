"""TVD-score bundle: the documented pipeline (classifier -> regressor -> diffusion -> evaluate) through the real
configs at tiny size, inference (feature-guided samples), and unit tests of the config glue in common.tvd."""

import ast
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from torch import nn

import common.tvd as tvd
from common.data import load_datalist
from common.diffusion import ConditionalPredictions
from common.engines import latest_checkpoint
from common.errors import DatalistError, InputError
from common.files import EVALUATION_PROGRESS_DIR
from tests import bundle_runner
from tests.bundle_runner import REPO, cli_value

sys.path.insert(0, str(REPO / "benchmarks"))
import tvd_samplers  # noqa: E402
import tvd_sampling_precision  # noqa: E402

FEATURES = ["aspect_ratio", "size"]
CONFIGS = REPO / "bundles" / "tvd_score" / "configs"
# 40 ellipses of 32x32 (the default is 10000), one epoch per network, tiny networks, DDIM with 3 steps,
# 3 values x 4 samples per feature, 50 bootstrap resamples: the whole pipeline takes seconds. The tolerance
# is wide because a regressor trained for one epoch would reject every sample at the paper's 0.3 sd.
TINY = [
    ("synthetic_params", {"n": 40}),
    ("cnn_channels", [4, 4, 4, 4]),
    ("cnn_hidden", 8),
    ("diffusion_channels", [8, 8]),
    ("diffusion_attention_levels", "[False, False]"),  # Python literals: the command line reads JSON false as 'false'
    ("diffusion_norm_groups", 8),
    ("diffusion_head_channels", 8),
    ("num_inference_steps", 3),
    ("rejection_tolerance", 100.0),
]
SCHEDULE = [
    ("classifier_epochs", 1),
    ("regressor_epochs", 1),
    ("diffusion_epochs", 1),
    ("classifier_batch_size", 8),
    ("regressor_batch_size", 8),
    ("diffusion_batch_size", 8),
    ("n_values", 3),
    ("samples_per_value", 4),
    ("sample_batch_size", 4),
    ("bootstrap_resamples", 50),
]


# The 3D latent default at 16^3 (4 mm; the default is 32^3 at 2 mm): 12 subjects (24 ROIs), tiny networks.
TINY_3D = [
    ("synthetic_params", {"n": 12, "shape": [16, 16, 16], "spacing": 4.0}),
    ("spatial_size", [16, 16, 16]),
    ("cnn_channels", [4, 4, 4, 4]),
    ("cnn_hidden", 8),
    ("autoencoder_channels", [8, 8]),
    ("autoencoder_res_blocks", 1),
    ("autoencoder_norm_groups", 8),
    ("diffusion_channels", [8, 8]),
    ("diffusion_attention_levels", "[False, False]"),
    ("diffusion_norm_groups", 8),
    ("diffusion_head_channels", 8),
    ("num_inference_steps", 3),
    ("rejection_tolerance", 100.0),
]
SCHEDULE_3D = [
    ("classifier_epochs", 1),
    ("regressor_epochs", 1),
    ("autoencoder_epochs", 1),
    ("diffusion_epochs", 1),
    ("classifier_batch_size", 4),
    ("regressor_batch_size", 4),
    ("autoencoder_batch_size", 4),
    ("diffusion_batch_size", 4),
    ("n_values", 2),
    ("samples_per_value", 3),
    ("sample_batch_size", 3),
    ("bootstrap_resamples", 50),
]
FEATURES_3D = ["volume", "ventricle_volume"]


def _run_pipeline(root, pipeline_file, sizes, schedule):
    """The documented pipeline command in ``root``; returns (root, the overrides every later run needs)."""
    common = [("dataset_dir", str(root / "data")), ("bundle_root", str(root / "bundle")), *sizes]
    args = [sys.executable, "-m", "common.pipeline", "bundles/tvd_score", "--pipeline", pipeline_file]
    for key, value in [*common, *schedule]:
        args += [f"--{key}", cli_value(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, common


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return _run_pipeline(tmp_path_factory.mktemp("tvd_score"), "pipeline_ellipses.json", TINY, SCHEDULE)


@pytest.fixture(scope="module")
def latent_pipeline(tmp_path_factory):
    return _run_pipeline(tmp_path_factory.mktemp("tvd_score_3d"), "pipeline.json", TINY_3D, SCHEDULE_3D)


def _config(*names) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / name) for name in names])
    return parser


@pytest.mark.parametrize("size", [16, 32])
def test_the_optional_discriminator_fits_the_default_roi(size):
    # a PatchGAN of 3 stride-2 layers has nothing left to convolve on a 16^3 ROI (it failed after the warm-up)
    parser = _config("train.json", "train_autoencoder.json")
    parser.update({"adversarial_weight": 0.01, "spatial_size": [size] * 3, "device": "$torch.device('cpu')"})
    discriminator = parser.get_parsed_content("discriminator")
    with torch.no_grad():
        assert discriminator(torch.zeros(2, 1, size, size, size))[-1].shape[0] == 2


def test_the_ellipses_preset_is_the_papers():
    evaluate = _config("train.json", "evaluate.json", "ellipses.json")
    assert evaluate["features"] == FEATURES and evaluate["synthetic"] == "ellipses"
    assert evaluate["region_features"] == [] and evaluate["latent"] is False
    assert evaluate["num_train_timesteps"] == 1000 and evaluate["beta_schedule"] == "linear_beta"
    assert (evaluate["beta_start"], evaluate["beta_end"]) == (0.0015, 0.0205)  # appendix C.3
    assert evaluate.get_parsed_content("rho") == 0.1 and evaluate["rejection_tolerance"] == 0.3  # Table 9, D.1
    assert evaluate["samples_per_value"] == 200 and evaluate["bootstrap_resamples"] == 5000  # D.1, section 4.3
    assert evaluate["coverage_k"] == [5, 3, 1]  # Table 3
    assert evaluate.get_parsed_content("num_inference_steps") == 50 and evaluate["sampler"] == "ddim"
    # stochastic DDIM, as the paper's DDPM: with eta 0 the size guidance left adversarial pixel noise (docs)
    assert evaluate["ddim_eta"] == 1.0
    evaluate["sampler"] = "ddpm"
    assert evaluate.get_parsed_content("num_inference_steps") == 1000  # the paper's DDPM: every step
    assert evaluate["cnn_channels"] == [32, 64, 64, 64] and evaluate["cnn_hidden"] == 64  # Table 6
    for stage in ("classifier", "regressor", "diffusion"):
        parser = _config("train.json", f"train_{stage}.json", "ellipses.json")
        assert parser[f"{stage}_learning_rate"] == 1e-5  # appendix C.2 / C.3
        assert parser.get_parsed_content("sample_shape") == [1, 32, 32]
    stages = json.loads((CONFIGS / "pipeline_ellipses.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["classifier", "regressor", "diffusion", "evaluate"]
    assert all(s["configs"][0] == "train.json" and s["configs"][-1] == "ellipses.json" for s in stages)


def test_the_3d_default_is_the_papers_latent_set_up():
    evaluate = _config("train.json", "evaluate.json")
    assert evaluate["synthetic"] == "hippocampus_roi" and evaluate["latent"] is True
    assert evaluate["features"] == ["volume", "ventricle_volume"] and evaluate["region_features"] == ["hippocampus"]
    assert (evaluate["intensity"], evaluate["intensity_range"]) == ("percentile", [10.0, 90.0])  # appendix C.1
    # appendix B.4: a shallow autoencoder (x2 down-sampling); CPU-sized by default, with 4 latent channels where
    # the paper has one (one lost the atrophy the classifier reads on the 16^3 phantom; docs, Results) ...
    assert evaluate.get_parsed_content("sample_shape") == [4, 8, 8, 8]
    # ... and the paper's with two ResNet blocks of 32 and 64 channels, one latent channel: "1.2 M learnable parameters"
    evaluate["autoencoder_channels"], evaluate["autoencoder_res_blocks"] = [32, 64], 2
    evaluate["latent_channels"] = 1
    evaluate["autoencoder_norm_groups"] = 32
    autoencoder = evaluate.get_parsed_content("autoencoder_def", lazy=False)
    assert abs(sum(p.numel() for p in autoencoder.parameters()) / 1e6 - 1.2) < 0.05
    rho = evaluate.get_parsed_content("rho")  # Table 9: 0.03 for t > 400, 0.04 for t <= 400
    assert (rho(401), rho(400)) == (0.03, 0.04)
    assert evaluate["region_rho"] == 0.4 and evaluate["rho_per_train_step"] is True  # Table 9 (per DDPM step)
    train = _config("train.json", "train_autoencoder.json")
    assert train["kl_weight"] == 1e-7 and train["perceptual_weight"] == 0.0  # C.4; 1e-3 when the weights exist
    stages = json.loads((CONFIGS / "pipeline.json").read_text())["stages"]
    assert [s["name"] for s in stages] == ["classifier", "regressor", "autoencoder", "diffusion", "evaluate"]
    assert all(s["configs"][0] == "train.json" for s in stages)


def test_every_stage_writes_its_model(pipeline):
    root, _ = pipeline
    models = root / "bundle" / "models"
    for name in ("classifier.pt", "regressor.pt", "diffusion.pt"):
        state = torch.load(models / name, map_location="cpu", weights_only=True)
        assert state and all(isinstance(v, torch.Tensor) for v in state.values()), name
    stats = json.loads((models / "regressor_stats.json").read_text())
    assert stats["features"] == FEATURES and all(sd > 0 for sd in stats["sd"])
    train = load_datalist(root / "data" / "datalist.json", "training")
    assert stats["n"] == len(train)
    np.testing.assert_allclose(stats["mean"], [np.mean([i[f] for i in train]) for f in FEATURES])
    times = json.loads((root / "bundle" / "pipeline_times.json").read_text())
    assert set(times) == {"classifier", "regressor", "diffusion", "evaluate", "total"}


def test_the_diffusion_model_used_for_sampling_is_the_moving_average_of_the_trained_one(pipeline):
    root, _ = pipeline
    models = root / "bundle" / "models"
    sampled = torch.load(models / "diffusion.pt", map_location="cpu", weights_only=True)
    (state_file,) = (models / "diffusion_state").glob("*.pt")
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    assert sampled.keys() == state["diffusion_ema"].keys() == state["diffusion"].keys()
    for name, weights in sampled.items():
        torch.testing.assert_close(weights, state["diffusion_ema"][name])
    # the average lags the online weights: after a few updates they differ
    assert any(not torch.equal(sampled[n], state["diffusion"][n]) for n in sampled if sampled[n].is_floating_point())


def test_diffusion_training_resumes_with_its_moving_average(pipeline, tmp_path):
    root, common = pipeline
    bundle = tmp_path / "bundle"
    shutil.copytree(root / "bundle" / "models", bundle / "models")
    (state_file,) = (bundle / "models" / "diffusion_state").glob("*.pt")
    before = torch.load(state_file, map_location="cpu", weights_only=True)
    overrides = dict([*common, *TINY, *SCHEDULE])
    overrides.update(bundle_root=str(bundle), diffusion_epochs=2, resume=True)
    stage = ["train.json", "train_diffusion.json", "ellipses.json"]
    proc = bundle_runner.run_bundle("tvd_score", stage, *overrides.items())
    log = proc.stdout + proc.stderr
    assert "Epoch: 2/2" in log and "Epoch: 1/2" not in log
    state_file = latest_checkpoint(bundle / "models" / "diffusion_state")
    assert state_file.endswith("checkpoint_epoch=2.pt")
    after = torch.load(state_file, map_location="cpu", weights_only=True)
    assert after["trainer"]["epoch_length"] * 2 == after["trainer"]["iteration"]
    sampled = torch.load(bundle / "models" / "diffusion.pt", map_location="cpu", weights_only=True)
    moved = [n for n, w in sampled.items() if w.is_floating_point() and not torch.equal(w, before["diffusion_ema"][n])]
    assert moved  # the average continued from the checkpoint's, with the second epoch's updates
    for name, weights in sampled.items():
        torch.testing.assert_close(weights, after["diffusion_ema"][name])


def test_the_latent_pipeline_trains_every_network_and_scores_features_and_the_region(latent_pipeline):
    root, _ = latent_pipeline
    models = root / "bundle" / "models"
    for name in ("classifier.pt", "regressor.pt", "autoencoder.pt", "diffusion.pt"):
        state = torch.load(models / name, map_location="cpu", weights_only=True)
        assert state and all(isinstance(v, torch.Tensor) for v in state.values()), name
    scale = json.loads((models / "latent_scale.json").read_text())["scale_factor"]
    assert math.isfinite(scale) and scale > 0
    times = json.loads((root / "bundle" / "pipeline_times.json").read_text())
    assert set(times) == {"classifier", "regressor", "autoencoder", "diffusion", "evaluate", "total"}
    out = root / "bundle" / "eval"
    report = json.loads((out / "tvd_scores.json").read_text())
    test = load_datalist(root / "data" / "datalist.json", "test")
    assert list(report["features"]) == [*FEATURES_3D, "hippocampus"]
    for feature, scores in report["features"].items():
        assert math.isfinite(scores["global_score"]) and scores["global_score"] <= 1.0, feature
        assert scores["class_balanced"] is True and math.isfinite(scores["global_score_unbalanced"])  # Table 2
        assert scores["kept_per_value"] == [3, 3], feature
        assert (out / f"local_scores_{feature}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    region = report["features"]["hippocampus"]
    # the region's values are the kept items' hippocampal volumes, for the plot against the volume
    assert region["order_feature"] == "volume"
    assert region["values"] == [test[i]["volume"] for i in region["test_item_indices"]]
    assert report["settings"]["latent"] is True and report["settings"]["latent_scale"] == pytest.approx(scale)
    # the checks against the real test split: the latent space's classes, the data-alone scores
    checks = report["test"]
    assert 0.0 <= checks["reconstruction_predicted_positive_rate"] <= 1.0
    assert 0.0 <= checks["reconstruction_class_agreement"] <= 1.0
    assert set(checks["data_scores"]) == set(FEATURES_3D)
    assert "autoencoder reconstructions of the test split" in (out / "tvd_scores.md").read_text()
    assert report["settings"]["rho"] == "piecewise_rho(0.03, 0.04, 400)"


def test_roi_inference_keeps_the_inputs_space_and_reports_local_scores(latent_pipeline, tmp_path):
    root, common = latent_pipeline
    item = load_datalist(root / "data" / "datalist.json", "test")[0]
    image, mask = nib.load(item["image"]), nib.load(item["mask"])
    # a non-RAS, anisotropic affine: the samples must come back in exactly this space
    scan, roi_mask = tmp_path / "roi.nii.gz", tmp_path / "roi_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[:, ::-1], bundle_runner.LPS), scan)
    nib.save(nib.Nifti1Image(np.asarray(mask.dataobj)[:, ::-1], bundle_runner.LPS), roi_mask)
    for name, mask_arg in (("region", str(roi_mask)), ("volume", "")):
        out = tmp_path / name
        bundle_runner.run_bundle(
            "tvd_score",
            ["train.json", "inference.json"],
            *[(k, v) for k, v in common if k != "rejection_tolerance"],
            ("input_image", str(scan)),
            ("input_mask", mask_arg),
            ("n_samples", 2),
            ("output_dir", str(out)),
        )
        summary = json.loads((out / "roi_tvd.json").read_text())
        assert summary["constraint"]["kind"] == ("region" if mask_arg else "feature")
        assert set(summary["input_features"]) == set(FEATURES_3D)
        # the region's local score is looked up at the ROI's hippocampal volume either way
        assert set(summary["local_scores_at_input"]) == {*FEATURES_3D, "hippocampus"}
        assert all(s is None or s <= 1.0 for s in summary["local_scores_at_input"].values())
        for i in range(2):
            sample = nib.load(out / f"roi_sample_{i:03d}.nii.gz")
            assert sample.shape == image.shape
            np.testing.assert_allclose(sample.affine, bundle_runner.LPS, atol=1e-5)
        assert len(list(csv.DictReader(open(out / "roi_samples.csv")))) == 2
        assert (out / "roi_samples.png").stat().st_size > 500


def test_evaluation_reports_both_features_with_finite_scores(pipeline):
    root, _ = pipeline
    out = root / "bundle" / "eval"
    report = json.loads((out / "tvd_scores.json").read_text())
    test = load_datalist(root / "data" / "datalist.json", "test")
    assert list(report["features"]) == FEATURES
    for feature, scores in report["features"].items():
        assert math.isfinite(scores["global_score"]) and scores["global_score"] <= 1.0
        assert scores["class_balanced"] is False and math.isfinite(scores["global_score_class_balanced"])
        assert len(scores["local_scores"]) == scores["n_values"] == 3
        assert all(math.isfinite(s) and s <= 1.0 for s in scores["local_scores"])
        assert scores["bootstrap_variance_global"] >= 0.0 and scores["bootstrap_variance_local"] >= 0.0
        assert scores["kept_per_value"] == [4, 4, 4] and scores["kept_total"] == 12
        # the values are test items' own values of the feature, sorted
        assert scores["target_values"] == sorted(scores["target_values"])
        assert scores["target_values"] == [test[i][feature] for i in scores["test_item_indices"]]
        assert (out / f"local_scores_{feature}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["test"]["n_test"] == len(test) and 0.0 <= report["test"]["classifier_accuracy"] <= 1.0
    assert set(report["test"]["regressor_r2"]) == set(FEATURES)
    assert set(report["coverage"]) == {*FEATURES, "plain"}
    for coverage in report["coverage"].values():
        assert set(coverage) == {"k=5", "k=3", "k=1"}
        assert all(0.0 <= c <= 1.0 for c in coverage.values())
    assert report["settings"]["sampler"] == "ddim" and report["settings"]["rho"] == 0.1
    markdown = (out / "tvd_scores.md").read_text()
    assert all(f"| {f} |" in markdown for f in FEATURES) and "plain (unguided)" in markdown


def test_sampling_amp_reaches_the_samplers_and_the_report(pipeline):
    root, common = pipeline
    overrides = {k: ast.literal_eval(v) if k == "diffusion_attention_levels" else v for k, v in common}
    assert _config("train.json", "evaluate.json")["sampling_amp"] is False  # opt-in: it moves samples (docs)
    for amp in (False, True):
        evaluate = _config("train.json", "evaluate.json", "ellipses.json")
        evaluate.update({**overrides, "sampling_amp": amp})
        assert evaluate.get_parsed_content("evaluate#sample_fn")("size").amp is amp
        assert evaluate.get_parsed_content("evaluate#settings")["sampling_amp"] is amp  # so in the run key too
        inference = _config("train.json", "inference.json", "ellipses.json")
        inference.update({**overrides, "sampling_amp": amp, "feature": "size", "value": 100.0})
        assert inference.get_parsed_content("inferer").amp is amp
        assert inference.get_parsed_content("inference#sampler_kwargs")["amp"] is amp  # roi_inference's samplers


def test_a_stopped_evaluation_resumes_from_its_sampling_records(pipeline, tmp_path):
    """Stopped after both features' conditional sampling (the unguided sampling made to fail), then run with
    ``--resume True``: the features come from the records (a record's drawn counts, doubled on purpose, halve
    its feature's reported acceptance) and everything else equals the evaluation that never stopped."""
    root, common = pipeline
    out = tmp_path / "eval"
    configs = ["train.json", "evaluate.json", "ellipses.json"]
    overrides = [*common, *SCHEDULE, ("output_dir", str(out))]
    records = out / EVALUATION_PROGRESS_DIR
    records.mkdir(parents=True)
    (records / "plain.pt").write_bytes(b"an older run's record")  # a run without resume starts without them
    stopped = bundle_runner.run_bundle("tvd_score", configs, *overrides, ("evaluate#plain", "$1 / 0"), expect_ok=False)
    assert stopped.returncode != 0 and "ZeroDivisionError" in stopped.stderr
    assert sorted(p.name for p in records.iterdir()) == ["conditional_aspect_ratio.pt", "conditional_size.pt"]
    assert not (out / "tvd_scores.json").exists()
    record = torch.load(records / "conditional_size.pt", weights_only=True)
    assert record["done"] == 3
    record["drawn"] = record["drawn"] * 2
    torch.save(record, records / "conditional_size.pt")

    bundle_runner.run_bundle("tvd_score", configs, *overrides, ("resume", True))
    resumed = json.loads((out / "tvd_scores.json").read_text())
    whole = json.loads((root / "bundle" / "eval" / "tvd_scores.json").read_text())
    assert not records.exists()  # the records go once the report is written
    size, whole_size = resumed["features"].pop("size"), whole["features"].pop("size")
    assert size["acceptance_per_value"] == pytest.approx([a / 2 for a in whole_size["acceptance_per_value"]])
    assert size["local_scores"] == whole_size["local_scores"]
    assert resumed["features"] == whole["features"] and resumed["coverage"] == whole["coverage"]


def _benchmark_bundle_args(pipeline) -> list[str]:
    """The tiny bundle for the sampler benchmarks: its root, preset and sizes (``--set``)."""
    root, common = pipeline
    # the benchmarks set the steps themselves (50 DDIM, 1000 DDPM)
    skip = ("bundle_root", "rejection_tolerance", "num_inference_steps")
    settings = [f"{k}={cli_value(v)}" for k, v in common if k not in skip]
    settings.append("rejection_tolerance=100.0")
    args = ["--bundle_root", str(root / "bundle"), "--preset", "ellipses.json"]
    for setting in settings:
        args += ["--set", setting]
    return args


def _sampler_benchmark_args(pipeline, out) -> list[str]:
    args = [*_benchmark_bundle_args(pipeline), "--n_values", "1"]
    return args + ["--samples_per_value", "2", "--batch", "2", "--out", str(out)]


def test_sampler_benchmark_times_both_samplers_and_compares_their_scores(pipeline, tmp_path):
    out = tmp_path / "tvd_samplers.md"
    assert tvd_samplers.main(_sampler_benchmark_args(pipeline, out)) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert all(t > 0 for t in result["seconds_per_sample"].values())  # the speed itself is the benchmark's job
    for sampler, steps in (("ddim", 50), ("ddpm", 1000)):  # each evaluation ran with its own sampler and steps
        settings = json.loads((tmp_path / "tvd_samplers_runs" / sampler / "tvd_scores.json").read_text())["settings"]
        assert (settings["sampler"], settings["num_inference_steps"]) == (sampler, steps)
    for sampler in ("ddim", "ddpm"):
        assert set(result["evaluations"][sampler]["features"]) == set(FEATURES)
    text = out.read_text()
    assert "DDPM / DDIM time per sample" in text and all(f"| {f} |" in text for f in FEATURES)


@pytest.mark.filterwarnings("ignore:DDPM sampling with 4 < 1000 steps")  # expected: 4 steps are for speed here
def test_sampler_benchmark_goes_on_after_a_stop(pipeline, tmp_path, monkeypatch):
    """Stopped during the DDPM evaluation (after its conditional sampling, as a kill would), the same command goes
    on: the timing and the finished DDIM evaluation are kept, the DDPM one resumes from its sampling records, its
    time is the sum of both pieces; other arguments are refused. (4 sampling steps for both samplers: the
    continuation is under test, not the samplers, which the test above runs at their 50 and 1000 steps.)"""
    out = tmp_path / "tvd_samplers.md"
    monkeypatch.setattr(tvd_samplers, "SAMPLERS", {"ddim": 4, "ddpm": 4})
    args = [*_sampler_benchmark_args(pipeline, out), "--set", "num_inference_steps=4"]
    runs, real_run_stage, commands = tmp_path / "tvd_samplers_runs", tvd_samplers.run_stage, []

    def killed_in_ddpm(command, note, **popen):
        commands.append(command)
        if "ddpm" not in command:
            return real_run_stage(command, note, **popen)
        _, seconds = real_run_stage([*command, "--evaluate#plain", "$1 / 0"], note, **popen)
        return -signal.SIGKILL, seconds

    monkeypatch.setattr(tvd_samplers, "run_stage", killed_in_ddpm)
    with pytest.raises(subprocess.CalledProcessError):
        tvd_samplers.main(args)
    first = json.loads((runs / "progress.json").read_text())
    assert first["evaluations"]["ddim"]["finished"] and not first["evaluations"]["ddpm"]["finished"]
    assert len(list((runs / "ddpm" / EVALUATION_PROGRESS_DIR).glob("conditional_*.pt"))) == 2
    ddim_report = (runs / "ddim" / "tvd_scores.json").stat().st_mtime_ns

    commands.clear()
    monkeypatch.setattr(
        tvd_samplers,
        "run_stage",
        lambda command, note, **popen: commands.append(command) or real_run_stage(command, note, **popen),
    )
    assert tvd_samplers.main(args) == 0
    assert len(commands) == 1 and "ddpm" in commands[0]  # neither the timing nor DDIM again
    assert commands[0][commands[0].index("--resume") + 1] == "True"
    assert (runs / "ddim" / "tvd_scores.json").stat().st_mtime_ns == ddim_report
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["seconds_per_sample"] == first["seconds_per_sample"]
    assert result["evaluations"]["ddpm"]["pieces"] == 2
    assert result["evaluations"]["ddpm"]["wall_s"] > first["evaluations"]["ddpm"]["seconds"]
    assert "(in 2 pieces)" in out.read_text()
    assert not (runs / "progress.json").exists()  # finished: the same command would measure afresh

    with pytest.raises(subprocess.CalledProcessError):  # stopped again, in DDPM: other arguments are refused
        monkeypatch.setattr(tvd_samplers, "run_stage", killed_in_ddpm)
        tvd_samplers.main(args)
    with pytest.raises(InputError, match="progress.json: the record of a run with other arguments .*batch"):
        tvd_samplers.main([*args, "--batch", "3"])


def test_precision_benchmark_pairs_float32_and_bfloat16_samples(pipeline, tmp_path):
    args = [*_benchmark_bundle_args(pipeline), "--n_values", "2", "--samples", "3", "--control"]
    assert tvd_sampling_precision.main([*args, "--out", str(tmp_path / "precision.md")]) == 0
    result = json.loads((tmp_path / "precision.json").read_text())
    assert set(result["features"]) == set(FEATURES)
    runs = ["float32", "bfloat16 autocast", "float32, 1 thread"]
    for f in result["features"].values():
        assert f["pairs"] == 2 * 3 and len(f["values"]) == 2
        assert list(f["against_float32"]) == runs[1:] and list(f["positive_rate"]) == runs
        for c in f["against_float32"].values():
            assert 0.0 <= c["same_decision"] <= 1.0 and 0.0 <= c["same_keep"] <= 1.0
        # the pairs share x_T and every step's noise: bfloat16 changes them, yet not to infinity
        bf16 = f["against_float32"]["bfloat16 autocast"]
        assert 0.0 < bf16["g_difference_sd_mean"] <= bf16["g_difference_sd_max"] < float("inf")
    assert list(result["seconds_per_sample"]) == runs and all(s > 0 for s in result["seconds_per_sample"].values())
    assert "float32 / bfloat16 time per sample" in (tmp_path / "precision.md").read_text()


def test_sampler_agreement_needs_the_whole_interval_inside_the_margin():
    agreement = tvd_samplers.agreement
    assert agreement(0.01, 0.01) == "yes"  # 0.01 + 1.645 * 0.01 < 0.05
    assert agreement(-0.01, 0.01) == "yes"
    assert agreement(0.0, 0.04) == "not resolved"  # equal scores, but too few samples to exclude 0.05
    assert agreement(0.04, 0.01) == "not resolved"
    assert agreement(0.10, 0.01) == "no"
    assert agreement(-0.10, 0.01) == "no"


def test_inference_writes_guided_samples_and_their_features(pipeline, tmp_path):
    root, common = pipeline
    out = tmp_path / "out"
    overrides = [(k, v) for k, v in common if k != "rejection_tolerance"]
    bundle_runner.run_bundle(
        "tvd_score",
        ["train.json", "inference.json", "ellipses.json"],
        *overrides,
        ("feature", "aspect_ratio"),
        ("value", 2.5),
        ("n_samples", 3),
        ("output_dir", str(out)),
    )
    rows = list(csv.DictReader(open(out / "samples_aspect_ratio_2.5.csv")))
    assert len(rows) == 3
    assert {"aspect_ratio", "size", "predicted_class", "probability_0", "probability_1", "within_tolerance"} <= set(
        rows[0]
    )
    assert all(abs(float(r["probability_0"]) + float(r["probability_1"]) - 1.0) < 1e-5 for r in rows)
    image = nib.load(out / "samples_aspect_ratio_2.5_000.nii.gz")
    assert image.shape == (32, 32)
    assert (out / "samples_aspect_ratio_2.5.png").stat().st_size > 500


# --- common.tvd glue -----------------------------------------------------------------------------------------


def _items(n=20, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"image": f"{i}.nii.gz", "label": int(i % 2), "aspect_ratio": float(rng.uniform(1, 4)), "size": float(i * 3)}
        for i in range(n)
    ]


def test_standardised_targets_use_the_training_statistics():
    items = _items()
    stats = tvd.feature_statistics(items, FEATURES)
    targets = np.array([i["target"] for i in tvd.with_targets(items, FEATURES, stats)])
    np.testing.assert_allclose(targets.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(targets.std(0, ddof=1), 1.0)
    # the order of the regressor's outputs is the statistics', whatever order is asked for
    swapped = np.array([i["target"] for i in tvd.with_targets(items, FEATURES[::-1], stats)])
    np.testing.assert_allclose(swapped, targets[:, ::-1])
    with pytest.raises(InputError, match="constant"):
        tvd.feature_statistics([{**i, "size": 1.0} for i in items], FEATURES)


def test_statistics_round_trip_and_unknown_features(tmp_path):
    path = tmp_path / "stats.json"
    written = tvd.write_feature_statistics(path, _items(), FEATURES)
    read = tvd.read_feature_statistics(path, ["size"])
    assert read == written and read.sd_of("size") == written.sd[1]
    with pytest.raises(InputError, match="volume"):
        tvd.read_feature_statistics(path, ["volume"])
    with pytest.raises(InputError, match="train_regressor.json"):
        tvd.read_feature_statistics(tmp_path / "missing.json")


def test_guidance_target_is_standardised(monkeypatch):
    calls = []
    monkeypatch.setattr(tvd, "guided_sample", lambda *a, **k: calls.append((a, k)) or torch.zeros(a[2]))
    guide = nn.Identity()
    sampler = tvd.FeatureSampler("model", "scheduler", (1, 4, 4), guide=guide, mean=2.0, sd=0.5, rho=0.1)
    out = sampler(3, torch.full((3,), 3.0), None)
    (args, kwargs) = calls[-1]
    assert out.shape == (3, 1, 4, 4) and args[2] == (3, 1, 4, 4)
    torch.testing.assert_close(kwargs["target"], torch.full((3,), 2.0))  # (3 - 2) / 0.5
    assert kwargs["feature_fn"] is guide and kwargs["rho"] == 0.1
    sampler(2, None, None)  # the coverage baseline: unguided
    assert calls[-1][1]["feature_fn"] is None and calls[-1][1]["rho"] == 0.0 and calls[-1][1]["target"] is None


def test_feature_sampler_guides_by_the_standardised_regressor_output():
    stats = tvd.FeatureStatistics(FEATURES, [2.0, 60.0], [0.5, 20.0], 10)
    regressor = nn.Linear(3, 2)
    sampler = tvd.feature_sampler("model", "scheduler", (3,), regressor, stats, "size", rho=0.1)
    assert (sampler.mean, sampler.sd) == (60.0, 20.0)
    x = torch.randn(4, 3)
    with torch.no_grad():
        torch.testing.assert_close(sampler.guide(x), regressor(x)[:, 1])
        g = tvd.feature_output(regressor, stats, "size", standardised=False)(x)
        torch.testing.assert_close(g, regressor(x)[:, 1] * 20.0 + 60.0)
        torch.testing.assert_close(tvd.FeatureOutputs(regressor, stats, FEATURES)(x)[:, 1], g)
    assert tvd.feature_sampler("model", "scheduler", (3,)).guide is None


def test_values_come_from_the_test_split():
    items = _items(n=30)
    for selection in ("quantiles", "random"):
        chosen = tvd.feature_values(items, "aspect_ratio", 7, selection, seed=3)
        assert len(set(chosen.indices.tolist())) == 7
        assert chosen.values.tolist() == [items[i]["aspect_ratio"] for i in chosen.indices]
        assert chosen.values.tolist() == sorted(chosen.values.tolist())
        assert chosen.classes.tolist() == [items[i]["label"] for i in chosen.indices]
    # quantiles: the items of rank floor((j + 0.5) N / n) in sorted order
    ranked = sorted(i["size"] for i in items)
    assert tvd.feature_values(items, "size", 3).values.tolist() == [ranked[5], ranked[15], ranked[25]]
    same = tvd.feature_values(items, "size", 5, "random", seed=1).indices
    assert same.tolist() == tvd.feature_values(items, "size", 5, "random", seed=1).indices.tolist()
    with pytest.raises(InputError, match="n_values=31"):
        tvd.feature_values(items, "size", 31)
    with pytest.raises(InputError, match="value_selection"):
        tvd.feature_values(items, "size", 3, "grid")


def test_items_without_a_feature_are_named(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), tmp_path / "a.nii.gz")
    item = {"image": "a.nii.gz", "label": 1, "aspect_ratio": 2.0}
    (tmp_path / "datalist.json").write_text(json.dumps({"test": [item]}))
    with pytest.raises(DatalistError, match=r"test\[0\] .*a.nii.gz.*'size' missing"):
        tvd.load_items(tmp_path / "datalist.json", "test", FEATURES)
    (tmp_path / "datalist.json").write_text(json.dumps({"test": [{**item, "size": "big"}]}))
    with pytest.raises(DatalistError, match="'size' 'big' is not a finite number"):
        tvd.load_items(tmp_path / "datalist.json", "test", FEATURES)


def _result(kept, embeddings=True):
    preds = [np.array([0, 1] * (k // 2) + [0] * (k % 2)) for k in kept]
    return ConditionalPredictions(
        values=np.arange(len(kept), dtype=np.float64),
        predictions=preds,
        features=[np.full(k, 1.0) for k in kept],
        embeddings=[np.random.default_rng(k).normal(size=(k, 2)) for k in kept] if embeddings else None,
        drawn=np.full(len(kept), 4),
        accepted=np.array(kept),
        kept=np.array(kept),
        rounds=np.ones(len(kept), dtype=np.int64),
        samples_per_value=4,
    )


def test_a_feature_without_kept_samples_still_reports(tmp_path):
    values = tvd.FeatureValues("size", np.array([1.0, 2.0]), np.array([0, 1]), np.array([0, 1]), "quantiles")
    empty = tvd.score_feature(_result([0, 0]), values, [0, 1, 0, 1], n_resamples=10)
    assert empty["global_score"] is None and "no sample within the rejection tolerance" in empty["error"]
    assert tvd.coverage_of(_result([0, 0]), np.zeros((8, 2)), [5, 3, 1]) is None
    scores = tvd.score_feature(_result([4, 2]), values, [0, 1, 0, 1], n_resamples=10)
    assert scores["global_score"] == pytest.approx(0.0) and scores["kept_feature_mean"] == [1.0, 1.0]
    # the other global score comes along: class-balanced here, plain when the evaluation is class-balanced
    from common.metrics.tvd import global_tvd_score

    groups = [_result([4, 2]).predictions[i] for i in (0, 1)]
    assert scores["global_score_class_balanced"] == pytest.approx(global_tvd_score(groups, [0, 1, 0, 1], [0, 1]))
    balanced = tvd.score_feature(_result([4, 2]), values, [0, 1, 0, 1], class_balanced=True, n_resamples=10)
    assert balanced["global_score_unbalanced"] == pytest.approx(scores["global_score"])
    assert balanced["global_score"] == pytest.approx(scores["global_score_class_balanced"])
    # k must stay below the number of real samples: k=5 is left out with 5 test items
    assert set(tvd.coverage_of(_result([4, 2]), np.random.default_rng(0).normal(size=(5, 2)), [5, 3, 1])) == {
        "k=3",
        "k=1",
    }
    assert tvd.plain_sample_count({"a": scores, "b": empty}) == 6
    report = tvd.write_report(
        tmp_path, {"size": scores, "aspect_ratio": empty}, {"size": None}, {}, {"rho": 0.1}, _items(), ["a", "b"]
    )
    assert report["features"]["aspect_ratio"]["global_score"] is None
    assert (tmp_path / "local_scores_size.png").is_file() and not (tmp_path / "local_scores_aspect_ratio.png").exists()
    assert "| aspect_ratio | n/a |" in (tmp_path / "tvd_scores.md").read_text()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_test_summary_and_network_loading(tmp_path):
    items = _items(n=6)
    truth = np.array([[i[f] for f in FEATURES] for i in items])
    reference = {"classes": np.array([i["label"] for i in items]), "features": truth}
    summary = tvd.test_summary(reference, items, FEATURES)
    assert summary["classifier_accuracy"] == 1.0 and summary["regressor_r2"] == {"aspect_ratio": 1.0, "size": 1.0}
    assert summary["plain_predicted_positive_rate"] is None
    # the score from the data alone: predictions that follow the size exactly, two bins of size
    by_size = {**reference, "classes": np.array([int(i["size"] >= 9) for i in items])}
    data = tvd.test_summary(by_size, items, FEATURES, n_bins=2)["data_scores"]
    assert data["size"]["global_score"] == pytest.approx(1.0) and data["aspect_ratio"]["global_score"] < 1.0
    assert tvd.test_summary(by_size, items, FEATURES, n_bins=1)["data_scores"]["size"]["global_score"] == 0.0
    with pytest.raises(InputError, match="classifier checkpoint not found"):
        tvd.load_network(nn.Linear(2, 2), tmp_path / "classifier.pt", "classifier")
    net = nn.Linear(2, 2)
    torch.save({"classifier": net.state_dict()}, tmp_path / "wrapped.pt")
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    for name in ("wrapped.pt", "bare.pt"):
        loaded = tvd.load_network(nn.Linear(2, 2), tmp_path / name, "classifier")
        torch.testing.assert_close(loaded.weight, net.weight)
        assert not loaded.training


def test_inference_arguments_are_checked():
    tvd.check_target(None, None, FEATURES)
    with pytest.raises(InputError, match="unknown; expected one of"):
        tvd.check_target("volume", 1.0, FEATURES)
    with pytest.raises(InputError, match="needs --value"):
        tvd.check_target("size", None, FEATURES)
    with pytest.raises(InputError, match="without --feature"):
        tvd.check_target(None, 2.0, FEATURES)
    with pytest.raises(InputError, match="sampler 'euler'"):
        tvd.sampling_scheduler("euler")
    with pytest.raises(InputError, match="coverage_embedding"):
        tvd.embedding("vgg16")


def test_preprocessing_is_flat_so_the_cache_holds_it():
    from monai.transforms import Compose

    chain = tvd.preprocessing(2, [32, 32], target_key="target")
    assert not any(isinstance(t, Compose) for t in chain.transforms)  # a nested Compose counts as random
    assert chain.get_index_of_first(lambda t: isinstance(t, Compose)) is None
