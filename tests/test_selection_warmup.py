"""common.handlers.SelectionWarmup: no model selection and no early stop before the constraint's warm-up."""

from types import SimpleNamespace

import pytest
from ignite.engine import Engine
from ignite.handlers import EarlyStopping

from common.handlers import SelectionWarmup

# A constrained classifier's validation accuracy: best at epoch 2, then swinging (attr_constraint seed 1's pattern)
ACCURACY = {1: 0.80, 2: 0.98, 3: 0.50, 4: 0.70, 5: 0.90, 6: 0.95, 7: 0.60, 8: 0.60, 9: 0.60}


def _selected(start_epoch: int, patience: int) -> tuple[list[float], int]:
    """The selected scores epoch by epoch and the epoch at which ignite's EarlyStopping ends training."""
    trainer = Engine(lambda engine, batch: None)
    stopper = EarlyStopping(
        patience=patience, score_function=lambda e: e.state.metrics["val_accuracy_selected"], trainer=trainer
    )
    warmup = SelectionWarmup(start_epoch=start_epoch)
    scores = []
    for epoch in ACCURACY:
        evaluator = SimpleNamespace(state=SimpleNamespace(epoch=epoch, metrics={"val_accuracy": ACCURACY[epoch]}))
        warmup(evaluator)
        scores.append(evaluator.state.metrics["val_accuracy_selected"])
        stopper(evaluator)
        if trainer.should_terminate:
            return scores, epoch
    return scores, len(ACCURACY)


def test_without_warmup_the_metric_passes_through_and_training_stops_after_the_early_best():
    scores, stopped = _selected(start_epoch=1, patience=2)
    assert scores == [ACCURACY[e] for e in range(1, 5)]
    assert stopped == 4  # best at epoch 2, two epochs without improvement


def test_with_warmup_early_epochs_never_win_and_never_count_against_patience():
    scores, stopped = _selected(start_epoch=5, patience=2)
    assert all(s < 0 for s in scores[:4]) and scores[:4] == sorted(scores[:4])  # rising, below any real score
    assert scores[4:7] == [0.90, 0.95, 0.60]
    assert stopped == 8  # best after the warm-up at epoch 6, two epochs without improvement
    best_epoch = 1 + max(range(len(scores)), key=lambda i: (scores[i], i))
    assert best_epoch == 6  # the model a best-score checkpoint keeps: after the warm-up, not epoch 2


def test_start_epoch_must_be_positive():
    with pytest.raises(ValueError, match="start_epoch"):
        SelectionWarmup(start_epoch=0)
