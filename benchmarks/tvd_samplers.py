"""DDIM (50 steps) against the paper's DDPM (1000 steps) for the TVD score: time per guided sample and global scores.

    python benchmarks/tvd_samplers.py --bundle_root runs/tvd_ell/b --preset ellipses.json \
        --n_values 5 --samples_per_value 20 --out benchmarks/results/tvd_samplers.md

Needs a trained bundle (the four training stages of ``bundles/tvd_score``). Two measurements:

1. speed: one batch of ``--batch`` guided samples per sampler, drawn in this process with the bundle's own sampler
   (``evaluate#sample_fn``) at the median test value of the first feature; seconds per sample;
2. scores: ``evaluate.json`` run once per sampler (``--sampler ddim`` / ``ddpm``) with the same values, seed and
   sample counts; the global score of every feature with its bootstrap standard deviation, and the difference.

Writes a markdown table (with the command, machine and date) and a JSON next to it.

DDPM evaluations at the paper's sample counts take many hours on a CPU. The benchmark records its progress in
``<out stem>_runs/progress.json`` (the timing, each evaluation's time so far and whether it finished); run the same
command again after it stopped and it goes on: the timing and finished evaluations are kept, the stopped one is
resumed from its sampling records (``evaluate.json`` with ``--resume True``: what it had drawn is kept). An
evaluation's time is the sum of its pieces. ``--fresh`` starts again; other arguments with the same ``--out`` are
refused. The record goes once the report is written: the same command then measures afresh.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the bundles' configs import the repository's common package
CONFIGS = REPO / "bundles" / "tvd_score" / "configs"
SAMPLERS = {"ddim": 50, "ddpm": 1000}
PROGRESS_FILE = "progress.json"

from fidelity import command_line  # noqa: E402  (this script's folder is on the path when it runs)

from common.errors import InputError  # noqa: E402
from common.files import write_text_atomic  # noqa: E402
from common.pipeline import cli_value, run_stage  # noqa: E402


def _configs(preset: str | None, *names: str) -> list[str]:
    return [str(CONFIGS / n) for n in ("train.json", *names, *([preset] if preset else []))]


def time_per_sample(bundle_root: str, preset: str | None, batch: int, overrides: dict) -> dict[str, float]:
    """Seconds per guided sample of each sampler, one batch drawn with the bundle's own sampler."""
    import torch
    from monai.bundle import ConfigParser

    import common.tvd

    result = {}
    for sampler in SAMPLERS:
        parser = ConfigParser()
        parser.read_config(_configs(preset, "evaluate.json"))
        steps = SAMPLERS[sampler]
        parser.update({**overrides, "bundle_root": bundle_root, "sampler": sampler, "num_inference_steps": steps})
        feature = parser["features"][0]
        sample_fn = parser.get_parsed_content("evaluate#sample_fn")(feature)
        values = parser.get_parsed_content("evaluate#values")[feature].values
        target = torch.full((batch,), float(values[len(values) // 2]))
        device = parser.get_parsed_content("device")
        generator = common.tvd.seeded_generator(device, 0)  # the samplers draw their noise on the device
        synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
        synchronize()
        start = time.perf_counter()
        sample_fn(batch, target, generator)
        synchronize()
        result[sampler] = (time.perf_counter() - start) / batch
    return result


def read_progress(path: Path, arguments: dict) -> dict:
    """The record of a stopped run of the same arguments ({} if there is none); InputError for other arguments."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
        recorded = record["arguments"]
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(
            f"{path}: not a progress record of tvd_samplers.py ({error}); delete it or pass --fresh"
        ) from None
    if recorded != arguments:
        differing = ", ".join(
            f"{k}: recorded {recorded.get(k)!r}, now {arguments[k]!r}"
            for k in arguments
            if recorded.get(k) != arguments[k]
        )
        raise InputError(
            f"{path}: the record of a run with other arguments ({differing}); expected the same command to go on, "
            "or --fresh (or another --out) to start again"
        )
    return record


def scores(bundle_root: str, preset: str | None, out: Path, overrides: dict, record: dict) -> dict[str, dict]:
    """``evaluate.json`` once per sampler (each going on from where ``record`` says it stopped); its report and
    wall time (the sum of its pieces)."""
    path = out / PROGRESS_FILE
    result = {}
    for sampler in SAMPLERS:
        output_dir = out / sampler
        so_far = record["evaluations"].get(sampler, {"seconds": 0.0, "pieces": 0, "finished": False})
        if not so_far["finished"]:
            command = [
                sys.executable,
                "-m",
                "monai.bundle",
                "run",
                "--config_file",
                json.dumps(_configs(preset, "evaluate.json")),
            ]
            settings = {"bundle_root": bundle_root, "sampler": sampler, "output_dir": str(output_dir), **overrides}
            if so_far["pieces"]:  # a stopped evaluation: its sampling records keep the feature values it finished
                settings["resume"] = True
            for key, value in settings.items():
                command += [f"--{key}", cli_value(value)]
            before, piece = so_far["seconds"], so_far["pieces"] + 1

            def note(seconds: float, finished: bool = False, sampler=sampler, before=before, piece=piece) -> None:
                record["evaluations"][sampler] = {
                    "seconds": round(before + seconds, 1),
                    "pieces": piece,
                    "finished": finished,
                }
                write_text_atomic(path, json.dumps(record, indent=1))

            note(0.0)
            status, seconds = run_stage(command, note, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
            if status != 0:
                raise subprocess.CalledProcessError(status, command)
            note(seconds, finished=True)
            so_far = record["evaluations"][sampler]
        report = json.loads((output_dir / "tvd_scores.json").read_text())
        result[sampler] = {"wall_s": so_far["seconds"], "pieces": so_far["pieces"], "features": report["features"]}
    return result


AGREEMENT_MARGIN = 0.05  # the target: DDIM's global score within 0.05 of DDPM's
Z_ONE_SIDED_95 = 1.645


def agreement(difference: float, sd: float, margin: float = AGREEMENT_MARGIN) -> str:
    """Whether two global scores agree within ``margin``, by two one-sided tests at 5% each (TOST).

    ``difference`` is the difference of the two scores and ``sd`` its standard deviation (the square root of the
    two bootstrap variances summed: the samplers' runs are independent). "yes": the 90% interval of the
    difference lies inside (-margin, margin); "no": it lies outside; "not resolved": the samples are too few to
    tell either way.
    """
    if abs(difference) + Z_ONE_SIDED_95 * sd < margin:
        return "yes"
    if abs(difference) - Z_ONE_SIDED_95 * sd > margin:
        return "no"
    return "not resolved"


def markdown(speed: dict, evaluated: dict, command: str) -> str:
    import torch

    ratio = speed["ddpm"] / speed["ddim"]
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    lines = [
        "# TVD score: DDIM (50 steps) vs DDPM (1000 steps)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
        f"{os.environ.get('OMP_NUM_THREADS', 'default')}{gpu}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        "| sampler | steps | s per guided sample | evaluation wall time (s) |",
        "|---|---:|---:|---:|",
    ]
    for sampler, steps in SAMPLERS.items():
        pieces = evaluated[sampler].get("pieces", 1)
        wall = f"{evaluated[sampler]['wall_s']:.0f}" + (f" (in {pieces} pieces)" if pieces > 1 else "")
        lines.append(f"| {sampler} | {steps} | {speed[sampler]:.3f} | {wall} |")
    lines += ["", f"DDPM / DDIM time per sample: **{ratio:.1f}x** (target >= 10x).", ""]
    lines += [
        "| feature | global score DDIM (sd) | global score DDPM (sd) | difference (sd) | within 0.05? |",
        "|---|---|---|---|---|",
    ]
    for feature in evaluated["ddim"]["features"]:
        a, b = evaluated["ddim"]["features"][feature], evaluated["ddpm"]["features"][feature]
        if a.get("global_score") is None or b.get("global_score") is None:
            lines.append(f"| {feature} | {a.get('global_score')} | {b.get('global_score')} | n/a | n/a |")
            continue
        var_a, var_b = a["bootstrap_variance_global"], b["bootstrap_variance_global"]
        diff, sd = a["global_score"] - b["global_score"], (var_a + var_b) ** 0.5
        lines.append(
            f"| {feature} | {a['global_score']:.3f} ({var_a**0.5:.3f}) | {b['global_score']:.3f} ({var_b**0.5:.3f}) "
            f"| {diff:+.3f} ({sd:.3f}) | {agreement(diff, sd)} |"
        )
    lines += [
        "",
        "sd: bootstrap standard deviation; the difference's is the square root of the two variances summed. "
        "Within 0.05: two one-sided tests at 5% (the difference's 90% interval inside +/-0.05: yes; outside: no; "
        "otherwise not resolved: more samples per value needed).",
    ]
    return "\n".join(lines) + "\n"


def config_settings(items: list[str]) -> dict:
    """``--set ID=JSON`` items as config overrides: JSON, else a Python literal (as on MONAI's command line:
    "[False, True]"), else the string itself."""
    settings = {}
    for item in items:
        key, value = item.split("=", 1)
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            try:
                settings[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                settings[key] = value
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle_root", required=True, help="a trained tvd_score bundle root (models/ inside)")
    parser.add_argument("--preset", default=None, help="preset config merged last, e.g. ellipses.json")
    parser.add_argument("--n_values", type=int, default=5)
    parser.add_argument("--samples_per_value", type=int, default=20)
    parser.add_argument("--batch", type=int, default=20, help="samples in the timed batch")
    parser.add_argument(
        "--set", action="append", default=[], metavar="ID=JSON", help="any other config id, e.g. rho=0.2"
    )
    parser.add_argument("--out", default="benchmarks/results/tvd_samplers.md")
    parser.add_argument("--fresh", action="store_true", help="start again instead of going on from a stopped run")
    args = parser.parse_args(argv)
    overrides = {
        "n_values": args.n_values,
        "samples_per_value": args.samples_per_value,
        "sample_batch_size": args.samples_per_value,
    }
    overrides.update(config_settings(args.set))
    out = Path(args.out)
    runs = out.parent / (out.stem + "_runs")
    arguments = {"bundle_root": args.bundle_root, "preset": args.preset, "batch": args.batch, "overrides": overrides}
    arguments = json.loads(json.dumps(arguments))  # as the record will hold them (lists, not tuples)
    record = {} if args.fresh else read_progress(runs / PROGRESS_FILE, arguments)
    if not record:  # written at once, so that a kill during the timing cannot leave an older run's record
        record = {"arguments": arguments, "seconds_per_sample": None, "evaluations": {}}
        write_text_atomic(runs / PROGRESS_FILE, json.dumps(record, indent=1))
    if record["seconds_per_sample"] is None:
        record["seconds_per_sample"] = time_per_sample(args.bundle_root, args.preset, args.batch, overrides)
        write_text_atomic(runs / PROGRESS_FILE, json.dumps(record, indent=1))
    speed = record["seconds_per_sample"]
    evaluated = scores(args.bundle_root, args.preset, runs, overrides, record)
    text = markdown(speed, evaluated, command_line("benchmarks/tvd_samplers.py", argv))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"seconds_per_sample": speed, "evaluations": evaluated}, indent=1))
    (runs / PROGRESS_FILE).unlink()  # finished: the same command measures afresh
    print(text)
    return 0


if __name__ == "__main__":
    # a scheduler's SIGTERM (a job's time limit) as SystemExit, so the running evaluation is stopped with this
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
