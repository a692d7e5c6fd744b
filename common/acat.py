"""ACAT pipeline pieces that sit between the networks and the bundle configs.

- :class:`SaliencyMaps`: one saliency method of the paper (counterfactual, latent shift, gradient,
  Grad-CAM) as a module ``volume -> map``, so a MONAI evaluator can run it like a network and
  ``Invertd`` can bring its maps back to the input's space.
- :func:`acat_from_baseline`: ACAT initialised from the trained baseline (paper appendix C).
- :class:`SaliencyDatalistWriter`: after the saliency stage, the datalist with a ``saliency`` map
  for every item of every split (the paper's Algorithm 1: ACAT trains on (x, S)).
- :class:`LocalisationTargetd`: the true territory and lesion of a stroke case for the localisation scores.
- :class:`ACATProbabilitiesd`: ACAT's class probabilities of one item from its image and saliency.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.data import MetaTensor
from monai.transforms import (
    MapTransform,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from torch import nn

from common.attribution import attribute
from common.attribution.counterfactual import (
    GRAD_CAM_CHANNEL_WEIGHTS,
    counterfactual_saliency,
    inside_window,
    latent_shift_saliency,
    normalise_per_sample,
    slice_grad_cam,
)
from common.data import SPLITS, load_datalist, read_datalist_json, write_datalist
from common.data.transforms import RandHemisphereFlipd
from common.errors import InputError

SALIENCY_METHODS = ("counterfactual", "latent_shift", "gradient", "grad_cam")


class SaliencyMaps(nn.Module):
    """``volume (B, 1, X, Y, S) -> saliency (B, 1, X, Y, S)`` of the baseline ``classifier``.

    ``counterfactual`` (paper Eq. 3-4) and ``latent_shift`` (Cohen et al.) also need the
    ``autoencoder``. ``comparator_target`` (a class index) is the class ``gradient`` and
    ``grad_cam`` explain and the one ``latent_shift`` moves towards; ``None``: the class the
    classifier predicts for each volume, which latent shift moves away from. ``grad_cam_weights`` is
    :func:`~common.attribution.counterfactual.slice_grad_cam`'s ``channel_weights``.
    Every map is non-negative and normalised to [0, 1] per volume, as ACAT's saliency input is.
    ``tissue_only``: every method's map is zero outside the intensity window (air and bone of a
    windowed CT, see :func:`common.attribution.counterfactual.inside_window`), where no lesion can
    be and where the counterfactual differences otherwise peak on the skull's edges.
    Gradients are switched on inside ``forward`` because MONAI evaluators run networks under
    ``torch.no_grad``.
    """

    def __init__(
        self,
        classifier: nn.Module,
        autoencoder: nn.Module | None = None,
        method: str = "counterfactual",
        alpha: float = 100.0,
        steps: int = 20,
        step_size: float = 0.1,
        targets: Sequence[int] | None = None,
        tissue_only: bool = True,
        comparator_target: int | None = None,
        grad_cam_weights: str = "half_slice",
    ):
        super().__init__()
        if method not in SALIENCY_METHODS:
            raise ValueError(f"saliency method '{method}' is unknown; expected one of {SALIENCY_METHODS}")
        if grad_cam_weights not in GRAD_CAM_CHANNEL_WEIGHTS:
            expected = f"expected one of {GRAD_CAM_CHANNEL_WEIGHTS}"
            raise ValueError(f"grad_cam_weights='{grad_cam_weights}' is unknown; {expected}")
        if method in ("counterfactual", "latent_shift") and autoencoder is None:
            raise ValueError(f"saliency method '{method}' needs the autoencoder")
        self.classifier = classifier
        self.autoencoder = autoencoder
        self.method = method
        self.tissue_only = tissue_only
        self.comparator_target = comparator_target
        self.grad_cam_weights = grad_cam_weights
        self.counterfactual_kwargs = {
            "alpha": alpha,
            "steps": steps,
            "step_size": step_size,
            "targets": None if targets is None else list(targets),
        }

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        maps = self._maps(torch.as_tensor(volume).as_subclass(torch.Tensor))
        if isinstance(volume, MetaTensor):  # keep the input's metadata, so Invertd finds its space
            maps = MetaTensor(maps)
            maps.copy_meta_from(volume)
        return maps

    def _maps(self, volume: torch.Tensor) -> torch.Tensor:
        self.classifier.eval()
        if self.autoencoder is not None:
            self.autoencoder.eval()
        region = inside_window(volume) if self.tissue_only else None
        with torch.enable_grad():
            if self.method == "counterfactual":
                return counterfactual_saliency(
                    self.classifier, self.autoencoder, volume, region=region, **self.counterfactual_kwargs
                )
            if self.method == "latent_shift":
                return latent_shift_saliency(
                    self.classifier, self.autoencoder, volume, region=region, towards_class=self.comparator_target
                )
            if self.comparator_target is None:
                with torch.no_grad():
                    target = self.classifier(volume).argmax(dim=1)
            else:
                target = self.comparator_target
            if self.method == "gradient":
                raw = attribute(self.classifier, volume, "gradient", target_class=target).abs()
            else:
                raw = slice_grad_cam(self.classifier, volume, target, channel_weights=self.grad_cam_weights)
        raw = raw.detach()
        return normalise_per_sample(raw if region is None else raw * region)


def training_augmentation(map_keys: Sequence[str] = (), hemisphere_flip: float = 0.5, image_key: str = "image") -> list:
    """The random transforms of the baseline and of ACAT, so both models see the same augmentation.

    A mirrored hemisphere (labels 1/2 swapped), a small in-plane affine (rotation 0.1 rad,
    translation 3 voxels, scale 5%), Gaussian noise (sd 0.05, 2 HU in the 0-80 HU window) and
    intensity scale and shift. The spatial ones move ``map_keys`` (ACAT's saliency map) with the
    image. Without the affine and the noise, two of three seeds memorised the 279 training volumes
    (training loss 0.1) at chance validation accuracy (docs/README.md, calibration).
    """
    spatial = [image_key, *map_keys]
    return [
        RandHemisphereFlipd(spatial, prob=hemisphere_flip),
        RandAffined(
            spatial,
            prob=0.5,
            rotate_range=(0.0, 0.0, 0.1),
            translate_range=(3, 3, 0),
            scale_range=(0.05, 0.05, 0.0),
            padding_mode="border",  # the window maps air to -1; zero padding would add mid-grey tissue
        ),
        RandGaussianNoised(image_key, prob=0.5, std=0.05),
        RandScaleIntensityd(image_key, factors=0.05, prob=0.5),
        RandShiftIntensityd(image_key, offsets=0.05, prob=0.5),
    ]


def acat_from_baseline(
    acat: nn.Module, baseline: nn.Module, checkpoint: str, device=None, gate_bias: float | None = None
) -> nn.Module:
    """``acat`` with both branches and the head initialised from the baseline's weights in ``checkpoint``
    (``gate_bias``: see :meth:`common.networks.ACATClassifier.load_baseline`)."""
    if not Path(checkpoint).is_file():
        raise InputError(
            f"{checkpoint}: baseline classifier not found; expected the output of train_classifier.json "
            "(ACAT is fine-tuned from the baseline)"
        )
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    baseline.load_state_dict(state.get("classifier", state) if isinstance(state, dict) else state)
    acat.load_baseline(baseline, gate_bias=gate_bias)
    return acat.to(device) if device is not None else acat


def fine_tuning_groups(acat: nn.Module, learning_rate: float, added_learning_rate: float | None = None) -> list[dict]:
    """Optimiser parameter groups: the baseline's parameters at ``learning_rate``, the modules ACAT adds at
    ``added_learning_rate`` (default: the same)."""
    added = acat.added_parameters()
    ids = {id(p) for p in added}
    rest = [p for p in acat.parameters() if id(p) not in ids]
    rate = learning_rate if added_learning_rate is None else added_learning_rate
    return [{"params": rest, "lr": learning_rate}, {"params": added, "lr": rate}]


def all_items(datalist: str, dataset_dir: str | None, num_classes: int) -> list[dict]:
    """Every item of every split, each tagged with ``split`` and ``index`` (its place in the datalist)."""
    content = read_datalist_json(datalist)
    items = []
    for split in SPLITS:
        if not content.get(split):
            continue
        for index, item in enumerate(
            load_datalist(datalist, split, dataset_dir=dataset_dir, allowed_labels=range(num_classes))
        ):
            items.append(
                {
                    **item,
                    "split": split,
                    "index": index,
                    "subdir": item_subdir(item, dataset_dir or Path(datalist).parent),
                }
            )
    return items


class SaliencyDatalistWriter:
    """At the end of the saliency run, write ``out_file``: the datalist with ``key`` on every item.

    The map paths are written relative to ``dataset_dir`` (the maps live next to the data), all
    other fields exactly as in the source datalist. Fails, writing nothing, if an item got no map.
    """

    def __init__(self, datalist: str, dataset_dir: str, out_file: str, key: str = "saliency"):
        self.datalist = datalist
        self.dataset_dir = Path(dataset_dir)
        self.out_file = out_file
        self.key = key
        self.written: dict[tuple[str, int], str] = {}

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine) -> None:
        for batch_item, output_item in zip(engine.state.batch, engine.state.output):
            path = output_item[f"{self.key}_file"]
            self.written[(str(batch_item["split"]), int(batch_item["index"]))] = path

    def _write(self, engine) -> None:
        content = read_datalist_json(self.datalist)
        out = {}
        for split, items in content.items():
            if split not in SPLITS or not isinstance(items, list):
                out[split] = items
                continue
            rows = []
            for index, item in enumerate(items):
                path = self.written.get((split, index))
                if path is None:
                    raise RuntimeError(f"{self.datalist}: {split}[{index}] got no saliency map; the run was incomplete")
                rows.append({**item, self.key: os.path.relpath(path, self.dataset_dir)})
            out[split] = rows
        Path(self.out_file).parent.mkdir(parents=True, exist_ok=True)
        write_datalist(self.out_file, out)


def item_subdir(item: dict, dataset_dir: str, image_key: str = "image") -> str:
    """The image's folder relative to ``dataset_dir`` ('' outside it), so maps of files with the same
    name in different folders (``sub-01/ct.nii.gz``, ``sub-02/ct.nii.gz``) do not collide."""
    folder = Path(item[image_key]).resolve().parent
    try:
        return str(folder.relative_to(Path(dataset_dir).resolve()))
    except ValueError:
        return ""


class LocalisationTargetd(MapTransform):
    """``output_key`` = region + 2 * lesion: the ground truth of both localisation scores in one map.

    ``region`` is 1 where the ``regions`` label image holds one of the item's ``region`` indices
    (ACAT section 4.4 counts a hit when the saliency maximum lies in the lesion's territory, of 6);
    ``lesion`` is the lesion ``mask`` (appendix H: top-p IoU/Dice). One map keeps the evaluator's
    single ``target`` and shows both in the report's figure; :func:`localisation_output` splits it.
    """

    def __init__(
        self,
        regions_key: str = "regions",
        mask_key: str = "mask",
        region_key: str = "region",
        output_key: str = "localisation_target",
    ):
        super().__init__([regions_key, mask_key])
        self.regions_key, self.mask_key = regions_key, mask_key
        self.region_key = region_key
        self.output_key = output_key

    def __call__(self, data):
        d = dict(data)
        # popped: a list of 1 or 2 territories per case would not batch
        wanted = torch.as_tensor(np.asarray(d.pop(self.region_key), dtype=np.int64).reshape(-1))
        labels = torch.as_tensor(d[self.regions_key]).as_subclass(torch.Tensor).round().long()
        region = torch.isin(labels, wanted).float()
        lesion = (torch.as_tensor(d[self.mask_key]).as_subclass(torch.Tensor) > 0.5).float()
        d[self.output_key] = region + 2.0 * lesion
        return d


def localisation_output(method: str, part: str):
    """``output_transform`` for a localisation metric: (map of ``method``, ``region`` or ``lesion`` mask)."""
    if part not in ("region", "lesion"):
        raise ValueError(f"part '{part}' is unknown; expected region or lesion")

    def transform(output):
        target = output["target"].round().long()
        truth = (target % 2 == 1) if part == "region" else (target >= 2)
        return output[f"map_{method}"], truth.float()

    return transform


def classification_metrics(prefix: str, class_names: Sequence[str]) -> dict:
    """Accuracy over all classes, then each class's sensitivity and specificity (one-vs-rest)."""
    from monai.handlers import from_engine

    from common.handlers import ClassificationRate

    rates = {
        f"{prefix}_accuracy": ClassificationRate(
            "accuracy", positive=None, output_transform=from_engine(["pred", "label"])
        )
    }
    for k, name in enumerate(class_names):
        for column, rate in (("sensitivity", "tpr"), ("specificity", "tnr")):
            rates[f"{prefix}_{column}_{name}"] = ClassificationRate(
                rate, positive=k, output_transform=from_engine(["pred", "label"])
            )
    return rates


def classification_columns(prefix: str, class_names: Sequence[str]) -> dict:
    """The report's {column: metric name} of :func:`classification_metrics`."""
    columns = {"Accuracy": f"{prefix}_accuracy"}
    for name in class_names:
        columns[f"Sens {name}"] = f"{prefix}_sensitivity_{name}"
        columns[f"Spec {name}"] = f"{prefix}_specificity_{name}"
    return columns


class ACATProbabilitiesd(MapTransform):
    """``output_key``: ACAT's class probabilities (softmax) for one item's image and saliency."""

    def __init__(
        self,
        network: nn.Module,
        image_key: str = "image",
        saliency_key: str = "pred",
        output_key: str = "probabilities",
    ):
        super().__init__([image_key])
        self.network = network
        self.image_key = image_key
        self.saliency_key = saliency_key
        self.output_key = output_key

    def __call__(self, data):
        d = dict(data)
        self.network.eval()
        image = torch.as_tensor(d[self.image_key]).as_subclass(torch.Tensor)[None]
        saliency = torch.as_tensor(d[self.saliency_key]).as_subclass(torch.Tensor)[None].to(image.device)
        with torch.no_grad():
            d[self.output_key] = torch.softmax(self.network(image, saliency), dim=1)[0]
        return d
