"""Model selection and early stopping that start only after a warm-up of the training."""

from __future__ import annotations

from ignite.engine import Engine, Events
from monai.handlers import ValidationHandler

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


class WarmupValidationHandler(ValidationHandler):
    """MONAI's epoch-level ``ValidationHandler`` that validates every ``interval`` epochs from ``start_epoch`` on
    and only every ``warmup_interval`` epochs before it; always at ``start_epoch`` itself and at the last epoch,
    so a run shorter than the warm-up still validates (and keeps a model) once.

    Why: before the selection warm-up ends (:class:`SelectionWarmup`) a validation only logs, it cannot choose
    the model or stop the training, and with a moving average of the weights each validation first recomputes
    the batch-norm statistics over the training set (:class:`RefreshBatchNorm`): about a fifth of an
    attribution-constrained epoch on a CPU. ``warmup_interval`` 1 (or ``start_epoch`` 1) is MONAI's handler.
    """

    def __init__(self, validator=None, interval: int = 1, start_epoch: int = 1, warmup_interval: int = 1):
        super().__init__(interval=interval, validator=validator, epoch_level=True)
        if int(interval) < 1 or int(warmup_interval) < 1 or int(start_epoch) < 1:
            raise ValueError(
                f"WarmupValidationHandler: interval={interval}, warmup_interval={warmup_interval}, "
                f"start_epoch={start_epoch} (in train.json: val_interval, warmup_val_interval, selection_start_epoch); "
                "expected >= 1 each"
            )
        self.start_epoch = int(start_epoch)
        self.warmup_interval = int(warmup_interval)

    def due(self, epoch: int, max_epochs: int | None = None) -> bool:
        if max_epochs is not None and epoch >= max_epochs:
            return True
        if epoch < self.start_epoch:
            return epoch % self.warmup_interval == 0
        return (epoch - self.start_epoch) % int(self.interval) == 0

    def attach(self, engine: Engine) -> None:
        due = Events.EPOCH_COMPLETED(event_filter=lambda e, epoch: self.due(epoch, e.state.max_epochs))
        engine.add_event_handler(due, self)


class RefreshBatchNorm:
    """Recompute the batch-norm statistics of the evaluator's network on ``loader`` before each validation.

    A moving average of the weights (``ignite.handlers.EMAHandler``) is a network that never ran forward during
    training, so the running means and variances it inherits from the online network do not fit its own
    activations; stochastic weight averaging recomputes them with one pass over the training data
    (``torch.optim.swa_utils.update_bn``), which this handler does at the evaluator's start. Why: the averaged
    attribution-constrained classifier with inherited statistics predicted one class on every validation image.
    ``enabled`` false makes it a no-op, so a config can list it unconditionally.
    """

    def __init__(self, loader, image_key: str = "image", enabled: bool = True):
        self.loader = loader
        self.image_key = image_key
        self.enabled = bool(enabled)

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        import torch
        from monai.utils import convert_to_tensor

        device = engine.state.device
        images = (convert_to_tensor(batch[self.image_key], track_meta=False).to(device) for batch in self.loader)
        with torch.no_grad():
            torch.optim.swa_utils.update_bn(images, engine.network)


class AverageBuffersAcrossProcesses:
    """At the evaluator's start, average the batch-norm buffers of its network over the processes of a DDP run
    (:func:`common.engines.distributed.average_buffers`); a no-op in a single process.

    Why: every process validates on the whole validation set and must reach the same score, or early stopping and
    the best-model choice would differ between processes (and the run would hang); the parameters are equal under
    DDP, but each process's batch-norm statistics follow its own data shard. List it after
    :class:`RefreshBatchNorm`, whose statistics also come from each process's shard.
    """

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        from common.engines.distributed import average_buffers

        average_buffers(engine.network)
