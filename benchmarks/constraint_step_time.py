"""Training-step time of the attribution-constrained classifier, by constraint, on one batch.

The attribution-constraint paper reports EG training about 1.5x slower per iteration than G; the
project's target is a G-constrained step at most 2.5x the unconstrained one. Every variant runs
the same PatchGAN classifier on the same batch (forward, loss, backward, optimiser step), after
warm-up steps, and the table reports the median step time and its ratio to the unconstrained step.
Half the batch is healthy; the "running" and "detached" variants constrain the maps of those images
only, from a second pass (the loss's ``batch_norm``).

    python benchmarks/constraint_step_time.py [--spatial_dims 2] [--shape 64 80] [--batch 16] [--steps 10]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.engines.precision import bf16_autocast  # noqa: E402
from common.losses import AttributionConstraintLoss  # noqa: E402
from common.networks import PatchGANClassifier  # noqa: E402

VARIANTS = [
    ("unconstrained", dict(mode="none")),
    ("G", dict(mode="unsupervised", method="G")),
    ("G, running statistics", dict(mode="unsupervised", method="G", batch_norm="running")),
    ("G, detached batch statistics", dict(mode="unsupervised", method="G", batch_norm="detached")),
    ("Ross (G, L2)", dict(mode="ross", method="G")),
    ("IG", dict(mode="unsupervised", method="IG")),
    ("EG", dict(mode="unsupervised", method="EG")),
    ("EG, running statistics", dict(mode="unsupervised", method="EG", batch_norm="running")),
    ("IEG", dict(mode="unsupervised", method="IEG")),
]


def step_times(
    spatial_dims: int, shape: list[int], batch: int, steps: int, warmup: int, device: str, amp: bool = False
) -> dict:
    """Step times of every variant; ``amp``: the loss under bfloat16 autocast, as the trainer's ``amp`` on CUDA."""
    torch.manual_seed(0)
    x = torch.randn(batch, 1, *shape, device=device)
    y = torch.arange(batch, device=device) % 2
    results = {}
    for name, kwargs in VARIANTS:
        torch.manual_seed(0)
        model = PatchGANClassifier(spatial_dims).to(device)
        optimiser = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)
        loss_fn = AttributionConstraintLoss(alpha=1.0, **kwargs)
        times = []
        for i in range(warmup + steps):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            optimiser.zero_grad(set_to_none=True)
            with bf16_autocast(amp):
                loss = loss_fn(model, x, y)["loss"]
            loss.backward()
            optimiser.step()
            if device == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append(time.perf_counter() - start)
        results[name] = times
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spatial_dims", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs="+", default=[64, 80])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only), as the trainer's amp")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "constraint_step_time.md"))
    args = parser.parse_args(argv)
    if len(args.shape) != args.spatial_dims:
        parser.error(f"--shape has {len(args.shape)} values; expected {args.spatial_dims}")
    if args.amp and args.device != "cuda":
        parser.error("--amp needs --device cuda (bfloat16 autocast is what the trainer uses on CUDA only)")
    results = step_times(args.spatial_dims, args.shape, args.batch, args.steps, args.warmup, args.device, args.amp)
    base = statistics.median(results["unconstrained"])
    size = "x".join(map(str, args.shape))
    lines = [
        f"### Attribution-constraint training step, PatchGAN classifier, batch {args.batch} of {size}",
        "",
        f"Command: `python benchmarks/constraint_step_time.py --spatial_dims {args.spatial_dims} "
        f"--shape {' '.join(map(str, args.shape))} --batch {args.batch} --steps {args.steps} --device {args.device}"
        f"{' --amp' if args.amp else ''}`  ",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"device {args.device}{' (' + torch.cuda.get_device_name() + ')' if args.device == 'cuda' else ''}, "
        f"{'bfloat16 autocast' if args.amp else 'float32'}, torch {torch.__version__}  ",
        f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        "| constraint | median step (s) | min (s) | ratio to unconstrained |",
        "|---|---|---|---|",
    ]
    for name, times in results.items():
        median = statistics.median(times)
        lines.append(f"| {name} | {median:.3f} | {min(times):.3f} | {median / base:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
