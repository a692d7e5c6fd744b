"""A stopped attribution evaluation goes on from its per-batch records (common.evaluation.MapRecords).

Toy set-up: 5 batches of 2x1x4x4 images with ground-truth maps; one method is random (it draws from torch's global
generator, as expected gradients does), so a resumed run equals the uninterrupted one only if the generators are
restored with the records.
"""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.handlers import from_engine

from common.errors import InputError
from common.evaluation import AttributionEvaluator, MapMethod, MapRecords
from common.files import EVALUATION_PROGRESS_DIR, remove_evaluation_progress
from common.handlers import NCC
from common.icam_maps import PairedAttributionEvaluator

BATCHES = 5


class Stop(Exception):
    """What a kill does to the evaluation, raised by a method on a given call."""


def batches() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {"image": torch.rand(2, 1, 4, 4, generator=g), "effect": torch.rand(2, 1, 4, 4, generator=g)}
        for _ in range(BATCHES)
    ]


def methods(calls: list, stop_at: int | None = None, extra: bool = False) -> dict:
    def noisy(x):
        calls.append(1)
        if stop_at is not None and len(calls) == stop_at:
            raise Stop
        return x + torch.rand_like(x)  # the global generator, as expected gradients' references

    return {
        "identity": MapMethod(lambda x: x),
        "noisy": MapMethod(noisy),
        **({"negated": MapMethod(torch.neg)} if extra else {}),
    }


def evaluate(tmp_path, calls, stop_at=None, resume=False, run_key=None, data=None, extra=False):
    torch.manual_seed(123)
    metrics = {f"ncc_{m}": NCC(output_transform=from_engine([f"map_{m}", "target"])) for m in ("identity", "noisy")}
    records = MapRecords(tmp_path, "test", resume=resume, run_key=run_key or {"models": [["model.pt", "abc"]]})
    evaluator = AttributionEvaluator(
        "cpu", data or batches(), methods(calls, stop_at, extra), metrics, progress=records
    )
    evaluator.run()
    return evaluator.state.metrics, records


def test_a_stopped_evaluation_goes_on_to_the_metrics_of_one_that_never_stopped(tmp_path):
    whole, _ = evaluate(tmp_path / "whole", [])
    folder = tmp_path / "run" / EVALUATION_PROGRESS_DIR / "test"
    with pytest.raises(Stop):
        evaluate(tmp_path / "run", [], stop_at=4)  # stopped in the fourth batch
    assert sorted(p.name for p in folder.iterdir()) == [f"batch_{i:06d}.pt" for i in (1, 2, 3)]

    calls = []
    resumed, records = evaluate(tmp_path / "run", calls, resume=True)
    assert len(calls) == BATCHES - 3  # the three recorded batches were not computed again
    assert records.counts == {"from records": 3, "computed": 2}
    assert resumed == whole  # the random method's draws too: the generators were restored

    with pytest.raises(Stop):
        evaluate(tmp_path / "run", [], stop_at=2)
    calls = []
    evaluate(tmp_path / "run", calls)  # without resume the records are not used
    assert len(calls) == BATCHES


def test_a_record_of_another_evaluation_is_refused(tmp_path):
    with pytest.raises(Stop):
        evaluate(tmp_path, [], stop_at=3)
    record = tmp_path / EVALUATION_PROGRESS_DIR / "test" / "batch_000001.pt"
    refused = f"{record}: a record of another evaluation \\(the models, the methods or their settings differ"
    with pytest.raises(InputError, match=refused):
        evaluate(tmp_path, [], resume=True, run_key={"models": [["model.pt", "retrained"]]})
    with pytest.raises(InputError, match=refused):  # one method more: its map is not in the records
        evaluate(tmp_path, [], resume=True, extra=True)
    other = batches()
    other[0]["image"] = other[0]["image"] + 1
    with pytest.raises(InputError, match=f"{record}: a record of another evaluation \\(the batch's inputs"):
        evaluate(tmp_path, [], resume=True, data=other)
    record.write_bytes(b"not a record")
    with pytest.raises(InputError, match=f"{record}: not an evaluation progress record"):
        evaluate(tmp_path, [], resume=True)


def test_the_paired_evaluator_records_its_pair_maps_and_classes(tmp_path):
    data = [{**b, "healthy": b["image"] * 0.5} for b in batches()]
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 1))
    calls = []

    def run(resume, stop_at=None, pairs=data):
        torch.manual_seed(7)
        records = MapRecords(tmp_path, "test", resume=resume, run_key=None)
        evaluator = PairedAttributionEvaluator(
            "cpu", pairs, methods(calls, stop_at), pair_methods={"negated": MapMethod(lambda x: -x)},
            classifier=classifier, target_key="effect", progress=records,
        )  # fmt: skip
        outputs = []
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
        evaluator.run()
        return outputs

    whole = run(resume=False)
    remove_evaluation_progress(tmp_path)  # what a bundle's config does when it starts without resume
    with pytest.raises(Stop):
        run(resume=False, stop_at=len(calls) + 3)
    calls.clear()
    resumed = run(resume=True)
    assert len(calls) == BATCHES - 2
    keys = {"image", "target", "pair_image", "map_identity", "map_noisy", "pair_map_negated", "class_pred"}
    for a, b in zip(whole, resumed, strict=True):  # the first two batches from records, the others computed
        assert set(a) == set(b) == {*keys, "class_label"}
        for key in keys | {"class_label"}:  # map_noisy too: the generators were restored
            assert torch.equal(a[key], b[key])
    with pytest.raises(Stop):
        run(resume=False, stop_at=len(calls) + 2)
    other = [{**b, "healthy": b["healthy"] + 1} for b in data]  # the same patients with other pairs
    with pytest.raises(InputError, match="a record of another evaluation \\(the batch's inputs"):
        run(resume=True, pairs=other)
