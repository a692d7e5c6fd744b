"""Weights for class-imbalanced classification losses."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.utils.class_weight import compute_class_weight


def balanced_class_weights(items: Sequence[dict], num_classes: int, label_key: str = "label") -> torch.Tensor:
    """Per-class weights n / (K * n_k) of the items' labels, for a weighted cross-entropy.

    ACAT weights its cross-entropy against class imbalance (40% of stroke scans have no lesion).
    A class absent from ``items`` gets weight 1 (it contributes no loss anyway).
    """
    labels = np.array([int(item[label_key]) for item in items])
    present = np.unique(labels)
    weights = np.ones(num_classes, dtype=np.float32)
    weights[present] = compute_class_weight("balanced", classes=present, y=labels)
    return torch.as_tensor(weights)
