"""Ignite handlers: metric handlers over :mod:`common.metrics`."""

from common.handlers.metrics import (
    AUPRC,
    AUROC,
    AUROC10,
    NCC,
    ClassificationRate,
    Dice,
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
    "PerCaseMetric",
    "PointingGame",
    "PooledMetric",
    "TopPDice",
    "TopPIoU",
]
