"""The Ignite metric handlers of :mod:`common.handlers` against the pure functions of :mod:`common.metrics`.

A tiny ``ignite.engine.Engine`` whose process function returns its batch feeds every handler; after
``engine.run`` each ``engine.state.metrics[name]`` must be the mean over cases of the pure function
(or, pooled, the function on all voxels together) and per-case handlers must leave one value per
case in ``engine.state.metric_details[name]``.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score

from common import handlers, metrics
from common.handlers import memory
from common.metrics import DegenerateMetricWarning
from tests.bundle_runner import REPO

TOL = 1e-6
BATCH, N_BATCHES = 2, 3
N_CASES = BATCH * N_BATCHES
THRESHOLD = 0.7
RATES = ("accuracy", "tpr", "tnr", "balanced_accuracy")

MAPS = lambda output: (output["pred"], output["mask"])  # noqa: E731
LABELS = lambda output: (output["label_pred"], output["label"])  # noqa: E731


def _batches(seed: int = 0) -> list[dict]:
    """Batch-first maps (B, 1, 8, 8) with masks holding both classes, and image labels (B,)."""
    rng = np.random.default_rng(seed)
    batches = []
    for index in range(N_BATCHES):
        mask = rng.random((BATCH, 1, 8, 8)) < 0.3
        mask[:, 0, 0, 0], mask[:, 0, 7, 7] = True, False
        pred = rng.normal(size=mask.shape) + 1.2 * mask
        label = np.array([1, 0]) if index == 0 else rng.integers(0, 2, BATCH)
        label_pred = np.where(rng.random(BATCH) < 0.6, label, 1 - label)
        batches.append(
            {
                "pred": torch.tensor(pred, dtype=torch.float32),
                "mask": torch.tensor(mask, dtype=torch.float32),
                "label": torch.tensor(label),
                "label_pred": torch.tensor(label_pred),
            }
        )
    return batches


def _as_lists(batches: list[dict]) -> list[dict]:
    """The same data as lists of channel-first tensors: maps (1, 8, 8), labels (1,)."""
    return [
        {
            "pred": list(batch["pred"]),
            "mask": list(batch["mask"]),
            "label": list(batch["label"].reshape(-1, 1)),
            "label_pred": list(batch["label_pred"].reshape(-1, 1)),
        }
        for batch in batches
    ]


def _handlers() -> dict:
    named = {
        "ncc": handlers.NCC(output_transform=MAPS),
        "ncc_abs": handlers.NCC(absolute=True, output_transform=MAPS),
        "dice": handlers.Dice(threshold=THRESHOLD, output_transform=MAPS),
        "auroc": handlers.AUROC(output_transform=MAPS),
        "auroc_pooled": handlers.AUROC(pooled=True, output_transform=MAPS),
        "auroc10": handlers.AUROC10(output_transform=MAPS),
        "auroc10_pooled": handlers.AUROC10(pooled=True, output_transform=MAPS),
        "auprc": handlers.AUPRC(output_transform=MAPS),
        "auprc_pooled": handlers.AUPRC(pooled=True, output_transform=MAPS),
        "pointing_game": handlers.PointingGame(output_transform=MAPS),
        "top_p_iou": handlers.TopPIoU(output_transform=MAPS),
        "top_p_dice": handlers.TopPDice(output_transform=MAPS),
    }
    for rate in RATES:
        named[rate] = handlers.ClassificationRate(rate=rate, output_transform=LABELS)
    return named


PER_CASE = {
    "ncc": metrics.ncc,
    "ncc_abs": lambda p, t: metrics.ncc(p, t, absolute=True),
    "dice": lambda p, t: metrics.dice(p, t, threshold=THRESHOLD),
    "auroc": metrics.auroc,
    "auroc10": metrics.auroc10,
    "auprc": metrics.auprc,
    "pointing_game": lambda p, t: float(metrics.pointing_game_hit(p, t)),
    "top_p_iou": lambda p, t: metrics.top_p_overlap(p, t)[0],
    "top_p_dice": lambda p, t: metrics.top_p_overlap(p, t)[1],
}
POOLED = {"auroc_pooled": metrics.auroc, "auroc10_pooled": metrics.auroc10, "auprc_pooled": metrics.auprc}


def _run(batches: list[dict], max_epochs: int = 1) -> Engine:
    engine = Engine(lambda engine, batch: batch)
    for name, handler in _handlers().items():
        handler.attach(engine, name)
    engine.run(batches, max_epochs=max_epochs)
    return engine


def _cases(batches: list[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(p, t) for batch in batches for p, t in zip(batch["pred"], batch["mask"])]


def _expected(batches: list[dict]) -> tuple[dict, dict]:
    cases = _cases(batches)
    per_case = {name: [float(fn(p, t)) for p, t in cases] for name, fn in PER_CASE.items()}
    expected = {name: float(np.mean(values)) for name, values in per_case.items()}
    scores = torch.cat([p.reshape(-1) for p, _ in cases])
    truth = torch.cat([t.reshape(-1) for _, t in cases])
    expected.update({name: fn(scores, truth) for name, fn in POOLED.items()})
    labels = torch.cat([batch["label"] for batch in batches])
    predicted = torch.cat([batch["label_pred"] for batch in batches])
    rates = metrics.classification_rates(labels, predicted)
    expected.update({rate: rates[rate] for rate in RATES})
    return expected, per_case


@pytest.fixture(scope="module")
def batches() -> list[dict]:
    return _batches()


@pytest.fixture(scope="module")
def engine(batches) -> Engine:
    return _run(batches)


def test_every_handler_equals_the_pure_function(engine, batches):
    expected, _ = _expected(batches)
    assert set(engine.state.metrics) == set(expected)
    for name, value in expected.items():
        got = engine.state.metrics[name]
        assert math.isfinite(got), name
        assert abs(got - value) <= TOL, f"{name}: handler {got} != pure function {value}"


def test_per_case_details_hold_one_value_per_case(engine, batches):
    _, per_case = _expected(batches)
    details = engine.state.metric_details
    for name, values in per_case.items():
        stored = torch.as_tensor(details[name]).double().reshape(-1)
        assert stored.numel() == N_CASES, name
        assert np.allclose(stored.numpy(), values, rtol=0.0, atol=TOL), name
    # Pooled metrics have no per-case values.
    for name in (*POOLED, *RATES):
        assert name not in details


def test_the_data_is_not_trivial(engine, batches):
    """Pooled and per-case values differ and the pointing game sees hits and misses: the checks above bite."""
    _, per_case = _expected(batches)
    metric = engine.state.metrics
    assert 0.0 < metric["pointing_game"] < 1.0
    assert abs(metric["auroc"] - metric["auroc_pooled"]) > 1e-4
    assert abs(metric["auroc10"] - metric["auroc"]) > 1e-2
    assert len(set(per_case["ncc"])) == N_CASES
    assert metric["ncc"] != pytest.approx(metric["ncc_abs"])
    for rate in RATES:
        assert 0.0 < metric[rate] < 1.0, rate


def test_classification_rates_match_sklearn(engine, batches):
    labels = torch.cat([batch["label"] for batch in batches]).numpy()
    predicted = torch.cat([batch["label_pred"] for batch in batches]).numpy()
    metric = engine.state.metrics
    assert metric["accuracy"] == pytest.approx(accuracy_score(labels, predicted), abs=TOL)
    assert metric["tpr"] == pytest.approx(recall_score(labels, predicted, pos_label=1), abs=TOL)
    assert metric["tnr"] == pytest.approx(recall_score(labels, predicted, pos_label=0), abs=TOL)
    assert metric["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted), abs=TOL)


def test_lists_of_channel_first_tensors_give_the_same_result(engine, batches):
    listed = _run(_as_lists(batches))
    assert set(listed.state.metrics) == set(engine.state.metrics)
    for name, value in engine.state.metrics.items():
        assert abs(listed.state.metrics[name] - value) <= TOL, name
    for name in PER_CASE:
        a = torch.as_tensor(listed.state.metric_details[name]).reshape(-1)
        b = torch.as_tensor(engine.state.metric_details[name]).reshape(-1)
        assert torch.allclose(a, b, rtol=0.0, atol=TOL), name


def test_each_epoch_starts_afresh():
    """Two epochs on different data: the metrics are those of the second epoch's data alone."""
    per_epoch = [_batches(2), _batches(3)]
    engine = Engine(lambda engine, index: per_epoch[engine.state.epoch - 1][index])
    for name, handler in _handlers().items():
        handler.attach(engine, name)
    engine.run(list(range(N_BATCHES)), max_epochs=2)
    expected, per_case = _expected(per_epoch[1])
    stale, _ = _expected(per_epoch[0] + per_epoch[1])
    for name, value in expected.items():
        assert abs(engine.state.metrics[name] - value) <= TOL, name
    assert any(abs(stale[name] - expected[name]) > 1e-4 for name in (*POOLED, *RATES))
    for name in PER_CASE:
        assert torch.as_tensor(engine.state.metric_details[name]).numel() == N_CASES, name


def test_a_degenerate_case_counts_with_its_documented_value():
    batch = _batches(1)[0]
    batch["mask"][1] = 0.0  # the second case has an empty mask
    engine = Engine(lambda engine, batch: batch)
    handlers.AUROC(output_transform=MAPS).attach(engine, "auroc")
    handlers.Dice(threshold=100.0, output_transform=MAPS).attach(engine, "dice")
    with pytest.warns(DegenerateMetricWarning):
        engine.run([batch], max_epochs=1)
    first = metrics.auroc(batch["pred"][0], batch["mask"][0])
    assert engine.state.metrics["auroc"] == pytest.approx((first + 0.5) / 2, abs=TOL)
    # Nothing passes threshold 100: Dice 0 for the first case, 1 (both empty) for the second.
    assert engine.state.metrics["dice"] == pytest.approx(0.5, abs=TOL)
    assert torch.as_tensor(engine.state.metric_details["dice"]).reshape(-1).tolist() == [0.0, 1.0]


def test_unknown_rate_is_rejected():
    with pytest.raises(ValueError):
        handlers.ClassificationRate(rate="precision")


@pytest.mark.parametrize("metric", [handlers.PerCaseMetric(metrics.ncc), handlers.PooledMetric(metrics.auroc)])
def test_aggregate_without_data_raises(metric):
    metric.reset()
    with pytest.raises(ValueError):
        metric.aggregate()


def test_refresh_batch_norm_recomputes_the_statistics_before_validation():
    from monai.engines import SupervisedEvaluator

    torch.manual_seed(0)
    network = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    network[1].running_mean.fill_(100.0)  # statistics that do not fit the network, as an average's inherited ones
    images = [torch.randn(4, 1, 3, 3) * 2 + 1 for _ in range(3)]
    loader = [{"image": x} for x in images]
    with torch.no_grad():
        expected = network[0](torch.cat(images)).mean(dim=(0, 2, 3))
    for enabled in (False, True):
        evaluator = SupervisedEvaluator(device="cpu", val_data_loader=loader, network=network)
        handlers.RefreshBatchNorm(loader, enabled=enabled).attach(evaluator)
        evaluator.run()
        refreshed = torch.allclose(network[1].running_mean, expected, atol=1e-5)
        assert refreshed == enabled


class _FakeLibc:
    def __init__(self):
        self.trimmed = []

    def malloc_trim(self, pad):
        self.trimmed.append(pad.value)


def test_return_freed_memory_trims_the_heap_after_every_iteration(monkeypatch):
    libc = _FakeLibc()
    monkeypatch.setattr(memory, "_glibc", lambda: libc)
    engine = Engine(lambda e, b: None)
    assert handlers.ReturnFreedMemory().attach(engine) is True
    engine.run([0, 1, 2], max_epochs=2)
    assert libc.trimmed == [0] * 6
    monkeypatch.setattr(memory, "_glibc", lambda: None)  # not glibc: nothing attached, no error
    other = Engine(lambda e, b: None)
    assert handlers.ReturnFreedMemory().attach(other) is False
    assert not other.has_event_handler(handlers.ReturnFreedMemory, Events.ITERATION_COMPLETED)


def test_only_glibc_is_taken_for_glibc(monkeypatch):
    monkeypatch.setattr(memory.os, "name", "nt")
    assert memory._glibc() is None
    monkeypatch.setattr(memory.os, "name", "posix")

    def cannot_load(name):
        raise OSError("no C library")

    monkeypatch.setattr(memory.ctypes, "CDLL", cannot_load)
    assert memory._glibc() is None
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: type("MuslLike", (), {"malloc_trim": print})())
    assert memory._glibc() is None


GLIBC = platform.libc_ver()[0] == "glibc"

# A freed 6 MiB block (mmapped, above the threshold) raises glibc's mmap threshold to 6 MiB and its trim threshold
# to 12 MiB: a 4 MiB block then comes from the heap and stays there, free, after it is freed, unless trimmed.
_HEAP_PROBE = """
import ctypes, sys
from ignite.engine import Engine
from common.handlers import ReturnFreedMemory
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
class Mallinfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]
libc.mallinfo2.restype = Mallinfo2
engine = Engine(lambda e, b: libc.free(libc.malloc(4 << 20)))
if sys.argv[1] == "attach":
    assert ReturnFreedMemory().attach(engine)
libc.free(libc.malloc(6 << 20))
engine.run([0])
print(libc.mallinfo2().fordblks >= 4 << 20)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_return_freed_memory_returns_the_freed_heap_in_this_glibc():
    assert memory._glibc() is not None
    if not hasattr(memory._glibc(), "mallinfo2"):
        pytest.skip("glibc older than 2.33 (no mallinfo2)")
    kept_free = {
        mode: subprocess.run(
            [sys.executable, "-c", _HEAP_PROBE, mode], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        for mode in ("attach", "without")
    }
    assert kept_free == {"attach": "False", "without": "True"}


@pytest.mark.parametrize("bundle", ["vagan", "icam", "acat", "attr_constraint"])
def test_every_folder_inference_returns_freed_memory(bundle):
    config = json.loads((REPO / "bundles" / bundle / "configs" / "inference.json").read_text())
    assert "common.handlers.ReturnFreedMemory" in [h.get("_target_") for h in config["handlers"]]
