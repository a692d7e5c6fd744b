"""ACAT's localisation score under the evaluation protocol's open choices, on trained pipeline runs.

    python benchmarks/acat_localisation.py runs/acat/seed0 runs/acat/seed1 runs/acat/seed2 --seeds 0 1 2 \
        --out benchmarks/results/acat_localisation.md [--id value ...]

Each run is the ``bundle_root`` of one ``python -m common.pipeline bundles/acat --seed S --bundle_root
DIR`` run, and ``--seeds`` gives each run's seed (it selects the run's test split). For every protocol
variant below, the evaluate stage (``train.json`` + ``evaluate.json``, exactly the pipeline's command)
runs again on the run's trained baseline classifier and autoencoder with the variant's config
overrides, writing to ``DIR/eval_localisation/<variant>`` (the run's own ``eval/`` is left alone);
any further ``--id value`` (the ids the pipeline runs were given, e.g. ``--dataset_dir``) reaches
every evaluate run. The table gives each method's localisation score (hit if the map's maximum lies
in the lesion's territory, of 6) as mean +/- standard error over the runs, with every run's value.

The paper (section 4.4) fixes the score and the methods but not these choices, which decide where a
coarse map's maximum falls: whether maps are restricted to the windowed tissue (the bundle's default;
the paper does not say), which class the comparators explain (by default "none", the class of the
paper's negative counterfactuals: latent shift moves towards it, gradient and Grad-CAM explain it; or
the class the classifier predicts, which latent shift moves away from) and over what Grad-CAM averages
its gradients (each half slice the 2D CNN sees, or the whole volume).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.acat_seeds import PAPER_LOCALISATION, mean_se  # noqa: E402
from common.pipeline import cli_value, read_stages, stage_command  # noqa: E402

BUNDLE = Path("bundles/acat")
ALL_METHODS = ["counterfactual", "latent_shift", "gradient", "grad_cam"]
COMPARATORS = ["latent_shift", "gradient", "grad_cam"]
# name -> (what it changes, evaluate.json overrides, methods it affects)
VARIANTS = {
    "default": ("the bundle's defaults: tissue only, class 'none', Grad-CAM per half slice", {}, ALL_METHODS),
    "target_predicted": ("comparators of the predicted class", {"comparator_target": None}, COMPARATORS),
    "no_tissue_mask": ("maps not restricted to the windowed tissue", {"saliency_tissue_only": False}, ALL_METHODS),
    "grad_cam_volume": ("Grad-CAM weights over the whole volume", {"grad_cam_weights": "volume"}, ["grad_cam"]),
}


def evaluate(run: Path, seed: int, variant: str, extra: list[str], reuse: bool = False) -> dict:
    """The variant's saliency metrics of one run, computed afresh unless ``reuse`` and already there."""
    _, overrides, methods = VARIANTS[variant]
    output_dir = run / "eval_localisation" / variant
    if reuse and (output_dir / "saliency_metrics.json").is_file():
        return json.loads((output_dir / "saliency_metrics.json").read_text())
    stage = next(s for s in read_stages(BUNDLE) if s["name"] == "evaluate")
    ids = {"seed": seed, "bundle_root": str(run), "output_dir": str(output_dir), "saliency_methods": methods}
    ids.update(overrides)
    command = stage_command(BUNDLE, stage, extra + [a for k, v in ids.items() for a in (f"--{k}", cli_value(v))])
    print("[acat_localisation] " + " ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads((output_dir / "saliency_metrics.json").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="bundle_root of each seed's pipeline run")
    parser.add_argument("--seeds", nargs="+", type=int, required=True, help="each run's --seed, in order")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/acat_localisation.md"))
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="take a variant's output already in DIR/eval_localisation (made by this code with these ids)",
    )
    args, extra = parser.parse_known_args(argv)
    if len(args.seeds) != len(args.runs):
        parser.error(f"{len(args.runs)} runs but {len(args.seeds)} seeds; expected one seed per run")
    missing = [str(r) for r in args.runs if not (r / "models" / "classifier.pt").is_file()]
    if missing:
        parser.error(f"no trained baseline in {missing}; expected <bundle_root>/models/classifier.pt")
    lines = [
        f"### ACAT localisation score by evaluation protocol ({len(args.runs)} runs, mean +/- standard error)",
        "",
        "| variant | what changes | " + " | ".join(ALL_METHODS) + " |",
        "|---|---|" + "---|" * len(ALL_METHODS),
        "| paper (IST-3) | | " + " | ".join(f"{PAPER_LOCALISATION[m]:.3f}" for m in ALL_METHODS) + " |",
    ]
    for variant in args.variants:
        what, _, methods = VARIANTS[variant]
        results = [evaluate(run, seed, variant, extra, args.reuse) for run, seed in zip(args.runs, args.seeds)]
        cells = []
        for method in ALL_METHODS:
            if method not in methods:
                cells.append("as default")
                continue
            values = [r[method]["localisation"] for r in results]
            mean, se = mean_se(values)
            cells.append(f"{mean:.3f} +/- {se:.3f} ({', '.join(f'{v:.3f}' for v in values)})")
        lines.append(f"| {variant} | {what} | " + " | ".join(cells) + " |")
    command = " ".join(
        ["python benchmarks/acat_localisation.py", *map(str, args.runs), "--seeds", *map(str, args.seeds), *extra]
    )
    lines += [
        "",
        f"Made {datetime.date.today().isoformat()} on {platform.machine()}, {os.cpu_count()} CPU cores by `{command}`;"
        " each cell: mean +/- s.e. (per run). Positive test scans only; the baseline classifier of each run.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
