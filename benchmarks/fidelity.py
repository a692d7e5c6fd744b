"""One fidelity table across the five methods and their baselines, on the project's phantoms (issue 11).

    python benchmarks/fidelity.py --quick        # every run at a small scale: minutes, for checking the machinery
    python benchmarks/fidelity.py                # every run at its bundle's default scale: hours on 2 cores
    python benchmarks/fidelity.py --runs vagan/boxes,icam/boxes [--fresh] [--root DIR] [--out FILE]
    python benchmarks/fidelity.py --runs acat/ct_stroke --merge benchmarks/results/fidelity.json

Each run is one bundle's documented pipeline (``python -m common.pipeline bundles/<name> --pipeline ...``: its
training stages, the comparators it trains, then ``evaluate.json``) on one data set, in its own folder
``<root>/<bundle>_<dataset>``. The same data set folder serves every run on it, so VA-GAN and ICAM are compared
on the very same images. A finished run is reused (its evaluate outputs are read again) unless ``--fresh``
or its overrides changed, so the full benchmark can be built up over several sessions; a run that was stopped
part way (a job's time limit) is continued where it stopped (``common.pipeline --continue``: finished stages
skipped, the interrupted stage resumed from its newest checkpoint or evaluation record) unless ``--fresh``, and
its time is the sum of its pieces (each invocation's commit, thread setting and processor are kept in the run's
record and shown beside its wall time). ``--merge`` carries the other runs' records over from an earlier results JSON
(the run folders may be gone by then: the full benchmark takes more hours than one machine keeps them), refusing
any record whose pipeline or overrides differ from the run's current ones.

The table collects what each ``evaluate.json`` wrote (``eval/*metrics.json``: mean, per-case sd, case count and
the paper's figure; ``eval/tvd_scores.json`` for the TVD score) and puts the methods that share a data set
side by side: VA-GAN vs ICAM vs gradient / guided backprop / integrated gradients / Grad-CAM / occlusion by
NCC on ``boxes`` and ``brain_atrophy`` (each bundle's baselines run on that bundle's own classifier, so both
sets are shown); the attribution-constrained classifier vs the unconstrained one with gradient and Grad-CAM
by Dice and AUPRC on ``brain_tumour`` and ``brain_ms``; ACAT vs its baseline classifier and the saliency
methods' localisation on ``ct_stroke``; TVD global scores against the phantoms' known ground truth on
``ellipses`` and ``hippocampus_roi``. ``--quick`` numbers come from models trained for a minute or two on
small images: they show the pipeline works end to end, not what the methods can do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common.errors import InputError  # noqa: E402
from common.files import write_text_atomic  # noqa: E402
from common.pipeline import PROGRESS_FILE, cli_value, read_progress, read_stages  # noqa: E402

# The TVD paper's global scores (no evaluate config holds them: the score is the bundle's output, not a target).
TVD_PAPER = {
    ("ellipses", "aspect_ratio"): 0.871,  # Table 1, ellipses: the feature that sets the label
    ("ellipses", "size"): 0.049,  # Table 1: a feature the label does not depend on
    ("hippocampus_roi", "volume"): 0.280,  # Table 2, OASIS-3 hippocampal volume
}
# What the phantom's recipe makes the label depend on (README, "Synthetic data with known ground truth").
TVD_GROUND_TRUTH = {
    ("ellipses", "aspect_ratio"): "sets the label (aspect ratio > 2)",
    ("ellipses", "size"): "label-independent",
    ("hippocampus_roi", "volume"): "sets the label (P = sigmoid((1750 - V) / 80))",
    ("hippocampus_roi", "ventricle_volume"): "label-independent",
    ("hippocampus_roi", "hippocampus"): "region holding the label's cause",
}


@dataclass(frozen=True)
class Run:
    """One bundle pipeline on one data set; ``overrides`` apply at every scale, ``quick`` on top with --quick."""

    bundle: str
    dataset: str
    pipeline: str = "pipeline.json"
    overrides: dict = field(default_factory=dict)
    quick: dict = field(default_factory=dict)
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.bundle}/{self.dataset}"


# Small data shared by the quick runs on one data set (the same request, so one folder serves both methods).
QUICK_BOXES = {"n": 600, "shape": [48, 48], "box": 9, "offset": 14, "jitter": 2}
QUICK_ATROPHY = {"n": 30, "shape": [32, 48, 32]}
QUICK_VAGAN = {"epoch_length": 10, "max_epochs": 3, "critic_steps_boost": 5, "boost_first": 1, "test_max_cases": 40}
# The untrained quick models are rarely confident: cap the rejection sampling of attribute latents.
QUICK_ICAM = {
    "rejection_max_draws": 20,
    "sample_max_draws": 200,
    "val_n_samples": 3,
    "val_max_cases": 8,
    "n_samples": 5,
    "test_max_cases": 6,
    "eval_fallback_thresholds": [0.5, 0.0],
}
QUICK_TUMOUR = {"spatial_size": [64, 80], "max_epochs": 3, "batch_size": 16, "test_max_cases": 40}
QUICK_ATTRIBUTION = {"eg_samples": 20, "ig_steps": 20, "eg_reference_count": 8}
QUICK_TVD = {"n_values": 3, "samples_per_value": 8, "sample_batch_size": 8, "bootstrap_resamples": 500}

RUNS = [
    Run(
        "vagan",
        "boxes",
        quick={"synthetic_params": QUICK_BOXES, "spatial_size": [48, 48], "batch_size": 8, **QUICK_VAGAN},
    ),
    Run(
        "icam",
        "boxes",
        # the same images as vagan/boxes (ICAM pairs each patient with its saved healthy image); no paper figure
        overrides={
            "dataset_dir": "data/boxes",
            "synthetic": "boxes",
            "synthetic_params": {},
            "spatial_size": [112, 112],
            "ncc_target": "effect",
            "paper_metrics": {},
        },
        quick={"synthetic_params": QUICK_BOXES, "spatial_size": [48, 48], "epoch_length": 20, "max_epochs": 2}
        | QUICK_ICAM,
    ),
    Run(
        "vagan",
        "brain_atrophy",
        pipeline="pipeline_brain3d.json",
        quick={
            "synthetic_params": QUICK_ATROPHY,
            "spatial_size": [32, 48, 32],
            "accumulation_steps": 1,
            **QUICK_VAGAN,
            "epoch_length": 3,
            "max_epochs": 1,
            "test_max_cases": 8,
            "ig_steps": 50,
        },
    ),
    Run(
        "icam",
        "brain_atrophy",
        pipeline="pipeline_brain3d.json",
        quick={
            "synthetic_params": QUICK_ATROPHY,
            "spatial_size": [32, 48, 32],
            "epoch_length": 6,  # the baseline classifier's 3D epochs too (the stages share the id)
            "max_epochs": 1,
            **QUICK_ICAM,
            "test_max_cases": 6,
            "ig_steps": 50,
        },
    ),
    Run(
        "attr_constraint",
        "brain_tumour",
        quick={"synthetic_params": {"spatial_dims": 2, "shape": [64, 80], "n": 240}, **QUICK_TUMOUR}
        | QUICK_ATTRIBUTION,
    ),
    Run(
        "attr_constraint",
        "brain_ms",
        pipeline="pipeline_ms.json",
        quick={"synthetic_params": {"spatial_dims": 2, "shape": [64, 80], "n": 240}, **QUICK_TUMOUR}
        | QUICK_ATTRIBUTION,
    ),
    Run(
        "acat",
        "ct_stroke",
        # 10 counterfactual steps instead of the paper's 20: the saliency maps of every item dominate the quick run
        quick={
            "synthetic_params": {"n": 40, "shape": [48, 48, 11], "lesion_hu": [10.0, 18.0]},
            "spatial_size": [48, 48, 11],
            "max_epochs": 2,
            "cf_steps": 10,
        },
    ),
    Run(
        "tvd_score",
        "ellipses",
        pipeline="pipeline_ellipses.json",
        # the paper's learning rates (1e-5) learn nothing in a few epochs: 100x / 30x larger ones for --quick
        quick={
            "synthetic_params": {"n": 1500},
            "classifier_epochs": 3,
            "regressor_epochs": 3,
            "diffusion_epochs": 2,
            "classifier_learning_rate": 1e-3,
            "regressor_learning_rate": 1e-3,
            "diffusion_learning_rate": 3e-4,
            "num_inference_steps": 20,
            **QUICK_TVD,
        },
    ),
    Run(
        "tvd_score",
        "hippocampus_roi",
        quick={
            "synthetic_params": {"n": 60, "shape": [16, 16, 16], "spacing": 4.0},
            "spatial_size": [16, 16, 16],
            "classifier_epochs": 8,
            "regressor_epochs": 8,
            "autoencoder_epochs": 8,
            "diffusion_epochs": 15,
            "num_inference_steps": 10,
            **QUICK_TVD,
        },
    ),
]


def run_overrides(run: Run, quick: bool, root: Path) -> dict:
    """Every id the run sets: its own folder, the data set folder (shared by the runs on the same data) in quick
    mode, the run's overrides, then the quick ones."""
    overrides = {"bundle_root": str(root / f"{run.bundle}_{run.dataset}" / "bundle"), **run.overrides}
    if quick:
        overrides["dataset_dir"] = str(root / "data" / run.dataset)
        overrides.update(run.quick)
    return overrides


def run_pipeline(run: Run, overrides: dict, log_path: Path, continue_stopped: bool = False) -> float:
    """The bundle's pipeline command with ``overrides`` (``--continue``: picking up a stopped run of the same
    command); returns its wall time; raises with the log's tail. A continued run's log is appended to."""
    command = [sys.executable, "-m", "common.pipeline", f"bundles/{run.bundle}", "--pipeline", run.pipeline]
    command += ["--continue"] if continue_stopped else []
    command += pipeline_args(overrides)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "a" if continue_stopped else "w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        status = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_env())
    seconds = time.monotonic() - start
    if status != 0:
        tail = log_path.read_text().splitlines()[-25:]
        raise RuntimeError(f"{run.name} failed (exit status {status}); last lines of {log_path}:\n" + "\n".join(tail))
    return seconds


def pipeline_args(overrides: dict) -> list[str]:
    return [arg for key, value in overrides.items() for arg in (f"--{key}", cli_value(value))]


def stopped_here(run: Run, overrides: dict) -> bool:
    """Whether the run's bundle root holds the progress record of a stopped run of this very pipeline command."""
    stages = [stage["name"] for stage in read_stages(REPO / "bundles" / run.bundle, run.pipeline)]
    path = Path(overrides["bundle_root"]) / PROGRESS_FILE
    try:
        return bool(read_progress(path, run.pipeline, stages, pipeline_args(overrides)))
    except InputError:  # another command's record: the run starts again, and a new record with it
        return False


INVOCATIONS_FILE = "fidelity_invocations.json"


def code_version(repo: Path = REPO) -> str:
    """The commit checked out in ``repo``, with ``+changes-<hash>`` when tracked files outside
    ``benchmarks/results`` (which this script writes) differ from it, the hash that of the difference; 'unknown'
    outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        difference = git("diff", "HEAD", "--", ".", ":(exclude)benchmarks/results")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    if not difference:
        return commit
    return f"{commit}+changes-{hashlib.sha256(difference.encode()).hexdigest()[:8]}"


def note_invocation(path: Path, continued: bool) -> list[dict]:
    """Adds this invocation (start time, code version, thread setting) to the run's list and returns the list.
    A run made in pieces may span commits and machines; a result that differs from an earlier one of the same
    settings can then be traced to what ran each piece. A fresh start begins a new list; a continued run whose
    list is missing or unreadable (pieces run before fidelity.py kept it) begins with a 'not recorded' entry."""
    earlier = []
    if continued:
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = None
        if not isinstance(earlier, list):
            earlier = [{"started": "not recorded", "code": "not recorded", "omp_num_threads": "not recorded"}]
    invocations = earlier + [
        {
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "code": code_version(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            "cpu": cpu_description(),
        }
    ]
    write_text_atomic(path, json.dumps(invocations, indent=1) + "\n")
    return invocations


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def collect(eval_dir: Path) -> dict:
    """Everything the evaluate stage wrote that the table uses: {report prefix or 'tvd': contents}."""
    reports = {}
    for path in sorted(eval_dir.glob("*metrics.json")):
        reports[path.name[: -len("metrics.json")].rstrip("_") or "attribution"] = json.loads(path.read_text())
    tvd = eval_dir / "tvd_scores.json"
    if tvd.is_file():
        reports["tvd"] = json.loads(tvd.read_text())
    if not reports:
        raise RuntimeError(f"{eval_dir}: no metrics.json or tvd_scores.json; did the evaluate stage run?")
    return reports


def run_key(run: Run, overrides: dict) -> str:
    """What identifies a run's measurement: its pipeline and every override (the root folder included)."""
    return hashlib.sha256(json.dumps([run.pipeline, overrides], sort_keys=True).encode()).hexdigest()[:16]


def execute(run: Run, quick: bool, root: Path, fresh: bool) -> dict:
    """Run (or reuse) one benchmark run; returns its record: overrides, stage times, collected reports."""
    overrides = run_overrides(run, quick, root)
    run_root = Path(overrides["bundle_root"]).parent
    record_path = run_root / "fidelity_run.json"
    key = run_key(run, overrides)
    if not fresh and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("key") == key:
            print(f"[fidelity] {run.name}: reusing the finished run in {run_root}", flush=True)
            record["reports"] = collect(Path(overrides["bundle_root"]) / "eval")
            return record
    stopped = not fresh and stopped_here(run, overrides)
    print(f"[fidelity] {run.name}: {'continuing' if stopped else 'running'} {run.pipeline} in {run_root}", flush=True)
    invocations = note_invocation(run_root / INVOCATIONS_FILE, continued=stopped)
    seconds = run_pipeline(run, overrides, run_root / "pipeline.log", continue_stopped=stopped)
    times_file = Path(overrides["bundle_root"]) / "pipeline_times.json"
    stage_times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    pieces = stage_times.pop("pieces", {})
    record = {
        "run": run.name,
        "pipeline": run.pipeline,
        "key": key,
        "overrides": overrides,
        # a continued run: the stages' summed time (wall time spent, redone work included), not this call's
        "seconds": stage_times["total"] if stopped else round(seconds, 1),
        "stage_seconds": stage_times,
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    if pieces:
        record["stage_pieces"] = pieces
    record["invocations"] = invocations
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"[fidelity] {run.name}: done in {seconds:.0f} s", flush=True)
    return {**record, "reports": collect(Path(overrides["bundle_root"]) / "eval")}


def carried_records(path: Path, runs: list[Run], quick: bool) -> dict:
    """The records of ``runs`` in an earlier results JSON (``--merge``), each checked against the run as it is
    defined now: the same pipeline and overrides at the earlier record's own root, else ValueError naming what
    differs (a stale record would put a different measurement under the run's name)."""
    try:
        earlier = json.loads(path.read_text())["records"]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"--merge {path}: not a results JSON written by fidelity.py ({error})") from error
    carried = {}
    for run in runs:
        record = earlier.get(run.name)
        if record is None:
            continue
        recorded = record.get("overrides", {})
        root = Path(recorded.get("bundle_root", "root/run/bundle")).parents[1]
        expected = run_overrides(run, quick, root)
        if record.get("pipeline") != run.pipeline or run_key(run, recorded) != run_key(run, expected):
            differing = sorted(k for k in set(recorded) | set(expected) if recorded.get(k) != expected.get(k))
            raise ValueError(
                f"--merge {path}: the record of {run.name} was made with pipeline {record.get('pipeline')} and "
                f"overrides differing from the current ones in {differing or 'none'} (now {run.pipeline}); "
                f"rerun it with --runs {run.name} instead of merging it"
            )
        carried[run.name] = {**record, "carried_from": str(path)}
    return carried


# ---------------------------------------------------------------------------------------------- the tables


def _number(value, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _paper_figure(value) -> str:
    """A paper's figure as stored in the configs: two decimals, or all the digits it has where two would lose some
    (MS NoConsG Dice 0.001 and NoConsGC 0.0003 would read 0.00). A trailing zero the paper printed (0.280) is not
    kept: the configs store numbers."""
    if isinstance(value, str):
        return value
    return f"{value:.2f}" if round(value, 2) == value else f"{value:g}"


def _cell(entry: dict | None, column: str, cases: bool = False) -> str:
    """'mean +/- sd (paper p)' of one column of one method's metrics.json entry; with ``cases``, the number of test
    cases after the sd, for tables whose columns come from evaluations of different sizes."""
    if not entry or column not in entry:
        return ""
    text = _number(entry[column])
    if entry.get(f"{column}_sd") is not None:
        text += f" +/- {_number(entry[f'{column}_sd'])}"
    if cases and entry.get("n") is not None:
        text += f", {entry['n']} cases"
    paper = entry.get(f"{column}_paper")
    if paper is not None:
        text += f" (paper {_paper_figure(paper)})"
    return text


def _report(records: dict, name: str, prefix: str = "attribution") -> dict:
    return records.get(name, {}).get("reports", {}).get(prefix, {})


def ncc_table(records: dict) -> list[str]:
    """VA-GAN vs ICAM vs the baselines by NCC on the data both ran on."""
    datasets = ["boxes", "brain_atrophy"]
    lines = [
        "### Disease-effect maps against the ground truth (NCC), VA-GAN vs ICAM vs baselines",
        "",
        "VA-GAN's evaluation: NCC of the signed map with the ground-truth effect (`effect`); ICAM's: NCC(-) of the "
        "patient-to-control FA map with the effect. Baselines run on each bundle's own classifier. Cases: the test "
        "patients each evaluation took (its `test_max_cases`).",
        "",
        "| method | " + " | ".join(datasets) + " |",
        "|---|" + "---|" * len(datasets),
    ]
    for bundle, column in (("vagan", "ncc"), ("icam", "ncc_minus")):
        methods = list(dict.fromkeys(m for d in datasets for m in _report(records, f"{bundle}/{d}")))
        for method in methods:
            if method in ("accuracy",) or not any(
                column in _report(records, f"{bundle}/{d}").get(method, {}) for d in datasets
            ):
                continue
            label = method if method in ("vagan", "icam") else f"{method} ({bundle} classifier)"
            cells = [_cell(_report(records, f"{bundle}/{d}").get(method), column, cases=True) for d in datasets]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def constraint_table(records: dict) -> list[str]:
    """The attribution-constrained classifier vs the unconstrained one (gradient, Grad-CAM) by Dice and AUPRC."""
    datasets = ["brain_tumour", "brain_ms"]
    columns = ["dice", "auprc", "tpr", "tnr"]
    header = [f"{d} {c}" for d in datasets for c in ("Dice", "AUPRC")]
    lines = [
        "### Attribution-constrained classifier vs unconstrained (segmentation by the attribution map)",
        "",
        "| method | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    methods = list(dict.fromkeys(m for d in datasets for m in _report(records, f"attr_constraint/{d}")))
    for method in methods:
        cells = [_cell(_report(records, f"attr_constraint/{d}").get(method), c) for d in datasets for c in columns[:2]]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def acat_table(records: dict) -> list[str]:
    run = "acat/ct_stroke"
    lines = ["### ACAT vs its baseline classifier, and the saliency methods' localisation (ct_stroke)", ""]
    classification = _report(records, run, "classification")
    if classification:
        columns = list(dict.fromkeys(c for e in classification.values() for c in e if _is_metric(e, c)))
        lines += ["| classifier | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for method, entry in classification.items():
            lines.append(f"| {method} | " + " | ".join(_cell(entry, c) for c in columns) + " |")
        lines.append("")
    saliency = _report(records, run, "saliency")
    if saliency:
        columns = list(dict.fromkeys(c for e in saliency.values() for c in e if _is_metric(e, c)))
        lines += ["| saliency method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for method, entry in saliency.items():
            lines.append(f"| {method} | " + " | ".join(_cell(entry, c) for c in columns) + " |")
    return lines


def _is_metric(entry: dict, column: str) -> bool:
    return column != "n" and not column.endswith(("_sd", "_paper"))


def tvd_table(records: dict) -> list[str]:
    lines = [
        "### TVD score against the phantoms' ground truth",
        "",
        "| data set | feature | ground truth | global score (bootstrap sd) | from the test data alone | paper |",
        "|---|---|---|---|---|---|",
    ]
    for dataset in ("ellipses", "hippocampus_roi"):
        report = records.get(f"tvd_score/{dataset}", {}).get("reports", {}).get("tvd")
        if not report:
            continue
        data_scores = (report.get("test") or {}).get("data_scores") or {}
        for feature, scores in report["features"].items():
            variance = scores.get("bootstrap_variance_global")
            sd = None if variance is None else math.sqrt(variance)
            score = _number(scores.get("global_score")) + ("" if sd is None else f" ({_number(sd)})")
            if scores.get("error"):
                score = f"none ({scores['error'].split(';')[0]})"
            truth = TVD_GROUND_TRUTH.get((dataset, feature), "")
            data = _number((data_scores.get(feature) or {}).get("global_score"))
            paper = TVD_PAPER.get((dataset, feature))
            lines.append(f"| {dataset} | {feature} | {truth} | {score} | {data} | {_number(paper)} |")
    return lines


def all_metrics_table(records: dict) -> list[str]:
    """method x data set x metric: every figure each evaluate run wrote (AttributionReport files)."""
    lines = [
        "### Every metric (method x data set x metric)",
        "",
        "| run | report | method | metric | ours (mean +/- per-case sd) | paper | cases |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, record in records.items():
        for prefix, report in record.get("reports", {}).items():
            if prefix == "tvd":
                continue
            for method, entry in report.items():
                for column in [c for c in entry if _is_metric(entry, c)]:
                    ours = _number(entry[column])
                    if entry.get(f"{column}_sd") is not None:
                        ours += f" +/- {_number(entry[f'{column}_sd'])}"
                    paper = entry.get(f"{column}_paper")
                    paper = "" if paper is None else _paper_figure(paper)
                    n = "" if entry.get("n") is None else str(entry["n"])
                    lines.append(f"| {name} | {prefix} | {method} | {column} | {ours} | {paper} | {n} |")
    return lines


def timing_table(records: dict) -> list[str]:
    lines = [
        "### Wall time per run",
        "",
        "Code and processor: what each invocation of the run ran on (several when it was made in pieces; "
        "`+changes-<hash>`: with uncommitted changes; not recorded: before fidelity.py kept it).",
        "",
        "| run | seconds | stages (s) | finished | code | processor |",
        "|---|---:|---|---|---|---|",
    ]
    for name, record in records.items():
        pieces = record.get("stage_pieces", {})
        stages = ", ".join(
            f"{k} {v:.0f}" + (f" (in {pieces[k]} pieces)" if k in pieces else "")
            for k, v in record.get("stage_seconds", {}).items()
            if k != "total"
        )
        invocations = record.get("invocations", [])
        codes = ", ".join(dict.fromkeys(i["code"] for i in invocations)) or "not recorded"
        cpus = "; ".join(dict.fromkeys(i.get("cpu", "not recorded") for i in invocations)) or "not recorded"
        seconds = record.get("seconds", 0)
        lines.append(f"| {name} | {seconds:.0f} | {stages} | {record.get('finished', '')} | {codes} | {cpus} |")
    return lines


def plot_results(records: dict, path: Path) -> None:
    """Four panels of the headline comparisons: NCC per map method, Dice / AUPRC of the constrained and
    unconstrained classifiers, ACAT's localisation per saliency method, TVD global scores; the paper's figure
    as a black tick where it has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for bundle, column in (("vagan", "ncc"), ("icam", "ncc_minus")):
        for dataset in ("boxes", "brain_atrophy"):
            report = _report(records, f"{bundle}/{dataset}")
            bars = [(f"{m} {dataset[:5]}", e.get(column), e.get(f"{column}_paper")) for m, e in report.items()]
            panels.append((f"{bundle} NCC", bars))
    for dataset in ("brain_tumour", "brain_ms"):
        report = _report(records, f"attr_constraint/{dataset}")
        bars = [(f"{m} {dataset[6:]}", e.get("dice"), e.get("dice_paper")) for m, e in report.items()]
        panels.append(("attr_constraint Dice", bars))
    saliency = _report(records, "acat/ct_stroke", "saliency")
    panels.append(
        ("ACAT localisation", [(m, e.get("localisation"), e.get("localisation_paper")) for m, e in saliency.items()])
    )
    tvd = []
    for dataset in ("ellipses", "hippocampus_roi"):
        report = records.get(f"tvd_score/{dataset}", {}).get("reports", {}).get("tvd") or {"features": {}}
        tvd += [
            (f"{f} ({dataset[:4]})", s.get("global_score"), TVD_PAPER.get((dataset, f)))
            for f, s in report["features"].items()
        ]
    panels.append(("TVD global score", tvd))
    merged: dict[str, list] = {}
    for title, bars in panels:
        merged.setdefault(title, []).extend(b for b in bars if b[1] is not None)
    merged = {t: b for t, b in merged.items() if b}
    if not merged:
        return
    fig, axes = plt.subplots(1, len(merged), figsize=(3.2 * len(merged), 3.4), squeeze=False)
    for ax, (title, bars) in zip(axes[0], merged.items()):
        positions = range(len(bars))
        ax.bar(positions, [b[1] for b in bars], color="tab:blue")
        for x, (_, _, paper) in zip(positions, bars):
            if isinstance(paper, (int, float)):
                ax.plot([x - 0.4, x + 0.4], [paper, paper], color="black", linewidth=2)
        ax.set_xticks(list(positions), [b[0] for b in bars], rotation=70, ha="right", fontsize=6)
        ax.set_title(title, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The processor and the vector kernels torch's own operators dispatch to, e.g. 'AMD EPYC (family 25 model 17),
    AVX512 kernels'. Machines may round differently (other kernels, other oneDNN / BLAS code paths), so the same seed
    can train to other weights; recorded so that runs that differ can be traced to what ran them."""
    import torch

    fields = {}
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor()
    if "cpu family" in fields:
        name = f"{name or 'unknown processor'} (family {fields['cpu family']} model {fields.get('model', '?')})"
    kernels = f"{torch.backends.cpu.get_cpu_capability()} kernels"
    return f"{name}, {kernels}" if name else kernels


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that ran ``script`` (its path from the repository root) with ``argv`` (default: this process's
    arguments), quoted so that it can be pasted into a shell again (JSON values, lists)."""
    return shlex.join(["python", script, *(sys.argv[1:] if argv is None else argv)])


def machine() -> str:
    import torch

    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores ({cpu_description()}), torch {torch.__version__} threads "
        f"{torch.get_num_threads()}"
    )


def write_results(records: dict, failures: dict, out: Path, command: str, quick: bool, wall: float) -> None:
    scale = (
        "quick (small images, minutes of training: checks the machinery, not the methods)"
        if quick
        else "each bundle's default"
    )
    lines = [
        "# Fidelity across methods" + (" (--quick)" if quick else ""),
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}; {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Scale: {scale}. Wall time of this invocation: {wall:.0f} s "
        f"(runs reused from earlier invocations count their own time below).",
        "",
    ]
    carried = [name for name, record in records.items() if record.get("carried_from")]
    if carried:
        sources = sorted({records[name]["carried_from"] for name in carried})
        lines += [
            f"Carried over unchanged from {', '.join(f'`{s}`' for s in sources)} (earlier invocations; their "
            f"finish dates below): {', '.join(carried)}.",
            "",
        ]
    lines += [f"![headline comparisons; black ticks: the paper's figures]({out.with_suffix('.png').name})", ""]
    for table in (ncc_table, constraint_table, acat_table, tvd_table, timing_table, all_metrics_table):
        lines += table(records) + [""]
    if failures:
        lines += ["### Failed runs", ""] + [
            f"- {name}: {message.splitlines()[0]}" for name, message in failures.items()
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"records": records, "failures": failures}, indent=1) + "\n")
    plot_results(records, out.with_suffix(".png"))
    print(f"[fidelity] wrote {out} and its .json and .png", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small data and short schedules (minutes)")
    parser.add_argument("--runs", default="", help="comma-separated runs (bundle/dataset); default: all")
    parser.add_argument(
        "--root", type=Path, default=None, help="where runs live (default runs/benchmarks/fidelity[_quick])"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="rerun finished runs and restart stopped ones instead of reusing them"
    )
    parser.add_argument("--out", type=Path, default=None, help="markdown table (a .json is written next to it)")
    parser.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="an earlier results JSON: the runs not selected by --runs are carried over from it",
    )
    args = parser.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    root = (args.root or REPO / "runs" / "benchmarks" / f"fidelity{suffix}").resolve()
    out = args.out or REPO / "benchmarks" / "results" / f"fidelity{suffix}.md"
    selected = RUNS
    if args.runs:
        wanted = args.runs.split(",")
        unknown = sorted(set(wanted) - {r.name for r in RUNS})
        if unknown:
            parser.error(f"unknown run(s) {unknown}; expected some of {[r.name for r in RUNS]}")
        selected = [r for r in RUNS if r.name in wanted]
    carried = {}
    if args.merge:
        try:
            carried = carried_records(args.merge, [r for r in RUNS if r not in selected], args.quick)
        except ValueError as error:
            parser.error(str(error))
    start = time.monotonic()
    records, failures = {}, {}
    for run in selected:
        try:
            records[run.name] = execute(run, args.quick, root, args.fresh)
        except RuntimeError as error:  # one failing run must not lose the others' results
            print(f"[fidelity] {error}", file=sys.stderr, flush=True)
            failures[run.name] = str(error)
    records = {r.name: records.get(r.name, carried.get(r.name)) for r in RUNS if r.name in records | carried}
    command = command_line("benchmarks/fidelity.py", argv)
    write_results(records, failures, out, command, args.quick, time.monotonic() - start)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
