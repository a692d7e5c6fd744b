"""benchmarks/speed.py end to end at tiny sizes: every part (training, inference against IG and occlusion, TVD
samplers) for two bundles, through the bundles' real configs, writes its tables with a positive time per row."""

import json
import math
import subprocess
import sys

import pytest

from tests.bundle_runner import REPO

METHODS = ["attr_constraint", "tvd_score"]
SIZES = ["32x32", "24x24x24"]  # the PatchGAN classifier needs at least 24 voxels per axis


@pytest.mark.slow
def test_speed_benchmark_writes_every_table(tmp_path):
    out = tmp_path / "speed.md"
    args = [sys.executable, "benchmarks/speed.py", "--tiny", "--device", "cpu", "--threads", "1"]
    args += ["--methods", *METHODS, "--settings", "default", "--sizes", *SIZES]
    args += ["--workdir", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    results = json.loads(out.with_suffix(".json").read_text())["results"]
    stages = [(row["method"], row["stage"]) for row in results["training"]]
    assert stages == [("attr_constraint", "train")] + [
        ("tvd_score", s) for s in ("classifier", "regressor", "autoencoder", "diffusion")
    ]
    measured = {(row["method"], row["size"]) for row in results["inference"]}
    for size in SIZES:
        assert {("attr_constraint", size), ("integrated_gradients", size), ("occlusion", size)} <= measured
    assert [row["sampler"] for row in results["tvd"]] == ["ddim", "ddpm"]
    for part, rows in results.items():
        for row in rows:
            assert "error" not in row, (part, row.get("error"))
            assert row["seconds"] and all(math.isfinite(s) and s > 0 for s in row["seconds"]), (part, row)
            assert math.isfinite(row["peak_mib"]), (part, row)

    table = out.read_text()
    assert "Command: `python benchmarks/speed.py --tiny" in table and "total wall time" in table
    for heading in ("## Training", "## Inference", "## TVD score"):
        assert heading in table
    assert "| attr_constraint | default | train | 32x40 | 32 |" in table
    assert "| tvd_score | default | diffusion | 16x16x16 |" in table
    assert "| 24x24x24 | PatchGAN classifier of attr_constraint |" in table
    assert "DDPM / DDIM time per sample:" in table
    assert "failed" not in table and "n/a" not in table
    # a report of part of a run says so
    assert "Restricted by the command line to: methods attr_constraint, tvd_score (of vagan, icam," in table
    assert "training settings default (of default, preset); inference sizes 32x32, 24x24x24 (of 32x32," in table
