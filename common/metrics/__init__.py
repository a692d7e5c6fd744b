"""Attribution and classification metrics as pure functions of arrays or tensors.

Every function takes NumPy arrays or torch tensors of any shape (maps are flattened) and returns a
Python float (or a dict / tuple of floats). ROC and PR quantities come from scikit-learn. Inputs
on which a metric is undefined (a constant map, an empty mask, one class only) give the documented
value below and a :class:`DegenerateMetricWarning`, never NaN, so one odd case cannot poison a mean.

| metric | definition | degenerate case |
|---|---|---|
| ``pearson``/``ncc`` | Pearson r of the flattened maps (NCC of VA-GAN / ICAM) | constant map -> 0 |
| ``dice`` | 2 abs(P.G) / (abs(P) + abs(G)), P = map >= threshold | both empty -> 1 |
| ``auroc`` | area under the voxel ROC curve | one class -> 0.5 |
| ``auroc_partial`` | ROC area to ``max_fpr`` / ``max_fpr`` (AUROC10: 0.1) | one class -> max_fpr / 2 |
| ``auprc`` | average precision | no positive -> 0 |
| ``pointing_game_hit`` | the map's maximum lies in the region | empty region -> miss |
| ``top_p_overlap`` | IoU, Dice of the top-k voxels, k = truth size (ACAT app. H) | empty truth -> (1, 1) |
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve


class DegenerateMetricWarning(RuntimeWarning):
    """A metric was asked for on inputs where it is undefined; a documented value was returned."""


def _flat(x, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def _binary(x, threshold: float | None = None) -> np.ndarray:
    values = _flat(x)
    return values > (0.5 if threshold is None else threshold)


def _warn(message: str) -> None:
    warnings.warn(message, DegenerateMetricWarning, stacklevel=3)


def _select(a: np.ndarray, b: np.ndarray, mask) -> tuple[np.ndarray, np.ndarray]:
    if a.size != b.size:
        raise ValueError(f"arrays have {a.size} and {b.size} elements; expected the same size")
    if mask is None:
        return a, b
    keep = _flat(mask) > 0
    if keep.size != a.size:
        raise ValueError(f"mask has {keep.size} elements; the maps have {a.size}")
    return a[keep], b[keep]


def pearson(a, b, mask=None) -> float:
    """Pearson correlation of two flattened arrays (restricted to ``mask > 0`` when given)."""
    x, y = _select(_flat(a), _flat(b), mask)
    # Constant maps are tested on the raw values: centring a constant such as 0.1 leaves rounding
    # residue that would otherwise correlate perfectly.
    if x.size < 2 or x.min() == x.max() or y.min() == y.max():
        _warn("pearson/ncc of a constant map is undefined; returning 0")
        return 0.0
    x = x - x.mean()
    y = y - y.mean()
    denominator = np.sqrt((x * x).sum() * (y * y).sum())
    if denominator == 0.0 or not np.isfinite(denominator):
        _warn("pearson/ncc of a constant map is undefined; returning 0")
        return 0.0
    return float((x * y).sum() / denominator)


def ncc(predicted_map, true_map, mask=None, absolute: bool = False) -> float:
    """Normalised cross-correlation of an attribution map with the ground-truth map.

    ``absolute=True`` correlates the magnitudes (ICAM's NCC between abs(FA map) and abs(mask)).
    """
    p, t = _flat(predicted_map), _flat(true_map)
    if absolute:
        p, t = np.abs(p), np.abs(t)
    return pearson(p, t, mask)


def dice(predicted, target, threshold: float = 0.5) -> float:
    """Dice of a map binarised at ``threshold`` (``>= threshold``) against a binary target (``> 0.5``).

    ``>=`` matches :func:`pr_operating_threshold`, whose threshold is the lowest score kept.
    """
    p = _flat(predicted) >= threshold
    g = _binary(target)
    if p.size != g.size:
        raise ValueError(f"maps have {p.size} and {g.size} elements; expected the same size")
    total = p.sum() + g.sum()
    if total == 0:
        _warn("dice with an empty prediction and an empty target; returning 1")
        return 1.0
    return float(2.0 * np.logical_and(p, g).sum() / total)


def pr_operating_threshold(scores, targets) -> float:
    """The score threshold at the precision-recall operating point (maximum F1) of pooled voxels.

    Choose it on a validation set and apply :func:`dice` with it on the test set (the attribution
    constraint paper's protocol). Voxels with ``score >= threshold`` are positive.
    """
    s, t = _flat(scores), _binary(targets)
    if not t.any():
        _warn("no positive voxel to choose a threshold on; returning the maximum score")
        return float(s.max())
    precision, recall, thresholds = precision_recall_curve(t, s)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return float(thresholds[int(np.argmax(f1))])


def _two_classes(targets: np.ndarray, name: str) -> bool:
    if targets.all() or not targets.any():
        _warn(f"{name} needs both classes in the target; returning the chance value")
        return False
    return True


def auroc(scores, targets) -> float:
    """Area under the ROC curve of ``scores`` against binary ``targets`` (voxels or images)."""
    s, t = _flat(scores), _binary(targets)
    if not _two_classes(t, "auroc"):
        return 0.5
    return float(roc_auc_score(t, s))


def auroc_partial(scores, targets, max_fpr: float = 0.1) -> float:
    """ROC area for FPR in [0, max_fpr], divided by max_fpr (the maximum attainable): AUROC10 at 0.1.

    This is the attribution-constraint paper's normalisation, not scikit-learn's McClish
    standardisation (``roc_auc_score(max_fpr=...)``), which maps chance to 0.5.
    """
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr={max_fpr}; expected a value in (0, 1]")
    s, t = _flat(scores), _binary(targets)
    if not _two_classes(t, "auroc_partial"):
        return max_fpr / 2.0  # the chance diagonal: area max_fpr^2 / 2, normalised by max_fpr
    fpr, tpr, _ = roc_curve(t, s)
    stop = int(np.searchsorted(fpr, max_fpr, side="right"))
    tpr_at_max = np.interp(max_fpr, fpr[stop - 1 : stop + 1], tpr[stop - 1 : stop + 1]) if stop < fpr.size else tpr[-1]
    fpr_part = np.append(fpr[:stop], max_fpr)
    tpr_part = np.append(tpr[:stop], tpr_at_max)
    return float(np.trapezoid(tpr_part, fpr_part) / max_fpr)


def auroc10(scores, targets) -> float:
    """Partial AUROC up to a false-positive rate of 10%, normalised to [0, 1]."""
    return auroc_partial(scores, targets, max_fpr=0.1)


def auprc(scores, targets) -> float:
    """Area under the precision-recall curve as average precision."""
    s, t = _flat(scores), _binary(targets)
    if not t.any():
        _warn("auprc without a positive voxel; returning 0")
        return 0.0
    return float(average_precision_score(t, s))


def pointing_game_hit(saliency, region_mask) -> bool:
    """Whether the map's maximum lies inside the region (ACAT's localisation score, one case).

    ``region_mask`` is the true region as a binary map (e.g. ``region_labels == region_index``).
    Ties for the maximum count as a hit when any tied voxel lies in the region.
    """
    s, r = _flat(saliency), _binary(region_mask)
    if s.size != r.size:
        raise ValueError(f"saliency has {s.size} elements and the region mask {r.size}")
    if not r.any():
        _warn("pointing game with an empty region; counting a miss")
        return False
    return bool(r[s == s.max()].any())


def hit_rate(hits) -> float:
    """Fraction of hits (pointing-game score over a data set)."""
    hits = _flat(hits)
    if hits.size == 0:
        _warn("hit rate over no case; returning 0")
        return 0.0
    return float(hits.mean())


def top_p_overlap(saliency, target) -> tuple[float, float]:
    """(IoU, Dice) of the map's top-k voxels with the target, k = number of target voxels.

    ACAT appendix H: binarise the map at the top-p percentile with p matched to the ground-truth
    size. Exactly k voxels are kept (ties broken by position), so the result does not depend on
    how many voxels share the threshold value.
    """
    s, g = _flat(saliency), _binary(target)
    if s.size != g.size:
        raise ValueError(f"saliency has {s.size} elements and the target {g.size}")
    k = int(g.sum())
    if k == 0:
        _warn("top-p overlap with an empty target; returning (1, 1)")
        return 1.0, 1.0
    predicted = np.zeros_like(g)
    predicted[np.argsort(-s, kind="stable")[:k]] = True
    intersection = float(np.logical_and(predicted, g).sum())
    return intersection / (2 * k - intersection), intersection / k


def classification_rates(y_true, y_pred, positive: int = 1) -> dict[str, float]:
    """Accuracy, TPR (sensitivity), TNR (specificity) and balanced accuracy of a binary task.

    Labels other than ``positive`` count as negative. A rate without any case of its class is
    reported as 0 with a warning.
    """
    t = _flat(y_true) == positive
    p = _flat(y_pred) == positive
    if t.size != p.size:
        raise ValueError(f"{t.size} labels and {p.size} predictions; expected the same number")
    if t.size == 0:
        raise ValueError("classification_rates of no case")
    rates = {"accuracy": float((t == p).mean())}
    for name, cls in (("tpr", True), ("tnr", False)):
        members = t == cls
        if members.any():
            rates[name] = float((p[members] == cls).mean())
        else:
            _warn(f"no {'positive' if cls else 'negative'} case for {name}; returning 0")
            rates[name] = 0.0
    rates["balanced_accuracy"] = (rates["tpr"] + rates["tnr"]) / 2.0
    return rates


def accuracy(y_true, y_pred) -> float:
    """Fraction of correct predictions (any number of classes)."""
    t, p = _flat(y_true), _flat(y_pred)
    if t.size != p.size or t.size == 0:
        raise ValueError(f"{t.size} labels and {p.size} predictions; expected the same non-zero number")
    return float((t == p).mean())


def mean_sd(values) -> tuple[float, float]:
    """Mean and (population) standard deviation, as papers report ``mean +/- sd``."""
    v = _flat(values)
    if v.size == 0:
        _warn("mean of no value; returning (0, 0)")
        return 0.0, 0.0
    return float(v.mean()), float(v.std())


# Imported last: the TVD module uses the helpers defined above.
from .tvd import (  # noqa: E402
    binned_tvd_score,
    coverage,
    global_tvd_score,
    local_tvd_score,
    local_tvd_scores,
    prediction_variance,
    tvd_bootstrap_variance,
)

__all__ = [
    "DegenerateMetricWarning",
    "accuracy",
    "auprc",
    "auroc",
    "auroc10",
    "auroc_partial",
    "classification_rates",
    "coverage",
    "dice",
    "binned_tvd_score",
    "global_tvd_score",
    "hit_rate",
    "local_tvd_score",
    "local_tvd_scores",
    "mean_sd",
    "ncc",
    "pearson",
    "pointing_game_hit",
    "pr_operating_threshold",
    "prediction_variance",
    "top_p_overlap",
    "tvd_bootstrap_variance",
]
