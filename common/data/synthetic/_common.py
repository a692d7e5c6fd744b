"""Pieces every synthetic generator shares: per-case RNG, NIfTI writing and the paper's splits."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from sklearn.model_selection import train_test_split


def case_rng(seed: int, index: int) -> np.random.Generator:
    """An RNG for one case that depends only on (seed, index), so cases are order-independent."""
    return np.random.default_rng([seed, index])


def save_nifti(array: np.ndarray, path: Path, spacing: float | tuple[float, ...] = 1.0) -> None:
    """Write ``array`` as float32 NIfTI with a diagonal (RAS) affine of the given voxel spacing."""
    spacing = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    affine = np.diag([*spacing, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine), str(path))


def scale_to_unit_range(image: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Min-max scale to [-1, 1]; also returns (offset, gain) so effects can be mapped alike."""
    lo, hi = float(image.min()), float(image.max())
    gain = 2.0 / (hi - lo) if hi > lo else 1.0
    return (image - lo) * gain - 1.0, lo, gain


def stratified_splits(labels: np.ndarray, seed: int, test_fraction: float = 0.2, val_fraction: float = 0.2):
    """Indices of (training, validation, test): stratified test split, then validation from training.

    This is VA-GAN's protocol (80/20 train/test, then 20% of training for monitoring).
    """
    indices = np.arange(len(labels))
    strat = labels if len(np.unique(labels)) > 1 else None
    train_val, test = train_test_split(indices, test_size=test_fraction, stratify=strat, random_state=seed)
    strat_tv = labels[train_val] if strat is not None else None
    train, val = train_test_split(train_val, test_size=val_fraction, stratify=strat_tv, random_state=seed + 1)
    return np.sort(train), np.sort(val), np.sort(test)
