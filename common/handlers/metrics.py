"""Ignite metric handlers over :mod:`common.metrics`, in the shape of MONAI's own handlers.

Each handler is a thin ``monai.handlers.IgniteMetricHandler`` around a MONAI cumulative metric,
exactly like ``monai.handlers.MeanDice`` wraps ``DiceMetric``. ``output_transform`` must return
``(y_pred, y)``: batch-first tensors or lists of channel-first tensors, as for MONAI's handlers.

- Per-case metrics (NCC, Dice, pointing game, top-p overlap, per-image AUROC/AUPRC) are reduced by
  the mean over cases; the per-case values land in ``engine.state.metric_details[name]`` so the
  evaluation can report mean +/- sd.
- Pooled metrics (``pooled=True`` for AUROC/AUROC10/AUPRC over all test voxels, the
  classification rates over all images) are computed once on everything seen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from monai.handlers import IgniteMetricHandler
from monai.metrics import CumulativeIterationMetric

from common import metrics

IDENTITY = lambda x: x  # noqa: E731


class PerCaseMetric(CumulativeIterationMetric):
    """Applies a per-case metric function to each item of a batch; the aggregate is the mean."""

    def __init__(self, fn: Callable, **kwargs):
        super().__init__()
        self.fn = functools.partial(fn, **kwargs) if kwargs else fn
        self.name = getattr(fn, "__name__", "metric")

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if y is None:
            raise ValueError(f"{self.name} needs the ground truth y")
        values = [float(self.fn(p, t)) for p, t in zip(y_pred, y)]
        return torch.tensor(values, dtype=torch.float64).reshape(-1, 1)

    def aggregate(self) -> torch.Tensor:
        buffer = self.get_buffer()
        if buffer is None or (isinstance(buffer, torch.Tensor) and buffer.numel() == 0):
            raise ValueError(f"{self.name}: no case was seen")
        return buffer.double().mean()


class PooledMetric(CumulativeIterationMetric):
    """Collects every (prediction, truth) element seen and applies ``fn`` to all of them at once."""

    def __init__(self, fn: Callable, **kwargs):
        super().__init__()
        self.fn = functools.partial(fn, **kwargs) if kwargs else fn
        self.name = getattr(fn, "__name__", "metric")
        self._pred: list[torch.Tensor] = []
        self._true: list[torch.Tensor] = []

    def reset(self):
        super().reset()
        self._pred, self._true = [], []

    def __call__(self, y_pred, y=None, **kwargs):
        if y is None:
            raise ValueError(f"{self.name} needs the ground truth y")
        # Stored as float32 on the CPU: a 3D test set is kept whole until the end.
        self._pred.extend(torch.as_tensor(p).detach().reshape(-1).float().cpu() for p in y_pred)
        self._true.extend(torch.as_tensor(t).detach().reshape(-1).float().cpu() for t in y)

    def _compute_tensor(self, y_pred, y=None, **kwargs):  # pragma: no cover - __call__ is overridden
        raise NotImplementedError

    def get_buffer(self):
        return None

    def aggregate(self):
        if not self._pred:
            raise ValueError(f"{self.name}: no case was seen")
        return torch.tensor(self.fn(torch.cat(self._true), torch.cat(self._pred)), dtype=torch.float64)


class _Handler(IgniteMetricHandler):
    def __init__(self, fn: Callable, pooled: bool, output_transform: Callable, save_details: bool, **kwargs):
        metric = PooledMetric(fn, **kwargs) if pooled else PerCaseMetric(fn, **kwargs)
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details and not pooled)


def _pooled_scores(fn: Callable, **kwargs) -> Callable:
    # PooledMetric calls fn(truth, prediction); scoring functions take (scores, targets).
    return lambda truth, prediction: fn(prediction, truth, **kwargs)


class NCC(_Handler):
    """Mean NCC (Pearson r) of predicted maps with ground-truth maps; ``absolute`` for ICAM's |map|."""

    def __init__(self, absolute: bool = False, output_transform: Callable = IDENTITY, save_details: bool = True):
        super().__init__(metrics.ncc, False, output_transform, save_details, absolute=absolute)


def _dice_at(predicted, target, threshold: float | Callable[[], float]) -> float:
    return metrics.dice(predicted, target, threshold=threshold() if callable(threshold) else threshold)


class Dice(_Handler):
    """Mean Dice of maps binarised at ``threshold`` with masks.

    ``threshold`` may be a callable, read when the metric is computed: the attribution-constraint
    protocol takes it from the validation run (:class:`OperatingThreshold`) that precedes the test run.
    """

    def __init__(
        self,
        threshold: float | Callable[[], float] = 0.5,
        output_transform: Callable = IDENTITY,
        save_details: bool = True,
    ):
        super().__init__(_dice_at, False, output_transform, save_details, threshold=threshold)


class _ScoreHandler(_Handler):
    def __init__(self, fn, pooled, output_transform, save_details, **kwargs):
        if pooled:
            super().__init__(_pooled_scores(fn, **kwargs), True, output_transform, save_details)
        else:
            super().__init__(fn, False, output_transform, save_details, **kwargs)


class AUROC(_ScoreHandler):
    """Voxel-level AUROC: mean over cases, or over all voxels pooled (``pooled=True``)."""

    def __init__(self, pooled: bool = False, output_transform: Callable = IDENTITY, save_details: bool = True):
        super().__init__(metrics.auroc, pooled, output_transform, save_details)


class AUROC10(_ScoreHandler):
    """Voxel-level partial AUROC up to FPR 0.1, normalised to its maximum."""

    def __init__(self, pooled: bool = False, output_transform: Callable = IDENTITY, save_details: bool = True):
        super().__init__(metrics.auroc_partial, pooled, output_transform, save_details, max_fpr=0.1)


class AUPRC(_ScoreHandler):
    """Voxel-level average precision: mean over cases, or pooled over all voxels."""

    def __init__(self, pooled: bool = False, output_transform: Callable = IDENTITY, save_details: bool = True):
        super().__init__(metrics.auprc, pooled, output_transform, save_details)


class OperatingThreshold(_ScoreHandler):
    """The map threshold at the precision-recall operating point (max F1) of all voxels seen."""

    def __init__(self, output_transform: Callable = IDENTITY):
        super().__init__(metrics.pr_operating_threshold, True, output_transform, False)


class PointingGame(_Handler):
    """Hit rate: fraction of cases whose map maximum lies in the true region (y = region mask)."""

    def __init__(self, output_transform: Callable = IDENTITY, save_details: bool = True):
        super().__init__(metrics.pointing_game_hit, False, output_transform, save_details)


def _top_p_iou(saliency, target) -> float:
    return metrics.top_p_overlap(saliency, target)[0]


def _top_p_dice(saliency, target) -> float:
    return metrics.top_p_overlap(saliency, target)[1]


class TopPIoU(_Handler):
    """Mean IoU of the top-k voxels of the map with the mask, k = mask size (ACAT appendix H)."""

    def __init__(self, output_transform: Callable = IDENTITY, save_details: bool = True):
        super().__init__(_top_p_iou, False, output_transform, save_details)


class TopPDice(_Handler):
    """Mean Dice of the top-k voxels of the map with the mask, k = mask size (ACAT appendix H)."""

    def __init__(self, output_transform: Callable = IDENTITY, save_details: bool = True):
        super().__init__(_top_p_dice, False, output_transform, save_details)


class ClassificationRate(_Handler):
    """Image-level ``accuracy``, ``tpr``, ``tnr`` or ``balanced_accuracy`` over all images seen.

    ``output_transform`` returns (predicted labels, true labels). ``positive`` is the class counted
    as positive (one-vs-rest: a class's sensitivity is its ``tpr``, its specificity its ``tnr``);
    ``positive=None`` with ``rate="accuracy"`` is the accuracy over all classes.
    """

    def __init__(self, rate: str = "accuracy", positive: int | None = 1, output_transform: Callable = IDENTITY):
        if rate not in ("accuracy", "tpr", "tnr", "balanced_accuracy"):
            raise ValueError(f"rate '{rate}' is unknown; expected accuracy, tpr, tnr or balanced_accuracy")
        if positive is None and rate != "accuracy":
            raise ValueError(f"rate '{rate}' needs a positive class; only accuracy is defined over all classes")

        def fn(y_true, y_pred):
            if positive is None:
                return metrics.accuracy(y_true, y_pred)
            return metrics.classification_rates(y_true, y_pred, positive=positive)[rate]

        super().__init__(fn, True, output_transform, False)
