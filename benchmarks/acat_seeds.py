"""ACAT over several seeds (the paper's "three runs with different dataset splits and initialisations").

    python benchmarks/acat_seeds.py runs/acat/seed0 runs/acat/seed1 runs/acat/seed2 \
        --out benchmarks/results/acat_seeds.md

Each argument is the ``bundle_root`` of one ``python -m common.pipeline bundles/acat --seed S
--bundle_root DIR`` run; ``--eval_dir`` names the evaluation folder inside it (default ``eval``, the
pipeline's; ``eval_localisation/default`` is the evaluate stage re-run by
``benchmarks/acat_localisation.py`` with the current defaults). The table gives, per method, the
mean and the standard error over the runs (as the paper reports) of the test accuracy and of the
localisation score, with every run's value.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
from pathlib import Path

PAPER_ACCURACY = {"baseline": 0.7139, "acat": 0.7255}  # IST-3, Table 2
PAPER_LOCALISATION = {"counterfactual": 0.6505, "latent_shift": 0.5839, "gradient": 0.6129, "grad_cam": 0.1167}


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample sd / sqrt(n); 0 for one run)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, sd / math.sqrt(n)


def _rows(runs: list[Path], eval_dir: str, file: str, column: str, paper: dict) -> list[str]:
    results = [json.loads((run / eval_dir / file).read_text()) for run in runs]
    lines = []
    for method in results[0]:
        values = [r[method][column] for r in results]
        mean, se = mean_se(values)
        per_run = ", ".join(f"{v:.3f}" for v in values)
        n = results[0][method].get("n")
        cases = "" if n is None else f" | {n}"
        figure = paper.get(method, float("nan"))
        lines.append(f"| {method} | {mean:.3f} +/- {se:.3f} | {figure:.4f} | {per_run}{cases} |")
    return lines


def _provenance(runs: list[Path], eval_dir: str) -> str:
    """Where the runs came from: their defaults' version and pipeline times, and when this table was made."""
    times = []
    for run in runs:
        path = run / "pipeline_times.json"
        if path.is_file():
            total = json.loads(path.read_text()).get("total")
            if total is not None:
                times.append(f"{run}: {total / 60:.0f} min")
    made = datetime.date.today().isoformat()
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores"
    pipeline = f" Pipeline wall-clock time per run: {'; '.join(times)}." if times else ""
    return (
        f"Made {made} on {machine} by `python benchmarks/acat_seeds.py {' '.join(map(str, runs))}"
        f" --eval_dir {eval_dir}` from the runs"
        f" of `python -m common.pipeline bundles/acat --seed S --bundle_root DIR`.{pipeline}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bundle_root of each seed's pipeline run")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/acat_seeds.md"))
    parser.add_argument("--eval_dir", default="eval", help="the evaluation folder inside each run")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / args.eval_dir / "classification_metrics.json").is_file()]
    if missing:
        print(f"no evaluation in {missing}; expected <bundle_root>/{args.eval_dir}/*_metrics.json", file=sys.stderr)
        return 2
    lines = [
        f"### ACAT over {len(args.runs)} runs (mean +/- standard error; runs: {', '.join(map(str, args.runs))})",
        "",
        "Test accuracy (4 classes):",
        "",
        "| method | accuracy | paper (IST-3) | per run |",
        "|---|---|---|---|",
        *_rows(args.runs, args.eval_dir, "classification_metrics.json", "accuracy", PAPER_ACCURACY),
        "",
        "Localisation score of the baseline's saliency maps on the positive test scans:",
        "",
        "| method | localisation | paper (IST-3) | per run | cases (first run) |",
        "|---|---|---|---|---|",
        *_rows(args.runs, args.eval_dir, "saliency_metrics.json", "localisation", PAPER_LOCALISATION),
        "",
        _provenance(args.runs, args.eval_dir),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
