"""Data-parallel training through each bundle's real ``multi_gpu_train.json``, launched by ``torchrun`` with two
CPU processes (Gloo): the replicas end with equal weights, only rank 0 writes, and each process trained on its
own half of the training set."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.bundle_runner import REPO, monai_bundle_run_args, run_bundle

# Merged last: every rank saves the parameters of every network it trains (the networks of train#resume_objects)
# to bundle_root/rank<R>.pt at the end (then leaves the group). Only parameters: batch-norm buffers follow each
# process's last batch until DDP broadcasts rank 0's.
SAVE_RANK_WEIGHTS = REPO / "tests" / "configs" / "save_rank_weights.json"
WORLD = 2


def torchrun(bundle: str, *overrides, stage: tuple = ("train.json",)) -> subprocess.CompletedProcess:
    """``stage``: the training configs multi_gpu_train.json merges on (train.json, or a stage config)."""
    configs = [*stage, "multi_gpu_train.json", SAVE_RANK_WEIGHTS]
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--standalone"]
    args += monai_bundle_run_args(bundle, configs, overrides)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_replicas_equal(root, networks) -> dict:
    """Rank 1 ended with rank 0's parameters in each of ``networks`` (names in train#resume_objects)."""
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert sorted(ranks[0]) == sorted(ranks[1]) == sorted(networks)
    for network in networks:
        assert ranks[0][network].keys() == ranks[1][network].keys()
        for key in ranks[0][network]:
            assert torch.equal(ranks[0][network][key], ranks[1][network][key]), f"rank 1 differs in {network}.{key}"
    return ranks[0]


def assert_rank0_wrote(models, checkpoint: str, weights: dict) -> dict:
    """Only ``checkpoint`` (the latest state) and model.pt are in ``models`` (one writer, no temporary file), and
    the checkpoint holds the final weights of each network, without DDP's "module." prefix."""
    assert sorted(p.name for p in models.iterdir()) == sorted([checkpoint, "model.pt"])
    saved = torch.load(models / checkpoint, weights_only=True)
    for network, parameters in weights.items():
        for key, value in parameters.items():
            assert torch.equal(saved[network][key], value), f"{network}.{key}"
    return saved


def test_vagan_synchronises_generator_and_critic(tmp_path):
    epochs, epoch_length = 2, 2
    torchrun(
        "vagan",
        ("dataset_dir", str(tmp_path / "data")),
        ("synthetic_params", {"n": 48, "shape": [32, 32], "box": 6, "offset": 9, "jitter": 1}),
        ("bundle_root", str(tmp_path)),
        ("spatial_size", [32, 32]),
        ("batch_size", 4),
        ("epoch_length", epoch_length),
        ("max_epochs", epochs),
        ("critic_steps_boost", 2),
        ("boost_first", 1),
    )
    # the critic trains several times per generator update (its own batches) and is frozen in the generator's
    weights = assert_replicas_equal(tmp_path, ["generator", "critic"])
    saved = assert_rank0_wrote(tmp_path / "models", f"checkpoint_epoch={epochs}.pt", weights)
    assert saved["trainer"]["iteration"] == epochs * epoch_length


def test_icam_synchronises_its_six_networks(tmp_path):
    epochs, epoch_length = 2, 3  # one translation step (encoders, generator, classifier, D) and two D^c steps
    torchrun(
        "icam",
        ("dataset_dir", str(tmp_path / "data")),
        ("synthetic_params", {"spatial_dims": 2, "shape": [32, 32], "n": 24}),
        ("bundle_root", str(tmp_path)),
        ("spatial_size", [32, 32]),
        ("epoch_length", epoch_length),
        ("max_epochs", epochs),
        ("val_n_samples", 3),
        ("fallback_thresholds", [0.5, 0.0]),
    )
    networks = ["content_encoder", "attribute_encoder", "generator", "classifier"]
    weights = assert_replicas_equal(tmp_path, [*networks, "domain_discriminator", "content_discriminator"])
    saved = assert_rank0_wrote(tmp_path / "models", f"checkpoint_epoch={epochs}.pt", weights)
    assert saved["trainer"]["iteration"] == epochs * epoch_length
    best = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert sorted(best) == sorted(networks)  # loads in the single-process inference (no "module." prefix)
    assert all(not key.startswith("module.") for network in networks for key in best[network])


def test_acat_trains_every_stage_on_two_processes(tmp_path):
    common = [
        ("dataset_dir", str(tmp_path / "data")),
        ("synthetic_params", {"n": 30, "shape": [32, 32, 3]}),
        ("bundle_root", str(tmp_path)),
        ("spatial_size", [32, 32, 3]),
        ("max_epochs", 1),
        ("batch_size", 4),
    ]
    models = tmp_path / "models"
    for stage, network in [("train_classifier.json", "classifier"), ("train_autoencoder.json", "autoencoder")]:
        torchrun("acat", *common, stage=(stage,))
        weights = assert_replicas_equal(tmp_path, [network])
        state = torch.load(models / f"{network}_state" / "checkpoint_epoch=1.pt", weights_only=True)
        for key, value in weights[network].items():
            assert torch.equal(state[network][key], value), key
    run_bundle("acat", ["saliency.json"], *common, ("cf_steps", 2))  # one process: inference, no DDP config
    torchrun("acat", *common)  # ACAT itself, fine-tuned from the baseline trained above
    weights = assert_replicas_equal(tmp_path, ["acat"])
    state = torch.load(models / "acat_state" / "checkpoint_epoch=1.pt", weights_only=True)
    for key, value in weights["acat"].items():
        assert torch.equal(state["acat"][key], value), key


def test_tvd_score_trains_every_stage_on_two_processes(tmp_path):
    from tests.test_bundle_tvd_score import SCHEDULE_3D, TINY_3D

    common = [("dataset_dir", str(tmp_path / "data")), ("bundle_root", str(tmp_path)), *TINY_3D, *SCHEDULE_3D]
    adversarial = [("adversarial_weight", 0.1), ("adversarial_warmup_epochs", 0)]  # the patch discriminator too
    stages = [
        ("classifier", [], ["classifier"]),
        ("regressor", [], ["regressor"]),
        ("autoencoder", adversarial, ["autoencoder", "discriminator"]),
        ("diffusion", [], ["diffusion", "diffusion_ema"]),
    ]
    for stage, extra, networks in stages:
        proc = torchrun("tvd_score", *common, *extra, stage=("train.json", f"train_{stage}.json"))
        weights = assert_replicas_equal(tmp_path, networks)
        state = torch.load(tmp_path / "models" / f"{stage}_state" / "checkpoint_epoch=1.pt", weights_only=True)
        for network in networks:
            for key, value in weights[network].items():
                assert torch.equal(state[network][key], value), f"{stage}: {network}.{key}"
    # the latent scale is measured once, on rank 0, and every process trains with it
    scales = [
        line.split("latent scale factor:")[1]
        for line in (proc.stdout + proc.stderr).splitlines()
        if "latent scale" in line
    ]
    assert len(scales) == WORLD and len(set(scales)) == 1, scales


# "running" and "detached": the constrained maps come from a second forward pass of the plain module inside the
# DDP wrapper, whose gradients must be averaged with the rest
@pytest.mark.parametrize("constraint_batch_norm", ["batch", "running", "detached"])
def test_attr_constraint_trains_on_two_processes(tmp_path, constraint_batch_norm):
    epochs, batch = 2, 4
    torchrun(
        "attr_constraint",
        ("dataset_dir", str(tmp_path / "data")),
        ("synthetic_params", {"spatial_dims": 2, "shape": [32, 40], "n": 40}),
        ("bundle_root", str(tmp_path)),
        ("spatial_size", [32, 40]),
        ("batch_size", batch),
        ("max_epochs", epochs),
        ("alpha_A", 10.0),
        ("constraint_batch_norm", constraint_batch_norm),
    )
    # the processes saw different images (their own shard, their own augmentation seed): equal weights at the
    # end mean the gradients were averaged at every step
    # the weight average too: each process averages its own, equal replica
    weights = assert_replicas_equal(tmp_path, ["classifier", "classifier_ema"])["classifier"]
    saved = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert saved == ["checkpoint_epoch=2.pt", "model.pt"]  # one writer: no duplicate, no temporary file left
    checkpoint = torch.load(tmp_path / "models" / "checkpoint_epoch=2.pt", weights_only=True)
    for key, value in weights.items():  # the final weights, without DDP's "module." prefix
        assert torch.equal(checkpoint["classifier"][key], value), key
    n_train = len(json.loads((tmp_path / "data" / "datalist.json").read_text())["training"])
    per_rank = -(-n_train // WORLD) // batch
    assert per_rank < n_train // batch
    assert checkpoint["trainer"]["iteration"] == epochs * per_rank  # each process ran through its shard only


def test_multi_gpu_config_without_torchrun_says_how_to_launch(tmp_path):
    proc = run_bundle(
        "attr_constraint",
        ["train.json", "multi_gpu_train.json"],
        ("dataset_dir", str(tmp_path / "data")),
        ("bundle_root", str(tmp_path)),
        expect_ok=False,
    )
    assert proc.returncode != 0
    assert "are not set; expected a launch by torchrun --nproc_per_node" in proc.stdout + proc.stderr
    assert not (tmp_path / "models").exists()
