"""Data contract, synthetic data sets and MONAI transform helpers shared by the bundles."""

from common.data.datalist import SPLITS, image_file_problem, load_datalist, read_datalist_json, write_datalist


def __getattr__(name):
    # Lazy, so `python -m common.data.synthesize` does not import its own module twice.
    if name in ("ensure_dataset", "synthesize"):
        from common.data import synthesize as module

        return getattr(module, name)
    raise AttributeError(f"module 'common.data' has no attribute {name!r}")


__all__ = [
    "SPLITS",
    "ensure_dataset",
    "image_file_problem",
    "load_datalist",
    "read_datalist_json",
    "synthesize",
    "write_datalist",
]
