"""common.handlers.WarmupValidationHandler: sparse validation during the selection warm-up, every epoch after."""

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator

from common.handlers import WarmupValidationHandler


def _validated_epochs(max_epochs: int, **kwargs) -> list[int]:
    """The trainer epochs at which the handler ran a (real, one-batch) MONAI evaluator."""
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=[{"image": torch.zeros(1, 1)}], network=torch.nn.Identity()
    )
    epochs = []
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: epochs.append(e.state.epoch))
    trainer = Engine(lambda engine, batch: None)
    WarmupValidationHandler(validator=evaluator, **kwargs).attach(trainer)
    trainer.run([0], max_epochs=max_epochs)
    return epochs


def test_validates_every_warmup_interval_before_the_start_then_every_interval():
    assert _validated_epochs(14, start_epoch=8, warmup_interval=3) == [3, 6, 8, 9, 10, 11, 12, 13, 14]
    assert _validated_epochs(14, start_epoch=8, warmup_interval=3, interval=2) == [3, 6, 8, 10, 12, 14]


def test_defaults_are_monai_every_epoch_and_a_short_run_still_validates_its_last_epoch():
    assert _validated_epochs(4) == [1, 2, 3, 4]
    assert _validated_epochs(4, start_epoch=30, warmup_interval=5) == [4]  # the warm-up outlasts the run
    assert _validated_epochs(7, start_epoch=3, interval=3) == [1, 2, 3, 6, 7]


@pytest.mark.parametrize("bad", [{"interval": 0}, {"warmup_interval": 0}, {"start_epoch": 0}])
def test_non_positive_settings_fail_naming_them(bad):
    with pytest.raises(ValueError, match="expected >= 1"):
        WarmupValidationHandler(**bad)
