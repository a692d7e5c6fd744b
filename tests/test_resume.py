"""Training killed with SIGKILL resumes from its latest checkpoint (counters and optimiser state continue), and a
kill in the middle of a checkpoint write leaves the previous checkpoint loadable."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.bundle_runner import REPO, monai_bundle_run_args, run_bundle

SLOW_CHECKPOINT = REPO / "tests" / "configs" / "slow_checkpoint.json"
EPOCHS, BATCH = 4, 4


def _attr_constraint(root: Path) -> list:
    return [
        ("dataset_dir", str(root / "data")),
        ("synthetic_params", {"spatial_dims": 2, "shape": [32, 40], "n": 40}),
        ("bundle_root", str(root / "bundle")),
        ("spatial_size", [32, 40]),
        ("batch_size", BATCH),
        ("max_epochs", EPOCHS),
        ("alpha_A", 10.0),
    ]


def _start(configs: list[str], overrides: list) -> subprocess.Popen:
    args = [sys.executable, *monai_bundle_run_args("attr_constraint", configs, overrides)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the training ended before it could be killed"
        assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _epochs_on_disk(models: Path) -> list[int]:
    return sorted(int(p.stem.split("=")[1]) for p in models.glob("checkpoint_epoch=*.pt"))


def _resume_and_check(root: Path, overrides: list, killed_at: int) -> None:
    """Resume to EPOCHS; the run restarts after epoch ``killed_at`` and ends with the counters of an unbroken run."""
    proc = run_bundle("attr_constraint", ["train.json"], *overrides, ("resume", True))
    log = proc.stdout + proc.stderr
    assert f"Epoch: {killed_at + 1}/{EPOCHS}" in log and f"Epoch: {killed_at}/{EPOCHS}," not in log
    models = root / "bundle" / "models"
    # the resumed run removed its own older checkpoints once newer ones were saved (ignite's Checkpoint does not
    # know the files of the killed run: the one it resumed from stays)
    assert _epochs_on_disk(models) == [killed_at, EPOCHS]
    assert (models / "model.pt").is_file()  # the best model, replaced in place, never removed
    final = torch.load(models / f"checkpoint_epoch={EPOCHS}.pt", weights_only=True)
    n_train = len(json.loads((root / "data" / "datalist.json").read_text())["training"])
    iterations = EPOCHS * (n_train // BATCH)
    assert final["trainer"]["iteration"] == iterations
    # Adam's per-parameter step counts carried over the kill: a fresh optimiser would count only the resumed steps
    steps = {float(state["step"]) for state in final["optimizer"]["state"].values()}
    assert steps == {float(iterations)}


def test_sigkill_during_training_resumes_from_the_latest_checkpoint(tmp_path):
    overrides = _attr_constraint(tmp_path)
    models = tmp_path / "bundle" / "models"
    proc = _start(["train.json"], overrides)
    _kill_when(proc, lambda: models.is_dir() and 2 in _epochs_on_disk(models))
    killed_at = max(_epochs_on_disk(models))
    assert killed_at < EPOCHS
    _resume_and_check(tmp_path, overrides, killed_at)


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    overrides = _attr_constraint(tmp_path)
    models = tmp_path / "bundle" / "models"
    marker = tmp_path / "writing"
    proc = _start(["train.json", str(SLOW_CHECKPOINT)], [*overrides, ("slow_checkpoint_marker", str(marker))])
    _kill_when(proc, marker.exists)  # the second trainer checkpoint (epoch 2) is half-written on disk
    assert _epochs_on_disk(models) == [1]  # the half-written file never got a checkpoint's name
    assert any(p.name.startswith("tmp") for p in models.iterdir())  # the interrupted write
    assert torch.load(models / "checkpoint_epoch=1.pt", weights_only=True)["trainer"]["iteration"] > 0
    _resume_and_check(tmp_path, overrides, killed_at=1)


# Merged on train.json: the run stops (ignite's terminate) at the end of epoch ``stop_after_epoch``, after the
# epoch's checkpoint is written, as a run killed then would; max_epochs (and the schedules made from it) unchanged.
STOP_AFTER_EPOCH = REPO / "tests" / "configs" / "stop_after_epoch.json"


def test_a_resumed_run_continues_the_random_sequence_of_the_uninterrupted_one(tmp_path):
    """Data order, augmentation and every other draw continue where the stopped run left them: a run stopped after
    epoch 2 of 3 and resumed ends with the same weights, to the bit, as one that ran the 3 epochs at once."""
    epochs = 3
    last = f"checkpoint_epoch={epochs}.pt"

    def train(root: Path, configs, *extra) -> Path:
        overrides = dict(_attr_constraint(root))
        overrides["max_epochs"] = epochs
        run_bundle("attr_constraint", configs, *overrides.items(), *extra)
        return root / "bundle" / "models"

    straight = torch.load(train(tmp_path / "straight", ["train.json"]) / last, weights_only=True)
    stopped = train(tmp_path / "resumed", ["train.json", STOP_AFTER_EPOCH])
    assert _epochs_on_disk(stopped) == [2]
    resumed = torch.load(train(tmp_path / "resumed", ["train.json"], ("resume", True)) / last, weights_only=True)
    for network in ("classifier", "classifier_ema"):
        for key, value in straight[network].items():
            assert torch.equal(value, resumed[network][key]), f"{network}.{key} differs after the resume"
    assert torch.equal(straight["random_states"]["torch"], resumed["random_states"]["torch"])


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np
    from monai.transforms import Compose, RandAffined, RandFlipd

    from common.engines import RandomStates

    transform = Compose([RandFlipd("image", prob=0.5), RandAffined("image", prob=0.5, rotate_range=0.1)])
    states = RandomStates(transform)
    assert len(states.transforms) == 5  # Compose, RandFlipd, RandAffined and the RandAffine and grid inside it
    torch.save(states.state_dict(), tmp_path / "states.pt")

    def draws():
        inner = transform.transforms[1].rand_affine.rand_affine_grid.R.uniform()
        legacy_numpy = np.random.rand()  # noqa: NPY002 - the global generator MONAI seeds is the one restored
        return torch.rand(3).tolist(), legacy_numpy, random.random(), transform.transforms[0].R.rand(), inner

    expected = draws()
    states.load_state_dict(torch.load(tmp_path / "states.pt", weights_only=True))
    assert draws() == expected


def test_resuming_with_another_augmentation_names_the_checkpoint(tmp_path):
    import pytest
    from ignite.engine import Engine
    from monai.transforms import RandFlipd

    from common.engines import RandomStates, attach_resume
    from common.errors import InputError

    engine = Engine(lambda e, b: None)
    torch.save(
        {"trainer": engine.state_dict(), "random_states": RandomStates().state_dict()},
        tmp_path / "checkpoint_epoch=1.pt",
    )
    objects = {"trainer": engine, "random_states": RandomStates(RandFlipd("image", prob=0.5))}
    path = attach_resume(engine, str(tmp_path), objects)
    with pytest.raises(InputError, match=r"checkpoint_epoch=1\.pt: the checkpoint holds the random states of 0 random"):
        engine.run([0], max_epochs=2)
    assert path.endswith("checkpoint_epoch=1.pt")
