"""Run a multi-stage bundle (e.g. ACAT: classifier -> autoencoder -> saliency -> ACAT -> evaluate).

    python -m common.pipeline bundles/acat [--stages NAME,NAME] [--pipeline FILE] [--dry_run] [--id value ...]

The stages are listed in the bundle's ``configs/pipeline.json`` (or another file of its ``configs`` folder
named by ``--pipeline``, e.g. a preset's ``pipeline_ellipses.json``, whose stages merge the preset's config)::

    {"stages": [{"name": "classifier", "configs": ["train_classifier.json"]}, ...]}

A stage may also fix ids of its own, ``"overrides": {"alpha_A": 0, "ckpt_dir": "$@bundle_root + '/models/x'"}``
(e.g. the unconstrained comparator of the attribution-constraint bundle, trained by the same
train.json); they are given after the command line's, so they win for that stage.

Each stage is one ``python -m monai.bundle run`` of its config files (merged in order), in its own
process so a stage's memory and logging end with it. Every ``--id value`` given after the bundle is
passed to every stage (``--seed 1 --bundle_root runs/acat_seed1``): the stages share their ids by
name, so one override reaches all of them. The first failing stage stops the pipeline with its exit
status; the time of each stage is printed and written to ``<bundle_root>/pipeline_times.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common.errors import InputError


def read_stages(bundle: Path, pipeline: str = "pipeline.json") -> list[dict]:
    path = bundle / "configs" / pipeline
    if not path.is_file():
        available = sorted(p.name for p in (bundle / "configs").glob("pipeline*.json"))
        raise InputError(f"{path}: not found; expected a file listing the bundle's stages, one of {available}")
    stages = json.loads(path.read_text()).get("stages")
    if not isinstance(stages, list) or not stages or not all({"name", "configs"} <= set(s) for s in stages):
        raise InputError(f"{path}: expected {{'stages': [{{'name': ..., 'configs': [...]}}, ...]}}")
    if not all(isinstance(s.get("overrides", {}), dict) for s in stages):
        raise InputError(f"{path}: a stage's 'overrides' must be an object of config ids and values")
    return stages


def cli_value(value) -> str:
    """A config id's value as ``monai.bundle run`` reads it on the command line: a Python literal
    unless already a string, since its parser (python-fire) reads ``False`` and ``[0, 'a']`` but
    leaves JSON's ``false`` and ``null`` as the strings 'false' and 'null' (and a string is true);
    ``None`` as the expression ``$None``, since the runner drops an override whose value is None."""
    if value is None:
        return "$None"
    return value if isinstance(value, str) else repr(value)


def stage_command(bundle: Path, stage: dict, overrides: list[str]) -> list[str]:
    configs = [str(bundle / "configs" / name) for name in stage["configs"]]
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs)]
    logging_conf = bundle / "configs" / "logging.conf"
    if logging_conf.is_file():
        command += ["--logging_file", str(logging_conf)]
    fixed = [arg for key, value in stage.get("overrides", {}).items() for arg in (f"--{key}", cli_value(value))]
    return command + overrides + fixed


def _bundle_root(bundle: Path, overrides: list[str]) -> Path:
    if "--bundle_root" in overrides[:-1]:
        return Path(overrides[overrides.index("--bundle_root") + 1])
    return bundle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="the bundle folder, e.g. bundles/acat")
    parser.add_argument("--stages", default="", help="comma-separated stage names to run (default: all, in order)")
    parser.add_argument(
        "--pipeline",
        default="pipeline.json",
        help="the stage list in the bundle's configs folder (default: %(default)s)",
    )
    parser.add_argument("--dry_run", action="store_true", help="print the commands without running them")
    args, overrides = parser.parse_known_args(argv)
    stages = read_stages(args.bundle, args.pipeline)
    if args.stages:
        wanted = args.stages.split(",")
        unknown = sorted(set(wanted) - {s["name"] for s in stages})
        if unknown:
            raise InputError(f"unknown stage(s) {unknown}; expected names from {[s['name'] for s in stages]}")
        stages = [s for s in stages if s["name"] in wanted]
    times = {}
    for stage in stages:
        command = stage_command(args.bundle, stage, overrides)
        print(f"[pipeline] {stage['name']}: {' '.join(command)}", flush=True)
        if args.dry_run:
            continue
        start = time.monotonic()
        status = subprocess.call(command)
        times[stage["name"]] = round(time.monotonic() - start, 1)
        if status != 0:
            print(f"[pipeline] stage '{stage['name']}' failed with exit status {status}", file=sys.stderr)
            return status
    if times:
        root = _bundle_root(args.bundle, overrides)
        root.mkdir(parents=True, exist_ok=True)
        (root / "pipeline_times.json").write_text(
            json.dumps({**times, "total": round(sum(times.values()), 1)}, indent=1)
        )
        print("[pipeline] seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
