"""Evaluate attribution maps of several methods on the same test cases, with the same metrics.

:class:`AttributionEvaluator` is a ``monai.engines.Evaluator`` whose iteration computes one map
per method for every batch (gradients enabled, as the backprop baselines need them) and stores
them as ``map_<method>`` next to the ground truth ``target`` in ``engine.state.output``; metric
handlers from :mod:`common.handlers` read them with ``output_transform=from_engine([...])``.
:class:`AttributionReport` then writes ``metrics.json``, ``metrics.md`` (mean +/- sd per method,
with the paper's figure beside ours) and ``examples.png`` (the same cases under every method).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from ignite.engine import Events  # noqa: E402
from monai.data import Dataset  # noqa: E402
from monai.engines import Evaluator  # noqa: E402
from monai.handlers import from_engine  # noqa: E402

from common.attribution import attribute  # noqa: E402
from common.data import load_datalist  # noqa: E402
from common.engines.batches import PrepareKeys, RandomStates  # noqa: E402
from common.errors import InputError  # noqa: E402
from common.files import EVALUATION_PROGRESS_DIR, read_record, save_record, write_text_atomic  # noqa: E402
from common.handlers import AUPRC, AUROC, AUROC10, Dice, OperatingThreshold  # noqa: E402
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


class MapRecords:
    """Per-batch records of an evaluation's maps, so that a stopped evaluation goes on where it stopped.

    The baselines on 3D volumes (occlusion, 200-step integrated gradients) take hours on a CPU, longer than a job or
    session may last. After each batch the maps (and everything else the iteration computed), a digest of the
    batch's inputs and the global random generators' states (expected gradients draws its references) go to
    ``<output_dir>/evaluation_progress/<name>/batch_<iteration>.pt``, written whole or not at all. With ``resume`` a
    batch that has a record is taken from it and the generators are restored, so the metrics equal those of a run
    that never stopped where the maps are deterministic (on the CPU; on CUDA only with deterministic algorithms).
    A record of another run (``run_key``: the model files' fingerprints and the methods' settings; the evaluator
    adds the names of its outputs; or of other inputs) is refused naming what differs. Without ``resume`` records
    are neither read nor kept from an earlier run: the bundle's config empties the folder when it starts without
    resume and removes it after the report (``common.files.remove_evaluation_progress``), once for all its
    evaluators, so that a stop in a later evaluator keeps the records of the earlier ones.
    """

    def __init__(self, output_dir: str | os.PathLike, name: str, resume: bool = False, run_key=None):
        self.folder = Path(output_dir) / EVALUATION_PROGRESS_DIR / name
        self.resume = bool(resume)
        self.run_key = run_key
        self.key = json.dumps({"run": run_key, "outputs": None}, sort_keys=True, default=str)
        self.random_states = RandomStates()
        self.counts = {"from records": 0, "computed": 0}

    def attach(self, engine, output_names: Sequence[str]) -> None:
        """Called by the evaluator: the names of what it records belong to the key; counts logged per run."""
        self.key = json.dumps({"run": self.run_key, "outputs": sorted(output_names)}, sort_keys=True, default=str)
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.COMPLETED, self._finish)

    def _start(self, engine) -> None:
        self.counts = {"from records": 0, "computed": 0}

    def _finish(self, engine) -> None:
        counts = self.counts
        logging.getLogger(__name__).info(
            "%s: %d batches from records, %d computed", self.folder, counts["from records"], counts["computed"]
        )

    def outputs(self, iteration: int, inputs: Sequence[torch.Tensor], compute: Callable[[], dict], device) -> dict:
        """``compute()`` (a dict of tensors) for this batch of ``inputs``, or what the record of a stopped run holds."""
        path = self.folder / f"batch_{iteration:06d}.pt"
        digest = hashlib.sha1()
        for tensor in inputs:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest = digest.hexdigest()
        if self.resume and path.is_file():
            fields = ("key", "images", "outputs", "random_states")
            record = read_record(path, fields, "an evaluation progress record", "common.evaluation.MapRecords")
            if record["key"] != self.key or record["images"] != digest:
                what = (
                    "the models, the methods or their settings" if record["key"] != self.key else "the batch's inputs"
                )
                raise InputError(
                    f"{path}: a record of another evaluation ({what} differ from this run's); expected the record of "
                    "this same evaluation: delete the folder, or run without resume"
                )
            self.random_states.load_state_dict(record["random_states"])
            self.counts["from records"] += 1
            return {name: value.to(device) for name, value in record["outputs"].items()}
        outputs = compute()
        record = {
            "key": self.key,
            "images": digest,
            "outputs": {name: value.detach().cpu() for name, value in outputs.items()},
            "random_states": self.random_states.state_dict(),
        }
        save_record(path, record)
        self.counts["computed"] += 1
        return outputs


class AttributionEvaluator(Evaluator):
    """Computes ``map_<name>`` for every method in ``methods`` on each batch of ``val_data_loader``.

    ``prepare_batch`` returns (images, ground-truth maps); the output holds ``image``, ``target``
    and one ``map_<name>`` per method, batch-first. ``metrics`` are Ignite metrics (e.g.
    :class:`common.handlers.NCC` per method) computed over all batches. ``progress``: a :class:`MapRecords`
    that records each batch's maps, so that a stopped evaluation goes on (None: no records).
    """

    def __init__(
        self,
        device,
        val_data_loader,
        methods: Mapping[str, MapMethod],
        metrics: Mapping | None = None,
        prepare_batch: Callable | None = None,
        val_handlers=None,
        progress: MapRecords | None = None,
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
        self.progress = progress
        if progress is not None:
            progress.attach(self, self._output_names())

    def _output_names(self) -> list[str]:
        """The keys :meth:`_maps` returns (subclasses set what they need for it before calling ``__init__``)."""
        return [f"map_{name}" for name in self.methods]

    def _iteration(self, engine, batchdata):
        images, target = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        output = {"image": images, "target": target}
        compute = lambda: self._maps(engine, batchdata, images)
        if self.progress is None:
            output.update(compute())
        else:
            inputs = self._inputs(engine, batchdata, images)
            output.update(self.progress.outputs(engine.state.iteration, inputs, compute, engine.state.device))
        return output

    def _inputs(self, engine, batchdata, images) -> list[torch.Tensor]:
        """What the maps are computed from, for the records' digest."""
        return [images]

    def _maps(self, engine, batchdata, images) -> dict:
        """Everything costly the iteration computes (what :class:`MapRecords` records): here the maps."""
        return {f"map_{name}": method(images) for name, method in self.methods.items()}


class AttributionReport:
    """At the end of the evaluation, write metrics.json, metrics.md and examples.png to ``output_dir``.

    Args:
        output_dir: where to write.
        metric_names: {method: engine metric name} for one column named ``metric_label`` (e.g.
            ``{"vagan": "ncc_vagan"}``), or {method: {column: engine metric name}} for several.
        metric_label: the column's name when ``metric_names`` maps to single names.
        paper: the paper's figures shown beside ours, {method: value} or {method: {column: value}}.
        n_examples: cases in the figure (the first ones of the loader).
        title: the table's heading.
        sources: other engines, already run, whose metrics the table also uses (e.g. classification
            rates from a classifier evaluator).

    ``metrics.json`` holds, per method and column (lower case), the mean, ``<column>_sd`` (the
    per-case sd, ``None`` for pooled metrics) and ``<column>_paper``; ``n`` is the case count.
    """

    def __init__(
        self,
        output_dir: str,
        metric_names: Mapping[str, str | Mapping[str, str]],
        metric_label: str = "NCC",
        paper: Mapping[str, float | Mapping[str, float]] | None = None,
        n_examples: int = 4,
        title: str = "Attribution quality",
        sources: Sequence = (),
        prefix: str = "",
    ):
        self.output_dir = Path(output_dir)
        self.prefix = prefix  # e.g. "classification_": several reports in one output_dir
        self.columns = {
            method: dict(names) if isinstance(names, Mapping) else {metric_label: names}
            for method, names in metric_names.items()
        }
        self.paper = {
            method: dict(values) if isinstance(values, Mapping) else {metric_label: values}
            for method, values in (paper or {}).items()
        }
        self.n_examples = n_examples
        self.title = title
        self.sources = list(sources)
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
        for key in ["image", "target", *[f"map_{m}" for m in self.columns]]:
            self.examples.setdefault(key, []).extend(t.detach().cpu().float().numpy() for t in output[key][:take])

    def _lookup(self, engine, name: str) -> tuple[float, float | None, int | None]:
        """(mean, sd, cases) of a metric: per-case details give the sd, pooled metrics have none."""
        for source in [engine, *self.sources]:
            state = source.state
            details = getattr(state, "metric_details", {}).get(name)
            if details is not None:
                values = np.asarray(details.cpu() if isinstance(details, torch.Tensor) else details).reshape(-1)
                mean, sd = mean_sd(values)
                return mean, sd, int(values.size)
            if name in state.metrics:
                return float(state.metrics[name]), None, None
        raise KeyError(f"metric '{name}' was not computed by the evaluator or its sources")

    def summary(self, engine) -> dict:
        results = {}
        for method, columns in self.columns.items():
            entry: dict = {}
            cases = []
            for column, name in columns.items():
                key = column.lower()
                mean, sd, n = self._lookup(engine, name)
                entry[key] = mean
                entry[f"{key}_sd"] = sd
                entry[f"{key}_paper"] = self.paper.get(method, {}).get(column)
                if n is not None:
                    cases.append(n)
            entry["n"] = max(cases) if cases else None
            results[method] = entry
        return results

    def _write(self, engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        results = self.summary(engine)
        write_text_atomic(self.output_dir / f"{self.prefix}metrics.json", json.dumps(results, indent=2))
        labels = list(dict.fromkeys(c for columns in self.columns.values() for c in columns))
        header = ["method", *labels, "cases"]
        lines = [f"### {self.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method, r in results.items():
            cells = [method]
            for label in labels:
                key = label.lower()
                if key not in r:
                    cells.append("")
                    continue
                cell = f"{r[key]:.3f}" if r[f"{key}_sd"] is None else f"{r[key]:.3f} +/- {r[f'{key}_sd']:.3f}"
                if r[f"{key}_paper"] is not None:
                    cell += f" (paper {_paper_figure(r[f'{key}_paper'])})"
                cells.append(cell)
            cells.append("" if r["n"] is None else str(r["n"]))
            lines.append("| " + " | ".join(cells) + " |")
        write_text_atomic(self.output_dir / f"{self.prefix}metrics.md", "\n".join(lines) + "\n")
        self._figure(results)

    def _figure(self, results: dict) -> None:
        columns = ["image", "target", *[f"map_{m}" for m in self.columns]]
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
                    first = next(iter(self.columns.get(name, {})), None)
                    score = None if first is None else results[name][first.lower()]
                    ax.set_title(name if score is None else f"{name}\n{first} {score:.2f}", fontsize=8)
        fig.tight_layout()
        tmp = self.output_dir / f".{self.prefix}examples.partial.png"
        fig.savefig(tmp, dpi=60)
        plt.close(fig)
        os.replace(tmp, self.output_dir / f"{self.prefix}examples.png")


def _paper_figure(value: float) -> str:
    """A paper's figure as it printed it: two decimals, three when it has them (ICAM's NCC 0.435)."""
    text = f"{value:.3f}"
    return text[:-1] if text.endswith("0") else text


def operating_thresholds(methods: Sequence[str]) -> dict:
    """``threshold_<method>``: the precision-recall operating point of each map over all voxels seen.

    Run on the validation patients; :func:`segmentation_metrics` reads the thresholds for Dice.
    """
    return {f"threshold_{m}": OperatingThreshold(output_transform=from_engine([f"map_{m}", "target"])) for m in methods}


def segmentation_metrics(methods: Sequence[str], threshold_engine) -> dict:
    """Per method: Dice at the validation operating threshold (mean over cases) and the pooled
    voxel-level AUROC, AUROC10 and AUPRC (the attribution-constraint paper's protocol).

    ``threshold_engine`` is the evaluator that computed :func:`operating_thresholds`; it has run by
    the time these metrics are computed.
    """
    found = {}
    for m in methods:
        pair = from_engine([f"map_{m}", "target"])
        found[f"dice_{m}"] = Dice(
            threshold=functools.partial(_state_metric, threshold_engine, f"threshold_{m}"), output_transform=pair
        )
        found[f"auroc_{m}"] = AUROC(pooled=True, output_transform=pair)
        found[f"auroc10_{m}"] = AUROC10(pooled=True, output_transform=pair)
        found[f"auprc_{m}"] = AUPRC(pooled=True, output_transform=pair)
    return found


def _state_metric(engine, name: str) -> float:
    if name not in engine.state.metrics:
        raise RuntimeError(f"'{name}' is not available: run the validation evaluator before the test one")
    return float(engine.state.metrics[name])


def reference_images(dataset, n: int = 32, seed: int = 0, image_key: str = "image") -> torch.Tensor:
    """``n`` images drawn at random from ``dataset``, stacked: expected gradients' reference set."""
    order = np.random.default_rng(seed).permutation(len(dataset))[:n]
    return torch.stack([torch.as_tensor(dataset[int(i)][image_key]).as_subclass(torch.Tensor) for i in order])


class SaveThresholds:
    """At the end of a run, write ``{name: engine metric}`` (e.g. operating thresholds) to a JSON file.

    The attribution-constraint bundle stores its segmentation thresholds next to the model this
    way, so inference thresholds maps exactly as the evaluation did.
    """

    def __init__(self, path: str, names: Mapping[str, str]):
        self.path = Path(path)
        self.names = dict(names)

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        values = {name: float(engine.state.metrics[metric]) for name, metric in self.names.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(values, indent=2) + "\n")


def load_threshold(path: str, name: str) -> float:
    """The threshold ``name`` saved by :class:`SaveThresholds`, with a clear error if it is missing."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"{file}: no segmentation thresholds; run the bundle's evaluate.json first "
            "(it chooses them on the validation patients) or pass --segmentation_threshold VALUE"
        )
    values = json.loads(file.read_text())
    if name not in values:
        raise KeyError(f"{file}: no threshold for '{name}' (has {sorted(values)}); pass --segmentation_threshold VALUE")
    return float(values[name])


def datalist_reference_images(
    datalist: str, split: str, transform, n: int = 32, seed: int = 0, dataset_dir: str | None = None
) -> torch.Tensor:
    """Expected gradients' references for inference: ``n`` images of a datalist split, preprocessed."""
    if not datalist:
        raise InputError(
            "expected gradients at inference need reference images: pass --eg_reference_datalist DATALIST "
            "(e.g. the training datalist) and --eg_reference_split SPLIT"
        )
    items = load_datalist(datalist, split, dataset_dir=dataset_dir, required_keys=("image",), allowed_labels=None)
    return reference_images(Dataset(items, transform), n, seed=seed)
