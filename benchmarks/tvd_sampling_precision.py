"""TVD score: guided sampling in float32 against bfloat16 autocast (``sampling_amp``), paired sample by sample.

    python benchmarks/tvd_sampling_precision.py --bundle_root runs/tvd_ellipses --preset ellipses.json \
        --n_values 3 --samples 50 --out benchmarks/results/tvd_sampling_precision.md

Needs a trained bundle (the training stages of ``bundles/tvd_score``). For every feature (not region features)
and each of ``--n_values`` test values (the evaluation's own value selection), one batch of ``--samples`` guided
samples is drawn twice with the bundle's own sampler (``evaluate#sample_fn``): with ``sampling_amp`` false and
true, from the same seeded generator, so both start from the same x_T and draw the same step noise and differ only
by the precision of the networks. A pair is then compared the way the evaluation uses a sample: the classifier's
decision (the TVD score's Y), the regressor's feature value g(x) (in feature standard deviations) and the keep
decision of the 0.3 sd rejection rule. A score-level comparison of two independent evaluations would need many
thousands of samples to resolve the small differences that pairing shows directly.

Guided stochastic sampling amplifies small differences, so a pair need not stay one sample. ``--control`` adds a
float32 run with one torch thread instead of several: the same arithmetic summed in another order, i.e. how far
pairs drift apart from float32 rounding alone, the yardstick for the bfloat16 pairs.

Reports seconds per sample of each run (the same batches, the same process; ``--threads``), and per feature and run
the share of pairs with float32's decision and keep decision, the mean and largest |g difference| / sd, and each
run's positive and kept rates. Markdown with the command, machine and date, and a JSON next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the bundles' configs import the repository's common package

from fidelity import command_line, cpu_description  # noqa: E402  (this script's folder is on the path)
from tvd_samplers import SAMPLERS, _configs, config_settings  # noqa: E402

PRECISIONS = {"float32": False, "bfloat16 autocast": True}
CONTROL = "float32, 1 thread"  # the same float32 sampler with other rounding (another summation order)


def _parser(bundle_root: str, preset: str | None, sampler: str, amp: bool, overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(_configs(preset, "evaluate.json"))
    parser.update(
        {
            **overrides,
            "bundle_root": bundle_root,
            "sampler": sampler,
            "num_inference_steps": SAMPLERS[sampler],
            "sampling_amp": amp,
        }
    )
    return parser


def compare(
    bundle_root: str,
    preset: str | None,
    sampler: str,
    n_values: int,
    samples: int,
    seed: int,
    overrides: dict,
    control: bool = False,
) -> dict:
    """Paired draws per feature and value; the agreement of each run with float32 and its seconds per sample.

    ``control``: a third run, float32 with one torch thread, whose only difference from the float32 run is the
    order of floating-point sums: how far samples drift apart from rounding alone (CPU with several threads).
    """
    import numpy as np
    import torch

    import common.tvd
    from common.diffusion import reject_off_target

    settings = {**overrides, "n_values": n_values}
    runs = {name: (amp, None) for name, amp in PRECISIONS.items()}
    if control:
        runs[CONTROL] = (False, 1)
    parsers = {name: _parser(bundle_root, preset, sampler, amp, settings) for name, (amp, _) in runs.items()}
    reference = parsers["float32"]
    device = reference.get_parsed_content("device")
    classify = reference.get_parsed_content("evaluate#classify")
    regressor = reference.get_parsed_content("evaluate#regressor")
    stats = reference.get_parsed_content("evaluate#stats")
    tolerance = reference.get_parsed_content("rejection_tolerance")
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    threads = torch.get_num_threads()
    seconds = dict.fromkeys(runs, 0.0)
    drawn = 0
    features = {}
    for feature in reference["features"]:
        values = reference.get_parsed_content("evaluate#values")[feature].values
        g = common.tvd.feature_output(regressor, stats, feature, standardised=False)
        sd = stats.sd_of(feature)
        samplers = {name: parser.get_parsed_content("evaluate#sample_fn")(feature) for name, parser in parsers.items()}
        decisions, keeps, feature_values = ({n: [] for n in runs} for _ in range(3))
        for index, value in enumerate(values):
            target = torch.full((samples,), float(value))
            for name, sample_fn in samplers.items():
                generator = common.tvd.seeded_generator(device, seed + index)
                torch.set_num_threads(runs[name][1] or threads)
                synchronize()
                start = time.perf_counter()
                images = sample_fn(samples, target, generator)
                synchronize()
                seconds[name] += time.perf_counter() - start
                torch.set_num_threads(threads)
                with torch.no_grad():
                    decisions[name].append(classify(images).reshape(-1).cpu().numpy())  # the predicted class, Y
                    values_g = g(images).reshape(-1).double().cpu().numpy()
                feature_values[name].append(values_g)
                keeps[name].append(reject_off_target(values_g, float(value), sd, tolerance).numpy())
            drawn += samples
        joined = {
            k: {n: np.concatenate(v[n]) for n in runs}
            for k, v in (("y", decisions), ("keep", keeps), ("g", feature_values))
        }
        against = {}
        for name in runs:
            if name == "float32":
                continue
            difference = np.abs(joined["g"][name] - joined["g"]["float32"]) / sd
            against[name] = {
                "same_decision": float((joined["y"][name] == joined["y"]["float32"]).mean()),
                "same_keep": float((joined["keep"][name] == joined["keep"]["float32"]).mean()),
                "g_difference_sd_mean": float(difference.mean()),
                "g_difference_sd_max": float(difference.max()),
            }
        features[feature] = {
            "values": [float(v) for v in values],
            "pairs": len(values) * samples,
            "against_float32": against,
            "positive_rate": {n: float(joined["y"][n].mean()) for n in runs},
            "kept_rate": {n: float(joined["keep"][n].mean()) for n in runs},
        }
    per_sample = {name: s / drawn for name, s in seconds.items()}
    return {
        "seconds_per_sample": per_sample,
        "features": features,
        "device": str(device),
        "threads": threads,
        "tolerance": tolerance,
    }


def markdown(result: dict, sampler: str, samples: int, command: str) -> str:
    import torch

    speed = result["seconds_per_sample"]
    fp32, bf16 = (speed[n] for n in PRECISIONS)
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    runs = list(speed)
    lines = [
        "# TVD score: guided sampling in float32 against bfloat16 autocast (`sampling_amp`), paired",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {cpu_description()}, {os.cpu_count()} CPU cores, torch {torch.__version__} "
        f"threads {result['threads']}, device {result['device']}{gpu}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        f"Sampler: {sampler}, {SAMPLERS[sampler]} steps; {samples} samples per value, each drawn by every run "
        "from the same seeded generator (same x_T, same step noise).",
        "",
        "| run | s per guided sample |",
        "|---|---:|",
        *(f"| {name} | {speed[name]:.3f} |" for name in runs),
        "",
        f"float32 / bfloat16 time per sample: **{fp32 / bf16:.2f}x** ({result['threads']} threads).",
        "",
        "| feature | values | run | pairs with float32 | same decision | same keep decision (rejection rule) "
        "| mean / max abs g difference (sd) |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for feature, f in result["features"].items():
        values = ", ".join(f"{v:.3g}" for v in f["values"])
        for name, c in f["against_float32"].items():
            lines.append(
                f"| {feature} | {values} | {name} | {f['pairs']} | {c['same_decision']:.3f} | {c['same_keep']:.3f} "
                f"| {c['g_difference_sd_mean']:.3f} / {c['g_difference_sd_max']:.3f} |"
            )
    lines += [
        "",
        "| feature | "
        + " | ".join(f"positive rate, {n}" for n in runs)
        + " | "
        + " | ".join(f"kept, {n}" for n in runs)
        + " |",
        "|---|" + "---:|" * (2 * len(runs)),
    ]
    for feature, f in result["features"].items():
        cells = [f"{f['positive_rate'][n]:.3f}" for n in runs] + [f"{f['kept_rate'][n]:.3f}" for n in runs]
        lines.append(f"| {feature} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "g difference: |g(x) - g(x_float32)| of a pair in units of the feature's training standard deviation (the "
        f"rejection rule keeps |g(x) - v| <= {result['tolerance']} sd). Positive rate: the share of a run's samples "
        "the classifier puts in class 1 (Y); kept: the share within the rejection tolerance.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle_root", required=True, help="a trained tvd_score bundle root (models/ inside)")
    parser.add_argument("--preset", default=None, help="preset config merged last, e.g. ellipses.json")
    parser.add_argument("--sampler", choices=list(SAMPLERS), default="ddim")
    parser.add_argument("--n_values", type=int, default=3, help="test values per feature (the evaluation's selection)")
    parser.add_argument("--samples", type=int, default=50, help="samples per value, one batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--control",
        action="store_true",
        help="also float32 with one thread: the drift of samples from rounding alone (CPU, several threads)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="ID=JSON", help="any other config id, e.g. rho=0.2"
    )
    parser.add_argument("--out", default="benchmarks/results/tvd_sampling_precision.md")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    overrides = config_settings(args.set)
    result = compare(
        args.bundle_root, args.preset, args.sampler, args.n_values, args.samples, args.seed, overrides, args.control
    )
    text = markdown(result, args.sampler, args.samples, command_line("benchmarks/tvd_sampling_precision.py", argv))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
