"""Evaluation of one feature with the TVD score (common.diffusion.evaluation) on toy samplers.

Toy "diffusion model": 2x4x4 images whose channel 0 has mean v + noise (so g = mean of channel 0 is the
feature) and whose channel 1 is noise independent of v. A classifier thresholding channel 0's mean
has Y a function of V (global score 1); one thresholding channel 1 has Y independent of V (score ~ 0).
One test wires guided_sample with a tiny untrained MONAI DiffusionModelUNet to check the interfaces.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from common.diffusion import (
    ConditionalPredictions,
    conditional_predictions,
    feature_scores,
    guided_sample,
    plot_local_scores,
    sample_coverage,
    scores_markdown,
)
from common.errors import InputError
from common.metrics.tvd import global_tvd_score, local_tvd_scores, tvd_bootstrap_variance
from tests.toys import tiny_diffusion_unet

SD = 0.1  # feature sd over the "real data"
TOL = 0.3
VALUES = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]  # all further than TOL * SD from the 0.5 threshold


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def feature(images: torch.Tensor) -> torch.Tensor:
    return images[:, 0].flatten(1).mean(1)


def toy_sampler(noise: float = 0.1, off_target_fraction: float = 0.0, off_by: float = 1.0, log: list | None = None):
    """sample_fn: channel 0 = v + N(0, noise^2) per pixel (mean sd noise / 4), channel 1 = N(0, 1).

    With ``off_target_fraction`` that share of the samples (a coin flip each) has its mean moved by ``off_by``.
    """

    def sample_fn(n: int, target: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if log is not None:
            log.append((n, target.clone(), torch.is_grad_enabled()))
        x = torch.randn(n, 2, 4, 4, generator=generator)
        x[:, 0] = target.reshape(n, 1, 1) + noise * x[:, 0]
        off = torch.rand(n, generator=generator) < off_target_fraction
        x[off, 0] += off_by
        return x

    return sample_fn


def by_feature(images: torch.Tensor) -> torch.Tensor:
    return (feature(images) > 0.5).long()


def by_noise(images: torch.Tensor) -> torch.Tensor:
    return (images[:, 1].flatten(1).mean(1) > 0).long()


def run(classify_fn=by_feature, sampler=None, values=VALUES, **kwargs) -> ConditionalPredictions:
    kwargs = {"samples_per_value": 100, "batch_size": 50, "feature_sd": SD, "generator": seeded(0), **kwargs}
    return conditional_predictions(sampler or toy_sampler(), classify_fn, feature, values, **kwargs)


# --- conditional_predictions ---------------------------------------------------------------------------


def test_feature_that_decides_the_class_scores_one_and_independent_one_scores_zero():
    decided = run(by_feature)
    assert decided.kept.tolist() == [100] * len(VALUES)
    assert [p.tolist() for p in decided.predictions] == [[int(v > 0.5)] * 100 for v in VALUES]
    reference = np.array([0, 1] * 50)  # the "test set" predictions: Var(Y) = 1/4
    scores = feature_scores(decided, reference, n_resamples=200)
    assert scores["global_score"] == 1.0
    assert scores["local_scores"] == [1.0] * len(VALUES)

    independent = run(by_noise, samples_per_value=200)
    scores = feature_scores(independent, reference, n_resamples=200)
    assert abs(scores["global_score"]) < 0.05
    assert all(abs(s) < 0.2 for s in scores["local_scores"])
    # both classes at every value
    assert all(0 < p.mean() < 1 for p in independent.predictions)


def test_target_is_passed_per_sample_and_everything_runs_without_grad():
    log, seen = [], []

    def classify(images):
        seen.append(torch.is_grad_enabled())
        return by_feature(images)

    result = run(classify, sampler=toy_sampler(log=log), values=[0.2, 0.8])
    for n, target, grad in log:
        assert target.shape == (n,) and target.dtype == torch.float32 and not grad
    assert {round(float(t[0]), 6) for _, t, _ in log} == {0.2, 0.8}
    assert not any(seen)
    np.testing.assert_allclose(result.values, [0.2, 0.8])
    # features of the kept samples lie around their own target
    assert all(abs(f.mean() - v) < 0.01 for f, v in zip(result.features, [0.2, 0.8]))


def test_vector_feature_targets_have_shape_n_by_k():
    log = []

    def sampler(n, target, generator):
        log.append(target.shape)
        x = torch.zeros(n, 2, 4, 4)
        x[:, 0] = target[:, :1, None]
        x[:, 1] = target[:, 1:, None]
        return x

    two = lambda images: images.flatten(2).mean(2)  # (n, 2)
    result = conditional_predictions(
        sampler, by_feature, two, [[0.2, 0.0], [0.8, 1.0]], samples_per_value=10, batch_size=10, feature_sd=[SD, SD]
    )
    assert log == [(10, 2), (10, 2)]
    assert result.features[1].shape == (10, 2)
    assert result.values.shape == (2, 2)


def test_rejection_keeps_only_samples_within_tolerance_and_reports_acceptance():
    classified = []

    def classify(images):
        classified.append(feature(images))
        return by_feature(images)

    sampler = toy_sampler(noise=0.02, off_target_fraction=0.5, off_by=0.5)  # on-target ones all within tolerance
    result = run(classify, sampler=sampler, values=[0.2, 0.8], samples_per_value=200, batch_size=50)
    assert result.kept.tolist() == [200, 200]
    assert (result.drawn > result.accepted).all() and (result.accepted >= result.kept).all()
    assert np.all((0.4 < result.acceptance_rate) & (result.acceptance_rate < 0.6))
    for f, v in zip(result.features, [0.2, 0.8]):
        assert f.shape == (200,)
        assert np.abs(f - v).max() <= TOL * SD
    # only kept samples are classified: 400 images, all on target
    g = torch.cat(classified).numpy()
    assert g.size == 400
    assert np.minimum(np.abs(g - 0.2), np.abs(g - 0.8)).max() <= TOL * SD
    scores = feature_scores(result, None, n_resamples=100)
    assert scores["mean_acceptance"] == pytest.approx(result.acceptance_rate.mean())
    assert scores["kept_total"] == 400 and scores["drawn_total"] == int(result.drawn.sum())


def test_acceptance_counts_every_sample_within_tolerance_and_later_batches_shrink():
    log = []
    result = run(by_feature, sampler=toy_sampler(noise=0.02, log=log), values=[0.2], samples_per_value=10)
    assert result.drawn.tolist() == result.accepted.tolist() == [50]  # one full batch, all within tolerance
    assert result.kept.tolist() == [10] and result.predictions[0].shape == (10,)
    assert result.acceptance_rate.tolist() == [1.0]

    log.clear()
    sampler = toy_sampler(noise=0.02, off_target_fraction=0.5, off_by=0.5, log=log)
    result = run(by_feature, sampler=sampler, values=[0.2], samples_per_value=60, batch_size=50)
    sizes = [n for n, _, _ in log]
    assert sizes[0] == 50 and all(n <= 50 for n in sizes)
    assert sizes[-1] < 50  # drawn for what was still missing, not a full batch
    assert result.kept.tolist() == [60] and result.drawn.tolist() == [sum(sizes)]


def test_no_rejection_without_tolerance():
    sampler = toy_sampler(off_target_fraction=0.5, off_by=0.5)
    result = run(by_feature, sampler=sampler, values=[0.2], tolerance=None)
    assert result.features is None
    assert result.drawn.tolist() == result.kept.tolist() == [100]
    assert result.acceptance_rate.tolist() == [1.0]


def test_max_rounds_stops_and_reports_short_and_empty_values():
    # samples for v > 5 are always off target; for other values half are
    def sampler(n, target, generator):
        x = toy_sampler(off_target_fraction=0.5, off_by=0.5)(n, target, generator)
        x[:, 0] += 10.0 * (target.reshape(n, 1, 1) > 5)
        return x

    result = run(
        by_feature, sampler=sampler, values=[0.2, 9.0, 0.8], samples_per_value=100, batch_size=10, max_rounds=3
    )
    assert result.rounds.tolist() == [3, 3, 3]
    assert result.drawn.tolist() == [30, 30, 30]
    assert result.kept[1] == 0 and 0 < result.kept[0] < 100 and 0 < result.kept[2] < 100
    assert result.empty == [1]
    assert result.short == [0, 1, 2]
    assert result.predictions[1].size == 0 and result.features[1].shape == (0,)

    with pytest.warns(UserWarning, match=r"left out of the scores: indices \[1\]"):
        scores = feature_scores(result, None, n_resamples=100)
    assert scores["n_values"] == 2 and scores["n_values_total"] == 3
    assert scores["dropped_values"] == [1] and scores["value_indices"] == [0, 2]
    assert scores["values"] == pytest.approx([0.2, 0.8])
    # the value with no sample still counts in the acceptance rate (0 there)
    assert scores["mean_acceptance"] == pytest.approx(result.acceptance_rate.mean())
    assert result.acceptance_rate[1] == 0.0

    kept = result.select(result.kept > 0)
    assert len(kept) == 2 and kept.empty == [] and kept.values.tolist() == pytest.approx([0.2, 0.8])


def test_default_max_rounds_bounds_the_draws():
    never = toy_sampler(off_target_fraction=1.0, off_by=1.0)
    result = run(by_feature, sampler=never, values=[0.2], samples_per_value=20, batch_size=10)
    assert result.rounds.tolist() == [10]  # 5 * ceil(20 / 10)
    assert result.kept.tolist() == [0]


def test_deterministic_for_a_generator():
    sampler = toy_sampler(off_target_fraction=0.3, off_by=0.5)
    a = run(by_noise, sampler=sampler, values=[0.2, 0.8], generator=seeded(5), embed_fn=lambda x: x[:, 1])
    b = run(by_noise, sampler=sampler, values=[0.2, 0.8], generator=seeded(5), embed_fn=lambda x: x[:, 1])
    c = run(by_noise, sampler=sampler, values=[0.2, 0.8], generator=seeded(6), embed_fn=lambda x: x[:, 1])
    for field in ("drawn", "accepted", "kept", "rounds"):
        assert getattr(a, field).tolist() == getattr(b, field).tolist()
    for x, y in zip(a.features + a.predictions + a.embeddings, b.features + b.predictions + b.embeddings):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.features[0], c.features[0])
    assert a.embeddings[0].shape == (100, 16) and a.embeddings[0].dtype == np.float32


class Stop(Exception):
    """What a kill does to the sampling, raised by the sampler after its n-th call."""


def stopping_after(sample_fn, calls: int):
    count = [0]

    def stopping(n, target, generator):
        count[0] += 1
        if count[0] > calls:
            raise Stop
        return sample_fn(n, target, generator)

    return stopping


def assert_same_result(a: ConditionalPredictions, b: ConditionalPredictions):
    for field in ("values", "drawn", "accepted", "kept", "rounds"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    for x, y in zip(a.features + a.predictions + a.embeddings, b.features + b.predictions + b.embeddings, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_a_stopped_sampling_resumes_to_the_result_of_one_that_never_stopped(tmp_path):
    """Stopped during the second batch of the third value (two values and one batch recorded), then resumed: what
    the record holds is taken from it (not drawn again) and the generator goes on from its recorded state."""
    sampler = toy_sampler(off_target_fraction=0.3, off_by=0.5)
    kwargs = dict(values=[0.2, 0.3, 0.7, 0.8], samples_per_value=30, batch_size=20, embed_fn=lambda x: x[:, 1])
    key = {"settings": {"rho": 0.1}}
    whole = run(by_noise, sampler=sampler, generator=seeded(5), **kwargs)
    assert whole.rounds[2] >= 2
    record = tmp_path / "progress" / "conditional_size.pt"
    calls_before_the_stop = int(whole.rounds[:2].sum()) + 1
    with pytest.raises(Stop):
        run(by_noise, sampler=stopping_after(sampler, calls_before_the_stop), generator=seeded(5),
            progress_file=record, run_key=key, **kwargs)  # fmt: skip
    stopped = torch.load(record, weights_only=True)
    assert stopped["done"] == 2 and 0 < len(stopped["partial"]["predictions"][0]) <= 20
    assert [p.name for p in record.parent.iterdir()] == [record.name]  # no temporary file left behind

    log = []
    resumed = run(by_noise, sampler=toy_sampler(off_target_fraction=0.3, off_by=0.5, log=log), generator=seeded(5),
                  progress_file=record, resume=True, run_key=key, **kwargs)  # fmt: skip
    assert_same_result(resumed, whole)
    assert len(log) == int(whole.rounds.sum()) - calls_before_the_stop  # only what the record did not hold
    assert torch.load(record, weights_only=True)["done"] == 4

    log.clear()  # a finished record: nothing is drawn again
    again = run(by_noise, sampler=toy_sampler(log=log), generator=seeded(5), progress_file=record, resume=True,
                run_key=key, **kwargs)  # fmt: skip
    assert_same_result(again, whole) and not log
    record.write_bytes(b"an older run's record")  # without resume a record is not read, and is replaced
    fresh = run(
        by_noise, sampler=toy_sampler(log=log), generator=seeded(5), progress_file=record, run_key=key, **kwargs
    )
    assert len(log) == int(fresh.rounds.sum()) and torch.load(record, weights_only=True)["done"] == 4


def test_a_sampling_record_needs_a_generator(tmp_path):
    with pytest.raises(ValueError, match="progress_file needs a generator"):
        run(generator=None, progress_file=tmp_path / "plain.pt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_generator_resumes_from_its_recorded_state(tmp_path):
    generator = lambda: torch.Generator(device="cuda").manual_seed(3)
    sample_fn = lambda n, target, g: (
        torch.randn(n, 2, 4, 4, generator=g, device="cuda").cpu() * 0.1 + target.reshape(n, 1, 1, 1)
    )
    kwargs = dict(values=[0.2, 0.8], samples_per_value=10, batch_size=10, tolerance=None)
    whole = run(by_feature, sampler=sample_fn, generator=generator(), **kwargs)
    record = tmp_path / "c.pt"
    with pytest.raises(Stop):
        run(by_feature, sampler=stopping_after(sample_fn, 1), generator=generator(), progress_file=record, **kwargs)
    resumed = run(by_feature, sampler=sample_fn, generator=generator(), progress_file=record, resume=True, **kwargs)
    assert_same_result(resumed, whole)


def test_a_sampling_record_of_another_run_is_refused_naming_what_differs(tmp_path):
    record = tmp_path / "conditional_size.pt"
    base = dict(values=[0.2, 0.8], samples_per_value=10, batch_size=10, progress_file=record)
    key = {"settings": {"rho": 0.1}, "models": [["d.pt", 10, 1]]}
    run(generator=seeded(5), run_key=key, **base)
    for changed, differs in (
        (dict(generator=seeded(6), run_key=key), r"generator_initial_state \(the seed or the device\)"),
        (dict(generator=seeded(5), run_key={**key, "models": [["d.pt", 10, 2]]}), "run.models"),
        (dict(generator=seeded(5), run_key={**key, "settings": {"rho": 0.2}}), "run.settings"),
        (dict(generator=seeded(5), run_key=key, values=[0.2, 0.9]), "values"),
    ):
        with pytest.raises(InputError, match=f"{record}: records sampling that differs from this run's in .*{differs}"):
            run(resume=True, **{**base, **changed})
    record.write_bytes(b"not a record")
    with pytest.raises(InputError, match=f"{record}: not a sampling progress record"):
        run(resume=True, generator=seeded(5), **base)


def test_classifier_modules_are_evaluated_in_eval_mode_and_restored():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.9)
            self.modes = []

        def forward(self, x):
            self.modes.append(self.training)
            return by_feature(self.drop(x) * 0 + x)

    net = Net().train()
    run(net, values=[0.2], samples_per_value=10, batch_size=10)
    assert net.modes == [False]
    assert net.training


def test_bad_callables_are_reported():
    with pytest.raises(ValueError, match="one predicted class per image"):
        run(lambda x: torch.zeros(x.shape[0], 2), values=[0.2])
    with pytest.raises(ValueError, match="sample_fn returned"):
        run(by_feature, sampler=lambda n, t, g: torch.zeros(n + 1, 2, 4, 4), values=[0.2])
    with pytest.raises(ValueError, match="feature_sd"):
        run(by_feature, values=[0.2], feature_sd=None)


# --- feature_scores ------------------------------------------------------------------------------------


def _binomial_result(probabilities, n=40, seed=0) -> ConditionalPredictions:
    rng = np.random.default_rng(seed)
    predictions = [(rng.random(n) < p).astype(np.int64) for p in probabilities]
    v = len(probabilities)
    return ConditionalPredictions(
        values=np.linspace(0, 1, v, dtype=np.float32),
        predictions=predictions,
        features=None,
        embeddings=None,
        drawn=np.full(v, 2 * n),
        accepted=np.full(v, n),
        kept=np.full(v, n),
        rounds=np.ones(v, dtype=np.int64),
        samples_per_value=n,
    )


def test_feature_scores_are_those_of_common_metrics_tvd():
    result = _binomial_result([0.05, 0.3, 0.5, 0.6, 0.95, 0.1])
    reference = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    classes = np.array([0, 0, 0, 0, 1, 1])
    scores = feature_scores(result, reference, classes, n_resamples=300, seed=3)
    assert scores["global_score"] == pytest.approx(global_tvd_score(result.predictions, reference, classes))
    assert scores["local_scores"] == pytest.approx(local_tvd_scores(result.predictions, reference))
    expected = tvd_bootstrap_variance(result.predictions, reference, classes, 300, 3)
    assert (scores["bootstrap_variance_local"], scores["bootstrap_variance_global"]) == pytest.approx(expected)
    assert scores["class_balanced"] and scores["n_values"] == 6
    assert scores["reference_variance"] == pytest.approx(0.25)
    assert scores["mean_acceptance"] == pytest.approx(0.5)
    # class balancing changes the global score here, and only the global score
    plain = feature_scores(result, reference, n_resamples=300, seed=3)
    assert plain["global_score"] != pytest.approx(scores["global_score"])
    assert plain["global_score"] == pytest.approx(np.mean(plain["local_scores"]))  # Eq. 7
    assert plain["local_scores"] == scores["local_scores"]
    json.dumps(scores)  # serialisable as is


def test_feature_scores_without_any_usable_value_raise():
    result = _binomial_result([0.5])
    result.kept[:] = 0
    result.predictions[0] = np.zeros(0, dtype=np.int64)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no feature value"):
        feature_scores(result, None)


# --- plot and markdown ---------------------------------------------------------------------------------


def _plot(path, **kwargs):
    rng = np.random.default_rng(0)
    train_y = rng.integers(0, 2, 300)
    train_v = rng.normal(0.4 + 0.3 * train_y, 0.1)
    return plot_local_scores(
        [0.8, 0.2, 0.5], [0.9, 0.7, -0.1], train_v, train_y, ["CN", "AD"], "hippocampal volume", path, **kwargs
    )


def test_plot_local_scores_writes_a_small_png_atomically(tmp_path):
    path = _plot(tmp_path / "plots" / "local.png")
    assert path == tmp_path / "plots" / "local.png"
    assert os.listdir(path.parent) == ["local.png"]  # no temporary file left
    assert 5_000 < path.stat().st_size < 200_000
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file written by the process
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 700 <= image.width <= 1100 and 250 <= image.height <= 500
    with pytest.raises(ValueError, match="3 values but 2"):
        plot_local_scores([1, 2, 3], [0.1, 0.2], [1], [0], None, "v", tmp_path / "bad.png")


def test_plot_local_scores_draws_the_scores_sorted_by_value(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn, plot = [], matplotlib.axes.Axes.plot

    def recording(self, *args, **kwargs):
        drawn.append([np.asarray(a).tolist() for a in args])
        return plot(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    _plot(tmp_path / "local.png")
    assert [[0.2, 0.5, 0.8], [0.7, -0.1, 0.9]] in drawn


def test_plot_local_scores_leaves_the_old_file_when_saving_fails(tmp_path, monkeypatch):
    path = _plot(tmp_path / "local.png")
    before = path.read_bytes()

    def broken(self, handle, **kwargs):
        handle.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        _plot(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["local.png"]


def test_scores_markdown_has_one_row_per_feature_with_the_numbers():
    rows = {
        "aspect ratio": {
            "global_score": 0.8712,
            "bootstrap_variance_global": 3.4e-7,
            "bootstrap_variance_local": 6.74e-4,
            "n_values": 20,
            "n_values_total": 20,
            "mean_acceptance": 0.9134,
        },
        "size": {
            "global_score": 0.049,
            "bootstrap_variance_global": 5.0e-7,
            "bootstrap_variance_local": 9.85e-4,
            "n_values": 19,
            "n_values_total": 20,
            "mean_acceptance": 0.5,
        },
    }
    text = scores_markdown(rows)
    lines = text.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| Feature | Global score")
    assert lines[2] == "| aspect ratio | 0.871 | 3.40e-07 | 6.74e-04 | 20 | 0.913 |"
    assert lines[3] == "| size | 0.049 | 5.00e-07 | 9.85e-04 | 19/20 | 0.500 |"
    as_list = scores_markdown([{"feature": name, **row} for name, row in rows.items()])
    assert as_list == text


def test_markdown_of_real_scores():
    scores = feature_scores(_binomial_result([0.1, 0.9]), None, n_resamples=50)
    text = scores_markdown({"a|b": scores})
    assert "| a\\|b | " in text and f"{scores['global_score']:.3f}" in text


# --- integration with guided_sample and a MONAI UNet -----------------------------------------------------


def test_guided_sample_with_monai_unet_fits_sample_fn():
    from monai.networks.schedulers import DDIMScheduler

    unet = tiny_diffusion_unet()
    scheduler = DDIMScheduler(1000, schedule="linear_beta", beta_start=0.0015, beta_end=0.0205, clip_sample=False)
    scheduler.set_timesteps(5)
    mean = lambda x: x.flatten(1).mean(1)

    def sample_fn(n, target, generator):
        return guided_sample(unet, scheduler, (n, 1, 8, 8), mean, target, rho=0.1, generator=generator)

    classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    result = conditional_predictions(
        sample_fn,
        lambda x: classifier(x).argmax(1),
        mean,
        [-0.5, 0.5],
        samples_per_value=4,
        batch_size=4,
        feature_sd=100.0,  # the untrained model is far off: keep everything, check the plumbing
        generator=seeded(0),
        embed_fn=lambda x: x.flatten(1)[:, :6],
    )
    assert result.kept.tolist() == [4, 4]
    assert all(p.shape == (4,) and set(p.tolist()) <= {0, 1} for p in result.predictions)
    assert all(e.shape == (4, 6) for e in result.embeddings)
    assert all(p.requires_grad for p in unet.parameters())  # guided_sample froze them only while sampling
    cover = sample_coverage(result, np.random.default_rng(0).normal(size=(10, 6)), ks=(1, 3))
    assert set(cover) == {"k=1", "k=3"} and all(0.0 <= c <= 1.0 for c in cover.values())
