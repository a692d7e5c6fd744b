"""PNG montage of a data set: examples of each class, with ground truth where the datalist has it."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from common.data.datalist import load_datalist  # noqa: E402

GROUND_TRUTH_KEYS = ("effect", "mask")


def middle_slice(volume: np.ndarray) -> np.ndarray:
    """A 2D view of an image: itself, or the middle slice along the last axis of a volume."""
    volume = np.squeeze(volume)
    return volume if volume.ndim == 2 else volume[..., volume.shape[-1] // 2]


def write_preview(datalist: Path, out: Path, per_class: int = 6, scalar_keys=(), split: str = "training") -> Path:
    items = load_datalist(datalist, split, required_keys=("image", "label"), allowed_labels=None, read_headers=False)
    classes = sorted({item["label"] for item in items})
    gt_key = next((k for k in GROUND_TRUTH_KEYS if any(k in item for item in items)), None)
    rows = []  # (title prefix, item, key)
    for label in classes:
        chosen = [item for item in items if item["label"] == label][:per_class]
        rows.append([(f"label {label}", item, "image") for item in chosen])
        if gt_key and label != classes[0]:
            rows.append([(f"{gt_key}", item, gt_key) for item in chosen])
    n_cols = max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.8 * n_cols, 1.9 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(row):
                continue
            title, item, key = row[c]
            view = middle_slice(np.asarray(nib.load(item[key]).dataobj))
            ax.imshow(view.T, cmap="gray" if key == "image" else "magma", origin="lower")
            extras = [f"{k}={item[k]:.3g}" if isinstance(item[k], float) else f"{k}={item[k]}" for k in scalar_keys if k in item]
            ax.set_title("\n".join([title, *extras]) if key == "image" else title, fontsize=7)
    fig.suptitle(f"{Path(datalist).parent.name}: {split} examples", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
