"""The pure metric functions of :mod:`common.metrics` against independent references.

Acceptance: every metric agrees with scikit-learn / NumPy / SciPy references within 1e-6 on 100
random cases (seeded; 1D, 2D and 3D maps of about 50 to 2000 elements, given as NumPy arrays,
float64 or float32 tensors). Where the implementation itself calls scikit-learn, the reference is
written out with NumPy (or taken from SciPy / MONAI) so that the two do not share code. Degenerate
inputs give the documented value and a ``DegenerateMetricWarning``, never NaN.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch
from monai.metrics import compute_roc_auc
from scipy import stats
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    f1_score,
    jaccard_score,
    recall_score,
    roc_auc_score,
)

from common import metrics
from common.metrics import DegenerateMetricWarning

# A random (well-posed) case must never take a degenerate branch.
pytestmark = pytest.mark.filterwarnings("error::common.metrics.DegenerateMetricWarning")

N_CASES = 100
TOL = 1e-6
PARTIAL_FPRS = (0.1, 0.05, 0.3)


# --------------------------------------------------------------------------------------------------
# random cases


def _rngs(seed: int):
    for index in range(N_CASES):
        yield index, np.random.default_rng([seed, index])


def _shape(rng) -> tuple[int, ...]:
    kind = rng.integers(3)
    if kind == 0:
        return (int(rng.integers(50, 2001)),)
    if kind == 1:
        return int(rng.integers(8, 45)), int(rng.integers(8, 45))
    return tuple(int(v) for v in rng.integers(4, 13, size=3))


def _wrap(array: np.ndarray, rng):
    """The array as NumPy, a float64 tensor or a float32 tensor, and the flat float64 values the metric sees."""
    kind = rng.integers(3)
    if kind == 0:
        value = array
    elif kind == 1:
        value = torch.from_numpy(np.array(array, dtype=np.float64))
    else:
        value = torch.from_numpy(np.array(array, dtype=np.float32))
    if isinstance(value, torch.Tensor):
        return value, value.double().numpy().ravel()
    return value, np.asarray(value, dtype=np.float64).ravel()


def _scored_case(rng, ties: bool):
    """Scores and a target map (both classes present); the target is sometimes soft (binarised at 0.5)."""
    shape = _shape(rng)
    n = math.prod(shape)
    positive = rng.random(n) < rng.uniform(0.03, 0.7)
    positive[rng.choice(n, 2, replace=False)] = [True, False]
    scores = rng.normal(size=n) + rng.uniform(-0.5, 2.5) * positive
    if ties:
        scores = np.round(scores, int(rng.integers(0, 2)))
    if rng.random() < 0.3:
        target = np.where(positive, rng.uniform(0.51, 1.0, n), rng.uniform(0.0, 0.5, n))
    else:
        target = positive.astype(np.float64)
    s, s_ref = _wrap(scores.reshape(shape), rng)
    t, t_ref = _wrap(target.reshape(shape), rng)
    return s, t, s_ref, t_ref > 0.5


def _close(actual, expected, what: str, index: int) -> None:
    assert isinstance(actual, float), f"{what}: case {index} returned {type(actual).__name__}, not float"
    assert math.isfinite(actual), f"{what}: case {index} returned {actual}"
    assert abs(actual - expected) <= TOL, f"{what}: case {index}: {actual} != {expected}"


# --------------------------------------------------------------------------------------------------
# independent references


def _roc_points(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC vertices (one per distinct score, descending), starting at (0, 0)."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each run of equal scores
    tp = np.cumsum(y)[last]
    fp = last + 1 - tp
    return np.r_[0.0, fp / (y.size - y.sum())], np.r_[0.0, tp / y.sum()]


def _partial_area(fpr: np.ndarray, tpr: np.ndarray, max_fpr: float) -> float:
    """Area under the piecewise-linear ROC curve for FPR in [0, max_fpr]."""
    x0, x1, y0, y1 = fpr[:-1], fpr[1:], tpr[:-1], tpr[1:]
    keep = x0 < max_fpr
    x0, x1, y0, y1 = x0[keep], x1[keep], y0[keep], y1[keep]
    cut = x1 > max_fpr
    y1 = np.where(cut, y0 + (y1 - y0) * (max_fpr - x0) / np.where(cut, x1 - x0, 1.0), y1)
    x1 = np.minimum(x1, max_fpr)
    return float(np.sum((x1 - x0) * (y0 + y1) / 2.0))


def _unstandardised_partial_auc(y: np.ndarray, s: np.ndarray, max_fpr: float) -> float:
    """Invert scikit-learn's McClish standardisation and normalise by max_fpr."""
    standardised = roc_auc_score(y, s, max_fpr=max_fpr)
    min_area, max_area = 0.5 * max_fpr * max_fpr, max_fpr
    return (min_area + (2.0 * standardised - 1.0) * (max_area - min_area)) / max_fpr


def _average_precision(s: np.ndarray, y: np.ndarray) -> float:
    """sum_n (R_n - R_{n-1}) P_n over distinct thresholds, scores sorted descending, ties grouped."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1_at_thresholds(s: np.ndarray, y: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """F1 of ``s >= u`` against ``y`` for every u, by counting with sorted arrays."""
    n_pos = y.sum()
    predicted = s.size - np.searchsorted(np.sort(s), thresholds, side="left")
    true_positive = n_pos - np.searchsorted(np.sort(s[y]), thresholds, side="left")
    return 2.0 * true_positive / (predicted + n_pos)


# --------------------------------------------------------------------------------------------------
# correlation


def test_pearson_matches_numpy_and_scipy():
    for index, rng in _rngs(1):
        shape = _shape(rng)
        a = rng.normal(size=shape) * rng.uniform(0.1, 10.0) + rng.uniform(-5, 5)
        b = rng.uniform(-2, 2) * a + rng.normal(size=shape) * rng.uniform(0.1, 3.0)
        a_in, a_ref = _wrap(a, rng)
        b_in, b_ref = _wrap(b, rng)
        expected = np.corrcoef(a_ref, b_ref)[0, 1]
        _close(metrics.pearson(a_in, b_in), expected, "pearson vs corrcoef", index)
        _close(metrics.pearson(a_in, b_in), stats.pearsonr(a_ref, b_ref).statistic, "pearson vs scipy", index)
        _close(metrics.ncc(a_in, b_in), expected, "ncc", index)


def test_ncc_absolute_correlates_magnitudes():
    for index, rng in _rngs(2):
        shape = _shape(rng)
        a = rng.normal(size=shape)
        # |b| follows |a| while the signs of b are random: the signed correlation is about 0.
        b = rng.choice([-1.0, 1.0], size=shape) * (rng.uniform(0.5, 3.0) * np.abs(a) + 0.5 * rng.normal(size=shape))
        a_in, a_ref = _wrap(a, rng)
        b_in, b_ref = _wrap(b, rng)
        expected = np.corrcoef(np.abs(a_ref), np.abs(b_ref))[0, 1]
        _close(metrics.ncc(a_in, b_in, absolute=True), expected, "ncc(absolute=True)", index)
        assert abs(expected - np.corrcoef(a_ref, b_ref)[0, 1]) > 1e-3, "the absolute case must differ"


def test_ncc_mask_restricts_to_the_mask():
    for index, rng in _rngs(3):
        shape = _shape(rng)
        a = rng.normal(size=shape)
        b = 0.5 * a + rng.normal(size=shape)
        keep = rng.random(shape) < rng.uniform(0.1, 0.9)
        keep.flat[rng.choice(keep.size, 3, replace=False)] = True
        # A weight map: anything > 0 is inside the mask.
        mask = np.where(keep, rng.uniform(0.1, 2.0, shape), 0.0)
        a_in, a_ref = _wrap(a, rng)
        b_in, b_ref = _wrap(b, rng)
        mask_in, mask_ref = _wrap(mask, rng)
        inside = mask_ref > 0
        _close(metrics.ncc(a_in, b_in, mask=mask_in), np.corrcoef(a_ref[inside], b_ref[inside])[0, 1], "mask", index)
        expected_abs = np.corrcoef(np.abs(a_ref[inside]), np.abs(b_ref[inside]))[0, 1]
        _close(metrics.ncc(a_in, b_in, mask=mask_in, absolute=True), expected_abs, "mask+absolute", index)


# --------------------------------------------------------------------------------------------------
# overlap


def test_dice_matches_sklearn_f1():
    for index, rng in _rngs(4):
        shape = _shape(rng)
        predicted = rng.random(shape)
        target = rng.random(shape) * rng.uniform(0.6, 1.4)  # soft: binarised at > 0.5
        threshold = 0.5 if index % 4 == 0 else float(rng.uniform(0.05, 0.95))
        p_in, p_ref = _wrap(predicted, rng)
        t_in, t_ref = _wrap(target, rng)
        expected = f1_score(t_ref > 0.5, p_ref >= threshold, zero_division=1.0)
        _close(metrics.dice(p_in, t_in, threshold=threshold), expected, "dice", index)


def test_dice_threshold_is_inclusive():
    assert metrics.dice([0.5, 0.7, 0.2], [1, 1, 0], threshold=0.5) == pytest.approx(1.0)
    assert metrics.dice([0.5, 0.7, 0.2], [1, 1, 0], threshold=0.51) == pytest.approx(2 / 3)
    # The target is binarised at 0.5 whatever the threshold.
    assert metrics.dice([0.9, 0.9], [0.6, 0.4], threshold=0.1) == pytest.approx(2 / 3)


def test_pointing_game_matches_brute_force():
    outcomes = set()
    for index, rng in _rngs(5):
        shape = _shape(rng)
        saliency = rng.normal(size=shape)
        region = rng.random(shape) < rng.uniform(0.05, 0.6)
        region.flat[rng.integers(region.size)] = True
        s_in, s_ref = _wrap(saliency, rng)
        assert np.sum(s_ref == s_ref.max()) == 1
        expected = bool(region.ravel()[np.argmax(s_ref)])
        r_in = torch.from_numpy(region) if index % 2 else region.astype(np.float32)
        hit = metrics.pointing_game_hit(s_in, r_in)
        assert isinstance(hit, bool)
        assert hit == expected, f"case {index}"
        outcomes.add(hit)
    assert outcomes == {True, False}


def test_pointing_game_ties():
    saliency = np.zeros((4, 4))
    saliency[0, 0] = saliency[3, 3] = 1.0
    region = np.zeros((4, 4))
    region[3, 3] = 1
    assert metrics.pointing_game_hit(saliency, region) is True
    region[:] = 0
    region[1, 1] = 1
    assert metrics.pointing_game_hit(saliency, region) is False
    assert metrics.pointing_game_hit(np.ones((4, 4)), region) is True  # a flat map ties everywhere


def test_hit_rate_is_the_mean():
    for index, rng in _rngs(6):
        hits = rng.random(int(rng.integers(1, 200))) < 0.4
        _close(metrics.hit_rate(list(hits)), float(np.mean(hits)), "hit_rate", index)


def test_top_p_overlap_matches_sklearn():
    for index, rng in _rngs(7):
        shape = _shape(rng)
        n = math.prod(shape)
        saliency = rng.permutation(n).astype(np.float64).reshape(shape) / n  # unique scores: no tie
        target = rng.random(shape) < rng.uniform(0.02, 0.5)
        target.flat[rng.integers(n)] = True
        s_in, s_ref = _wrap(saliency, rng)
        assert np.unique(s_ref).size == n
        k = int(target.sum())
        predicted = np.zeros(n, dtype=bool)
        predicted[np.argpartition(-s_ref, k - 1)[:k]] = True
        g = target.ravel()
        iou, dice = metrics.top_p_overlap(s_in, torch.from_numpy(target.astype(np.float32)))
        _close(iou, jaccard_score(g, predicted), "top-p IoU", index)
        _close(dice, f1_score(g, predicted), "top-p Dice", index)


def test_top_p_overlap_breaks_ties_by_position():
    # All scores tie: the first k positions are taken.
    target = np.array([0, 0, 1, 1, 0, 0], dtype=float)
    iou, dice = metrics.top_p_overlap(np.zeros(6), target)
    assert (iou, dice) == pytest.approx((0.0, 0.0))
    iou, dice = metrics.top_p_overlap(np.zeros(6), np.array([1, 0, 0, 0, 0, 1]))
    assert (iou, dice) == pytest.approx((1 / 3, 0.5))
    # Many ties: the earliest positions within a tied score win.
    rng = np.random.default_rng(0)
    scores = np.round(rng.random(300), 1)
    target = rng.random(300) < 0.2
    k = int(target.sum())
    order = sorted(range(300), key=lambda i: (-scores[i], i))
    predicted = np.zeros(300, dtype=bool)
    predicted[order[:k]] = True
    iou, dice = metrics.top_p_overlap(scores, target)
    assert (iou, dice) == pytest.approx((jaccard_score(target, predicted), f1_score(target, predicted)), abs=TOL)
    # Exactly k voxels are kept even when the k-th score is shared.
    iou, dice = metrics.top_p_overlap([3.0, 2.0, 2.0, 2.0, 0.0], [1, 1, 0, 0, 0])
    assert (iou, dice) == pytest.approx((1.0, 1.0))


# --------------------------------------------------------------------------------------------------
# ROC / PR


def test_auroc_matches_mann_whitney_and_monai():
    for index, rng in _rngs(8):
        s_in, t_in, s, y = _scored_case(rng, ties=index % 3 == 0)
        u = stats.mannwhitneyu(s[y], s[~y], alternative="two-sided", method="asymptotic").statistic
        value = metrics.auroc(s_in, t_in)
        _close(value, u / (y.sum() * (~y).sum()), "auroc vs Mann-Whitney U", index)
        monai_auc = compute_roc_auc(torch.from_numpy(s), torch.from_numpy(y.astype(np.float64)))
        _close(value, float(monai_auc), "auroc vs monai", index)


@pytest.mark.parametrize("max_fpr", PARTIAL_FPRS)
def test_auroc_partial_matches_destandardised_sklearn(max_fpr):
    for index, rng in _rngs(9):
        s_in, t_in, s, y = _scored_case(rng, ties=index % 3 == 0)
        value = metrics.auroc_partial(s_in, t_in, max_fpr=max_fpr)
        _close(value, _unstandardised_partial_auc(y, s, max_fpr), f"auroc_partial({max_fpr}) vs sklearn", index)
        fpr, tpr = _roc_points(s, y)
        _close(value, _partial_area(fpr, tpr, max_fpr) / max_fpr, f"auroc_partial({max_fpr}) vs numpy", index)


def test_auroc10_is_partial_auc_at_ten_percent():
    for index, rng in _rngs(10):
        s_in, t_in, s, y = _scored_case(rng, ties=index % 3 == 0)
        value = metrics.auroc10(s_in, t_in)
        _close(value, _unstandardised_partial_auc(y, s, 0.1), "auroc10", index)
        assert value == metrics.auroc_partial(s_in, t_in, max_fpr=0.1)


def test_auroc_partial_at_one_is_the_full_auroc():
    for index, rng in _rngs(11):
        s_in, t_in, s, y = _scored_case(rng, ties=index % 2 == 0)
        _close(metrics.auroc_partial(s_in, t_in, max_fpr=1.0), metrics.auroc(s_in, t_in), "max_fpr=1", index)


def test_auroc_partial_hand_computed():
    # One positive on top, then a negative, then a positive, then two negatives: FPR steps of 1/3.
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    targets = [1, 0, 1, 0, 0]
    # ROC: (0,0) (0,.5) (1/3,.5) (1/3,1) (1,1); area to FPR 0.5 = 1/3 * 0.5 + (0.5 - 1/3) * 1
    assert metrics.auroc_partial(scores, targets, max_fpr=0.5) == pytest.approx((1 / 6 + 1 / 6) / 0.5)
    assert metrics.auroc_partial(scores, targets, max_fpr=0.2) == pytest.approx(0.5)


def test_auprc_matches_explicit_average_precision_and_sklearn():
    for index, rng in _rngs(12):
        s_in, t_in, s, y = _scored_case(rng, ties=index % 3 == 0)
        value = metrics.auprc(s_in, t_in)
        _close(value, _average_precision(s, y), "auprc vs numpy", index)
        _close(value, average_precision_score(y, s), "auprc vs sklearn", index)


def test_auprc_hand_computed():
    # Ranked 1, 0, 1, 0: AP = 0.5 * 1 + 0.5 * 2/3.
    assert metrics.auprc([4, 3, 2, 1], [1, 0, 1, 0]) == pytest.approx(0.5 + 1 / 3)
    # One tie group holding everything: AP = prevalence.
    assert metrics.auprc([1, 1, 1, 1], [1, 0, 0, 0]) == pytest.approx(0.25)


def test_pr_operating_threshold_maximises_f1():
    for index, rng in _rngs(13):
        s_in, t_in, s, y = _scored_case(rng, ties=index % 3 == 0)
        threshold = metrics.pr_operating_threshold(s_in, t_in)
        assert isinstance(threshold, float)
        assert np.any(s == threshold), f"case {index}: the threshold is not a score"
        candidates = np.unique(s)
        f1 = _f1_at_thresholds(s, y, candidates)
        # The counting reference agrees with scikit-learn on a few candidates ...
        for u in rng.choice(candidates, 3):
            assert abs(_f1_at_thresholds(s, y, np.array([u]))[0] - f1_score(y, s >= u)) <= TOL
        # ... and the returned threshold attains the maximum F1 over all of them.
        _close(float(f1_score(y, s >= threshold)), float(f1.max()), "F1 at the operating threshold", index)


def test_dice_at_the_pr_operating_threshold_is_the_best_f1():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    targets = np.array([1, 1, 1, 0, 1, 0])
    threshold = metrics.pr_operating_threshold(scores, targets)  # 0.5: F1 = 8/9 with scores >= 0.5
    assert metrics.dice(scores, targets, threshold=threshold) == pytest.approx(f1_score(targets, scores >= threshold))


# --------------------------------------------------------------------------------------------------
# classification


def test_classification_rates_match_sklearn():
    for index, rng in _rngs(14):
        n = int(rng.integers(20, 2001))
        n_classes = 2 if index % 3 else 3
        positive = 1 if index % 2 else n_classes - 1
        truth = rng.integers(0, n_classes, n)
        truth[:2] = [positive, (positive + 1) % n_classes]
        prediction = np.where(rng.random(n) < rng.uniform(0.3, 0.95), truth, rng.integers(0, n_classes, n))
        t_in = torch.from_numpy(truth) if index % 4 == 0 else truth
        p_in = torch.from_numpy(prediction.reshape(-1, 1)) if index % 5 == 0 else prediction
        rates = metrics.classification_rates(t_in, p_in, positive=positive)
        y, p = truth == positive, prediction == positive
        _close(rates["accuracy"], accuracy_score(y, p), "accuracy", index)
        _close(rates["tpr"], recall_score(y, p, pos_label=1), "tpr", index)
        _close(rates["tnr"], recall_score(y, p, pos_label=0), "tnr", index)
        _close(rates["balanced_accuracy"], balanced_accuracy_score(y, p), "balanced accuracy", index)


def test_accuracy_multiclass_matches_sklearn():
    for index, rng in _rngs(15):
        n = int(rng.integers(1, 2001))
        n_classes = int(rng.integers(2, 8))
        truth = rng.integers(0, n_classes, n)
        prediction = np.where(rng.random(n) < 0.6, truth, rng.integers(0, n_classes, n))
        t_in = torch.from_numpy(truth) if index % 2 else truth
        _close(metrics.accuracy(t_in, prediction), accuracy_score(truth, prediction), "accuracy", index)


def test_mean_sd_matches_numpy():
    for index, rng in _rngs(16):
        shape = _shape(rng)
        values = rng.normal(size=shape) * rng.uniform(0.01, 10) + rng.uniform(-100, 100)
        v_in, v_ref = _wrap(values, rng)
        mean, sd = metrics.mean_sd(v_in)
        _close(mean, float(np.mean(v_ref)), "mean", index)
        _close(sd, float(np.std(v_ref)), "sd", index)
        _close(sd, statistics.pstdev(v_ref.tolist()), "population sd", index)


# --------------------------------------------------------------------------------------------------
# degenerate inputs


def _warns(fn, *args, **kwargs):
    with pytest.warns(DegenerateMetricWarning):
        value = fn(*args, **kwargs)
    for v in value if isinstance(value, tuple) else [value]:
        assert not (isinstance(v, float) and math.isnan(v))
    return value


RNG = np.random.default_rng(0)
MAP = RNG.random((8, 8))


@pytest.mark.parametrize(
    "fn, args, kwargs, expected",
    [
        (metrics.pearson, (np.full(64, 3.0), MAP), {}, 0.0),
        (metrics.pearson, (MAP, np.zeros((8, 8))), {}, 0.0),
        (metrics.pearson, (np.ones(50), np.zeros(50)), {}, 0.0),
        (metrics.pearson, ([1.0], [2.0]), {}, 0.0),
        (metrics.ncc, (torch.full((1, 8, 8), 0.25), torch.from_numpy(MAP)), {}, 0.0),
        (metrics.ncc, (MAP, -np.ones((8, 8))), {"absolute": True}, 0.0),
        (metrics.ncc, (MAP, MAP**2), {"mask": (np.arange(64) == 0).astype(float)}, 0.0),
        pytest.param(
            metrics.ncc,
            (np.arange(64.0), MAP),
            {"mask": np.zeros(64)},
            0.0,
            # An empty mask also makes NumPy warn about the mean of an empty slice (harmless).
            marks=pytest.mark.filterwarnings("ignore::RuntimeWarning"),
        ),
        (metrics.dice, (np.zeros(64), np.zeros(64)), {}, 1.0),
        (metrics.dice, (np.full(64, 0.3), np.full(64, 0.4)), {"threshold": 0.5}, 1.0),
        (metrics.auroc, (MAP, np.ones((8, 8))), {}, 0.5),
        (metrics.auroc, (MAP, np.zeros((8, 8))), {}, 0.5),
        (metrics.auroc_partial, (MAP, np.ones(64)), {"max_fpr": 0.1}, 0.05),
        (metrics.auroc_partial, (MAP, np.zeros(64)), {"max_fpr": 0.05}, 0.025),
        (metrics.auroc_partial, (MAP, np.zeros(64)), {"max_fpr": 0.3}, 0.15),
        (metrics.auroc10, (MAP, np.zeros(64)), {}, 0.05),
        (metrics.auprc, (MAP, np.zeros((8, 8))), {}, 0.0),
        (metrics.pr_operating_threshold, (MAP, np.zeros(64)), {}, float(MAP.max())),
        (metrics.pointing_game_hit, (MAP, np.zeros((8, 8))), {}, False),
        (metrics.top_p_overlap, (MAP, np.zeros((8, 8))), {}, (1.0, 1.0)),
        (metrics.hit_rate, ([],), {}, 0.0),
        (metrics.mean_sd, ([],), {}, (0.0, 0.0)),
    ],
)
def test_degenerate_inputs_give_the_documented_value(fn, args, kwargs, expected):
    value = _warns(fn, *args, **kwargs)
    assert value == expected
    assert type(value) is type(expected)


def test_classification_rates_without_one_class():
    rates = _warns(metrics.classification_rates, [0, 0, 0, 0], [0, 1, 0, 0])
    assert rates["tpr"] == 0.0
    assert rates["tnr"] == pytest.approx(0.75)
    assert rates["accuracy"] == pytest.approx(0.75)
    assert rates["balanced_accuracy"] == pytest.approx(0.375)
    rates = _warns(metrics.classification_rates, [1, 1, 1], [1, 0, 1])
    assert rates["tnr"] == 0.0
    assert rates["tpr"] == pytest.approx(2 / 3)
    assert all(math.isfinite(v) for v in rates.values())


def test_pearson_of_non_dyadic_constant_maps_is_degenerate():
    with pytest.warns(DegenerateMetricWarning):
        value = metrics.ncc(np.full((10, 10), 0.1), np.full((10, 10), 0.7))
    assert value == 0.0


# --------------------------------------------------------------------------------------------------
# invalid inputs


@pytest.mark.parametrize(
    "fn, args, kwargs",
    [
        (metrics.pearson, (np.zeros(10), np.zeros(12)), {}),
        (metrics.ncc, (np.zeros((4, 4)), np.zeros((4, 5))), {}),
        (metrics.ncc, (MAP, MAP), {"mask": np.ones(10)}),
        (metrics.dice, (np.zeros(10), np.zeros(11)), {}),
        (metrics.pointing_game_hit, (np.zeros(10), np.ones(9)), {}),
        (metrics.top_p_overlap, (np.zeros(10), np.ones(9)), {}),
        (metrics.classification_rates, ([0, 1, 1], [0, 1]), {}),
        (metrics.classification_rates, ([], []), {}),
        (metrics.accuracy, ([0, 1, 2], [0, 1]), {}),
        (metrics.accuracy, ([], []), {}),
        (metrics.auroc_partial, (MAP, MAP > 0.5), {"max_fpr": 0.0}),
        (metrics.auroc_partial, (MAP, MAP > 0.5), {"max_fpr": -0.1}),
        (metrics.auroc_partial, (MAP, MAP > 0.5), {"max_fpr": 1.5}),
        (metrics.auroc, (np.arange(10.0), np.arange(12) % 2), {}),
        (metrics.auprc, (np.arange(10.0), np.arange(12) % 2), {}),
    ],
)
def test_shape_mismatch_and_bad_arguments_raise_value_error(fn, args, kwargs):
    with pytest.raises(ValueError):
        fn(*args, **kwargs)


def test_pearson_with_mask_and_mismatched_maps_raises_value_error():
    with pytest.raises(ValueError):
        metrics.pearson(np.zeros(10), np.zeros(12), mask=np.ones(10))
