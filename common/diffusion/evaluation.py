"""Evaluation of one feature with the TVD score (Jin, Zhu & Fletcher, MIDL 2025, sections 3.3, 4.2-4.3, appendix D.1).

The TVD bundle's evaluate config calls, for one feature at a time:

1. :func:`conditional_predictions`: at every target value v (taken from the real test data), draw samples
   from P(X | V = v) with a closure around :func:`~common.diffusion.guided_sample` (plus decoding), drop
   those whose regressor value g(x) is more than ``tolerance`` (0.3) feature standard deviations from v
   (:func:`~common.diffusion.reject_off_target`), and classify the kept ones, until ``samples_per_value``
   (200) are kept or ``max_rounds`` batches were drawn. Values with too few (or no) kept samples are
   reported in the result, never dropped here.
2. :func:`feature_scores`: global score (paper Table 1 / 2, optionally class-balanced), local scores
   (Fig. 5 / 8), bootstrap variances (Table 4) and the acceptance rate, from :mod:`common.metrics.tvd`.
3. :func:`plot_local_scores`: the two panels of Fig. 5 / 8 (local score against the feature value; per-class
   histograms of the training feature values), written atomically.
4. :func:`scores_markdown`: one markdown row per feature, written next to the JSON of the scores.

:func:`sample_coverage` gives the coverage of Table 3 from the kept samples' embeddings.

The paper's own protocol ("we generated 200 samples per feature value and removed those with feature
values ... deviated by more than +-0.3 standard deviations") is ``samples_per_value=200, batch_size=200,
max_rounds=1``: one batch of 200, fewer than 200 kept. The default instead keeps drawing until 200 are kept,
so that every value has the same number of predictions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.utils import optional_import  # noqa: E402

from common.diffusion.guided import reject_off_target  # noqa: E402
from common.errors import InputError  # noqa: E402
from common.files import read_record, save_record  # noqa: E402
from common.metrics.tvd import (  # noqa: E402
    coverage,
    global_tvd_score,
    local_tvd_scores,
    prediction_variance,
    tvd_bootstrap_variance,
)
from common.networks.modes import frozen, modules_of  # noqa: E402

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

__all__ = [
    "ConditionalPredictions",
    "conditional_predictions",
    "feature_scores",
    "sample_coverage",
    "plot_local_scores",
    "scores_markdown",
]

SampleFn = Callable[[int, torch.Tensor, "torch.Generator | None"], torch.Tensor]

# A later batch draws this many times what the acceptance rate so far says is still missing, so that
# the last batch is usually enough without drawing a full batch for a handful of samples.
_BATCH_MARGIN = 1.25


@dataclass
class ConditionalPredictions:
    """What :func:`conditional_predictions` drew at each target value (all lists / arrays are per value).

    Attributes:
        values: (V, ...) the target values, in the order given.
        predictions: V arrays of the predicted classes of the kept samples (at most ``samples_per_value``).
        features: V arrays of g(x) of the kept samples ((n,) or (n, k)); None without rejection.
        embeddings: V (n, d) float32 arrays of ``embed_fn`` of the kept samples; None without ``embed_fn``.
        drawn: (V,) samples drawn; accepted: (V,) samples within tolerance (may exceed ``samples_per_value``);
        kept: (V,) samples kept = min(accepted, samples_per_value); rounds: (V,) batches drawn.
        samples_per_value: the number of kept samples asked for at each value.
    """

    values: np.ndarray
    predictions: list[np.ndarray]
    features: list[np.ndarray] | None
    embeddings: list[np.ndarray] | None
    drawn: np.ndarray
    accepted: np.ndarray
    kept: np.ndarray
    rounds: np.ndarray
    samples_per_value: int

    def __len__(self) -> int:
        return len(self.predictions)

    @property
    def acceptance_rate(self) -> np.ndarray:
        """(V,) accepted / drawn (NaN where nothing was drawn)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.accepted / np.where(self.drawn > 0, self.drawn, np.nan)

    @property
    def empty(self) -> list[int]:
        """Indices of the values at which no sample was kept (the scores cannot use them)."""
        return np.flatnonzero(self.kept == 0).tolist()

    @property
    def short(self) -> list[int]:
        """Indices of the values with fewer than ``samples_per_value`` kept samples (``empty`` included)."""
        return np.flatnonzero(self.kept < self.samples_per_value).tolist()

    def select(self, indices: Sequence[int] | np.ndarray) -> ConditionalPredictions:
        """The same result restricted to some values (indices, or a boolean mask of length V)."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise ValueError(f"boolean mask of shape {idx.shape} for {len(self)} values")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        pick = lambda items: None if items is None else [items[i] for i in idx]
        return ConditionalPredictions(
            values=self.values[idx],
            predictions=pick(self.predictions),
            features=pick(self.features),
            embeddings=pick(self.embeddings),
            drawn=self.drawn[idx],
            accepted=self.accepted[idx],
            kept=self.kept[idx],
            rounds=self.rounds[idx],
            samples_per_value=self.samples_per_value,
        )


def _cpu(x: Any) -> torch.Tensor:
    return torch.as_tensor(x).detach().cpu()


def _per_image(output: Any, n: int, what: str) -> torch.Tensor:
    out = _cpu(output)
    if out.ndim == 0 or out.shape[0] != n:
        raise ValueError(f"{what} returned shape {tuple(out.shape)} for a batch of {n} images; expected ({n}, ...)")
    return out


def _classes(output: Any, n: int) -> np.ndarray:
    out = _per_image(output, n, "classify_fn")
    if out.numel() != n:
        raise ValueError(
            f"classify_fn must return one predicted class per image, got shape {tuple(out.shape)} for {n} images "
            "(take the argmax of logits, or threshold a probability, inside classify_fn)"
        )
    return out.reshape(n).numpy()


def conditional_predictions(
    sample_fn: SampleFn,
    classify_fn: Callable[[torch.Tensor], Any],
    feature_fn: Callable[[torch.Tensor], Any] | None,
    values: Sequence[Any] | np.ndarray | torch.Tensor,
    samples_per_value: int = 200,
    batch_size: int = 50,
    feature_sd: float | Sequence[float] | torch.Tensor | None = None,
    tolerance: float | None = 0.3,
    max_rounds: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    embed_fn: Callable[[torch.Tensor], Any] | None = None,
    progress_file: str | os.PathLike | None = None,
    resume: bool = False,
    run_key: Any = None,
) -> ConditionalPredictions:
    """Predictions of the classifier on samples drawn at each target feature value (paper 3.3, appendix D.1).

    Args:
        sample_fn: ``sample_fn(n, target, generator) -> images``: ``n`` samples from P(X | V = v) in the space
            of ``classify_fn`` / ``feature_fn`` (decode latents inside it). ``target`` is the value repeated
            per sample, shape (n, *value_shape), float32 on the CPU (move it to the device inside); it fits
            ``guided_sample(..., target=target)`` directly. ``generator`` is the one given here, passed on.
        classify_fn: images -> one predicted class per image ((n,) or (n, 1)), e.g.
            ``lambda x: classifier(x).argmax(1)``.
        feature_fn: g, images -> (n,) or (n, k) feature values, for the rejection rule; None (or
            ``tolerance=None``) keeps every sample (the paper's hippocampus constraint, which has no sd).
        values: the target values, one per entry (scalars, (k,) vectors, or any tensor ``sample_fn`` accepts).
        samples_per_value: how many kept samples are wanted at each value (paper: 200).
        batch_size: the most samples drawn at once. The first batch at each value is full; later ones draw
            what is still missing divided by the acceptance rate so far (x 1.25), at most ``batch_size``.
        feature_sd: sd of the feature over the real data (scalar or (k,)); needed for the rejection.
        tolerance: keep |g(x) - v| <= tolerance * feature_sd (paper: 0.3); None: no rejection.
        max_rounds: the most batches drawn at one value; default ``5 * ceil(samples_per_value / batch_size)``
            (enough down to an acceptance rate of about 20 %). Values that then have fewer than
            ``samples_per_value`` kept samples are reported in ``result.short`` (no sample: ``result.empty``).
        generator: torch generator handed to every ``sample_fn`` call, in order: the same generator state
            gives the same result (on the device ``sample_fn`` samples on).
        progress: a tqdm bar over the values.
        embed_fn: images -> (n, ...) embeddings of the kept samples, kept for :func:`sample_coverage`.
        progress_file: where to record, after each batch, what was drawn so far and the generator's state
            (written whole or not at all), so that an evaluation of many hours can stop and go on; None: no record.
        resume: go on from ``progress_file`` if it exists (else start afresh): the values and batches it records
            are taken from it and the generator continues from its recorded state, so the result equals that of a
            run that never stopped where the sampling is deterministic (on the CPU; on CUDA only with deterministic
            algorithms). Without ``resume`` an existing record is deleted first. Needs ``generator``.
        run_key: JSON-able description of everything else the samples depend on (the sampler's settings, a
            fingerprint of the models' files): a record is resumed only if it, the arguments here and the
            generator's initial state match; otherwise :class:`~common.errors.InputError` names what differs.

    Everything runs under ``torch.no_grad`` (``guided_sample`` enables gradients itself where it guides),
    with the modules behind ``classify_fn``, ``feature_fn`` and ``embed_fn`` (modules or their bound methods)
    in eval mode, restored afterwards.
    """
    if samples_per_value < 1 or batch_size < 1:
        raise ValueError(f"samples_per_value={samples_per_value} and batch_size={batch_size} must be >= 1")
    if max_rounds is None:
        max_rounds = 5 * math.ceil(samples_per_value / batch_size)
    if max_rounds < 1:
        raise ValueError(f"max_rounds={max_rounds}; expected >= 1")
    reject = feature_fn is not None and tolerance is not None
    if reject:
        if feature_sd is None:
            raise ValueError("feature_sd is needed for the rejection rule (or pass tolerance=None)")
        if tolerance < 0:
            raise ValueError(f"tolerance={tolerance}; expected >= 0")
    # float64 for the rejection and the report; the samplers get float32 (see sample_fn above).
    targets = [torch.as_tensor(v).detach().cpu().to(torch.float64) for v in values]
    if not targets:
        raise ValueError("no feature value given")
    if any(t.shape != targets[0].shape for t in targets):
        raise ValueError("all target values must have the same shape")

    n_values = len(targets)
    drawn = np.zeros(n_values, dtype=np.int64)
    accepted = np.zeros(n_values, dtype=np.int64)
    rounds = np.zeros(n_values, dtype=np.int64)
    predictions: list[np.ndarray] = []
    features: list[np.ndarray] | None = [] if reject else None
    embeddings: list[np.ndarray] | None = [] if embed_fn is not None else None

    start, partial = 0, ([], [], [])
    if progress_file is not None:
        if generator is None:
            raise ValueError("progress_file needs a generator: a resumed run must go on with the stopped run's draws")
        rule = (feature_sd, tolerance) if reject else (None, None)
        key = _progress_key(
            run_key, targets, samples_per_value, batch_size, *rule, max_rounds, embed_fn is not None, generator
        )
        record = _read_progress(progress_file, key) if resume else None
        if record is None:
            Path(progress_file).unlink(missing_ok=True)
        else:
            start = record["done"]
            for name, counts in (("drawn", drawn), ("accepted", accepted), ("rounds", rounds)):
                counts[:] = record[name].numpy()
            arrays = lambda tensors: [t.numpy() for t in tensors]
            predictions = arrays(record["predictions"])
            features = None if features is None else arrays(record["features"])
            embeddings = None if embeddings is None else arrays(record["embeddings"])
            partial = tuple(arrays(record["partial"][name]) for name in ("predictions", "features", "embeddings"))
            generator.set_state(record["generator_state"])

    def save(done: int, current: tuple = ([], [], [])) -> None:
        """The record after a batch (``current``: the kept samples of value ``done`` so far) or a whole value."""
        _write_progress(
            progress_file, key, done, drawn, accepted, rounds, predictions, features, embeddings, current, generator
        )

    values_left = range(start, n_values)
    bar = (
        tqdm(values_left, desc="conditional sampling", initial=start, total=n_values)
        if progress and has_tqdm
        else values_left
    )
    with frozen(*modules_of(classify_fn, feature_fn, embed_fn)), torch.no_grad():
        for i in bar:
            target = targets[i]
            preds, feats, embs = partial if i == start else ([], [], [])
            kept = sum(p.size for p in preds)
            while kept < samples_per_value and rounds[i] < max_rounds:
                missing = samples_per_value - kept
                rate = accepted[i] / drawn[i] if accepted[i] > 0 else 1.0
                n = batch_size if rounds[i] == 0 else min(batch_size, math.ceil(_BATCH_MARGIN * missing / rate))
                images = sample_fn(n, target.float().expand(n, *target.shape).clone(), generator)
                if not isinstance(images, torch.Tensor) or images.shape[0] != n:
                    shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
                    raise ValueError(f"sample_fn returned {shape} when asked for {n} samples")
                rounds[i] += 1
                drawn[i] += n
                if reject:
                    g = _per_image(feature_fn(images), n, "feature_fn").to(torch.float64).reshape(n, -1)
                    g = g.reshape(n) if g.shape[1] == 1 else g
                    keep = reject_off_target(g, target.expand(n, *target.shape), feature_sd, tolerance)
                    index = keep.nonzero().reshape(-1)
                else:
                    g = None
                    index = torch.arange(n)
                accepted[i] += int(index.numel())
                index = index[:missing]
                if index.numel() > 0:
                    chosen = images[index.to(images.device)]
                    preds.append(_classes(classify_fn(chosen), int(index.numel())))
                    if g is not None:
                        feats.append(g[index].numpy())
                    if embed_fn is not None:
                        e = _per_image(embed_fn(chosen), int(index.numel()), "embed_fn")
                        embs.append(e.reshape(e.shape[0], -1).float().numpy())
                    kept += int(index.numel())
                if progress_file is not None and kept < samples_per_value and rounds[i] < max_rounds:
                    save(i, (preds, feats, embs))  # a value can take long (e.g. the thousands of plain samples)
            predictions.append(np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64))
            if features is not None:
                shape = (0,) if target.numel() == 1 else (0, target.numel())
                features.append(np.concatenate(feats) if feats else np.zeros(shape))
            if embeddings is not None:
                embeddings.append(np.concatenate(embs) if embs else np.zeros((0, 0), dtype=np.float32))
            if progress and has_tqdm:
                bar.set_postfix(kept=kept, drawn=int(drawn[i]))
            if progress_file is not None:
                save(i + 1)

    return ConditionalPredictions(
        values=np.stack([t.numpy() for t in targets]),
        predictions=predictions,
        features=features,
        embeddings=embeddings,
        drawn=drawn,
        accepted=accepted,
        kept=np.array([p.size for p in predictions], dtype=np.int64),
        rounds=rounds,
        samples_per_value=int(samples_per_value),
    )


def _progress_key(
    run_key, targets, samples_per_value, batch_size, feature_sd, tolerance, max_rounds, embed, generator
) -> str:
    """What a progress record must have been made with to be resumed, as JSON (see :func:`conditional_predictions`)."""
    state = None if generator is None else hashlib.sha1(generator.get_state().numpy().tobytes()).hexdigest()
    key = {
        "run": run_key,
        "values": [t.tolist() for t in targets],
        "samples_per_value": samples_per_value,
        "batch_size": batch_size,
        "feature_sd": None if feature_sd is None else _cpu(feature_sd).double().tolist(),
        "tolerance": tolerance,
        "max_rounds": max_rounds,
        "embeddings": embed,
        "generator_initial_state": state,
    }
    return json.dumps(key, sort_keys=True, default=str)


def _write_progress(
    path, key, done, drawn, accepted, rounds, predictions, features, embeddings, current, generator
) -> None:
    tensors = lambda arrays: None if arrays is None else [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    record = {
        "key": key,
        "done": done,
        "drawn": torch.from_numpy(drawn.copy()),
        "accepted": torch.from_numpy(accepted.copy()),
        "rounds": torch.from_numpy(rounds.copy()),
        "predictions": tensors(predictions),
        "features": tensors(features),
        "embeddings": tensors(embeddings),
        "partial": {name: tensors(arrays) for name, arrays in zip(("predictions", "features", "embeddings"), current)},
        "generator_state": generator.get_state(),
    }
    save_record(path, record)


# What a mismatch of a key field means to the user.
_KEY_FIELD_MEANING = {"generator_initial_state": "generator_initial_state (the seed or the device)"}


def _read_progress(path, key: str) -> dict | None:
    """The record at ``path`` if there is one (None if not); :class:`InputError` if it is not one of this run."""
    path = Path(path)
    if not path.is_file():
        return None
    fields = ("key", "done", "drawn", "accepted", "rounds", "predictions", "features", "embeddings", "partial")
    record = read_record(path, (*fields, "generator_state"), "a sampling progress record", "conditional_predictions")
    recorded = json.loads(record["key"])
    record["done"] = int(record["done"])
    record["partial"] = {name: list(record["partial"][name]) for name in ("predictions", "features", "embeddings")}
    expected = json.loads(key)
    if recorded != expected:
        differ = [k for k in expected if recorded.get(k) != expected[k]]
        if "run" in differ and isinstance(expected["run"], dict) and isinstance(recorded.get("run"), dict):
            differ.remove("run")
            differ += [
                f"run.{k}"
                for k in {**expected["run"], **recorded["run"]}
                if recorded["run"].get(k) != expected["run"].get(k)
            ]
        raise InputError(
            f"{path}: records sampling that differs from this run's in "
            f"{', '.join(_KEY_FIELD_MEANING.get(k, k) for k in differ)}; expected a record of this same evaluation "
            "(same settings, values, models and seed): delete it, or run without resume"
        )
    return record


def feature_scores(
    result: ConditionalPredictions,
    reference_predictions=None,
    classes_of_values=None,
    n_resamples: int = 5000,
    seed: int | np.random.Generator | None = 0,
    min_kept: int = 1,
) -> dict[str, Any]:
    """TVD scores of one feature from :func:`conditional_predictions` (JSON-serialisable dict).

    Args:
        result: the predictions at every value.
        reference_predictions: the classifier's predictions on the real test set, for Var(Y); None: the
            variance of all the conditional predictions pooled (see :func:`~common.metrics.tvd.global_tvd_score`).
        classes_of_values: the true class of the test item each value was taken from (length V, aligned
            with ``result.values``): the global score is then class-balanced (the paper's brain-MRI score).
        n_resamples, seed: of :func:`~common.metrics.tvd.tvd_bootstrap_variance` (paper: 5000).
        min_kept: values with fewer kept samples are left out of the scores, with a warning, and listed in
            ``dropped_values`` (those without any sample must be: the scores need non-empty groups).

    Returns:
        ``global_score``; ``local_scores`` and ``values`` (the values used, same order); ``value_indices``
        (their indices in ``result``); ``bootstrap_variance_local`` (mean over values of the local scores'
        bootstrap variance) and ``bootstrap_variance_global`` (paper Table 4); ``n_values`` (used) and
        ``n_values_total``; ``dropped_values``; ``reference_variance`` (Var(Y)); ``class_balanced``;
        ``mean_acceptance`` (mean over values of accepted / drawn) and ``overall_acceptance``
        (all accepted / all drawn); ``kept_total``, ``drawn_total``; ``samples_per_value``.
    """
    if min_kept < 1:
        raise ValueError(f"min_kept={min_kept}; every value used needs at least one prediction")
    used = np.flatnonzero(result.kept >= min_kept)
    dropped = np.flatnonzero(result.kept < min_kept).tolist()
    if dropped:
        warnings.warn(
            f"{len(dropped)} of {len(result)} feature value(s) have fewer than {min_kept} kept sample(s) and are "
            f"left out of the scores: indices {dropped}",
            stacklevel=2,
        )
    if used.size == 0:
        raise ValueError("no feature value has enough kept samples to score")
    groups = [result.predictions[i] for i in used]
    classes = None
    if classes_of_values is not None:
        classes = np.asarray(
            classes_of_values.detach().cpu() if isinstance(classes_of_values, torch.Tensor) else classes_of_values
        ).reshape(-1)
        if classes.size != len(result):
            raise ValueError(f"classes_of_values has {classes.size} entries for {len(result)} feature values")
        classes = classes[used]
    pooled = np.concatenate(groups).astype(np.float64)
    reference_variance = (
        prediction_variance(reference_predictions) if reference_predictions is not None else prediction_variance(pooled)
    )
    local = local_tvd_scores(groups, reference_predictions)
    global_ = global_tvd_score(groups, reference_predictions, classes)
    var_local, var_global = tvd_bootstrap_variance(groups, reference_predictions, classes, n_resamples, seed)
    rates = result.acceptance_rate
    rates = rates[np.isfinite(rates)]
    drawn = int(result.drawn.sum())
    return {
        "global_score": float(global_),
        "local_scores": [float(s) for s in local],
        "values": result.values[used].tolist(),
        "value_indices": used.tolist(),
        "bootstrap_variance_local": float(var_local),
        "bootstrap_variance_global": float(var_global),
        "n_values": int(used.size),
        "n_values_total": len(result),
        "dropped_values": dropped,
        "reference_variance": float(reference_variance),
        "class_balanced": classes is not None,
        "mean_acceptance": float(rates.mean()) if rates.size else float("nan"),
        "overall_acceptance": float(result.accepted.sum() / drawn) if drawn else float("nan"),
        "kept_total": int(result.kept.sum()),
        "drawn_total": drawn,
        "samples_per_value": result.samples_per_value,
    }


def sample_coverage(result: ConditionalPredictions, real_embeddings, ks: Sequence[int] = (5, 3, 1)) -> dict[str, float]:
    """Coverage (Naeem et al. 2020, paper Table 3) of the kept samples of all values pooled against the real test set.

    ``real_embeddings`` are the test images under the same ``embed_fn`` given to :func:`conditional_predictions`.
    Returns ``{"k=5": ..., "k=3": ..., "k=1": ...}``.
    """
    if result.embeddings is None:
        raise ValueError("no embeddings: pass embed_fn to conditional_predictions")
    fake = [e for e in result.embeddings if e.shape[0]]
    if not fake:
        raise ValueError("no kept sample to measure coverage with")
    fake = np.concatenate(fake)
    return {f"k={int(k)}": coverage(real_embeddings, fake, k=int(k)) for k in ks}


def _numpy(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)


def _class_name(class_names: Sequence[str] | Mapping[Any, str] | None, label: Any) -> str:
    if isinstance(class_names, Mapping):
        return str(class_names.get(label, label))
    if class_names is not None and float(label).is_integer() and 0 <= int(label) < len(class_names):
        return str(class_names[int(label)])
    return str(label)


def plot_local_scores(
    values,
    local_scores,
    train_feature_values,
    train_labels,
    class_names: Sequence[str] | Mapping[Any, str] | None,
    feature_name: str,
    path: str | os.PathLike,
    *,
    bins: int = 30,
    dpi: int = 100,
    title: str | None = None,
) -> Path:
    """Paper Fig. 5 / 8: local score against the feature value (left), per-class histograms of it (right).

    ``values`` and ``local_scores`` are those of :func:`feature_scores` (``scores["values"]``,
    ``scores["local_scores"]``; plotted sorted by value); ``train_feature_values`` and ``train_labels`` the
    feature and true class of the training items; ``class_names`` names the labels (a sequence indexed
    by the label, or a mapping). Both panels share the feature axis. The PNG (about 900 x 350 pixels at
    ``dpi=100``) is written to a temporary file in the same folder and moved onto ``path``, so a crash
    never leaves a half-written image. Returns ``path``.
    """
    v = _numpy(values).astype(np.float64)
    s = _numpy(local_scores).astype(np.float64).reshape(-1)
    if v.ndim != 1 and not (v.ndim == 2 and v.shape[1] == 1):
        raise ValueError(f"values must be one scalar feature per entry, got shape {v.shape}")
    v = v.reshape(-1)
    if v.size != s.size:
        raise ValueError(f"{v.size} values but {s.size} local scores")
    train_v = _numpy(train_feature_values).astype(np.float64).reshape(-1)
    train_y = _numpy(train_labels).reshape(-1)
    if train_v.size != train_y.size:
        raise ValueError(f"{train_v.size} training feature values but {train_y.size} labels")
    order = np.argsort(v, kind="stable")

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), sharex=True)
    try:
        left.plot(v[order], s[order], marker="o", markersize=3, linewidth=1)
        left.axhline(0.0, color="grey", linewidth=0.5, linestyle=":")
        left.set_xlabel(feature_name)
        left.set_ylabel("local score")
        left.set_title("local TVD score", fontsize=9)
        finite = train_v[np.isfinite(train_v)]
        if finite.size:
            edges = np.histogram_bin_edges(np.concatenate([finite, v[np.isfinite(v)]]), bins=bins)
            for label in np.unique(train_y):
                right.hist(
                    train_v[(train_y == label) & np.isfinite(train_v)],
                    bins=edges,
                    alpha=0.5,
                    label=_class_name(class_names, label),
                )
            right.legend(fontsize=8)
        right.set_xlabel(feature_name)
        right.set_ylabel("training items")
        right.set_title("training distribution per class", fontsize=9)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Opened as a plain file (not mkstemp, which would leave the PNG readable by its owner only).
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial.png")
        try:
            with open(tmp, "wb") as handle:
                fig.savefig(handle, format="png", dpi=dpi)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    finally:
        plt.close(fig)
    return path


_COLUMNS = (
    "Feature",
    "Global score",
    "Bootstrap var. (global)",
    "Mean bootstrap var. (local)",
    "Values",
    "Mean acceptance",
)


def _number(x: Any, spec: str) -> str:
    if x is None:
        return "n/a"
    x = float(x)
    return "n/a" if not math.isfinite(x) else format(x, spec)


def scores_markdown(rows: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of :func:`feature_scores` dicts, one row per feature (paper Tables 1, 2 and 4).

    ``rows`` is a mapping feature name -> scores, or a sequence of scores dicts that each also hold
    ``"feature"``. Columns: feature, global score (3 decimals), bootstrap variance of the global score and
    mean bootstrap variance of the local scores (as the paper's ``6.74e-04``), values used (``used/total``
    when some were dropped) and the mean acceptance rate of the rejection.
    """
    items = list(rows.items()) if isinstance(rows, Mapping) else [(row["feature"], row) for row in rows]
    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * (len(_COLUMNS) - 1)) + "|"]
    for feature, row in items:
        used, total = row.get("n_values"), row.get("n_values_total", row.get("n_values"))
        n = "n/a" if used is None else (f"{used}" if used == total else f"{used}/{total}")
        cells = [
            str(feature).replace("|", "\\|"),
            _number(row.get("global_score"), ".3f"),
            _number(row.get("bootstrap_variance_global"), ".2e"),
            _number(row.get("bootstrap_variance_local"), ".2e"),
            n,
            _number(row.get("mean_acceptance"), ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
