"""Run a bundle's real configs through ``python -m monai.bundle run``, as a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from common.pipeline import cli_value

REPO = Path(__file__).resolve().parents[1]
# A non-RAS (LPS-like), anisotropic affine with an offset origin: outputs must keep it exactly.
LPS = np.array([[-0.9, 0, 0, 10.0], [0, -1.3, 0, -20.0], [0, 0, 2.5, 5.0], [0, 0, 0, 1]])


def monai_bundle_run_args(bundle: str, configs, overrides) -> list[str]:
    """``-m monai.bundle run ...`` for ``configs`` (file names in ``bundles/<bundle>/configs``, or absolute paths,
    merged in order) and ``overrides`` ((id, value) pairs)."""
    files = [c if Path(c).is_absolute() else str(REPO / "bundles" / bundle / "configs" / c) for c in map(str, configs)]
    config_arg = files[0] if len(files) == 1 else json.dumps(files)
    args = ["-m", "monai.bundle", "run", "--config_file", config_arg]
    for key, value in overrides:
        args += [f"--{key}", cli_value(value)]
    return args


def run_bundle(bundle: str, configs, *overrides, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``configs`` are file names in ``bundles/<bundle>/configs`` (merged in order); overrides are (id, value)."""
    args = [sys.executable, *monai_bundle_run_args(bundle, configs, overrides)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def check_resume(bundle: str, root: Path, common, schedule) -> None:
    """Training with ``--resume true`` and one more epoch continues from the latest checkpoint (epoch 2)."""
    overrides = dict(schedule)
    overrides["max_epochs"] = 3
    proc = run_bundle(bundle, ["train.json"], *common, *overrides.items(), ("resume", True))
    log = proc.stdout + proc.stderr
    assert "Epoch: 3/3" in log and "Epoch: 1/3" not in log  # epochs 1-2 came from the checkpoint
    assert (root / "bundle" / "models" / "checkpoint_epoch=3.pt").is_file()
