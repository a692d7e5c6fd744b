"""Run a multi-stage bundle (e.g. ACAT: classifier -> autoencoder -> saliency -> ACAT -> evaluate).

    python -m common.pipeline bundles/acat [--stages NAME,NAME] [--pipeline FILE] [--dry_run] [--continue]
        [--id value ...]

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

``--continue`` picks up a pipeline that was stopped (a job's time limit, a machine given back) where it
stopped. A pipeline records its progress in ``<bundle_root>/pipeline_progress.json``: the finished stages with
their times, the running one with the start of its first piece and, every ``PROGRESS_INTERVAL`` seconds, its
time so far. Run again with ``--continue`` and the same arguments, it skips the finished stages and reruns the
interrupted one with ``--resume True`` when that stage wrote a ``checkpoint_epoch=N.pt`` under the bundle root
since its first piece started (the training configs then continue from their newest checkpoint; see the
README's "Resuming after a failure") or an evaluation progress record (an evaluation then keeps what it had
done: the TVD score's samples, the attribution maps of the batches it finished), from its start otherwise
(also when an earlier run left a checkpoint of a higher epoch in the same folder, which a resume would load).
A stage's time is the sum of its pieces: wall time spent, including the work after its last checkpoint that an
interruption lost (and up to ``PROGRESS_INTERVAL`` seconds uncounted per hard kill). A stage killed by a
signal counts as interrupted; one that exits with an error as failed, started again by ``--continue``. Ctrl-C
or SIGTERM to the pipeline stops the running stage with it; to stop a pipeline with SIGKILL, kill its process
group. Different arguments are refused rather than mixed into one record.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from common.errors import InputError
from common.files import EVALUATION_PROGRESS_DIR, latest_checkpoint, write_text_atomic


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


PROGRESS_FILE = "pipeline_progress.json"
PROGRESS_INTERVAL = 30.0  # seconds between records of the running stage's time: what a hard kill can lose


def read_progress(path: Path, pipeline: str, stages: list[str], overrides: list[str]) -> dict:
    """The progress record to continue from (``--continue``): empty when there is none; InputError when it
    belongs to another pipeline, stage list or set of overrides than the command's."""
    if not path.is_file():
        return {}
    try:
        progress = json.loads(path.read_text())
        recorded = {key: progress[key] for key in ("pipeline", "stages", "overrides")}
    except (ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: not a progress record written by common.pipeline ({error})") from None
    current = {"pipeline": pipeline, "stages": stages, "overrides": overrides}
    differing = [key for key in current if recorded[key] != current[key]]
    if differing:
        details = "; ".join(f"{key}: recorded {recorded[key]}, now {current[key]}" for key in differing)
        raise InputError(
            f"{path}: cannot continue, the stopped pipeline ran with different arguments ({details}); expected "
            f"the same command as before, or the command without --continue to start again"
        )
    return progress


def resumable(root: Path, since: float) -> tuple[bool, str]:
    """Whether the stage whose first piece started at time ``since`` left something to resume from, and why not:
    a folder under ``root`` got a ``checkpoint_epoch=N.pt`` (training) or an evaluation's progress record (see
    ``common.files.EVALUATION_PROGRESS_DIR``) since then (the stages run one at a time, so it is the
    stage's own), and in every folder with such checkpoints the one a resume loads (the highest epoch) is one of
    those, not a leftover of an earlier run that got further. (A stale evaluation record is refused by the
    evaluation itself: it records what it was made with.)"""
    written = sorted({path.parent for path in root.rglob("*checkpoint_epoch=*.pt") if path.stat().st_mtime >= since})
    records = [
        path
        for path in root.rglob("*.pt")
        if EVALUATION_PROGRESS_DIR in path.relative_to(root).parts and path.stat().st_mtime >= since
    ]
    if not written and not records:
        return False, "it wrote no checkpoint or evaluation progress record before it stopped"
    for folder in written:
        loaded = Path(latest_checkpoint(str(folder)))
        if loaded.stat().st_mtime < since:
            return False, f"{loaded} (an earlier run's) has a higher epoch than the stage's own checkpoints there"
    return True, ""


def run_stage(command: list[str], on_progress, **popen) -> tuple[int, float]:
    """One stage's process (``popen``: more arguments of ``subprocess.Popen``, e.g. ``cwd``, ``env``);
    ``on_progress(seconds)`` every ``PROGRESS_INTERVAL`` and when the pipeline is stopped (Ctrl-C, a scheduler's
    SIGTERM), which also stops the stage; (exit status, seconds)."""
    start = time.monotonic()
    process = subprocess.Popen(command, **popen)
    try:
        while True:
            try:
                return process.wait(timeout=PROGRESS_INTERVAL), round(time.monotonic() - start, 1)
            except subprocess.TimeoutExpired:
                on_progress(round(time.monotonic() - start, 1))
    except BaseException:
        on_progress(round(time.monotonic() - start, 1))
        raise
    finally:  # the stage must not run on without the pipeline
        if process.poll() is None:
            process.terminate()
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="the bundle folder, e.g. bundles/acat")
    parser.add_argument("--stages", default="", help="comma-separated stage names to run (default: all, in order)")
    parser.add_argument(
        "--pipeline",
        default="pipeline.json",
        help="the stage list in the bundle's configs folder (default: %(default)s)",
    )
    parser.add_argument(
        "--dry_run", action="store_true", help="print the commands of a run from the start without running them"
    )
    parser.add_argument(
        "--continue",
        dest="continue_stopped",
        action="store_true",
        help=f"skip the stages a stopped run of the same command finished (its {PROGRESS_FILE}) and resume the "
        "interrupted one",
    )
    args, overrides = parser.parse_known_args(argv)
    stages = read_stages(args.bundle, args.pipeline)
    if args.stages:
        wanted = args.stages.split(",")
        unknown = sorted(set(wanted) - {s["name"] for s in stages})
        if unknown:
            raise InputError(f"unknown stage(s) {unknown}; expected names from {[s['name'] for s in stages]}")
        stages = [s for s in stages if s["name"] in wanted]
    if args.dry_run:
        for stage in stages:
            print(f"[pipeline] {stage['name']}: {' '.join(stage_command(args.bundle, stage, overrides))}", flush=True)
        return 0
    root = _bundle_root(args.bundle, overrides)
    progress_path = root / PROGRESS_FILE
    names = [s["name"] for s in stages]
    earlier = read_progress(progress_path, args.pipeline, names, overrides) if args.continue_stopped else {}
    progress = {
        "pipeline": args.pipeline,
        "stages": names,
        "overrides": overrides,
        "finished": earlier.get("finished", []),
        "seconds": earlier.get("seconds", {}),  # per stage: its pieces' wall time summed, the running one's so far
        "pieces": earlier.get("pieces", {}),  # per stage: how many times it was started
        "running": None,  # the stage running or interrupted, and when its first piece started
    }
    interrupted = earlier.get("running") or {}

    def record(seconds_of_running: float | None = None) -> None:
        if seconds_of_running is not None:
            progress["seconds"][progress["running"]["stage"]] = round(so_far + seconds_of_running, 1)
        write_text_atomic(progress_path, json.dumps(progress, indent=1) + "\n")

    record()  # at once: a run killed before its first record must not leave an older run's record behind
    for stage in stages:
        name = stage["name"]
        if name in progress["finished"]:
            print(f"[pipeline] {name}: finished in an earlier run ({progress['seconds'][name]:.0f} s), skipped")
            continue
        if interrupted.get("stage") == name:
            first_started, so_far = interrupted["first_started"], progress["seconds"].get(name, 0.0)
            resume, why_not = resumable(root, first_started)
            print(
                f"[pipeline] {name}: continuing the interrupted stage ({so_far:.0f} s before), "
                + (
                    "resumed (--resume True) from its newest checkpoint or evaluation record"
                    if resume
                    else f"from its start: {why_not}"
                ),
                flush=True,
            )
        else:
            first_started, so_far, resume = time.time(), 0.0, False
            progress["pieces"][name] = 0
        command = stage_command(args.bundle, stage, [*overrides, *(["--resume", cli_value(True)] if resume else [])])
        progress["running"] = {"stage": name, "first_started": first_started}
        progress["pieces"][name] += 1
        record(0.0)
        print(f"[pipeline] {name}: {' '.join(command)}", flush=True)
        status, seconds = run_stage(command, record)
        progress["seconds"][name] = round(so_far + seconds, 1)
        if status < 0:  # killed by a signal (a job's end, the OOM killer): an interruption, to resume from
            record()
            print(f"[pipeline] stage '{name}' was killed by signal {-status}; --continue resumes it", file=sys.stderr)
            return 128 - status
        progress["running"] = None
        if status != 0:  # a failure: --continue starts the stage again rather than resuming from its checkpoint
            del progress["seconds"][name], progress["pieces"][name]
            record()
            print(f"[pipeline] stage '{name}' failed with exit status {status}", file=sys.stderr)
            return status
        progress["finished"].append(name)
        record()
    times = {name: progress["seconds"][name] for name in names}
    result = {**times, "total": round(sum(times.values()), 1)}
    continued = {name: n for name, n in progress["pieces"].items() if n > 1}
    if continued:
        result["pieces"] = continued
    (root / "pipeline_times.json").write_text(json.dumps(result, indent=1))
    print("[pipeline] seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    # a scheduler's SIGTERM (a job's time limit) as SystemExit, so the running stage is stopped with the pipeline
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
