"""Model selection and early stopping that start only after a warm-up of the training."""

from __future__ import annotations

from ignite.engine import Engine, Events

WARMUP_OFFSET = -1.0e6


class SelectionWarmup:
    """Copy a validation metric to ``name`` from training epoch ``start_epoch`` on; before that, write
    ``-1e6 + epoch``, below any real score and rising by 1 per epoch. The epoch is the evaluator's, which MONAI's
    ``ValidationHandler`` runs at the trainer's (``Evaluator.run(global_epoch)``).

    Point the best-model ``CheckpointSaver`` (``key_metric_name``) and the ``EarlyStopHandler`` at ``name``: during
    the warm-up the newest model is kept and early stopping sees an improvement every epoch, so neither picks nor
    stops at an epoch before ``start_epoch``. Why: a classifier trained with an attribution constraint can reach its
    best validation accuracy before the constraint has shaped its attributions (attr_constraint seeds 1 and 2 did,
    at epochs 13 and 5 of 50). ``start_epoch`` 1 gives the metric itself, every epoch.

    Attach it to the evaluator *before* the handlers that read ``name`` (first in ``val_handlers``).
    """

    def __init__(self, start_epoch: int = 1, metric: str = "val_accuracy", name: str | None = None):
        if int(start_epoch) < 1:
            raise ValueError(f"start_epoch={start_epoch}; expected >= 1")
        self.start_epoch = int(start_epoch)
        self.metric = metric
        self.name = name or f"{metric}_selected"

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        value = engine.state.metrics[self.metric]
        engine.state.metrics[self.name] = value if epoch >= self.start_epoch else WARMUP_OFFSET + epoch
