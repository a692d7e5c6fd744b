"""MONAI transform chains shared by the bundles: load NIfTI, check it, bring it to the network grid.

Every spatial step is invertible, so a map computed on the network grid can be brought back to
the input file's own grid with ``Invertd`` (see :mod:`common.output`). The chain is:

    LoadImaged (nibabel) -> EnsureChannelFirstd -> CheckImaged -> Orientationd (RAS)
    -> [Spacingd] -> intensity scaling -> ResizeWithPadOrCropd | Resized (network size)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import NibabelReader
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Flipd,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandomizableTransform,
    Resized,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    SelectItemsd,
    Spacingd,
)

from common.errors import ImageFileError

AXCODES = {2: "RA", 3: "RAS"}
INTENSITY_MODES = ("none", "minmax", "range", "percentile", "zscore", "std")
RESIZE_MODES = ("pad_crop", "resize")


def source_file(image) -> str:
    """The file an image was loaded from, for error messages."""
    meta = getattr(image, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<in-memory image>"))


class LoadImageCheckedd(LoadImaged):
    """``LoadImaged`` with nibabel only, whose failures name the file and what was expected.

    MONAI's ``LoadImaged(reader="NibabelReader")`` falls back to the other registered readers
    when nibabel fails, and ITK silently zero-fills a truncated .nii.gz; passing the reader at
    call time restricts loading to nibabel, which raises on a truncated or corrupt file.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("reader", "NibabelReader")
        super().__init__(*args, **kwargs)
        self._nibabel = NibabelReader()

    def __call__(self, data, reader=None):
        try:
            return super().__call__(data, reader or self._nibabel)
        except Exception as err:
            files = [str(data.get(key)) for key in self.keys if key in data]
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            # nibabel ends a short read with "from <file name>", empty for a gzip stream
            first_line = first_line.removesuffix(" from ").rstrip()
            problem = "truncated or corrupt voxel data" if "bytes" in first_line else "cannot read image"
            raise ImageFileError(
                f"{', '.join(files)}: {problem} ({first_line}); expected a readable NIfTI file"
            ) from err


class CheckImaged(MapTransform):
    """Reject images the network cannot take: wrong dimensionality or channels, NaN/Inf, too small.

    Runs right after loading (channel-first), so the message names the file as the user gave it.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int,
        channels: int | None = 1,
        min_size: int | Sequence[int] | None = None,
        check_finite: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.min_size = None if min_size is None else np.broadcast_to(np.asarray(min_size), (spatial_dims,))
        self.check_finite = check_finite

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            name = source_file(image)
            spatial = tuple(image.shape[1:])
            if len(spatial) != self.spatial_dims:
                raise ImageFileError(
                    f"{name}: image has {len(spatial)} spatial dimensions (shape {tuple(image.shape)} channel-first); "
                    f"expected a {self.spatial_dims}D image"
                )
            if self.channels is not None and image.shape[0] != self.channels:
                # a 4D NIfTI (a series, or stacked modalities) loads with its last axis as channels
                raise ImageFileError(
                    f"{name}: image has {image.shape[0]} channels (shape {tuple(image.shape)} channel-first); "
                    f"expected {self.channels} (a single {self.spatial_dims}D image per file)"
                )
            if self.min_size is not None and any(s < m for s, m in zip(spatial, self.min_size)):
                raise ImageFileError(
                    f"{name}: image size {spatial} is smaller than the network minimum {tuple(self.min_size.tolist())}"
                )
            if self.check_finite and not bool(torch.isfinite(torch.as_tensor(image)).all()):
                raise ImageFileError(f"{name}: image contains NaN or Inf voxels; expected finite intensities")
        return d


def intensity_transform(keys: KeysCollection, mode: str = "minmax", a_min=None, a_max=None, b_min=-1.0, b_max=1.0):
    """One intensity step: ``minmax`` to [b_min, b_max], fixed ``range`` (e.g. CT HU), ``percentile`` (a_min / a_max
    are percentiles of each image, clipped outside), ``zscore``, ``std`` (divided by the image's standard deviation
    without subtracting its mean, so a zero background stays zero) or ``none``."""
    if mode == "none":
        return None
    if mode == "minmax":
        return ScaleIntensityd(keys, minv=b_min, maxv=b_max)
    if mode == "range":
        if a_min is None or a_max is None:
            raise ValueError("intensity mode 'range' needs a_min and a_max (e.g. CT window in HU)")
        return ScaleIntensityRanged(keys, a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=True)
    if mode == "percentile":
        if a_min is None or a_max is None:
            raise ValueError("intensity mode 'percentile' needs the lower and upper percentiles (e.g. 10 and 90)")
        return ScaleIntensityRangePercentilesd(keys, lower=a_min, upper=a_max, b_min=b_min, b_max=b_max, clip=True)
    if mode == "zscore":
        return NormalizeIntensityd(keys, nonzero=False)
    if mode == "std":
        return NormalizeIntensityd(keys, subtrahend=0.0, nonzero=False)
    raise ValueError(f"intensity mode '{mode}' is unknown; expected one of {INTENSITY_MODES}")


def _size_bound(min_size, spatial_size):
    """The part of ``min_size`` an image must meet before ``spatial_size`` pads or resizes it (``None``: none)."""
    if min_size is None or spatial_size is None:
        return min_size
    kept = [size is None or size <= 0 for size in spatial_size]
    if not any(kept):
        return None
    bound = np.broadcast_to(np.asarray(min_size), (len(spatial_size),))
    return [int(m) if keep else 0 for m, keep in zip(bound, kept)]


def image_transforms(
    spatial_dims: int,
    spatial_size: Sequence[int] | None,
    image_key: str = "image",
    map_keys: Sequence[str] = (),
    mask_keys: Sequence[str] = (),
    intensity: str = "minmax",
    a_min: float | None = None,
    a_max: float | None = None,
    pixdim: Sequence[float] | None = None,
    resize: str = "pad_crop",
    channels: int | None = 1,
    min_size: int | Sequence[int] | None = None,
    allow_missing_keys: bool = False,
    keep: Sequence[str] | None = None,
) -> Compose:
    """Load NIfTI image(s) and bring them to the network grid.

    Args:
        spatial_dims: 2 or 3.
        spatial_size: the network's input size; ``None`` keeps the image grid.
        image_key: the intensity image (scaled by ``intensity``).
        map_keys: continuous images on the same grid (ground-truth effect maps), resampled linearly.
        mask_keys: label images (lesion masks, region labels), resampled with nearest neighbour.
        intensity: ``minmax`` ([-1, 1]), ``range`` (``a_min``..``a_max`` -> [-1, 1], clipped), ``percentile``
            (the image's ``a_min``-th..``a_max``-th percentiles -> [-1, 1], clipped), ``zscore``, ``std`` (divided
            by the standard deviation, no mean subtracted: zero stays zero), ``none``.
        pixdim: resample to this voxel spacing first (``None``: keep the file's spacing).
        resize: ``pad_crop`` (keep resolution, centre pad/crop) or ``resize`` (interpolate to the size).
        channels: expected channel count of the image (``None``: any).
        min_size: smallest spatial size the network accepts; it binds only the axes that keep the image's own
            size (``spatial_size`` ``None``, or -1 on that axis), since the others are padded or resized to
            ``spatial_size``.
        keep: if given, only these keys (besides the images) stay in each item, so datalist items
            with different optional fields (e.g. ``offset`` on patients only) still batch together.
    """
    if spatial_dims not in AXCODES:
        raise ValueError(f"spatial_dims={spatial_dims}; expected 2 or 3")
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize '{resize}' is unknown; expected one of {RESIZE_MODES}")
    all_keys = [image_key, *map_keys, *mask_keys]
    interp = ["bilinear" if spatial_dims == 2 else "trilinear"] * (1 + len(map_keys)) + ["nearest"] * len(mask_keys)
    spacing_modes = ["bilinear"] * (1 + len(map_keys)) + ["nearest"] * len(mask_keys)
    miss = allow_missing_keys
    steps = [
        LoadImageCheckedd(all_keys, reader="NibabelReader", image_only=True, allow_missing_keys=miss),
        EnsureChannelFirstd(all_keys, allow_missing_keys=miss),
        CheckImaged(
            image_key, spatial_dims=spatial_dims, channels=channels, min_size=_size_bound(min_size, spatial_size)
        ),
        EnsureTyped(all_keys, dtype=torch.float32, allow_missing_keys=miss),
        Orientationd(all_keys, axcodes=AXCODES[spatial_dims], labels=None, allow_missing_keys=miss),
    ]
    if pixdim is not None:
        steps.append(Spacingd(all_keys, pixdim=pixdim, mode=spacing_modes, allow_missing_keys=miss))
    scale = intensity_transform(image_key, intensity, a_min=a_min, a_max=a_max)
    if scale is not None:
        steps.append(scale)
    if spatial_size is not None:
        if resize == "pad_crop":
            steps.append(ResizeWithPadOrCropd(all_keys, spatial_size=spatial_size, allow_missing_keys=miss))
        else:
            # anti_aliasing off: it is not invertible and blurs thin structures before a down-sample.
            steps.append(Resized(all_keys, spatial_size=spatial_size, mode=interp, allow_missing_keys=miss))
    if keep is not None:
        steps.append(SelectItemsd([*all_keys, *keep]))
    return Compose(steps)


class RandHemisphereFlipd(RandomizableTransform, MapTransform):
    """Mirror left and right (the first, RAS ``R`` axis) and swap the side-specific labels.

    A brain mirrored at the midline is still a brain, but a left lesion becomes a right one: with
    ACAT's classes (0 none, 1 left, 2 right, 3 both) the flip swaps labels 1 and 2. A plain
    ``RandFlipd`` would teach the classifier that the side does not matter.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str = "label",
        swap: Sequence[Sequence[int]] = ((1, 2),),
        prob: float = 0.5,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.flip = Flipd(keys, spatial_axis=0, allow_missing_keys=allow_missing_keys)
        self.label_key = label_key
        self.mapping = {}
        for a, b in swap:
            self.mapping[int(a)], self.mapping[int(b)] = int(b), int(a)

    def __call__(self, data):
        self.randomize(None)
        if not self._do_transform:
            return data
        d = self.flip(dict(data))
        if self.label_key in d:
            label = d[self.label_key]
            value = int(label.item() if isinstance(label, (torch.Tensor, np.ndarray)) else label)
            swapped = self.mapping.get(value, value)
            if isinstance(label, torch.Tensor):  # keep its type (MetaTensor or not): batches must collate
                label = label.clone()
                label.fill_(swapped)
                d[self.label_key] = label
            else:
                d[self.label_key] = type(label)(swapped)
        return d
