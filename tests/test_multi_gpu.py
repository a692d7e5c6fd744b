"""Data-parallel training through each bundle's real ``multi_gpu_train.json``, launched by ``torchrun`` with two
CPU processes (Gloo): the replicas end with equal weights, only rank 0 writes, and each process trained on its
own half of the training set."""

import json
import os
import subprocess
import sys

import torch

from tests.bundle_runner import REPO, monai_bundle_run_args, run_bundle

# Merged last: every rank saves its network's parameters to bundle_root/rank<R>.pt at the end (then leaves the
# group). Only parameters: batch-norm buffers follow each process's last batch until DDP broadcasts rank 0's.
SAVE_RANK_WEIGHTS = REPO / "tests" / "configs" / "save_rank_weights.json"
WORLD = 2


def torchrun(bundle: str, *overrides) -> subprocess.CompletedProcess:
    configs = ["train.json", "multi_gpu_train.json", SAVE_RANK_WEIGHTS]
    args = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--standalone"]
    args += monai_bundle_run_args(bundle, configs, overrides)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_replicas_equal(root) -> dict:
    ranks = [torch.load(root / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert ranks[0].keys() == ranks[1].keys()
    for key in ranks[0]:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"rank 1 differs from rank 0 in {key}"
    return ranks[0]


def test_attr_constraint_trains_on_two_processes(tmp_path):
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
    )
    # the processes saw different images (their own shard, their own augmentation seed): equal weights at the
    # end mean the gradients were averaged at every step
    weights = assert_replicas_equal(tmp_path)
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
