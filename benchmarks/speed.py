"""Speed of the five methods (issue 11): training iterations per second, inference time and peak memory per image
against Captum integrated gradients and occlusion measured in the same run, and TVD samples per second (DDPM, DDIM).

    python benchmarks/speed.py --quick     # under 15 min on a 2-core CPU: benchmarks/results/speed_quick.md
    python benchmarks/speed.py             # every size: benchmarks/results/speed.md (hours on a 2-core CPU)
    python benchmarks/speed.py --device cuda --out benchmarks/results/speed_cuda.md
    python benchmarks/speed.py --parts inference --methods vagan icam --sizes 128x160 96x112x96

Everything is built from the bundles' own configs with ``monai.bundle.ConfigParser`` (untrained weights: speed and
memory do not depend on the weights' values), on the device of ``--device`` (default: CUDA when available), with the
bundles' own AMP setting there.

1. Training: each training stage (``pipeline.json`` for the multi-stage bundles) at the bundle's default and at its
   preset (``brain3d.json``; TVD score: ``ellipses.json``), on a small synthetic data set of the stage's own recipe
   generated into a temporary folder. The config's ``train#trainer`` (Ignite engine) runs with the config's ``run``
   handlers attached; a handler times each iteration from fetching its batch to the end of its handlers (validation
   and checkpoints at epoch ends are never reached), skips the warm-up iterations and stops the engine. A stage that
   reads earlier stages' outputs gets them with untrained weights (ACAT: classifier, autoencoder and saliency maps;
   TVD diffusion: the autoencoder).
2. Inference: the map each method writes, for one preprocessed image already on the device (NIfTI reading,
   preprocessing and writing excluded), at one 2D size and two 3D sizes, next to integrated gradients (200 steps)
   and occlusion of the attribution-constraint PatchGAN classifier at the same size
   (``common.attribution.baselines.attribute``, as the bundles' evaluations run them); ratios method / baseline.
   ACAT, a slice-wise method for 11-slice CT, runs on the 2D size (one slice) and on its own CT volume (64x64x11),
   against the baselines on its own slice classifier there.
3. TVD score: guided samples per second of ``evaluate#sample_fn`` (the bundle's own sampler) with DDIM (50 steps)
   and DDPM (1000 steps) at the default latent size.

Each measurement runs in its own process forked from a server that has imported torch and the bundles' code once
(``multiprocessing`` forkserver), so peak memory is the item's own: on CUDA ``torch.cuda.max_memory_allocated`` above
the memory allocated after the networks are built; on the CPU the peak resident memory (``VmHWM``, reset through
``/proc/self/clear_refs`` after the build) above the resident memory after the build. Map and sample times are
medians over the timed calls after the warm-up ones; training times are means (throughput). The report (markdown +
JSON) gives the command, machine, date, the run's wall time and how much CPU other processes used meanwhile (sampled
from ``/proc``). On a CPU shared with other jobs, ``--threads 1`` gives steadier numbers: torch's threads wait for
each other at every operation, and with the cores busy a 2-thread VA-GAN iteration of 32x32 images took 16-30 s
instead of 0.4 s with one thread.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import threading
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the bundles' configs import the repository's common package

import torch  # noqa: E402
from fidelity import command_line  # noqa: E402  (this script's folder is on the path when it runs)
from ignite.engine import Events  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from common.handlers.memory import trim_freed_heap  # noqa: E402
from common.pipeline import read_stages  # noqa: E402

BUNDLES = REPO / "bundles"
METHODS = ("vagan", "icam", "attr_constraint", "acat", "tvd_score")
PARTS = ("training", "inference", "tvd")
MIB = 2**20
IG_STEPS = 200
SAMPLERS = {"ddim": 50, "ddpm": 1000}  # the TVD bundle's steps: num_inference_steps is 50 for DDIM, T for DDPM
# Heavy imports done once by the forkserver, so that each measurement process starts in well under a second.
PRELOAD = ["__main__", "torch", "monai", "ignite", "captum", "common.networks", "common.engines", "common.tvd"]


# ---------------------------------------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class TrainingSetting:
    """A bundle's training at one size: its stages' configs and the synthetic cases generated for them."""

    method: str
    name: str  # "default" or the preset file
    stages: tuple[tuple[str, tuple[str, ...]], ...]  # (stage name, config files merged in order)
    cases: int  # synthetic cases: a few full batches; the timed iterations cycle through them
    volumes: bool  # 3D inputs (the profile's 3D warm-up and iteration counts)


def _pipeline_stages(method: str, pipeline_file: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The training stages of a multi-stage bundle, as its pipeline file lists them (evaluation and the ACAT saliency
    pass are not training: the saliency pass is timed as ACAT's inference)."""
    stages = read_stages(BUNDLES / method, pipeline_file)
    return tuple((s["name"], tuple(s["configs"])) for s in stages if s["name"] not in ("evaluate", "saliency"))


def training_settings() -> list[TrainingSetting]:
    """Every bundle at its default and at its preset (ACAT has none)."""

    def single(*configs):
        return (("train", ("train.json", *configs)),)

    # Cases per data set: at least one full batch of every stage in the training split (64 % of the cases for the
    # brain and box recipes, 70 % for ACAT's resplit; two ROIs per hippocampus subject), a few more for shuffling.
    return [
        TrainingSetting("vagan", "default", single(), 64, False),
        TrainingSetting("vagan", "brain3d.json", single("brain3d.json"), 12, True),
        TrainingSetting("icam", "default", single(), 16, False),
        TrainingSetting("icam", "brain3d.json", single("brain3d.json"), 12, True),
        TrainingSetting("attr_constraint", "default", single(), 80, False),
        TrainingSetting("attr_constraint", "brain3d.json", single("brain3d.json"), 16, True),
        TrainingSetting("acat", "default", _pipeline_stages("acat", "pipeline.json"), 24, True),
        TrainingSetting("tvd_score", "default", _pipeline_stages("tvd_score", "pipeline.json"), 40, True),
        TrainingSetting(
            "tvd_score", "ellipses.json", _pipeline_stages("tvd_score", "pipeline_ellipses.json"), 160, False
        ),
    ]


# Inference: what each method writes for one image ({...}: read from the bundle's inference config).
MAPS = {
    "vagan": "effect map M(x) and counterfactual x + M(x): one generator pass",
    "icam": "FA maps (mean, variance) over {n_samples} sampled attribute latents: {n_samples} translations",
    "attr_constraint": "gradient map G of the PatchGAN classifier: one forward and backward pass",
    "acat": "counterfactual saliency: {cf_steps} gradient steps through autoencoder and classifier, slice by slice",
}


@dataclass
class Profile:
    """Repeats and sizes of a run (``*_3d``: for volumes; training and inference repeats are counted separately)."""

    description: str
    sizes: tuple[str, ...]  # inference sizes; ACAT (2D slices) runs on the 2D ones and on its own CT volume
    train_warmup_2d: int
    train_warmup_3d: int
    train_iterations_2d: int
    train_iterations_3d: int
    train_budget_s: float  # timed iterations stop once they add up to this (at least one is timed)
    infer_warmup_2d: int
    infer_warmup_3d: int
    infer_repeats_2d: int
    infer_repeats_3d: int
    occlusion_2d: tuple[int, int]  # window, stride in voxels
    occlusion_3d: tuple[int, int]
    tvd_samples: int | None  # samples in the timed batch; None: the evaluate config's sample_batch_size
    sampler_steps: dict = field(default_factory=dict)  # {sampler: steps} instead of the bundle's (tiny runs only)
    acat_volume: list | None = None  # ACAT's CT volume size; None: its inference config's spatial_size
    training_overrides: dict = field(default_factory=dict)  # {(method, setting): {id: value}} (tiny runs only)
    inference_overrides: dict = field(default_factory=dict)  # {method: {id: value}} (tiny runs only)


PROFILES = {
    "full": Profile(
        description="every size; 3D occlusion in non-overlapping 16^3 blocks (ICAM's 10 / 5 voxels would take "
        "6,804 and 17,856 passes of a whole volume, hours per map on a CPU)",
        sizes=("128x160", "96x112x96", "128x160x128"),
        train_warmup_2d=2,
        train_warmup_3d=1,
        train_iterations_2d=10,
        train_iterations_3d=5,
        train_budget_s=600,
        infer_warmup_2d=1,
        infer_warmup_3d=1,
        infer_repeats_2d=5,
        infer_repeats_3d=2,
        occlusion_2d=(10, 5),
        occlusion_3d=(16, 16),
        tvd_samples=None,
    ),
    "quick": Profile(
        description="128x160x128 left out; 3D occlusion in non-overlapping 24^3 blocks; "
        "no warm-up before a 3D training iteration or map, so those times include first-call overheads; "
        "training iterations stop after 30 s of timed ones; one sample per TVD sampler (a sample costs more alone "
        "than in the full run, which draws the evaluate config's sample_batch_size at once). IG keeps its 200 steps "
        "and the samplers their 50 / 1000 steps",
        sizes=("128x160", "96x112x96"),
        train_warmup_2d=1,
        train_warmup_3d=0,
        train_iterations_2d=3,
        train_iterations_3d=2,
        train_budget_s=30,
        infer_warmup_2d=1,
        infer_warmup_3d=0,
        infer_repeats_2d=3,
        infer_repeats_3d=1,
        occlusion_2d=(10, 5),
        occlusion_3d=(24, 24),
        tvd_samples=1,
    ),
    "tiny": Profile(
        description="the test's: tiny sizes, data and sampler steps",
        sizes=("32x32", "32x32x32"),
        train_warmup_2d=1,
        train_warmup_3d=1,
        train_iterations_2d=2,
        train_iterations_3d=2,
        train_budget_s=30,
        infer_warmup_2d=1,
        infer_warmup_3d=1,
        infer_repeats_2d=2,
        infer_repeats_3d=1,
        occlusion_2d=(8, 8),
        occlusion_3d=(8, 8),
        tvd_samples=1,
        sampler_steps={"ddim": 2, "ddpm": 4},
        acat_volume=[32, 32, 3],
        training_overrides={
            ("vagan", "default"): {"spatial_size": [32, 32], "synthetic_params": {"shape": [32, 32]}, "batch_size": 4},
            ("vagan", "brain3d.json"): {"spatial_size": [16, 24, 16], "synthetic_params": {"shape": [16, 24, 16]}},
            ("icam", "default"): {"spatial_size": [32, 32], "synthetic_params": {"shape": [32, 32]}},
            ("icam", "brain3d.json"): {"spatial_size": [16, 32, 16], "synthetic_params": {"shape": [16, 32, 16]}},
            ("attr_constraint", "default"): {"spatial_size": [32, 40], "synthetic_params": {"shape": [32, 40]}},
            ("attr_constraint", "brain3d.json"): {
                "spatial_size": [32, 32, 32],
                "synthetic_params": {"shape": [32, 32, 32], "spacing": None},
            },
            ("acat", "default"): {"spatial_size": [32, 32, 3], "synthetic_params": {"shape": [32, 32, 3]}},
            ("tvd_score", "default"): {
                "spatial_size": [16, 16, 16],
                "synthetic_params": {"shape": [16, 16, 16], "spacing": 4.0},
            },
        },
        inference_overrides={"icam": {"n_samples": 4}},
    ),
}


# ---------------------------------------------------------------------------------------------------------------------
# Measurement helpers (run inside the measurement processes)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_bytes(field_name: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field_name + ":"))


class PeakMemory:
    """Peak memory of what runs after :meth:`reset`, above the memory in use at the reset.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the peak resident set size ``VmHWM``, which writing 5 to
    ``/proc/self/clear_refs`` resets to the current RSS (Linux); where that is refused, the process's lifetime
    peak (``ru_maxrss``), which may then include the network build.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        self.method = "cuda max_memory_allocated" if device.type == "cuda" else "VmHWM after clear_refs"

    def reset(self) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        # Heap memory freed by the build (data generation, caching) but kept by glibc would be reused unseen by RSS:
        # hand it back to the system first, so that what the measured code allocates shows up.
        gc.collect()
        trim_freed_heap()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.method = "ru_maxrss (process lifetime)"
        self.base = _proc_status_bytes("VmRSS")

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self.base) / MIB
        if self.method.startswith("VmHWM"):
            peak = _proc_status_bytes("VmHWM")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return (peak - self.base) / MIB


def bundle_parser(method: str, configs, overrides: dict) -> ConfigParser:
    """The bundle's configs (file names in ``bundles/<method>/configs``, merged in order) with ``overrides``."""
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / method / "configs" / name) for name in configs])
    parser.update(overrides)
    return parser


def save_untrained(parser: ConfigParser, network_id: str, path: Path) -> None:
    """A stage's checkpoint with the network's random initialisation, for a later stage that loads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(parser.get_parsed_content(network_id).state_dict(), path)


def first_batch_dimension(batch) -> int:
    """Items in a batch (dict or sequence of tensors): the leading dimension of its first tensor."""
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, torch.Tensor):
            return int(value.shape[0])
    return 0


class IterationTimer:
    """Seconds of each training iteration, from fetching its batch to the end of its handlers.

    Only iterations with a full batch count (a loader without ``drop_last`` ends each pass with a smaller one). The
    first ``warmup`` are not timed; the engine is stopped after ``iterations`` timed ones, or as soon as the timed ones
    add up to ``budget_s`` seconds, but only after a whole number of ``cycle`` iterations (ICAM alternates two kinds
    of iteration), so that the mean over the timed iterations is the trainer's throughput.
    """

    def __init__(
        self, device: torch.device, warmup: int, iterations: int, budget_s: float, batch_size: int, cycle: int = 1
    ):
        self.device, self.warmup, self.budget_s, self.batch_size, self.cycle = (
            device,
            warmup,
            budget_s,
            batch_size,
            cycle,
        )
        self.iterations = math.ceil(iterations / cycle) * cycle
        self.seconds: list[float] = []
        self.iteration_numbers: list[int] = []
        self.full_batches = 0
        self._start = 0.0
        self._items = 0

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.GET_BATCH_STARTED, self.batch_started)
        engine.add_event_handler(Events.GET_BATCH_COMPLETED, self.batch_completed)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def batch_started(self, engine) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def batch_completed(self, engine) -> None:
        self._items = first_batch_dimension(engine.state.batch)

    def iteration_completed(self, engine) -> None:
        synchronize(self.device)
        seconds = time.perf_counter() - self._start
        if self._items != self.batch_size:
            return
        self.full_batches += 1
        if self.full_batches > self.warmup:
            self.seconds.append(seconds)
            self.iteration_numbers.append(engine.state.iteration)
        enough = len(self.seconds) >= self.iterations or sum(self.seconds) >= self.budget_s
        if self.seconds and enough and len(self.seconds) % self.cycle == 0:
            engine.terminate(skip_completed=True)  # no EPOCH_COMPLETED (validation, checkpoints) nor COMPLETED


def prepare_stage(method: str, stage: str, parser: ConfigParser, overrides: dict) -> list[str]:
    """Write what a stage reads from earlier stages, with untrained weights; returns what was done, for the notes."""
    if method == "acat" and stage == "acat":
        # ACAT is fine-tuned from the baseline classifier and reads every volume's saliency map: run the saliency
        # stage (saliency.json) with untrained classifier and autoencoder, 1 counterfactual step instead of 20
        # (the maps' values do not change the ACAT stage's speed).
        saliency = bundle_parser("acat", ["saliency.json"], {**overrides, "cf_steps": 1})
        save_untrained(saliency, "classifier", Path(saliency.get_parsed_content("classifier_checkpoint")))
        save_untrained(saliency, "autoencoder", Path(saliency.get_parsed_content("autoencoder_checkpoint")))
        saliency.get_parsed_content("evaluator").run()
        return ["ACAT stage: untrained classifier.pt and autoencoder.pt, saliency maps by saliency.json with 1 step"]
    if method == "tvd_score" and stage == "diffusion" and parser.get_parsed_content("latent"):
        save_untrained(parser, "autoencoder_def", Path(parser.get_parsed_content("autoencoder_checkpoint")))
        return ["TVD diffusion stage: untrained autoencoder.pt (its latent scale measured as the stage does)"]
    return []


def measure_training(task: dict, device: torch.device) -> dict:
    overrides = {
        "bundle_root": task["bundle_root"],
        "dataset_dir": task["dataset_dir"],
        "device": f"$torch.device('{device}')",
    }
    probe = bundle_parser(task["method"], task["configs"], {})
    synthetic = {**probe["synthetic_params"], "n": task["cases"]}
    for key, value in task["overrides"].items():
        if key == "synthetic_params":
            synthetic.update(value)
        else:
            overrides[key] = value
    overrides["synthetic_params"] = {k: v for k, v in synthetic.items() if v is not None}
    if task["method"] == "vagan":
        # VA-GAN boosts the critic (25 updates instead of 5) for its first 5 generator updates and every 100th
        # (5 % of the default's 600): the steady state is timed, without the boosted iterations.
        overrides["boost_first"], overrides["boost_every"] = 0, 0
    parser = bundle_parser(task["method"], task["configs"], overrides)
    notes = prepare_stage(task["method"], task["stage"], parser, overrides)
    for i in range(len(parser.get("initialize", []))):
        parser.get_parsed_content(f"initialize#{i}")
    trainer = parser.get_parsed_content("train#trainer")
    for i, expression in enumerate(parser["run"]):  # the handlers the bundle attaches (EMA, savers), not the run
        if "trainer.run()" not in str(expression):
            parser.get_parsed_content(f"run#{i}")
    batch_size = parser.get_parsed_content("train#dataloader").batch_size
    accumulation = int(parser.get("accumulation_steps", 1)) if task["method"] == "vagan" else 1
    # ICAM updates only its content discriminator on two iterations of three (content_discriminator_period)
    cycle = int(parser.get_parsed_content("content_discriminator_period")) if task["method"] == "icam" else 1
    timer = IterationTimer(device, task["warmup"], task["iterations"], task["budget_s"], batch_size, cycle)
    timer.attach(trainer)
    memory = PeakMemory(device)
    trainer.state.max_epochs = 1
    trainer.state.epoch_length = 10**9  # never reached: the timer stops the engine; the loader restarts as needed
    memory.reset()
    trainer.run()
    spatial_size = parser.get_parsed_content("spatial_size")
    if cycle > 1:
        from common.engines import is_content_discriminator_iteration

        kinds = {"content discriminator": [], "translation": []}
        for number, seconds in zip(timer.iteration_numbers, timer.seconds):
            kinds[
                "content discriminator" if is_content_discriminator_iteration(number, cycle) else "translation"
            ].append(seconds)
        notes.append(
            "ICAM: "
            + ", ".join(f"{kind} iterations {statistics.median(t):.3f} s" for kind, t in kinds.items() if t)
            + f" (median, {size_label(spatial_size)})"
        )
    return {
        "seconds": timer.seconds,
        "peak_mib": memory.peak_mib(),
        "memory_method": memory.method,
        "batch_size": batch_size,
        "accumulation": accumulation,
        "spatial_size": list(spatial_size),
        "amp": bool(parser.get_parsed_content("amp")) if "amp" in parser else False,
        "notes": notes,
    }


def _autocast(enabled: bool):
    return torch.autocast("cuda") if enabled else nullcontext()


def inference_configs(method: str, shape: tuple[int, ...]) -> list[str]:
    preset = BUNDLES / method / "configs" / "brain3d.json"
    return ["inference.json"] + (["brain3d.json"] if len(shape) == 3 and preset.is_file() else [])


def build_method_map(method: str, shape: tuple[int, ...], device: torch.device, extra: dict):
    """(function of one image -> the method's map, the image (1, 1, *spatial) on the device, the config values that
    set the map's cost), built by the bundle's inference config (with its brain3d.json preset for volumes)."""
    if method == "acat":
        # ACAT's networks are 2D and run on every slice of a (X, Y, slices) CT volume: a 2D image is one slice.
        spatial = list(shape) if len(shape) == 3 else [*shape, 1]
        dims = 3
    else:
        spatial, dims = list(shape), len(shape)
    overrides = {"spatial_dims": dims, "spatial_size": spatial, "device": f"$torch.device('{device}')", **extra}
    if method == "icam":
        # An untrained classifier is never confident: accept every sampled latent (p > 0), so each call makes its 50
        # translations; a trained model also rejects some draws, each costing one pass of the small latent classifier.
        overrides["sample_threshold"] = 0.0
    parser = bundle_parser(method, inference_configs(method, shape), overrides)
    torch.manual_seed(0)
    image = torch.rand(1, 1, *spatial, device=device)  # in [0, 1]: inside ACAT's intensity window, as tissue is
    info = {key: parser[key] for key in ("n_samples", "cf_steps") if key in parser}
    if method == "vagan":
        network = parser.get_parsed_content("network").eval()
        amp = bool(parser.get_parsed_content("amp")) and device.type == "cuda"  # the evaluator's AMP

        def run(x):
            with torch.no_grad(), _autocast(amp):
                return network(x)

    elif method == "icam":
        feature_maps = parser.get_parsed_content("feature_maps")

        def run(x):
            return feature_maps.maps(x).mean_map

    elif method == "attr_constraint":
        transforms = parser["postprocessing"]["transforms"]
        index = next(i for i, t in enumerate(transforms) if str(t.get("_target_", "")).endswith("Attributiond"))
        attribution = parser.get_parsed_content(f"postprocessing#transforms#{index}")

        def run(x):
            return attribution({"image": x[0]})["attribution"]

    elif method == "acat":
        saliency = parser.get_parsed_content("saliency_network")

        def run(x):
            return saliency(x)

    else:
        raise ValueError(f"no per-image map for {method}")
    return run, image, info


BASELINE_CLASSIFIERS = {
    "patchgan": ("attr_constraint", "network_def", "PatchGAN classifier of attr_constraint"),
    "acat_slice": ("acat", "baseline", "ACAT's baseline slice classifier"),
}


def build_baseline(baseline: str, shape: tuple[int, ...], device: torch.device, classifier: str, occlusion):
    """IG (200 steps) or occlusion (``occlusion``: window and stride, per axis) of a bundle's classifier at ``shape``:
    the attribution-constraint PatchGAN, or for ACAT's CT volumes its baseline slice classifier."""
    from common.attribution.baselines import attribute

    bundle, network_id, _ = BASELINE_CLASSIFIERS[classifier]
    overrides = {"spatial_dims": len(shape)} if classifier == "patchgan" else {}
    model = bundle_parser(bundle, ["inference.json"], overrides).get_parsed_content(network_id).to(device).eval()
    torch.manual_seed(0)
    image = torch.rand(1, 1, *shape, device=device)
    if baseline == "integrated_gradients":
        return (lambda x: attribute(model, x, "integrated_gradients", n_steps=IG_STEPS)), image
    window, stride = (tuple(v) for v in occlusion)
    return (lambda x: attribute(model, x, "occlusion", window=window, stride=stride)), image


def timed_calls(run, image, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median seconds of ``repeats`` calls after ``warmup`` ones; peak memory of the first call."""
    memory = PeakMemory(device)
    memory.reset()
    seconds, peak = [], None
    for i in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        run(image)
        synchronize(device)
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
        if peak is None:
            peak = memory.peak_mib()
    return {"seconds": seconds, "peak_mib": peak, "memory_method": memory.method}


def measure_inference(task: dict, device: torch.device) -> dict:
    shape = tuple(task["shape"])
    if task["method"] in MAPS:
        run, image, info = build_method_map(task["method"], shape, device, task["overrides"])
    else:
        run, image = build_baseline(task["method"], shape, device, task["classifier"], task["occlusion"])
        info = {}
    return {**timed_calls(run, image, device, task["warmup"], task["repeats"]), "config": info}


def measure_tvd_sampler(task: dict, device: torch.device) -> dict:
    from common.tvd import seeded_generator
    from tests.untrained import write_untrained_bundle  # every checkpoint and statistics file, untrained

    root = Path(task["bundle_root"])
    if not (root / "models").is_dir():
        write_untrained_bundle("tvd_score", root, configs=["train.json", "inference.json"])

    def sampler_fn(sampler: str, steps: int | None):
        overrides = {"bundle_root": str(root), "sampler": sampler, "device": f"$torch.device('{device}')"}
        if steps is not None:
            overrides["num_inference_steps"] = steps
        parser = bundle_parser("tvd_score", ["train.json", "evaluate.json"], overrides)
        feature = parser["features"][0]
        stats = parser.get_parsed_content("evaluate#stats")
        info = {
            "feature": feature,
            "steps": int(parser.get_parsed_content("num_inference_steps")),
            "sample_shape": list(parser.get_parsed_content("sample_shape")),
            "spatial_size": list(parser.get_parsed_content("spatial_size")),
            "config_batch": int(parser.get_parsed_content("sample_batch_size")),
        }
        return parser.get_parsed_content("evaluate#sample_fn")(feature), stats.mean_of(feature), info

    # Warm-up: two DDIM steps exercise the same networks (diffusion U-Net, guidance through decoder and regressor).
    warm_fn, warm_target, _ = sampler_fn("ddim", 2)
    warm_fn(1, torch.full((1,), warm_target), seeded_generator(device, 0))
    sample_fn, target, info = sampler_fn(task["sampler"], task["steps"])
    n = task["samples"] or info["config_batch"]
    targets = torch.full((n,), float(target))  # the feature's training mean, in its own units
    result = timed_calls(lambda _: sample_fn(n, targets, seeded_generator(device, 0)), None, device, 0, task["repeats"])
    return {**result, **info, "samples": n}


MEASURES = {"training": measure_training, "inference": measure_inference, "tvd": measure_tvd_sampler}


def _measurement_process(task: dict, result_file: str, log_file: str) -> None:
    """Entry point of a measurement process: output to its log file, result (or traceback) to ``result_file``."""
    log = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    try:
        if task.get("threads"):
            torch.set_num_threads(task["threads"])
        device = torch.device(task["device"])
        result = MEASURES[task["kind"]](task, device)
        result["threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001  (reported in the table; the other measurements go on)
        result = {"error": traceback.format_exc()}
    Path(result_file).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------------------------
# Orchestration (the main process never runs a network: the measurement processes start clean)


class OtherProcessesCPU:
    """CPU seconds used by processes outside this run's process tree, sampled from ``/proc`` every ``interval`` s."""

    def __init__(self, interval: float = 2.0):
        self.interval = interval
        self.seconds = 0.0
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._previous: dict[int, float] = {}

    def _snapshot(self) -> dict[int, tuple[int, float]]:
        processes = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (name) "
            processes[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / self._ticks)
        return processes

    def _ours(self, pid: int, processes: dict) -> bool:
        me = os.getpid()
        while pid > 1 and pid in processes:
            if pid == me:
                return True
            pid = processes[pid][0]
        return False

    def _sample(self, count: bool) -> None:
        processes = self._snapshot()
        for pid, (_, cpu) in processes.items():
            if count and not self._ours(pid, processes):
                self.seconds += max(0.0, cpu - self._previous.get(pid, 0.0))
        self._previous = {pid: cpu for pid, (_, cpu) in processes.items()}

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample(count=True)

    def __enter__(self):
        self._sample(count=False)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample(count=True)


class Runner:
    """Runs each measurement in a fresh process forked from a preloaded forkserver."""

    def __init__(self, workdir: Path, device: str, threads: int | None):
        self.workdir, self.device, self.threads = workdir, device, threads
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(PRELOAD)
        self.count = 0

    def __call__(self, kind: str, label: str, **task) -> dict:
        self.count += 1
        result_file = self.workdir / f"result_{self.count:03d}.json"
        log_file = self.workdir / f"log_{self.count:03d}.txt"
        task = {**task, "kind": kind, "device": self.device, "threads": self.threads}
        start = time.perf_counter()
        process = self.context.Process(target=_measurement_process, args=(task, str(result_file), str(log_file)))
        process.start()
        process.join()
        wall = time.perf_counter() - start
        if result_file.is_file():
            result = json.loads(result_file.read_text())
        else:
            result = {"error": f"measurement process ended with exit code {process.exitcode}"}
        if "error" in result:
            tail = log_file.read_text()[-2000:] if log_file.is_file() else ""
            print(f"[{wall:6.1f} s] {label}: FAILED\n{result['error']}\n{tail}", flush=True)
        else:
            # training: the mean (throughput), as in its table; maps and samples: the median
            average, name = (statistics.fmean, "mean") if kind == "training" else (statistics.median, "median")
            seconds = average(result["seconds"]) if result["seconds"] else float("nan")
            print(f"[{wall:6.1f} s] {label}: {name} {seconds:.3f} s, peak {result['peak_mib']:.0f} MiB", flush=True)
        result["wall_s"] = wall
        return result


def parse_size(text: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in text.lower().split("x"))
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected 2 or 3 positive integers such as 96x112x96")
    return shape


def size_label(shape) -> str:
    return "x".join(str(s) for s in shape)


def run_training(runner: Runner, profile: Profile, methods, settings, workdir: Path) -> list[dict]:
    rows = []
    for setting in training_settings():
        kind = "default" if setting.name == "default" else "preset"
        if setting.method not in methods or kind not in settings:
            continue
        # The data set and bundle folders are shared by the stages of one setting (later stages read earlier ones').
        key = f"{setting.method}_{setting.name.replace('.json', '')}"
        warmup = profile.train_warmup_3d if setting.volumes else profile.train_warmup_2d
        for stage, configs in setting.stages:
            result = runner(
                "training",
                f"training {setting.method} {setting.name} {stage}",
                method=setting.method,
                stage=stage,
                configs=list(configs),
                cases=setting.cases,
                bundle_root=str(workdir / "bundles" / key),
                dataset_dir=str(workdir / "data" / key),
                overrides=profile.training_overrides.get((setting.method, setting.name), {}),
                warmup=warmup,
                iterations=profile.train_iterations_3d if setting.volumes else profile.train_iterations_2d,
                budget_s=profile.train_budget_s,
            )
            rows.append({"method": setting.method, "setting": setting.name, "stage": stage, "warmup": warmup, **result})
    return rows


def acat_volume_size(profile: Profile) -> tuple[int, ...]:
    """ACAT's CT volume (X, Y, slices) as its inference config sets it (64x64x11), unless the profile says."""
    if profile.acat_volume:
        return tuple(profile.acat_volume)
    return tuple(json.loads((BUNDLES / "acat" / "configs" / "inference.json").read_text())["spatial_size"])


def inference_plan(profile: Profile, methods, sizes) -> list[dict]:
    """(method or baseline, size, baseline classifier) of every inference measurement.

    ACAT explains a slice classifier of 11-slice CT: it runs on the 2D sizes (one slice, against the PatchGAN
    baselines) and on its own CT volume (against IG and occlusion of its baseline slice classifier, occlusion
    with the 2D window in each slice); a 96-slice MRI volume is not an input it is made for.
    """
    plan = []
    for shape in sizes:
        volume = len(shape) == 3
        window, stride = profile.occlusion_3d if volume else profile.occlusion_2d
        group = {
            "shape": shape,
            "classifier": "patchgan",
            "window": [window] * len(shape),
            "stride": [stride] * len(shape),
        }
        plan += [{"method": m, **group} for m in MAPS if m in methods and not (m == "acat" and volume)]
        plan += [{"method": b, **group} for b in ("integrated_gradients", "occlusion")]
    if "acat" in methods:
        shape = acat_volume_size(profile)
        window, stride = profile.occlusion_2d
        group = {
            "shape": shape,
            "classifier": "acat_slice",
            "window": [window, window, 1],
            "stride": [stride, stride, 1],
        }
        plan += [{"method": m, **group} for m in ("acat", "integrated_gradients", "occlusion")]
    return plan


def run_inference(runner: Runner, profile: Profile, methods, sizes) -> list[dict]:
    rows = []
    for item in inference_plan(profile, methods, sizes):
        volume = len(item["shape"]) == 3
        warmup = profile.infer_warmup_3d if volume else profile.infer_warmup_2d
        result = runner(
            "inference",
            f"inference {item['method']} {size_label(item['shape'])}",
            method=item["method"],
            shape=list(item["shape"]),
            classifier=item["classifier"],
            occlusion=[item["window"], item["stride"]],
            overrides=profile.inference_overrides.get(item["method"], {}),
            warmup=warmup,
            repeats=profile.infer_repeats_3d if volume else profile.infer_repeats_2d,
        )
        rows.append(
            {**item, "shape": list(item["shape"]), "size": size_label(item["shape"]), "warmup": warmup, **result}
        )
    return rows


def run_tvd(runner: Runner, profile: Profile, workdir: Path) -> list[dict]:
    rows = []
    for sampler in SAMPLERS:
        result = runner(
            "tvd",
            f"tvd_score {sampler}",
            sampler=sampler,
            steps=profile.sampler_steps.get(sampler),
            samples=profile.tvd_samples,
            repeats=1,
            bundle_root=str(workdir / "bundles" / "tvd_score_untrained"),
        )
        rows.append({"sampler": sampler, **result})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Report


def _median(row: dict) -> float:
    return statistics.median(row["seconds"]) if row.get("seconds") else float("nan")


def _fmt(value: float, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def _error_line(row: dict) -> str:
    return row["error"].strip().splitlines()[-1][:150].replace("|", "/")


def training_table(rows: list[dict]) -> list[str]:
    lines = [
        "## Training: iterations per second",
        "",
        "One iteration is one step of the stage's Ignite trainer, with its data loading and iteration handlers: one "
        "optimiser update of the stage's network(s); VA-GAN: one generator update after its 5 critic updates (the "
        "critic's boosted iterations, 25 updates, not timed), images / s counting the control and patient images of "
        "the generator's batch; ICAM (batch: one pair of images): the content discriminator alone on two iterations "
        "of three, the other networks on the third, so whole cycles of three are timed. Seconds per iteration: the "
        "mean over the timed iterations (their total time / their number, i.e. the throughput). Peak memory: above "
        "the memory in use once the trainer (networks, optimisers, cached data set) is built.",
        "",
        "| method | setting | stage | input size | batch | s / iteration | iterations / s | images / s "
        "| timed (warm-up) iterations | peak memory (MiB) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['setting']} | {row['stage']} | failed: {_error_line(row)} |")
            continue
        mean = statistics.fmean(row["seconds"])
        images = row["batch_size"] * row["accumulation"]
        batch = (
            f"{row['batch_size']} x {row['accumulation']} accumulated" if row["accumulation"] > 1 else row["batch_size"]
        )
        if row["method"] == "vagan":
            images *= 2  # a control and a patient image per batch item (critic batches not counted)
        lines.append(
            f"| {row['method']} | {row['setting']} | {row['stage']} | {size_label(row['spatial_size'])} | {batch} "
            f"| {_fmt(mean)} | {_fmt(1 / mean)} | {_fmt(images / mean)} "
            f"| {len(row['seconds'])} ({row['warmup']}) | {row['peak_mib']:.0f} |"
        )
    notes = sorted({note for row in rows for note in row.get("notes", [])})
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return lines


def inference_tables(rows: list[dict]) -> list[str]:
    baselines = {(r["method"], r["size"], r["classifier"]): r for r in rows if r["method"] not in MAPS}
    groups = list(dict.fromkeys((r["size"], r["classifier"]) for r in rows))
    lines = [
        "## Inference: one map per image, against integrated gradients and occlusion",
        "",
        "The map of one preprocessed image already on the device (reading, preprocessing and writing NIfTI "
        "excluded), built by the bundle's `inference.json` (with `brain3d.json` for volumes). Baselines through "
        f"`common.attribution.baselines.attribute`, as the bundles' evaluations run them: integrated gradients with "
        f"{IG_STEPS} steps (zero baseline, chunks of 2^23 input elements) and occlusion (zero baseline), both for "
        "class 1, of a classifier at the same size. TVD score: no per-image map; its unit of work is a guided "
        "sample (last table).",
        "",
        "| size | classifier | IG s | IG peak MiB | occlusion window / stride | occlusion passes | occlusion s "
        "| occlusion peak MiB |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for size, classifier in groups:
        ig = baselines.get(("integrated_gradients", size, classifier))
        occ = baselines.get(("occlusion", size, classifier))
        if ig is None or occ is None:
            continue
        passes = math.prod(max(1, (s - w) // t + 1) for s, w, t in zip(occ["shape"], occ["window"], occ["stride"]))
        window = f"{size_label(occ['window'])} / {size_label(occ['stride'])}"
        lines.append(
            f"| {size} | {BASELINE_CLASSIFIERS[classifier][2]} | {_cell(ig)} | {_mem(ig)} | {window} | {passes} "
            f"| {_cell(occ)} | {_mem(occ)} |"
        )
    lines += [
        "",
        "| method | map | size | s per image | peak MiB | time / IG | time / occlusion | memory / IG "
        "| memory / occlusion | timed (warm-up) calls |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for method in MAPS:
        for row in (r for r in rows if r["method"] == method):
            ig = baselines.get(("integrated_gradients", row["size"], row["classifier"]), {})
            occ = baselines.get(("occlusion", row["size"], row["classifier"]), {})
            shown = _acat_size(row["shape"]) if method == "acat" else row["size"]
            if "error" in row:
                lines.append(f"| {method} | {MAPS[method]} | {shown} | failed: {_error_line(row)} |")
                continue
            description = MAPS[method].format(**row.get("config", {}))
            lines.append(
                f"| {method} | {description} | {shown} | {_cell(row)} | {_mem(row)} | {_ratio(row, ig)} "
                f"| {_ratio(row, occ)} | {_ratio(row, ig, 'peak_mib')} | {_ratio(row, occ, 'peak_mib')} "
                f"| {len(row['seconds'])} ({row['warmup']}) |"
            )
    lines += [
        "",
        "Seconds per image: the median of the timed calls; peak memory: of the first call. ICAM: every sampled latent "
        "accepted (an untrained classifier is never confident), so each map makes exactly its translations; a trained "
        "model also rejects draws, each costing one pass of the small latent classifier. ACAT runs on the 2D size "
        "(one slice) and on its own CT volume only: its networks explain a classifier of 11-slice CT, slice by slice, "
        "and a 96-slice MRI volume is not an input it is made for.",
    ]
    return lines


def _acat_size(shape) -> str:
    if len(shape) == 2:
        return f"{size_label(shape)} (one slice)"
    return f"{size_label(shape)} ({shape[2]} slices of {shape[0]}x{shape[1]})"


def _cell(row: dict) -> str:
    return "failed" if not row or "error" in row else _fmt(_median(row))


def _mem(row: dict) -> str:
    return "failed" if not row or "error" in row else f"{row['peak_mib']:.0f}"


def _ratio(row: dict, base: dict, key: str = "seconds") -> str:
    if not base or "error" in base or "error" in row:
        return "n/a"
    if key == "seconds":
        return _fmt(_median(row) / _median(base), 4)
    return _fmt(row[key] / base[key], 3) if base[key] > 0 else "n/a"


def tvd_table(rows: list[dict]) -> list[str]:
    ok = {r["sampler"]: r for r in rows if "error" not in r}
    first = next(iter(ok.values()), {})
    lines = [
        "## TVD score: guided samples per second, DDIM and DDPM",
        "",
        f"`evaluate#sample_fn` of `train.json` + `evaluate.json` (feature `{first.get('feature', '?')}` guided to its "
        f"training mean), latent diffusion at the default size: latents {size_label(first.get('sample_shape', []))} "
        f"decoded to {size_label(first.get('spatial_size', []))} images; one batch of samples per sampler, after a "
        "2-step DDIM warm-up.",
        "",
        "| sampler | steps | samples in the batch | s per sample | samples / s | peak MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['sampler']} | failed: {_error_line(row)} |")
            continue
        per_sample = _median(row) / row["samples"]
        lines.append(
            f"| {row['sampler']} | {row['steps']} | {row['samples']} | {_fmt(per_sample)} | {_fmt(1 / per_sample, 4)} "
            f"| {row['peak_mib']:.0f} |"
        )
    if "ddim" in ok and "ddpm" in ok:
        ratio = (_median(ok["ddpm"]) / ok["ddpm"]["samples"]) / (_median(ok["ddim"]) / ok["ddim"]["samples"])
        lines += ["", f"DDPM / DDIM time per sample: **{ratio:.1f}x**."]
    return lines


def machine_line(device: str, threads: int | None, results: list[dict]) -> str:
    measured_threads = sorted({r["threads"] for r in results if "threads" in r})
    gpu = ""
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = f", GPU {torch.cuda.get_device_name()}"
    return (
        f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"threads {', '.join(map(str, measured_threads)) or threads or torch.get_num_threads()}, device {device}{gpu}, "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )


def restriction_note(args, profile: Profile) -> str | None:
    """What the command line left out of the profile (--parts, --methods, --settings, --sizes), so that a report of
    one part of a run is not read as the whole run; None when nothing was left out."""
    chosen = [("parts", args.parts, PARTS), ("methods", args.methods, METHODS)]
    if "training" in args.parts:
        chosen.append(("training settings", args.settings, ("default", "preset")))
    if "inference" in args.parts:
        sizes = [size_label(s) for s in args.sizes] if args.sizes else list(profile.sizes)
        chosen.append(("inference sizes", sizes, profile.sizes))
    restricted = [
        f"{name} {', '.join(values)} (of {', '.join(every)})"
        for name, values, every in chosen
        if list(values) != list(every)
    ]
    return "Restricted by the command line to: " + "; ".join(restricted) + "." if restricted else None


def report(args, profile_name: str, profile: Profile, results: dict, wall: float, others: float, started) -> str:
    everything = [r for part in results.values() for r in part]
    memory_methods = sorted({r["memory_method"] for r in everything if "memory_method" in r})
    cores = os.cpu_count() or 1
    lines = [
        f"# Speed of the attribution methods ({profile_name} run)",
        "",
        f"Command: `{args.command}`  ",
        f"Machine: {machine_line(args.device, args.threads, everything)}  ",
        f"Date: {started:%Y-%m-%d %H:%M} UTC; total wall time {wall / 60:.1f} min; other processes used "
        f"{others:.0f} CPU-seconds meanwhile ({100 * others / (wall * cores):.0f} % of the {cores} cores)  ",
        f"Peak memory: {', '.join(memory_methods) or 'n/a'}; untrained weights.",
    ]
    lines += ["", f"{profile_name.capitalize()} run: {profile.description}."]
    restricted = restriction_note(args, profile)
    if restricted:
        lines += ["", restricted]
    if results.get("training"):
        lines += [""] + training_table(results["training"])
    if results.get("inference"):
        lines += [""] + inference_tables(results["inference"])
    if results.get("tvd"):
        lines += [""] + tvd_table(results["tvd"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the under-15-minute CPU run (fewer sizes and repeats)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the test's tiny sizes
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per measurement (default: torch's)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=("default", "preset"),
        default=["default", "preset"],
        help="training at the bundles' defaults and/or at their presets (brain3d.json, ellipses.json)",
    )
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=None, help="inference sizes, e.g. 96x112x96")
    parser.add_argument("--workdir", default=None, help="folder for data, checkpoints and logs (default: temporary)")
    parser.add_argument("--out", default=None, help="markdown report (a JSON of every measurement beside it)")
    args = parser.parse_args(argv)
    profile_name = "tiny" if args.tiny else "quick" if args.quick else "full"
    profile = PROFILES[profile_name]
    sizes = args.sizes or [parse_size(s) for s in profile.sizes]
    if args.out is None:
        args.out = str(REPO / "benchmarks" / "results" / ("speed_quick.md" if args.quick else "speed.md"))
    args.command = command_line("benchmarks/speed.py", argv)
    started = datetime.now(timezone.utc)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="speed_") as tmp, OtherProcessesCPU() as others:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        runner = Runner(workdir, args.device, args.threads)
        results = {}
        if "training" in args.parts:
            results["training"] = run_training(runner, profile, args.methods, args.settings, workdir)
        if "inference" in args.parts:
            results["inference"] = run_inference(runner, profile, args.methods, sizes)
        if "tvd" in args.parts and "tvd_score" in args.methods:
            results["tvd"] = run_tvd(runner, profile, workdir)
    wall = time.perf_counter() - start
    text = report(args, profile_name, profile, results, wall, others.seconds, started)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    settings = {k: v for k, v in asdict(profile).items() if k != "training_overrides"}  # tuple keys: not JSON
    summary = {"command": args.command, "profile": settings | {"name": profile_name}, "wall_s": wall}
    summary |= {"other_processes_cpu_s": others.seconds, "date": started.isoformat(), "results": results}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str))
    print(text)
    failed = sum("error" in r for part in results.values() for r in part)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
