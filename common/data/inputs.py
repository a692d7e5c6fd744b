"""What an inference config runs on: one NIfTI file, a folder of them, or a datalist split."""

from __future__ import annotations

import os
from pathlib import Path

from common.data.datalist import NIFTI_SUFFIXES, image_file_problem, load_datalist
from common.errors import InputError


def inference_items(
    input_image: str | None = None,
    input_dir: str | None = None,
    input_datalist: str | None = None,
    split: str = "test",
    dataset_dir: str | None = None,
) -> list[dict]:
    """``[{"image": path}, ...]`` for exactly one of a file, a folder (``*.nii``/``*.nii.gz``) or a datalist.

    Every file is checked (exists, is a readable NIfTI) before any output is written; a problem
    raises one :class:`InputError` line naming the file.
    """
    given = [
        name
        for name, value in (("input_image", input_image), ("input_dir", input_dir), ("input_datalist", input_datalist))
        if value
    ]
    if len(given) != 1:
        raise InputError(
            f"inference input: got {given or 'none'}; expected exactly one of --input_image FILE, "
            "--input_dir FOLDER or --input_datalist DATALIST"
        )
    if input_datalist:
        return load_datalist(
            input_datalist, split, dataset_dir=dataset_dir, required_keys=("image",), allowed_labels=None
        )
    if input_dir:
        folder = Path(input_dir)
        if not folder.is_dir():
            raise InputError(f"{folder}: folder not found; expected a folder of .nii/.nii.gz files")
        files = sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
        if not files:
            raise InputError(f"{folder}: no .nii or .nii.gz file; expected at least one NIfTI image")
    else:
        files = [Path(input_image)]
    for path in files:
        problem = image_file_problem(path)
        if problem:
            raise InputError(f"{path}: {problem}; expected a readable NIfTI file")
    return [{"image": os.path.abspath(p)} for p in files]
