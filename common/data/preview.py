"""PNG montage of a data set: examples of each class with their ground truth.

Each case is a row: the image, then where the datalist has them its paired healthy image
(``healthy``), the ground-truth effect (``effect``), the lesion / ROI mask (``mask``) and the
region labels (``regions``). Data sets without per-case maps show a row of images per class. 3D
images are shown as the axial slice through the strongest effect (or the mask, or the middle).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from common.data.datalist import load_datalist  # noqa: E402

DETAIL_KEYS = ("healthy", "effect", "mask")
COLOUR_MAPS = {"image": "gray", "healthy": "gray", "effect": "coolwarm", "mask": "magma", "regions": "tab10"}


def _volume(path: str) -> np.ndarray:
    return np.squeeze(np.asarray(nib.load(path).dataobj, dtype=np.float32))


def axial_index(item: dict) -> int | None:
    """Axial slice that best shows the case's effect (None for 2D images)."""
    image = nib.load(item["image"])
    if len(image.shape) < 3 or image.shape[2] == 1:
        return None
    for key in ("effect", "mask"):
        if key in item:
            guide = np.abs(_volume(item[key]))
            if guide.any():
                return int(np.argmax(guide.sum(axis=(0, 1))))
    return image.shape[2] // 2


def _view(item: dict, key: str, z: int | None) -> tuple[np.ndarray, float]:
    """The axial view (x to the right, anterior up) and its pixel aspect ratio (dy / dx)."""
    image = nib.load(item[key])
    volume = np.squeeze(np.asarray(image.dataobj, dtype=np.float32))
    view = volume if z is None else volume[:, :, z]
    zooms = image.header.get_zooms()
    return np.rot90(view), float(zooms[1] / zooms[0]) if len(zooms) > 1 else 1.0


def _window(view: np.ndarray) -> dict:
    # CT in Hounsfield units (air at -1000) is shown in a brain window; anything else in full range.
    return {"vmin": 0.0, "vmax": 80.0} if view.min() < -500 else {}


def _describe(item: dict, scalar_keys) -> str:
    parts = []
    for key in scalar_keys:
        if key in item:
            value = item[key]
            parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return "\n".join(parts)


def _layout(items: list[dict], per_class: int) -> list[tuple[str, list]]:
    """Rows of (title, [(item, key, z)]).

    With ground truth: one row per case, columns image | healthy | effect | mask (| regions), so a
    case's healthy and diseased images and its ground truth sit side by side. Without: one row of
    images per class.
    """
    classes = sorted({item["label"] for item in items})
    columns = [k for k in ("image", *DETAIL_KEYS, "regions") if any(k in item for item in items)]
    rows = []
    if len(columns) == 1:
        for label in classes:
            chosen = [item for item in items if item["label"] == label][:per_class]
            rows.append((f"label {label}", [(item, "image", axial_index(item)) for item in chosen]))
        return rows
    per_row = max(1, per_class // 2)
    for label in classes:
        for item in [item for item in items if item["label"] == label][:per_row]:
            z = axial_index(item)
            rows.append((f"label {label}", [(item, key, z) if key in item else None for key in columns]))
    return rows


def write_preview(datalist: Path, out: Path, per_class: int = 4, scalar_keys=(), split: str = "training") -> Path:
    items = load_datalist(datalist, split, required_keys=("image", "label"), allowed_labels=None, read_headers=False)
    rows = _layout(items, per_class)
    n_cols = max(len(cells) for _, cells in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.0 * n_cols, 2.1 * len(rows)), squeeze=False)
    for r, (title, cells) in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(cells) or cells[c] is None:
                continue
            item, key, z = cells[c]
            view, aspect = _view(item, key, z)
            if key == "effect":
                vmax = float(np.abs(view).max()) or 1.0
                ax.imshow(view, cmap=COLOUR_MAPS[key], vmin=-vmax, vmax=vmax, aspect=aspect)
            else:
                ax.imshow(view, cmap=COLOUR_MAPS.get(key, "gray"), aspect=aspect, **_window(view))
            caption = title if key != "image" else "\n".join(filter(None, [title, _describe(item, scalar_keys)]))
            ax.set_title(caption if key == "image" else key, fontsize=7)
    fig.suptitle(f"{Path(datalist).parent.name}: {split} examples", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    plt.close(fig)
    return out
