"""TVD feature-importance scores, their bootstrap variance and the coverage of :mod:`common.metrics.tvd`.

Scores are checked on the paper's two extreme cases (Y independent of V: 0; Y a function of V: 1),
on small cases worked out by hand, and on Eq. 7 (mean local score = global score). The bootstrap is
checked against its exact (binomial) value and a plain index-resampling bootstrap; coverage against
a brute-force NumPy version of the ``prdc`` formula and Naeem et al.'s expected value (Lemma 2).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from common import metrics
from common.metrics import DegenerateMetricWarning

# Only the tests of the degenerate case may take a degenerate branch.
pytestmark = pytest.mark.filterwarnings("error::common.metrics.DegenerateMetricWarning")

# Three feature values with four binary predictions each (the hand cases below).
HAND = [np.array([0, 0, 0, 0]), np.array([0, 0, 1, 1]), np.array([1, 1, 1, 0])]
# Var(Y | V=v) = p(1 - p): 0, 1/2 * 1/2 = 1/4, 3/4 * 1/4 = 3/16.
HAND_WITHIN = np.array([0.0, 0.25, 0.1875])
# Pooled: 5 ones in 12 predictions, Var(Y) = 5/12 * 7/12 = 35/144.
HAND_POOLED = 35 / 144


def _bernoulli_groups(rng, probabilities, n: int) -> list[np.ndarray]:
    return [(rng.random(n) < p).astype(np.int64) for p in probabilities]


# --------------------------------------------------------------------------------------------------
# scores


def test_independent_prediction_scores_zero():
    rng = np.random.default_rng(0)
    groups = _bernoulli_groups(rng, [0.5] * 20, 2000)  # P(Y | V=v) = P(Y) at every v
    reference = (rng.random(5000) < 0.5).astype(np.int64)
    assert abs(metrics.global_tvd_score(groups)) < 0.05
    assert abs(metrics.global_tvd_score(groups, reference_predictions=reference)) < 0.05
    assert np.all(np.abs(metrics.local_tvd_scores(groups, reference)) < 0.05)


def test_prediction_determined_by_feature_scores_one():
    values = np.linspace(0.5, 3.0, 20)
    groups = [np.full(100, int(v > 1.7)) for v in values]  # Y = f(V): Var(Y | V=v) = 0
    reference = np.array([0, 1, 1, 0, 1])
    assert metrics.global_tvd_score(groups) == 1.0
    assert metrics.global_tvd_score(groups, reference_predictions=reference) == 1.0
    assert metrics.local_tvd_scores(groups) == [1.0] * 20
    assert metrics.local_tvd_score(groups[0], metrics.prediction_variance(reference)) == 1.0


def test_local_score_hand_case():
    # Var(Y | v) of [0, 0, 0, 1] = 1/4 * 3/4 = 3/16; Var(Y) = 1/4: 1 - (3/16) / (1/4) = 1/4.
    assert metrics.local_tvd_score([0, 0, 0, 1], 0.25) == pytest.approx(0.25, abs=1e-12)
    # The reference variance of [0, 1, 0, 1] is 1/4, the same score from a torch tensor.
    reference = metrics.prediction_variance(torch.tensor([0, 1, 0, 1]))
    assert reference == pytest.approx(0.25, abs=1e-15)
    assert metrics.local_tvd_score(torch.tensor([0, 0, 0, 1]), reference) == pytest.approx(0.25, abs=1e-12)
    # All three hand values against the pooled Var(Y) = 35/144, score = 1 - within * 144/35:
    # 1 - 0 = 1; 1 - 36/35 = -1/35 (negative: 1/4 > 35/144); 1 - 27/35 = 8/35.
    expected = [1.0, -1 / 35, 8 / 35]
    assert metrics.local_tvd_scores(HAND) == pytest.approx(expected, abs=1e-12)


def test_local_score_negative_when_conditional_variance_exceeds_total():
    # Var(Y | v) of [0, 1, 0, 1] = 1/4 > Var(Y) = 3/16: 1 - (1/4) / (3/16) = 1 - 4/3 = -1/3.
    score = metrics.local_tvd_score([0, 1, 0, 1], 0.1875)
    assert score == pytest.approx(-1 / 3, abs=1e-12)
    assert score < 0


def test_global_score_hand_case():
    # E_v[Var(Y | v)] = (0 + 1/4 + 3/16) / 3 = 7/48; pooled Var(Y) = 35/144:
    # 1 - (7/48) / (35/144) = 1 - 1008/1680 = 1 - 3/5 = 2/5.
    assert HAND_WITHIN.mean() == pytest.approx(7 / 48)
    assert metrics.global_tvd_score(HAND) == pytest.approx(0.4, abs=1e-12)
    # With the real test set's Var(Y) = 1/4 instead: 1 - (7/48) / (1/4) = 1 - 7/12 = 5/12.
    assert metrics.global_tvd_score(HAND, reference_predictions=[0, 1, 0, 1]) == pytest.approx(5 / 12, abs=1e-12)
    # A 2-D array (values x samples) is the same input as a list of rows.
    assert metrics.global_tvd_score(np.stack(HAND)) == pytest.approx(0.4, abs=1e-12)
    assert metrics.global_tvd_score(torch.tensor(np.stack(HAND))) == pytest.approx(0.4, abs=1e-12)


def test_global_score_unequal_group_sizes_is_plain_mean_over_values():
    # Values with 2 and 6 predictions: E_v is the mean over the 2 values, not over the 8 predictions.
    groups = [np.array([0, 1]), np.array([0, 0, 0, 0, 0, 1])]
    # Var: 1/4 and 1/6 * 5/6 = 5/36; E_v = (1/4 + 5/36) / 2 = 7/36. Reference [0, 1]: Var(Y) = 1/4.
    # 1 - (7/36) / (1/4) = 1 - 7/9 = 2/9.
    assert metrics.global_tvd_score(groups, reference_predictions=[0, 1]) == pytest.approx(2 / 9, abs=1e-12)


def test_class_balanced_global_score_hand_case():
    classes = ["CN", "CN", "AD"]  # imbalanced: two values from CN items, one from an AD item
    # Per class: CN (0 + 1/4) / 2 = 1/8, AD 3/16; balanced E_v = (1/8 + 3/16) / 2 = 5/32
    # (unbalanced: 7/48). With Var(Y) = 1/4: 1 - (5/32) / (1/4) = 1 - 5/8 = 3/8 (unbalanced 5/12).
    reference = [0, 1, 0, 1]
    balanced = metrics.global_tvd_score(HAND, reference_predictions=reference, classes_of_values=classes)
    unbalanced = metrics.global_tvd_score(HAND, reference_predictions=reference)
    assert balanced == pytest.approx(3 / 8, abs=1e-12)
    assert unbalanced == pytest.approx(5 / 12, abs=1e-12)
    assert abs(balanced - unbalanced) > 0.04
    # Var(Y) is not re-weighted: pooled 35/144, 1 - (5/32) / (35/144) = 1 - 720/1120 = 5/14.
    assert metrics.global_tvd_score(HAND, classes_of_values=np.array([0, 0, 1])) == pytest.approx(5 / 14, abs=1e-12)
    # Balanced classes change nothing; one class only is the plain mean.
    same = metrics.global_tvd_score(HAND + HAND, reference, classes_of_values=[0, 0, 1, 1, 1, 0])
    assert same == pytest.approx(metrics.global_tvd_score(HAND + HAND, reference), abs=1e-12)
    assert metrics.global_tvd_score(HAND, reference, classes_of_values=[1, 1, 1]) == pytest.approx(unbalanced)


def test_mean_local_score_is_global_score():
    # Paper Eq. 7: E_v[Score_{V=v}] = Score_V when the local scores share Var(Y).
    rng = np.random.default_rng(1)
    for index in range(20):
        n_values = int(rng.integers(2, 30))
        groups = _bernoulli_groups(rng, rng.uniform(0, 1, n_values), int(rng.integers(5, 300)))
        groups[0] = groups[0][: int(rng.integers(1, groups[0].size + 1))]  # ragged
        reference = (rng.random(500) < rng.uniform(0.2, 0.8)).astype(np.int64) if index % 2 else None
        local = metrics.local_tvd_scores(groups, reference)
        assert np.mean(local) == pytest.approx(metrics.global_tvd_score(groups, reference), abs=1e-12)
        variance = metrics.prediction_variance(np.concatenate(groups) if reference is None else reference)
        singles = [metrics.local_tvd_score(g, variance) for g in groups]
        assert singles == pytest.approx(local, abs=1e-12)


def test_pooled_global_score_is_explained_variance_fraction():
    # Equal group sizes: pooled Var(Y) = E_v[Var(Y|v)] + Var_v[E(Y|v)] exactly (law of total variance).
    rng = np.random.default_rng(2)
    groups = _bernoulli_groups(rng, rng.uniform(0, 1, 15), 40)
    means = np.array([g.mean() for g in groups])
    expected = means.var() / np.concatenate(groups).var()
    assert metrics.global_tvd_score(groups) == pytest.approx(expected, abs=1e-12)
    assert 0.0 <= metrics.global_tvd_score(groups) <= 1.0


def test_binned_score_from_data_closed_forms():
    rng = np.random.default_rng(0)
    v = rng.uniform(0, 1, 4000)
    determined = metrics.binned_tvd_score((v > np.median(v)).astype(int), v, n_bins=2)
    assert determined["global_score"] == pytest.approx(1.0)
    assert determined["counts"] == [2000, 2000]
    independent = metrics.binned_tvd_score(rng.integers(0, 2, v.size), v, n_bins=8)
    assert abs(independent["global_score"]) < 0.01
    # Y depends on V only through a threshold inside a bin: that bin keeps its variance, the score is a
    # lower bound (here exactly 1 - share of the mixed bin's variance).
    y = (v > 0.3).astype(int)
    mixed = metrics.binned_tvd_score(y, v, n_bins=2)
    low = v <= np.median(v)
    expected = 1.0 - low.mean() * np.var(y[low]) / np.var(y)
    assert mixed["global_score"] == pytest.approx(expected)


def test_binned_score_class_balanced_hand_case():
    # Bin 0 (v = 0, 1): predictions 0, 1 (variance 0.25); bin 1 (v = 2, 3): 1, 1 (variance 0).
    # Var(Y) = 0.1875. Class 0 = items 0, 1 (bin 0 only): E = 0.25; class 1 = items 2, 3 (bin 1): E = 0.
    result = metrics.binned_tvd_score([0, 1, 1, 1], [0, 1, 2, 3], n_bins=2, classes=[0, 0, 1, 1])
    assert result["global_score"] == pytest.approx(1.0 - 0.125 / 0.1875)
    plain = metrics.binned_tvd_score([0, 1, 1, 1], [0, 1, 2, 3], n_bins=2)
    assert plain["global_score"] == pytest.approx(1.0 - 0.125 / 0.1875)  # equal class sizes per bin
    skewed = metrics.binned_tvd_score([0, 1, 1, 1], [0, 1, 2, 3], n_bins=2, classes=[0, 1, 1, 1])
    # class 0: item 0 (bin 0): 0.25; class 1: items 1 (bin 0), 2, 3 (bin 1): 0.25 / 3.
    assert skewed["global_score"] == pytest.approx(1.0 - (0.25 + 0.25 / 3) / 2 / 0.1875)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="one array per feature value"):
        metrics.global_tvd_score(np.array([0, 1, 1, 0]))
    with pytest.raises(ValueError, match="no prediction at feature value"):
        metrics.global_tvd_score([np.array([0, 1]), np.array([])])
    with pytest.raises(ValueError, match="classes_of_values"):
        metrics.global_tvd_score(HAND, classes_of_values=[0, 1])
    with pytest.raises(ValueError, match="reference_variance"):
        metrics.local_tvd_score([0, 1], -0.1)


# --------------------------------------------------------------------------------------------------
# degenerate Var(Y) = 0


def test_constant_classifier_gives_zero_with_warning():
    constant = [np.zeros(10), np.zeros(7)]
    with pytest.warns(DegenerateMetricWarning, match="Var\\(Y\\) = 0"):
        assert metrics.global_tvd_score(constant) == 0.0
    with pytest.warns(DegenerateMetricWarning):
        assert metrics.global_tvd_score(HAND, reference_predictions=np.ones(8)) == 0.0
    with pytest.warns(DegenerateMetricWarning):
        assert metrics.local_tvd_score([0, 1, 1], 0.0) == 0.0
    with pytest.warns(DegenerateMetricWarning):
        assert metrics.local_tvd_scores(HAND, reference_predictions=np.full(5, 0.1)) == [0.0, 0.0, 0.0]
    with pytest.warns(DegenerateMetricWarning):
        assert metrics.tvd_bootstrap_variance(constant, n_resamples=50) == (0.0, 0.0)
    with pytest.warns(DegenerateMetricWarning):
        assert metrics.tvd_bootstrap_variance(HAND, reference_predictions=np.ones(3), n_resamples=50) == (0.0, 0.0)
    # A constant map of a non-dyadic value has Var(Y) exactly 0, not rounding residue.
    assert metrics.prediction_variance(np.full(7, 0.1)) == 0.0


# --------------------------------------------------------------------------------------------------
# bootstrap


def test_bootstrap_zero_when_every_value_is_constant():
    groups = [np.full(50, v % 2) for v in range(8)]  # constant within each value, not overall
    assert metrics.tvd_bootstrap_variance(groups, n_resamples=200) == (0.0, 0.0)
    reference = [0, 1, 1, 0, 0]
    assert metrics.tvd_bootstrap_variance(groups, reference, n_resamples=200) == (0.0, 0.0)


def test_bootstrap_positive_and_shrinks_with_more_samples():
    rng = np.random.default_rng(3)
    probabilities = rng.uniform(0.1, 0.9, 20)
    reference = (rng.random(400) < 0.5).astype(np.int64)
    results = {}
    for n in (50, 800):
        groups = _bernoulli_groups(rng, probabilities, n)
        results[n] = metrics.tvd_bootstrap_variance(groups, reference, n_resamples=2000, seed=0)
    for local, global_ in results.values():
        assert local > 0.0 and global_ > 0.0
    # The variance of a mean of n draws falls like 1/n: 16 times more samples, far less variance.
    assert results[800][0] < results[50][0] / 4
    assert results[800][1] < results[50][1] / 4
    # The global score averages 20 values, so it varies less than a local score.
    assert results[50][1] < results[50][0]


def test_bootstrap_global_variance_is_the_mean_local_variance_over_the_number_of_values():
    # Each value's samples are resampled independently and the global score is the weighted mean of the local
    # ones (Eq. 7), so with Var(Y) fixed Var(global) = sum_v w_v^2 Var(local_v): the mean local variance / m for
    # equal weights, (1 / 4m_0 + 1 / 4m_1) x it for class-balanced ones. The docs use this to relate the paper's
    # Table 4 ratios (local / global about 2,000 for the ellipses) to its number of feature values.
    rng = np.random.default_rng(5)
    probabilities = np.r_[np.zeros(6), rng.uniform(0.05, 0.95, 8), np.ones(6)]
    groups = _bernoulli_groups(rng, probabilities, 200)
    reference = (rng.random(2000) < 0.5).astype(np.int64)
    local, global_ = metrics.tvd_bootstrap_variance(groups, reference, n_resamples=20000, seed=0)
    assert global_ == pytest.approx(local / len(groups), rel=0.05)
    classes = np.r_[np.zeros(5), np.ones(15)].astype(np.int64)
    local, global_ = metrics.tvd_bootstrap_variance(groups, reference, classes, n_resamples=20000, seed=0)
    weights = np.where(classes == 0, 1 / (2 * 5), 1 / (2 * 15))
    per_value = [metrics.tvd_bootstrap_variance([g], reference, n_resamples=20000, seed=1)[0] for g in groups]
    assert global_ == pytest.approx(float(np.sum(weights**2 * per_value)), rel=0.05)


def test_bootstrap_deterministic_for_a_seed():
    rng = np.random.default_rng(4)
    groups = _bernoulli_groups(rng, rng.uniform(0.1, 0.9, 10), 100)
    first = metrics.tvd_bootstrap_variance(groups, n_resamples=500, seed=7)
    assert metrics.tvd_bootstrap_variance(groups, n_resamples=500, seed=7) == first
    assert metrics.tvd_bootstrap_variance(groups, n_resamples=500, seed=np.random.default_rng(7)) == first
    assert metrics.tvd_bootstrap_variance(groups, n_resamples=500, seed=8) != first


def test_bootstrap_matches_exact_binomial_variance():
    # With a fixed Var(Y) = R, a resample of n binary predictions with k ones, k ~ Binomial(n, p_hat),
    # has local score 1 - (k/n)(1 - k/n) / R: its variance over k is the ideal (infinite) bootstrap.
    # The values are independent, so the global score's variance is sum_v Var(within_v) / (n_v^2 R^2).
    rng = np.random.default_rng(5)
    n = 60
    groups = _bernoulli_groups(rng, [0.2, 0.35, 0.5, 0.7, 0.9], n)
    reference = np.array([0, 1, 1, 0, 0, 1, 0, 1])
    r = metrics.prediction_variance(reference)
    k = np.arange(n + 1)
    within_variances = []
    for group in groups:
        pmf = stats.binom.pmf(k, n, group.mean())
        within = (k / n) * (1 - k / n)
        within_variances.append(pmf @ within**2 - (pmf @ within) ** 2)
    exact_local = np.mean(within_variances) / r**2
    exact_global = np.sum(within_variances) / (len(groups) ** 2 * r**2)
    local, global_ = metrics.tvd_bootstrap_variance(groups, reference, n_resamples=5000, seed=0)
    # Monte Carlo relative error of a variance from 5000 resamples: about sqrt(2 / 5000) = 2%.
    assert local == pytest.approx(exact_local, rel=0.1)
    assert global_ == pytest.approx(exact_global, rel=0.1)


def test_bootstrap_matches_index_resampling():
    # A plain bootstrap: resample indices within each value, recompute the scores with the public
    # functions (pooled Var(Y), class balancing), and take the variances over the resamples.
    rng = np.random.default_rng(6)
    groups = _bernoulli_groups(rng, rng.uniform(0.1, 0.9, 6), 30)
    groups[2] = groups[2][:12]
    classes = [0, 0, 0, 0, 1, 1]
    naive_rng = np.random.default_rng(100)
    local_scores, global_scores = [], []
    for _ in range(3000):
        resample = [g[naive_rng.integers(0, g.size, g.size)] for g in groups]
        local_scores.append(metrics.local_tvd_scores(resample))
        global_scores.append(metrics.global_tvd_score(resample, classes_of_values=classes))
    naive_local = np.var(local_scores, axis=0, ddof=1).mean()
    naive_global = np.var(global_scores, ddof=1)
    local, global_ = metrics.tvd_bootstrap_variance(groups, classes_of_values=classes, n_resamples=3000, seed=0)
    assert local == pytest.approx(naive_local, rel=0.1)
    assert global_ == pytest.approx(naive_global, rel=0.1)


def test_bootstrap_recomputes_pooled_variance_per_resample():
    # One feature value and no reference: Var(Y) is the pooled variance, that is the value's own
    # variance, so every resample scores 1 - w / w = 0 and the bootstrap variance vanishes (a Var(Y)
    # frozen at the original data's would make it positive).
    groups = [np.array([0, 1] * 20)]
    local, global_ = metrics.tvd_bootstrap_variance(groups, n_resamples=1000, seed=0)
    assert local < 1e-20 and global_ < 1e-20
    assert metrics.tvd_bootstrap_variance(groups, [0, 1], n_resamples=1000, seed=0)[0] > 1e-4


def test_bootstrap_continuous_predictions_use_blocks():
    # Every prediction distinct (e.g. probabilities): one multinomial level per sample.
    rng = np.random.default_rng(7)
    groups = [rng.normal(loc, 1.0, 100) for loc in (0.0, 1.0, 2.0)]
    local, global_ = metrics.tvd_bootstrap_variance(groups, n_resamples=300, seed=0)
    assert local > 0.0 and global_ > 0.0 and math.isfinite(local) and math.isfinite(global_)


# --------------------------------------------------------------------------------------------------
# coverage


def _brute_coverage(real: np.ndarray, fake: np.ndarray, k: int) -> float:
    """The prdc formula with full distance matrices: mean(min_j |r - f_j| < k-th smallest |r - r'|, r' != r)."""
    real_distances = np.sqrt(((real[:, None, :] - real[None, :, :]) ** 2).sum(-1))
    radii = np.sort(real_distances, axis=1)[:, k]  # column 0 is the sample itself (distance 0)
    fake_distances = np.sqrt(((real[:, None, :] - fake[None, :, :]) ** 2).sum(-1))
    return float(np.mean(fake_distances.min(axis=1) < radii))


def test_coverage_of_the_real_samples_is_one():
    rng = np.random.default_rng(8)
    real = rng.normal(size=(200, 16))
    for k in (1, 3, 5):
        assert metrics.coverage(real, real.copy(), k) == 1.0


def test_coverage_of_distant_samples_is_zero():
    rng = np.random.default_rng(9)
    real = rng.normal(size=(200, 16))
    fake = rng.normal(size=(300, 16)) + 1000.0
    for k in (1, 3, 5):
        assert metrics.coverage(real, fake, k) == 0.0


@pytest.mark.parametrize("k", [1, 3, 5])
def test_coverage_matches_brute_force(k):
    rng = np.random.default_rng(10 + k)
    real = rng.normal(size=(150, 6))
    fake = rng.normal(size=(180, 6)) * 0.8 + 0.3  # partly overlapping: coverage strictly inside (0, 1)
    expected = _brute_coverage(real, fake, k)
    assert 0.05 < expected < 0.95
    assert metrics.coverage(real, fake, k) == pytest.approx(expected, abs=1e-12)
    # Images (samples, channels, h, w) as torch tensors are flattened per sample.
    as_images = metrics.coverage(torch.from_numpy(real.reshape(150, 1, 2, 3)), torch.from_numpy(fake), k)
    assert as_images == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("k", [1, 3])
def test_coverage_expected_value_for_identical_distributions(k):
    # Naeem et al. 2020, Lemma 2: with N real and M fake samples from the same distribution,
    # E[coverage] = 1 - prod_{i=1..k} (N - i) / (N + M - i). N = M: 1/2 at k = 1, 7/8 at k = 3
    # (an off-by-one in the k-NN radius would give 0 or 3/4 at k = 1).
    rng = np.random.default_rng(20 + k)
    n = m = 1000
    expected = 1 - math.prod((n - i) / (n + m - i) for i in range(1, k + 1))
    assert metrics.coverage(rng.normal(size=(n, 4)), rng.normal(size=(m, 4)), k) == pytest.approx(expected, abs=0.04)


def test_coverage_ties_are_not_covered():
    # prdc's strict "<": a real sample is covered only by a fake sample strictly inside its ball.
    # Integer points make every distance exact. Real: (0, 0) twice and (10, 0) ... (90, 0); k = 1
    # radii: 0 for the duplicates, 10 for the others. Fake: (0, 0) and a far point: the duplicates
    # are at distance 0 = radius, (10, 0) at 10 = radius, the rest farther: nothing covered
    # ("<=" would cover 3 of 11).
    real = np.array([[0, 0]] + [[x, 0] for x in range(0, 100, 10)], dtype=np.float64)
    fake = np.array([[0.0, 0.0], [1000.0, 1000.0]])
    assert metrics.coverage(real, fake, 1) == 0.0 == _brute_coverage(real, fake, 1)
    # A fake sample at (5, 0) is strictly inside the ball of (10, 0) only (the duplicates' radius is 0).
    assert metrics.coverage(real, fake + [[5.0, 0.0], [0.0, 0.0]], 1) == pytest.approx(1 / 11, abs=1e-12)


def test_coverage_invalid_inputs_raise():
    real = np.zeros((5, 3))
    with pytest.raises(ValueError, match="k=5"):
        metrics.coverage(real, real, 5)
    with pytest.raises(ValueError, match="features"):
        metrics.coverage(real, np.zeros((5, 4)), 1)
    with pytest.raises(ValueError, match="no sample"):
        metrics.coverage(real, np.zeros((0, 3)), 1)
