"""What an inference config runs on: one NIfTI file, a folder of them, or a datalist split."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from monai.transforms import Compose

from common.data.datalist import NIFTI_SUFFIXES, image_file_problem, load_datalist
from common.errors import InputError, input_error_in

logger = logging.getLogger(__name__)


class InferenceItems(list):
    """The items to run on, plus ``skipped``: ``(file, problem)`` of each bad input left out."""

    def __init__(self, items=(), skipped=()):
        super().__init__(items)
        self.skipped = list(skipped)


def checking_part(preprocessing: Compose) -> Compose:
    """The steps of ``preprocessing`` up to its last image check (load, channel first, ``CheckImaged``).

    Running these on every input before the engine starts finds every unreadable, NaN, wrongly shaped
    or too small image with the same code that would meet it during the run, but before any output
    is written; without a ``CheckImaged`` the whole chain is the check.
    """
    from common.data.transforms import CheckImaged

    steps = list(preprocessing.flatten().transforms)
    checks = [i for i, step in enumerate(steps) if isinstance(step, CheckImaged)]
    return Compose(steps[: checks[-1] + 1]) if checks else preprocessing


def inference_items(
    input_image: str | None = None,
    input_dir: str | None = None,
    input_datalist: str | None = None,
    split: str = "test",
    dataset_dir: str | None = None,
    preprocessing: Compose | None = None,
    skip_bad_inputs: bool = False,
) -> InferenceItems:
    """``[{"image": path}, ...]`` for exactly one of a file, a folder (``*.nii``/``*.nii.gz``) or a datalist.

    Every file is checked before any output is written: it exists and is a readable NIfTI, and, when
    ``preprocessing`` is given, its checking part (:func:`checking_part`) accepts the image (dimensions,
    channels, finite voxels, minimum size). A problem raises one :class:`InputError` line naming the
    file; with ``skip_bad_inputs`` the bad files of a folder or datalist are logged, left out and kept in
    ``skipped`` (reported again at the end by :class:`common.handlers.ReportSkippedInputs`).
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
        # a datalist's files are checked one by one below, so a bad one can be skipped like a folder's
        items = load_datalist(
            input_datalist, split, dataset_dir=dataset_dir, required_keys=("image",), allowed_labels=None,
            path_keys=("image",), check_files=False,
        )
    elif input_dir:
        folder = Path(input_dir)
        if not folder.is_dir():
            raise InputError(f"{folder}: folder not found; expected a folder of .nii/.nii.gz files")
        files = sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
        if not files:
            raise InputError(f"{folder}: no .nii or .nii.gz file; expected at least one NIfTI image")
        items = [{"image": str(p)} for p in files]
    else:
        items = [{"image": input_image}]
    check = checking_part(preprocessing) if preprocessing is not None else None
    accepted, skipped = [], []
    for item in items:
        problem = _problem(item, check)
        if problem is None:
            accepted.append({**item, "image": os.path.abspath(item["image"])})
        elif skip_bad_inputs and not input_image:
            logger.warning("skipping %s", problem)
            skipped.append((str(item["image"]), problem))
        else:
            raise InputError(problem)
    if not accepted:
        raise InputError(f"{input_dir or input_datalist}: all {len(skipped)} inputs are unusable; nothing to run on")
    return InferenceItems(accepted, skipped)


def _problem(item: dict, check: Compose | None) -> str | None:
    """The one-line problem of an input item (naming its file), or ``None`` when it can be used."""
    path = item["image"]
    if not isinstance(path, str):
        return f"{path!r}: not a file path; expected a NIfTI file name"
    problem = image_file_problem(path)
    if problem:
        return f"{path}: {problem}; expected a readable NIfTI file"
    if check is not None:
        try:
            check(dict(item))
        except Exception as err:  # MONAI wraps what a transform raised
            found = input_error_in(err)
            if found is None:
                raise
            return str(found)
    return None
