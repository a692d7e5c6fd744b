"""Pieces every synthetic generator shares: per-case RNG, NIfTI writing and the paper's splits."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from sklearn.model_selection import train_test_split


def case_rng(seed: int, index: int) -> np.random.Generator:
    """An RNG for one case that depends only on (seed, index), so cases are order-independent."""
    return np.random.default_rng([seed, index])


def save_nifti(array: np.ndarray, path: Path, affine: np.ndarray | None = None) -> None:
    """Write ``array`` as float32 NIfTI; the default affine is the identity (1 mm, RAS)."""
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
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
    try:
        train_val, test = train_test_split(indices, test_size=test_fraction, stratify=labels, random_state=seed)
        train, val = train_test_split(
            train_val, test_size=val_fraction, stratify=labels[train_val], random_state=seed + 1
        )
    except ValueError:  # too few cases of a class to stratify (tiny test data sets): plain random splits
        train_val, test = train_test_split(indices, test_size=test_fraction, random_state=seed)
        train, val = train_test_split(train_val, test_size=val_fraction, random_state=seed + 1)
    return np.sort(train), np.sort(val), np.sort(test)
