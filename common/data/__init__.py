"""Data contract, synthetic data sets and MONAI transform helpers shared by the bundles."""

from common.data.datalist import (
    SPLITS,
    image_file_problem,
    load_datalist,
    load_resplit,
    read_datalist_json,
    write_datalist,
)
from common.data.inputs import inference_items


def ensure_dataset(*args, **kwargs):
    """See :func:`common.data.synthesize.ensure_dataset` (imported lazily, so that
    ``python -m common.data.synthesize`` does not import its own module twice)."""
    import importlib

    return importlib.import_module("common.data.synthesize").ensure_dataset(*args, **kwargs)


__all__ = [
    "SPLITS",
    "ensure_dataset",
    "image_file_problem",
    "inference_items",
    "load_datalist",
    "load_resplit",
    "read_datalist_json",
    "write_datalist",
]
