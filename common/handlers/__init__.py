"""Ignite handlers: metric handlers over :mod:`common.metrics` and TensorBoard image logging."""

from common.handlers.images import TensorBoardAttributionMaps, TensorBoardOutputImages
from common.handlers.metrics import (
    AUPRC,
    AUROC,
    AUROC10,
    NCC,
    ClassificationRate,
    Dice,
    OperatingThreshold,
    PerCaseMetric,
    PointingGame,
    PooledMetric,
    TopPDice,
    TopPIoU,
)

__all__ = [
    "AUPRC",
    "AUROC",
    "AUROC10",
    "NCC",
    "ClassificationRate",
    "Dice",
    "OperatingThreshold",
    "PerCaseMetric",
    "PointingGame",
    "PooledMetric",
    "TopPDice",
    "TensorBoardAttributionMaps",
    "TensorBoardOutputImages",
    "TopPIoU",
]
