"""The data contract: a dataset folder of NIfTI files plus a decathlon-style datalist JSON.

```
{"training": [{"image": "img/0001.nii.gz", "label": 1, "effect": "gt/0001.nii.gz"}, ...],
 "validation": [...], "test": [...]}
```

Paths are relative to the dataset folder (absolute paths are accepted too). Optional keys:
``mask``, ``effect``, ``healthy`` (the paired healthy image of a synthetic patient), ``region``,
``regions`` (a region label image), ``saliency`` and feature values such as ``volume``. Every problem
is reported as one :class:`~common.errors.DatalistError` line naming the datalist, the split, the
item index, its image and what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.data.synthetic._common import stratified_splits
from common.errors import DatalistError

SPLITS = ("training", "validation", "test")
# Keys whose values are file paths relative to the dataset folder.
PATH_KEYS = ("image", "effect", "mask", "healthy", "saliency", "regions")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def image_file_problem(path: str | os.PathLike, read_header: bool = True) -> str | None:
    """Why ``path`` is not a usable NIfTI file, or ``None`` when it is.

    Reads the header only (cheap), so a datalist of thousands of files can be checked up front;
    the voxel data are checked when they are loaded.
    """
    path = Path(path)
    if not path.exists():
        return "file not found"
    if not path.is_file():
        return "not a regular file"
    if not str(path).endswith(NIFTI_SUFFIXES):
        return f"not a NIfTI file name (expected one of {', '.join(NIFTI_SUFFIXES)})"
    if read_header:
        import nibabel as nib

        try:
            img = nib.load(str(path))
        except Exception as err:  # nibabel raises several types for corrupt files
            return f"unreadable NIfTI ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            return f"not a NIfTI image (nibabel read it as {type(img).__name__})"
    return None


def _describe(datalist_path: Path, split: str, index: int, item: Any) -> str:
    image = item.get("image") if isinstance(item, dict) else None
    where = f"{datalist_path}: {split}[{index}]"
    return f"{where} ({image})" if image is not None else where


def read_datalist_json(datalist: str | os.PathLike) -> dict:
    """The parsed datalist dictionary, or a one-line error naming the file."""
    path = Path(datalist)
    if not path.is_file():
        raise DatalistError(f"{path}: datalist file not found; expected a JSON file with {list(SPLITS)} lists")
    try:
        with open(path) as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatalistError(f"{path}: not valid JSON ({err}); expected a decathlon-style datalist") from None
    if not isinstance(content, dict):
        raise DatalistError(f"{path}: top level is {type(content).__name__}; expected an object with split lists")
    return content


def load_datalist(
    datalist: str | os.PathLike,
    split: str = "training",
    dataset_dir: str | os.PathLike | None = None,
    required_keys: Sequence[str] = ("image", "label"),
    allowed_labels: Iterable[Any] | None = (0, 1),
    path_keys: Sequence[str] = PATH_KEYS,
    read_headers: bool = True,
    check_files: bool = True,
) -> list[dict]:
    """Load and validate one split of a datalist; paths come back absolute.

    Args:
        datalist: the datalist JSON file.
        split: ``training``, ``validation`` or ``test`` (any key of the JSON is accepted).
        dataset_dir: folder the relative paths are resolved against; default the datalist's folder.
        required_keys: keys every item must have.
        allowed_labels: the allowed values of ``label``; ``None`` accepts any number (regression).
        path_keys: keys holding file paths; each present one must be a readable NIfTI file.
        read_headers: read each file's NIfTI header (catches corrupt files before training).
        check_files: check each path's file; ``False`` only resolves the paths, for a caller that checks
            the files itself (inference, which can skip a bad one).

    Raises:
        DatalistError: one line naming the datalist, split, item and problem.
    """
    datalist_path = Path(datalist)
    content = read_datalist_json(datalist_path)
    base = Path(dataset_dir) if dataset_dir is not None else datalist_path.parent
    if split not in content:
        raise DatalistError(
            f"{datalist_path}: no '{split}' split; found {sorted(content)}, expected a non-empty '{split}' list"
        )
    items = content[split]
    if not isinstance(items, list) or not items:
        raise DatalistError(f"{datalist_path}: split '{split}' is empty; expected a non-empty list of items")
    allowed = None if allowed_labels is None else list(allowed_labels)
    loaded = []
    for index, item in enumerate(items):
        where = _describe(datalist_path, split, index, item)
        if not isinstance(item, dict):
            raise DatalistError(f"{where}: item is {type(item).__name__}; expected an object such as {{'image': ...}}")
        missing = [key for key in required_keys if key not in item]
        if missing:
            raise DatalistError(f"{where}: missing key(s) {missing}; expected keys {list(required_keys)}")
        if "label" in item:
            label = item["label"]
            if isinstance(label, bool) or not isinstance(label, (int, float)):
                raise DatalistError(f"{where}: label {label!r} is not a number; expected one of {allowed}")
            if allowed is not None and label not in allowed:
                raise DatalistError(f"{where}: label {label!r} is outside the allowed set; expected one of {allowed}")
        resolved = dict(item)
        for key in path_keys:
            if key not in item or item[key] is None:
                continue
            if not isinstance(item[key], str):
                raise DatalistError(f"{where}: '{key}' is {item[key]!r}; expected a file path")
            file_path = Path(item[key]) if os.path.isabs(item[key]) else base / item[key]
            problem = image_file_problem(file_path, read_header=read_headers) if check_files else None
            if problem:
                raise DatalistError(f"{where}: '{key}' {file_path}: {problem}; expected a readable NIfTI file")
            resolved[key] = str(file_path.resolve())
        loaded.append(resolved)
    return loaded


def write_datalist(path: str | os.PathLike, splits: dict[str, list[dict]]) -> None:
    """Write a datalist JSON atomically (temporary file + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(splits, f, indent=1)
    os.replace(tmp, path)


def load_resplit(
    datalist: str | os.PathLike,
    split: str = "training",
    seed: int | None = None,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    **load_kwargs,
) -> list[dict]:
    """One split of the datalist's items re-drawn by ``seed``, stratified by label.

    The papers that report "three runs with different splits and initialisations" (ACAT: 70/15/15)
    need splits that change with the run's seed; every item of every split is pooled (in datalist
    order, so the same seed always gives the same split) and divided by ``fractions`` (training,
    validation, test). ``seed=None`` keeps the datalist's own splits.
    """
    if split not in SPLITS:
        raise DatalistError(f"{datalist}: cannot re-split into '{split}'; expected one of {list(SPLITS)}")
    if seed is None:
        return load_datalist(datalist, split, **load_kwargs)
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions {list(fractions)}: expected three positive numbers summing to 1")
    content = read_datalist_json(datalist)
    items = [item for name in SPLITS if content.get(name) for item in load_datalist(datalist, name, **load_kwargs)]
    labels = np.array([item.get("label", 0) for item in items])
    test_fraction = fractions[2]
    val_fraction = fractions[1] / (fractions[0] + fractions[1])
    chosen = dict(zip(SPLITS, stratified_splits(labels, seed, test_fraction, val_fraction)))[split]
    return [items[i] for i in chosen]
