"""Ignite handlers: metric handlers over :mod:`common.metrics`, TensorBoard image logging, model selection after a
warm-up."""

from common.handlers.checkpoint import AtomicCheckpointSaver
from common.handlers.images import TensorBoardAttributionMaps, TensorBoardOutputImages
from common.handlers.inputs import ReportSkippedInputs
from common.handlers.memory import ReturnFreedMemory
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
from common.handlers.selection import (
    AverageBuffersAcrossProcesses,
    RefreshBatchNorm,
    SelectionWarmup,
    WarmupValidationHandler,
)

__all__ = [
    "AUPRC",
    "AUROC",
    "AUROC10",
    "AtomicCheckpointSaver",
    "AverageBuffersAcrossProcesses",
    "NCC",
    "ClassificationRate",
    "Dice",
    "OperatingThreshold",
    "PerCaseMetric",
    "PointingGame",
    "PooledMetric",
    "RefreshBatchNorm",
    "ReportSkippedInputs",
    "ReturnFreedMemory",
    "SelectionWarmup",
    "TopPDice",
    "TensorBoardAttributionMaps",
    "TensorBoardOutputImages",
    "TopPIoU",
    "WarmupValidationHandler",
]
