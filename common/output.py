"""Write maps back in the input file's space (NIfTI) and as a PNG overlay to look at.

``map_output_transforms`` is the post-processing every inference config uses:

    SaveOverlayd (PNG, on the network grid)  ->  Invertd (undo the pre-processing)
    ->  SaveMapd (MONAI ``SaveImage`` into a temporary name, then an atomic rename)

so ``<output_dir>/<input stem>_<key>.nii.gz`` has the input's shape and affine, and a run that
stops part-way never leaves a truncated NIfTI behind.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.config import KeysCollection  # noqa: E402
from monai.transforms import Compose, Invertd, MapTransform, SaveImage  # noqa: E402

from common.data.transforms import source_file  # noqa: E402

NIFTI_EXT = ".nii.gz"


def input_stem(image) -> str:
    """File name of the image's source without its NIfTI extension (``scan.nii.gz`` -> ``scan``)."""
    name = Path(source_file(image)).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x, dtype=np.float32)


def _display(slice_2d: np.ndarray) -> np.ndarray:
    # Array axes are (x, y) in RAS after Orientationd: show x to the right and y upwards.
    return np.rot90(slice_2d)


def save_overlay_png(
    image,
    attribution,
    path: str | os.PathLike,
    title: str | None = None,
    alpha: float = 0.6,
    signed: bool | None = None,
) -> Path:
    """Grey image with the map over it and a colour bar.

    2D: one panel. 3D: three orthogonal slices through the map's largest absolute value.
    ``signed`` chooses a diverging colour map centred on zero; by default it is used when the map
    has both signs. Arrays may carry a leading channel axis of size 1.
    """
    img = np.squeeze(_as_numpy(image))
    amap = np.squeeze(_as_numpy(attribution))
    if img.shape != amap.shape:
        raise ValueError(f"image shape {img.shape} and map shape {amap.shape} differ")
    if signed is None:
        signed = bool(amap.min() < 0 < amap.max())
    vmax = float(np.abs(amap).max()) or 1.0
    norm = dict(vmin=-vmax, vmax=vmax, cmap="coolwarm") if signed else dict(vmin=0.0, vmax=vmax, cmap="hot")
    if amap.ndim == 2:
        panels = [("", img, amap)]
    elif amap.ndim == 3:
        peak = np.unravel_index(int(np.argmax(np.abs(amap))), amap.shape)
        panels = [
            (f"sagittal x={peak[0]}", img[peak[0]], amap[peak[0]]),
            (f"coronal y={peak[1]}", img[:, peak[1]], amap[:, peak[1]]),
            (f"axial z={peak[2]}", img[:, :, peak[2]], amap[:, :, peak[2]]),
        ]
    else:
        raise ValueError(f"map has {amap.ndim} dimensions after squeezing; expected 2 or 3")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 0.8, 3.4), squeeze=False)
    for ax, (name, img_slice, map_slice) in zip(axes[0], panels):
        ax.imshow(_display(img_slice), cmap="gray")
        shown = np.ma.masked_where(np.abs(map_slice) < 1e-3 * vmax, map_slice)  # keep anatomy visible
        mappable = ax.imshow(_display(shown), alpha=alpha, **norm)
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    fig.colorbar(mappable, ax=axes[0].tolist(), shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path


class SaveOverlayd(MapTransform):
    """Write ``<output_dir>/<input stem>_<key>.png`` for each map key, over ``image_key``."""

    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike, image_key: str = "image"):
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.image_key = image_key

    def __call__(self, data):
        d = dict(data)
        stem = input_stem(d[self.image_key])
        for key in self.key_iterator(d):
            save_overlay_png(d[self.image_key], d[key], self.output_dir / f"{stem}_{key}.png", title=f"{stem}: {key}")
        return d


class SaveMapd(MapTransform):
    """Write each key as ``<output_dir>/<input stem>_<key>.nii.gz`` with MONAI ``SaveImage``.

    The file is written under a temporary name and renamed when complete (atomic on one file
    system), which ``SaveImaged`` alone does not do. Shape and affine come from the tensor's
    metadata, i.e. the input's own after ``Invertd``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        image_key: str = "image",
        dtype=np.float32,
        subdir_key: str | None = None,
    ):
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.image_key = image_key
        self.subdir_key = subdir_key  # an item field naming a sub-folder of output_dir (keeps input folders apart)
        self.saver = SaveImage(output_ext=NIFTI_EXT, output_dtype=dtype, resample=False, print_log=False)

    def __call__(self, data):
        d = dict(data)
        stem = input_stem(d[self.image_key])
        output_dir = self.output_dir / str(d[self.subdir_key]) if self.subdir_key else self.output_dir
        output_dir.mkdir(parents=True, exist_ok=True)
        for key in self.key_iterator(d):
            final = output_dir / f"{stem}_{key}{NIFTI_EXT}"
            partial = output_dir / f".{stem}_{key}.partial"
            try:
                self.saver(d[key], filename=str(partial))
                os.replace(f"{partial}{NIFTI_EXT}", final)
            finally:
                Path(f"{partial}{NIFTI_EXT}").unlink(missing_ok=True)
            d[f"{key}_file"] = str(final)
        return d


def map_output_transforms(
    preprocessing: Compose,
    map_keys: Sequence[str],
    output_dir: str | os.PathLike,
    image_key: str = "image",
    png: bool = True,
) -> Compose:
    """Post-processing that saves ``map_keys`` (computed on the network grid) in the input's space."""
    map_keys = list(map_keys)
    steps = [SaveOverlayd(map_keys, output_dir, image_key)] if png else []
    steps += [
        Invertd(keys=map_keys, transform=preprocessing, orig_keys=[image_key] * len(map_keys), nearest_interp=False),
        SaveMapd(map_keys, output_dir, image_key),
    ]
    return Compose(steps)


class SplitChannelsd(MapTransform):
    """Split a multi-channel prediction into named single-channel keys (``pred`` -> ``effect``, ...).

    The new keys keep the prediction's metadata, so ``Invertd`` can bring each back to the input space.
    """

    def __init__(self, key: str, names: Sequence[str]):
        super().__init__([key])
        self.names = list(names)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            if pred.shape[0] != len(self.names):
                raise ValueError(f"'{key}' has {pred.shape[0]} channels; expected {len(self.names)} ({self.names})")
            for i, name in enumerate(self.names):
                d[name] = pred[i : i + 1]
        return d
