"""Evaluate attribution maps of several methods on the same test cases, with the same metrics.

:class:`AttributionEvaluator` is a ``monai.engines.Evaluator`` whose iteration computes one map
per method for every batch (gradients enabled, as the backprop baselines need them) and stores
them as ``map_<method>`` next to the ground truth ``target`` in ``engine.state.output``; metric
handlers from :mod:`common.handlers` read them with ``output_transform=from_engine([...])``.
:class:`AttributionReport` then writes ``metrics.json``, ``metrics.md`` (mean +/- sd per method,
with the paper's figure beside ours) and ``examples.png`` (the same cases under every method).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ignite.engine import Events  # noqa: E402
from monai.engines import Evaluator  # noqa: E402

from common.attribution import attribute  # noqa: E402
from common.engines.batches import PrepareKeys  # noqa: E402
from common.metrics import mean_sd  # noqa: E402

POSTPROCESS = {
    "none": lambda m: m,
    "abs": torch.abs,  # backprop maps do not reliably predict the sign of a change (VA-GAN 4.2)
    "positive": lambda m: m.clamp_min(0.0),  # CAM: positive evidence only
    "negate": lambda m: -m,
}


class MapMethod:
    """One attribution method: a function of the input batch that returns maps of its shape."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], postprocess: str = "none", needs_grad: bool = False):
        if postprocess not in POSTPROCESS:
            raise ValueError(f"postprocess '{postprocess}' is unknown; expected one of {sorted(POSTPROCESS)}")
        self.fn = fn
        self.postprocess = POSTPROCESS[postprocess]
        self.needs_grad = needs_grad

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.needs_grad):
            return self.postprocess(self.fn(x).detach().float())


class NetworkMap(MapMethod):
    """A network whose output is the map (e.g. VA-GAN's effect map ``-M(x)``)."""

    def __init__(self, network: torch.nn.Module, postprocess: str = "none"):
        network.eval()
        super().__init__(network, postprocess, needs_grad=False)


class BaselineMap(MapMethod):
    """A Captum baseline (:func:`common.attribution.attribute`) on a classifier."""

    def __init__(
        self, classifier: torch.nn.Module, method: str, postprocess: str = "abs", target_class: int = 1, **kwargs
    ):
        classifier.eval()

        def fn(x):
            return attribute(classifier, x, method, target_class=target_class, **kwargs)

        super().__init__(fn, postprocess, needs_grad=True)


class AttributionEvaluator(Evaluator):
    """Computes ``map_<name>`` for every method in ``methods`` on each batch of ``val_data_loader``.

    ``prepare_batch`` returns (images, ground-truth maps); the output holds ``image``, ``target``
    and one ``map_<name>`` per method, batch-first. ``metrics`` are Ignite metrics (e.g.
    :class:`common.handlers.NCC` per method) computed over all batches.
    """

    def __init__(
        self,
        device,
        val_data_loader,
        methods: Mapping[str, MapMethod],
        metrics: Mapping | None = None,
        prepare_batch: Callable | None = None,
        val_handlers=None,
    ):
        # MONAI registers additional metrics only next to a key metric: the first one is the key.
        names = list(metrics or {})
        key_metric = {names[0]: metrics[names[0]]} if names else None
        additional = {name: metrics[name] for name in names[1:]} or None
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            prepare_batch=prepare_batch or PrepareKeys("image", "effect"),
            key_val_metric=key_metric,
            additional_metrics=additional,
            val_handlers=val_handlers,
            decollate=False,
        )
        self.methods = dict(methods)

    def _iteration(self, engine, batchdata):
        images, target = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        output = {"image": images, "target": target}
        for name, method in self.methods.items():
            output[f"map_{name}"] = method(images)
        return output


class AttributionReport:
    """At the end of the evaluation, write metrics.json, metrics.md and examples.png to ``output_dir``.

    Args:
        output_dir: where to write.
        metric_names: {method: engine metric name}, e.g. ``{"vagan": "ncc_vagan"}``.
        metric_label: what the metric is called in the table (e.g. ``NCC``).
        paper: {method: the paper's figure} shown beside ours (optional).
        n_examples: cases in the figure (the first ones of the loader).
        title: the table's heading.
    """

    def __init__(
        self,
        output_dir: str,
        metric_names: Mapping[str, str],
        metric_label: str = "NCC",
        paper: Mapping[str, float] | None = None,
        n_examples: int = 4,
        title: str = "Attribution quality",
    ):
        self.output_dir = Path(output_dir)
        self.metric_names = dict(metric_names)
        self.metric_label = metric_label
        self.paper = dict(paper or {})
        self.n_examples = n_examples
        self.title = title
        self.examples: dict[str, list] = {}

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, lambda e: self.examples.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        # COMPLETED, not EPOCH_COMPLETED: the metric handlers fill metric_details at the end of the epoch.
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine) -> None:
        have = len(self.examples.get("image", []))
        if have >= self.n_examples:
            return
        take = self.n_examples - have
        output = engine.state.output
        for key in ["image", "target", *[f"map_{m}" for m in self.metric_names]]:
            self.examples.setdefault(key, []).extend(t.detach().cpu().float().numpy() for t in output[key][:take])

    def summary(self, engine) -> dict:
        results = {}
        for method, metric in self.metric_names.items():
            details = engine.state.metric_details.get(metric)
            values = np.asarray(details.cpu() if isinstance(details, torch.Tensor) else details).reshape(-1)
            mean, sd = mean_sd(values)
            results[method] = {
                self.metric_label.lower(): mean,
                "sd": sd,
                "n": int(values.size),
                "paper": self.paper.get(method),
            }
        return results

    def _write(self, engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        results = self.summary(engine)
        _atomic_write(self.output_dir / "metrics.json", json.dumps(results, indent=2))
        label = self.metric_label
        lines = [f"### {self.title}", "", f"| method | {label} (mean +/- sd) | cases | paper |", "|---|---|---|---|"]
        for method, r in results.items():
            paper = "" if r["paper"] is None else f"{r['paper']:.2f}"
            lines.append(f"| {method} | {r[label.lower()]:.3f} +/- {r['sd']:.3f} | {r['n']} | {paper} |")
        _atomic_write(self.output_dir / "metrics.md", "\n".join(lines) + "\n")
        self._figure(results)

    def _figure(self, results: dict) -> None:
        columns = ["image", "target", *[f"map_{m}" for m in self.metric_names]]
        n = len(self.examples.get("image", []))
        if n == 0:
            return
        fig, axes = plt.subplots(n, len(columns), figsize=(1.9 * len(columns), 1.9 * n), squeeze=False)
        for row in range(n):
            for col, key in enumerate(columns):
                view = np.squeeze(self.examples[key][row])
                if view.ndim == 3:  # a volume: the axial slice through the ground truth's peak
                    target = np.abs(np.squeeze(self.examples["target"][row]))
                    view = view[..., int(np.argmax(target.sum(axis=(0, 1))))]
                ax = axes[row][col]
                ax.imshow(np.rot90(view), cmap="gray" if key == "image" else "magma")
                ax.axis("off")
                if row == 0:
                    name = key.removeprefix("map_")
                    score = results.get(name, {}).get(self.metric_label.lower())
                    ax.set_title(name if score is None else f"{name}\n{self.metric_label} {score:.2f}", fontsize=8)
        fig.tight_layout()
        tmp = self.output_dir / ".examples.partial.png"
        fig.savefig(tmp, dpi=60)
        plt.close(fig)
        os.replace(tmp, self.output_dir / "examples.png")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)
