"""Memory of folder inference at scale (issue 10): a folder of N NIfTIs through a bundle's inference.json.

    python benchmarks/batch_inference.py --n 200 --out benchmarks/results/batch_inference.md
    python benchmarks/batch_inference.py --n 200 --preset brain3d.json --shape 80 100 80 \
        --out benchmarks/results/batch_inference_3d.md

Runs ``python -m monai.bundle run --config_file bundles/attr_constraint/configs/inference.json --input_dir
FOLDER`` as a user would, samples the resident memory (RSS, from /proc: Linux) of that process and its
children every 0.1 s, and counts the outputs written so far to know which case the run is at. Reported: RSS
after the first 20 cases, the peak after them, the growth between the two (target: at most 10 %), and whether
every case wrote its outputs. Weights: the bundle's trained ``models/model.pt`` when ``--bundle_root`` has
one, else the network's random initialisation (memory does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from fidelity import command_line  # noqa: E402  (this script's folder is on the path when it runs)

from tests.untrained import write_untrained_bundle  # noqa: E402  (the network's random init + a zero threshold)

BUNDLE = REPO / "bundles" / "attr_constraint"
WARM_CASES = 20
OUTPUTS_PER_CASE = ("_attribution.nii.gz", "_segmentation.nii.gz", "_attribution.png")


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (0 once it has exited)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
        stack += [int(child) for child in children]
    return total


def write_cases(folder: Path, n: int, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])  # non-RAS, as user scans often are
    for i in range(n):
        image = rng.normal(100, 20, shape).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), folder / f"case_{i:04d}.nii.gz")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 80])
    parser.add_argument("--preset", default=None, help="a preset merged on inference.json (e.g. brain3d.json)")
    parser.add_argument("--bundle_root", default=None, help="a trained bundle root (default: untrained weights)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="markdown file for the result")
    args = parser.parse_args()
    configs = ["inference.json"] + ([args.preset] if args.preset else [])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, out = tmp / "scans", tmp / "out"
        folder.mkdir()
        write_cases(folder, args.n, tuple(args.shape))
        root = Path(args.bundle_root) if args.bundle_root else tmp / "bundle"
        if not args.bundle_root:
            write_untrained_bundle("attr_constraint", root, configs=configs)
        config_files = [str(BUNDLE / "configs" / name) for name in configs]
        command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(config_files)]
        command += ["--bundle_root", str(root), "--input_dir", str(folder), "--output_dir", str(out)]
        command += ["--spatial_size", json.dumps(args.shape)]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
        start = time.perf_counter()
        log = open(tmp / "run.log", "w")
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        samples = []  # (seconds, cases written, rss bytes)
        while process.poll() is None:
            done = len(list(out.glob("*_attribution.nii.gz"))) if out.is_dir() else 0
            samples.append((time.perf_counter() - start, done, rss_bytes(process.pid)))
            time.sleep(0.1)
        seconds = time.perf_counter() - start
        log.close()
        if process.returncode != 0:
            sys.exit(f"inference failed ({process.returncode}):\n" + (tmp / "run.log").read_text()[-3000:])
        written = {p.name for p in out.iterdir()}
        complete = all(f"case_{i:04d}{suffix}" in written for i in range(args.n) for suffix in OUTPUTS_PER_CASE)

    samples = [s for s in samples if s[2] > 0]
    warm = [rss for _, done, rss in samples if done <= WARM_CASES]
    after = [rss for _, done, rss in samples if done > WARM_CASES]
    at_warm, peak_after = max(warm), max(after) if after else float("nan")
    growth = peak_after / at_warm - 1
    mib = 2**20
    lines = [
        f"# Folder inference memory: {args.n} NIfTIs of {tuple(args.shape)}, attr_constraint {' + '.join(configs)}",
        "",
        f"Command: `{command_line('benchmarks/batch_inference.py')}`  ",
        f"Measured {datetime.date.today()} on {platform.machine()} ({os.cpu_count()} cores, {args.threads} "
        f"threads), python {platform.python_version()}; weights: {args.bundle_root or 'untrained (random init)'}.",
        "RSS of the `monai.bundle run` process and its children, sampled every 0.1 s; case index from the outputs.",
        "",
        "| cases | wall time | RSS peak, first 20 cases | RSS peak, cases 21+ | growth | every output written |",
        "|---|---|---|---|---|---|",
        f"| {args.n} | {seconds:.1f} s | {at_warm / mib:.0f} MiB | {peak_after / mib:.0f} MiB | {growth * 100:+.1f} % "
        f"| {'yes' if complete else 'NO'} |",
        "",
        "RSS (MiB) when the n-th case's outputs appeared: "
        + ", ".join(
            f"{n}: {next(rss for _, done, rss in samples if done >= n) / mib:.0f}"
            for n in (1, 20, 50, 100, 150, args.n)
            if any(done >= n for _, done, _ in samples)
        ),
        "",
        f"Target (issue 10): growth at most 10 % after the first {WARM_CASES} cases: "
        f"{'met' if growth <= 0.10 and complete else 'NOT met'}.",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
