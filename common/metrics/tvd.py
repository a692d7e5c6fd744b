"""Total-variance-decomposition (TVD) feature-importance scores and the coverage of generated samples.

Jin, Zhu & Fletcher (MIDL 2025) score how much a classifier relies on a feature V by the fraction of
the variance of its predicted class Y that V explains (law of total variance,
Var(Y) = E[Var(Y | V)] + Var[E(Y | V)]):

| score | definition | range |
|---|---|---|
| global ``Score_V`` (Eq. 5) | 1 - E_v[Var(Y given V=v)] / Var(Y) | [0, 1] for pooled Var(Y), equal groups |
| local ``Score_{V=v}`` (Eq. 6) | 1 - Var(Y given V=v) / Var(Y) | at most 1; < 0 if Y varies more at v |

so the mean local score is the global score when they share Var(Y) (Eq. 7). The input is the
classifier's predictions on samples drawn from P(X | V=v) (constrained diffusion sampling, or real
images with that value of a discrete feature), one array per feature value v. The values v are
themselves drawn from the test data, so E_v is the plain mean over the values (or a class-balanced
mean, see :func:`global_tvd_score`). Var(Y) is the variance of the predictions on the real test set
when given, else of all the predictions pooled.

Variances are population variances (ddof=0): the variance of the empirical distribution, which is
what the law of total variance decomposes exactly. Y is the predicted class as a number (0/1 in the
paper); with more than two classes the variance of the class index depends on how the classes are
numbered, so the score is only meaningful for binary (or ordinal) predictions.

Degenerate case: Var(Y) = 0 (the classifier predicts one class everywhere) leaves nothing to explain;
every score is then 0 with a :class:`~common.metrics.DegenerateMetricWarning`. A feature value
without any prediction (all its samples rejected) is an error: leave that value out.

:func:`coverage` is the coverage of Naeem et al. (2020) that the paper uses to check that the
generated samples cover the real test distribution in an embedding space.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors

from . import _flat, _warn

# Entries of one block of bootstrap counts (resamples x distinct predictions): bounds the memory of
# tvd_bootstrap_variance (about 32 MiB) when predictions are continuous rather than class labels.
_BLOCK_ENTRIES = 1 << 22


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _groups(predictions_by_value) -> tuple[np.ndarray, np.ndarray]:
    """All predictions concatenated (value by value) and the number of predictions at each value."""
    if isinstance(predictions_by_value, (np.ndarray, torch.Tensor)) and predictions_by_value.ndim < 2:
        # A flat array would silently be read as one prediction per value (every score 1).
        raise ValueError(
            "predictions_by_value must hold one array per feature value (a list, or a 2-D array of "
            f"values x samples); got an array of shape {tuple(predictions_by_value.shape)}"
        )
    groups = [_flat(p) for p in predictions_by_value]
    if not groups:
        raise ValueError("no feature value given")
    sizes = np.array([g.size for g in groups], dtype=np.int64)
    empty = np.flatnonzero(sizes == 0).tolist()
    if empty:
        raise ValueError(f"no prediction at feature value(s) {empty}; leave out values whose samples were all rejected")
    return np.concatenate(groups), sizes


def _group_variances(values: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Population variance of each consecutive group of ``values`` (one pass of bincounts, no Python loop)."""
    ids = np.repeat(np.arange(sizes.size), sizes)
    means = np.bincount(ids, weights=values, minlength=sizes.size) / sizes
    centred = values - means[ids]
    return np.bincount(ids, weights=centred * centred, minlength=sizes.size) / sizes


def _variance(values: np.ndarray) -> float:
    # Tested on the raw values: np.var of a constant such as 0.1 can leave rounding residue.
    if values.min() == values.max():
        return 0.0
    return float(np.var(values))


def _reference_variance(reference_predictions, pooled: np.ndarray) -> float:
    if reference_predictions is None:
        return _variance(pooled)
    reference = _flat(reference_predictions)
    if reference.size == 0:
        raise ValueError("reference_predictions is empty")
    return _variance(reference)


def _value_weights(n_values: int, classes_of_values) -> np.ndarray:
    """Weights (summing to 1) of the feature values in E_v: equal, or equal per class when balanced."""
    if classes_of_values is None:
        return np.full(n_values, 1.0 / n_values)
    classes = _numpy(classes_of_values).reshape(-1)
    if classes.size != n_values:
        raise ValueError(f"classes_of_values has {classes.size} entries for {n_values} feature values")
    _, inverse, counts = np.unique(classes, return_inverse=True, return_counts=True)
    # Each class present gets total weight 1/n_classes, shared equally by its values.
    return 1.0 / (counts.size * counts[inverse.reshape(-1)])


def prediction_variance(predictions) -> float:
    """Var(Y): population variance of a set of predicted classes (0 for a constant array).

    Use it on the classifier's predictions on the real test set to get the ``reference_variance`` of
    :func:`local_tvd_score`, so that every score shares the same denominator.
    """
    y = _flat(predictions)
    if y.size == 0:
        raise ValueError("prediction_variance of no prediction")
    return _variance(y)


def local_tvd_score(predictions_at_v, reference_variance: float) -> float:
    """Local score 1 - Var(Y | V=v) / Var(Y) (paper Eq. 6) from the predictions on samples at one value v.

    ``reference_variance`` is Var(Y), e.g. :func:`prediction_variance` of the predictions on the real
    test set. The score is at most 1 (Y constant at v: v decides the class) and is negative when the
    predictions vary more at v than over the data set. Var(Y) = 0 gives 0 with a warning.
    """
    y = _flat(predictions_at_v)
    if y.size == 0:
        raise ValueError("local_tvd_score of no prediction")
    reference_variance = float(reference_variance)
    if not np.isfinite(reference_variance) or reference_variance < 0.0:
        raise ValueError(f"reference_variance={reference_variance}; expected a finite value >= 0")
    if reference_variance == 0.0:
        _warn("TVD score with Var(Y) = 0 (a constant classifier) is undefined; returning 0")
        return 0.0
    return float(1.0 - np.var(y) / reference_variance)


def local_tvd_scores(predictions_by_value, reference_predictions=None) -> list[float]:
    """Local scores (Eq. 6) at every feature value, sharing Var(Y), e.g. for a plot against v.

    ``predictions_by_value`` holds one array of predicted classes per feature value (a list of
    arrays of any lengths, or a 2-D array values x samples). Var(Y) is the variance of
    ``reference_predictions`` (the classifier's predictions on the real test set) or, when None, of
    all the predictions pooled. Their mean is :func:`global_tvd_score` without class balancing (Eq. 7).
    """
    values, sizes = _groups(predictions_by_value)
    reference = _reference_variance(reference_predictions, values)
    if reference == 0.0:
        _warn("TVD score with Var(Y) = 0 (a constant classifier) is undefined; returning 0 at every value")
        return [0.0] * sizes.size
    return (1.0 - _group_variances(values, sizes) / reference).tolist()


def global_tvd_score(predictions_by_value, reference_predictions=None, classes_of_values=None) -> float:
    """Global score 1 - E_v[Var(Y | V=v)] / Var(Y) (paper Eq. 5 / 7): the fraction of Var(Y) that V explains.

    ``predictions_by_value`` holds one array of predicted classes per sampled feature value v (a
    list of arrays of any lengths, or a 2-D array values x samples). The values are drawn from the
    test data, so E_v is the plain mean of the per-value variances. Var(Y) is the variance of
    ``reference_predictions`` (the classifier's predictions on the real test set) or, when None, of
    all the predictions pooled; with a reference the score can fall below 0 (generated samples that
    vary more than the real data) and it is not clipped.

    Class balancing (the paper's brain-MRI score, "averaging the separately calculated expectations
    for the AD and CN groups ... similar to balanced accuracy"): ``classes_of_values`` gives, for
    each value v, the true class of the test item v was taken from. E_v[Var(Y | V=v)] is then the
    unweighted mean over the classes present of each class's mean per-value variance, so a minority
    class counts as much as the majority. Only this expectation is balanced: Var(Y) is the same
    (unweighted) reference variance as without balancing.

    Var(Y) = 0 (a constant classifier) gives 0 with a warning.
    """
    values, sizes = _groups(predictions_by_value)
    weights = _value_weights(sizes.size, classes_of_values)
    reference = _reference_variance(reference_predictions, values)
    if reference == 0.0:
        _warn("TVD score with Var(Y) = 0 (a constant classifier) is undefined; returning 0")
        return 0.0
    return float(1.0 - weights @ _group_variances(values, sizes) / reference)


def binned_tvd_score(predictions, feature_values, n_bins: int, classes=None) -> dict:
    """The TVD score from real data alone, the paper's route "when ample data is available": the items
    are grouped into ``n_bins`` quantile bins of their true feature value and Var(Y | V in bin) stands
    for Var(Y | V = v). E_v weights each bin by its share of the items or, given ``classes`` (each
    item's true class), averages the per-class expectations sum_b P(b | c) Var(Y | b) (the paper's
    class balancing). Var(Y) is the variance of all ``predictions``.

    A bin spans a range of V, and Var(Y | bin) = E[Var(Y | V) | bin] + Var(E[Y | V] | bin), so the
    binned score is a lower bound of the score at exact values (up to sampling noise). Returns
    ``global_score``, ``local_scores`` and ``counts`` per non-empty bin, and the ``bin_edges``.
    """
    y = _flat(predictions)
    v = _flat(feature_values).astype(float)
    if y.size != v.size or y.size == 0:
        raise ValueError(f"{y.size} predictions for {v.size} feature values; expected the same, non-zero number")
    edges = np.quantile(v, np.linspace(0.0, 1.0, int(n_bins) + 1))
    bins = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, int(n_bins) - 1)
    used = np.unique(bins)  # ties in V can leave a bin empty
    bin_of = np.searchsorted(used, bins)
    variances = np.array([_variance(y[bin_of == b]) for b in range(used.size)])
    reference = _variance(y)
    if reference == 0.0:
        _warn("TVD score with Var(Y) = 0 (a constant classifier) is undefined; returning 0")
        return {"global_score": 0.0, "local_scores": [0.0] * used.size, "counts": [], "bin_edges": edges.tolist()}
    counts = np.bincount(bin_of, minlength=used.size)
    if classes is None:
        expected = float(counts @ variances) / y.size
    else:
        c = _flat(classes)
        if c.size != y.size:
            raise ValueError(f"{c.size} classes for {y.size} predictions; expected one per item")
        per_class = [np.bincount(bin_of[c == k], minlength=used.size) / (c == k).sum() for k in np.unique(c)]
        expected = float(np.mean([shares @ variances for shares in per_class]))
    return {
        "global_score": 1.0 - expected / reference,
        "local_scores": (1.0 - variances / reference).tolist(),
        "counts": counts.tolist(),
        "bin_edges": edges.tolist(),
    }


def tvd_bootstrap_variance(
    predictions_by_value,
    reference_predictions=None,
    classes_of_values=None,
    n_resamples: int = 5000,
    seed: int | np.random.Generator | None = 0,
) -> tuple[float, float]:
    """Bootstrap variance of the TVD scores: (mean variance of the local scores across values, variance of the global).

    The paper (Sec. 4.3, Table 4) estimates how much the scores vary because of the finite number
    of samples drawn at each value: it resamples "the existing samples 5,000 times, calculating a
    new score for each", and reports for local scores "the mean variance across feature values".
    Here each resample draws, independently for every feature value, as many predictions as that
    value has, with replacement, from that value's predictions, and recomputes every score exactly
    as :func:`local_tvd_scores` and :func:`global_tvd_score` would (same ``classes_of_values``
    balancing). The feature values themselves are not resampled: they are fixed draws from the test
    data, not the samples whose variation is estimated. ``reference_predictions`` (the real test
    set) is not resampled either; without it, Var(Y) is recomputed from each resample's pooled
    predictions. Variances over resamples use ddof=1 (the usual bootstrap estimate).

    Resampling n predictions with replacement is drawn as the multinomial counts of the distinct
    predictions (the same distribution), so a resample costs O(number of distinct predictions)
    rather than O(n): 5,000 resamples of 20 values x 200 binary predictions take milliseconds.
    ``seed`` is an int or a ``numpy.random.Generator``; the same seed gives the same result.
    """
    if n_resamples < 2:
        raise ValueError(f"n_resamples={n_resamples}; the variance needs at least 2")
    rng = np.random.default_rng(seed)
    values, sizes = _groups(predictions_by_value)
    weights = _value_weights(sizes.size, classes_of_values)
    fixed_reference = None if reference_predictions is None else _reference_variance(reference_predictions, values)
    if (fixed_reference if fixed_reference is not None else _variance(values)) == 0.0:
        _warn("TVD score with Var(Y) = 0 (a constant classifier) is undefined; every score is 0, variance 0")
        return 0.0, 0.0

    # Shifting by the pooled mean changes no variance and keeps the pooled moments well conditioned.
    values = values - values.mean()
    within = np.zeros((n_resamples, sizes.size))  # Var(Y | V=v) of each resample
    pooled_sum = np.zeros(n_resamples)
    pooled_squares = np.zeros(n_resamples)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    for index, (start, n) in enumerate(zip(starts, sizes)):
        levels, counts = np.unique(values[start : start + n], return_counts=True)
        if levels.size == 1:  # every resample is the group itself: variance exactly 0
            pooled_sum += n * levels[0]
            pooled_squares += n * levels[0] ** 2
            continue
        block = max(1, _BLOCK_ENTRIES // levels.size)
        for first in range(0, n_resamples, block):
            rows = slice(first, min(first + block, n_resamples))
            drawn = rng.multinomial(n, counts / n, size=rows.stop - rows.start)
            total = drawn @ levels
            mean = total / n
            within[rows, index] = (drawn * (levels - mean[:, None]) ** 2).sum(axis=1) / n
            pooled_sum[rows] += total
            pooled_squares[rows] += drawn @ (levels * levels)

    if fixed_reference is not None:
        reference = np.full(n_resamples, fixed_reference)
    else:
        total_n = sizes.sum()
        reference = np.maximum(pooled_squares / total_n - (pooled_sum / total_n) ** 2, 0.0)
    degenerate = reference <= 0.0
    if degenerate.any():
        _warn(f"{int(degenerate.sum())} bootstrap resample(s) with Var(Y) = 0; their scores count as 0")
    safe = np.where(degenerate, 1.0, reference)
    local = np.where(degenerate[:, None], 0.0, 1.0 - within / safe[:, None])
    global_ = np.where(degenerate, 0.0, 1.0 - within @ weights / safe)
    return float(local.var(axis=0, ddof=1).mean()), float(global_.var(ddof=1))


def _rows(x, name: str) -> np.ndarray:
    """Embeddings as a float64 (samples x features) matrix; any trailing shape is flattened per sample."""
    a = np.asarray(_numpy(x), dtype=np.float64)
    if a.ndim == 0 or a.shape[0] == 0:
        raise ValueError(f"{name} holds no sample")
    return a.reshape(a.shape[0], -1)


def coverage(real_embeddings, fake_embeddings, k: int = 5) -> float:
    """Coverage (Naeem et al., 2020): fraction of real samples with a generated sample in their k-NN ball.

    The ball of a real sample is centred on it with radius the L2 distance to its k-th nearest
    other real sample; it is covered when the nearest generated sample is strictly closer than that
    radius. This is the ``prdc`` package's ``coverage = mean(min_fake dist(real, fake) < kNN
    radius(real))``. Unlike precision / recall it does not count generated outliers, and it rewards
    generated samples spread over the whole real distribution: the paper reports it for k = 1, 3, 5
    on embeddings (VGG16 features, VAE latents) of the generated samples of all values pooled against
    the real test set. Embeddings have shape (samples, ...) and are flattened per sample. Exact
    duplicates among the real samples have radius 0 and so are never covered (as in ``prdc``).
    """
    real = _rows(real_embeddings, "real_embeddings")
    fake = _rows(fake_embeddings, "fake_embeddings")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real embeddings have {real.shape[1]} features and fake ones {fake.shape[1]}")
    k = int(k)
    if not 1 <= k < real.shape[0]:
        raise ValueError(f"k={k}; expected 1 <= k < number of real samples ({real.shape[0]})")
    # kneighbors() without a query excludes each real sample from its own neighbours.
    radii = NearestNeighbors(n_neighbors=k).fit(real).kneighbors()[0][:, -1]
    nearest_fake = NearestNeighbors(n_neighbors=1).fit(fake).kneighbors(real)[0][:, 0]
    return float(np.mean(nearest_fake < radii))
