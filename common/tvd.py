"""Config glue of the TVD-score bundle (``bundles/tvd_score``): the pieces its JSON configs wire together.

The bundle trains three networks (the classifier under study, the feature regressor g, a diffusion model)
and then scores, for every feature in ``features``, how much of the classifier's prediction variance the
feature explains (Jin, Zhu & Fletcher, MIDL 2025). The method itself lives in :mod:`common.diffusion`
(guided sampling, conditional predictions, scores, coverage) and :mod:`common.metrics.tvd`; what is here
exists because a config expression must stay one line:

- the data: items checked for numeric feature values (:func:`load_items`), the training split's feature
  mean / sd saved next to the regressor (:func:`write_feature_statistics`; the rejection rule is in units
  of the feature's sd and the regressor learns standardised targets), the targets (:func:`with_targets`);
- the networks as the callables :mod:`common.diffusion` expects: the predicted class, one feature of the
  regressor in standardised or original units, an embedding for coverage (``nn.Module`` wrappers, so
  that :func:`common.networks.modes.frozen` finds the networks behind them);
- :class:`FeatureSampler`, the ``sample_fn`` closure around :func:`common.diffusion.guided_sample`: the
  target value v arrives in the feature's own units and guidance uses (v - mean) / sd against the
  regressor's standardised output;
- :func:`feature_values`: the values v taken from the test split (evenly spaced quantiles or a seeded draw);
- the report: scores that survive a feature whose samples were all rejected, coverage restricted to the k
  the test set allows, and the JSON / markdown / PNG outputs written atomically.

Latent diffusion (a 3D preset): ``sample_shape`` is the latent shape and ``decode`` maps latents to images;
:class:`FeatureSampler` passes ``decode`` to ``guided_sample`` (the gradient flows through it) and returns
decoded images, so everything downstream (rejection, classifier, embeddings) sees images either way.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.handlers import from_engine
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from monai.transforms import Compose, EnsureTyped
from monai.transforms.utils_morphological_ops import dilate
from monai.utils import convert_to_tensor
from torch import nn

from common.data import SPLITS, load_datalist
from common.data.transforms import image_transforms
from common.diffusion import feature_scores, guided_sample, plot_local_scores, sample_coverage, scores_markdown
from common.diffusion.evaluation import ConditionalPredictions
from common.errors import DatalistError, InputError
from common.files import write_text_atomic
from common.metrics.tvd import binned_tvd_score, global_tvd_score
from common.networks.modes import frozen, modules_of

logger = logging.getLogger(__name__)

SAMPLERS = ("ddim", "ddpm")
VALUE_SELECTIONS = ("quantiles", "random")
EMBEDDINGS = ("classifier", "regressor", "pixels")


# --- data --------------------------------------------------------------------------------------------------


def load_items(
    datalist: str | os.PathLike,
    split: str,
    features: Sequence[str],
    dataset_dir: str | os.PathLike | None = None,
    num_classes: int = 2,
) -> list[dict]:
    """One split of the datalist, every item checked to carry a finite number for each feature.

    The regressor, the rejection rule and the choice of the values v all need the feature values, so a
    missing or non-numeric one stops here with the item named rather than deep inside training.
    """
    items = load_datalist(datalist, split, dataset_dir=dataset_dir, allowed_labels=range(num_classes))
    for index, item in enumerate(items):
        for feature in features:
            value = item.get(feature)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                problem = "missing" if feature not in item else f"{value!r} is not a finite number"
                raise DatalistError(
                    f"{datalist}: {split}[{index}] ({item['image']}): feature '{feature}' {problem}; "
                    f"expected a number for every feature in {list(features)}"
                )
    return items


@dataclass
class FeatureStatistics:
    """Mean and sd of each feature over the regressor's training split, in the regressor's output order."""

    features: list[str]
    mean: list[float]
    sd: list[float]
    n: int

    def index(self, feature: str) -> int:
        if feature not in self.features:
            raise InputError(
                f"feature '{feature}' is not one the regressor was trained for ({self.features}); "
                "retrain the regressor with it in --features"
            )
        return self.features.index(feature)

    def mean_of(self, feature: str) -> float:
        return self.mean[self.index(feature)]

    def sd_of(self, feature: str) -> float:
        return self.sd[self.index(feature)]


def feature_statistics(items: Sequence[Mapping], features: Sequence[str]) -> FeatureStatistics:
    """Mean and sample sd (ddof=1) of each feature over ``items``; a constant feature is an error."""
    if len(items) < 2:
        raise InputError(f"feature statistics need at least 2 items, got {len(items)}")
    values = np.array([[float(item[f]) for f in features] for item in items], dtype=np.float64)
    mean, sd = values.mean(axis=0), values.std(axis=0, ddof=1)
    constant = [f for f, s in zip(features, sd) if not s > 0]
    if constant:
        raise InputError(f"feature(s) {constant} are constant over the training split; expected varying values")
    return FeatureStatistics(list(features), mean.tolist(), sd.tolist(), len(items))


def write_feature_statistics(path: str | os.PathLike, items: Sequence[Mapping], features: Sequence[str]):
    """The training split's :func:`feature_statistics`, also saved as JSON next to the regressor's weights.

    The regressor learns (v - mean) / sd, so its output means nothing without these numbers; the evaluation
    reads them back for the guidance target and the rejection rule (tolerance x sd).
    """
    stats = feature_statistics(items, features)
    write_text_atomic(path, json.dumps(asdict(stats), indent=1) + "\n")
    return stats


def read_feature_statistics(path: str | os.PathLike, features: Sequence[str] | None = None) -> FeatureStatistics:
    """The statistics saved by :func:`write_feature_statistics`; ``features`` must all be among them."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: feature statistics not found; expected the output of train_regressor.json")
    stats = FeatureStatistics(**json.loads(path.read_text()))
    for feature in features or ():
        stats.index(feature)
    return stats


def with_targets(items: Sequence[Mapping], features: Sequence[str], stats: FeatureStatistics, key: str = "target"):
    """Items with ``key`` = the standardised feature values [(v_f - mean_f) / sd_f for f in features]."""
    index = [stats.index(f) for f in features]
    return [
        {**item, key: [(float(item[f]) - stats.mean[i]) / stats.sd[i] for f, i in zip(features, index)]}
        for item in items
    ]


def preprocessing(
    spatial_dims: int,
    spatial_size: Sequence[int] | None,
    intensity: str = "range",
    intensity_range: Sequence[float] = (0.0, 1.0),
    resize: str = "pad_crop",
    target_key: str | None = None,
    mask_key: str | None = None,
    label: bool = True,
) -> Compose:
    """Load, check and scale the image to [-1, 1] (the diffusion model's range, used by all three networks).

    The classifier and the regressor see the same space as the diffusion samples, so the guidance and the
    classification of generated samples need no conversion. ``target_key``: also keep the regressor target;
    ``mask_key``: also load that label image on the same grid (a region feature's mask).
    ``intensity="percentile"``: ``intensity_range`` are percentiles (paper: 10th and 90th). ``label=False``: a
    new image at inference, without a label.
    """
    keep = (["label"] if label else []) + ([target_key] if target_key else [])
    steps = [
        image_transforms(
            spatial_dims,
            spatial_size,
            mask_keys=[mask_key] if mask_key else (),
            intensity=intensity,
            a_min=intensity_range[0],
            a_max=intensity_range[1],
            resize=resize,
            keep=keep,
        ),
    ]
    if label:
        steps.append(EnsureTyped("label", dtype=torch.long))
    if target_key:
        steps.append(EnsureTyped(target_key, dtype=torch.float32))
    # Flat: a nested Compose counts as random for CacheDataset, which would then cache nothing.
    return Compose(steps).flatten()


def describe_dataset(load: Callable[[str], list[dict]], features: Sequence[str], class_names: Sequence[str]) -> dict:
    """Items per split and class, and each feature's mean / sd / range per split (logged and returned).

    What ``train.json`` run on its own does: it makes the synthetic default on first use (through
    ``load``) and checks that every item carries the features, before any training stage.
    """
    summary = {}
    for split in SPLITS:
        items = load(split)
        labels = np.array([item["label"] for item in items])
        counts = {
            str(class_names[c]) if c < len(class_names) else str(c): int((labels == c).sum()) for c in set(labels)
        }
        stats = {}
        for feature in features:
            v = np.array([float(item[feature]) for item in items])
            stats[feature] = {
                "mean": float(v.mean()),
                "sd": float(v.std()),
                "min": float(v.min()),
                "max": float(v.max()),
            }
        summary[split] = {"n": len(items), "classes": counts, "features": stats}
        logger.info("%s: %d items %s; %s", split, len(items), counts, stats)
    return summary


# --- networks as the callables common.diffusion expects ------------------------------------------------------


def load_network(network: nn.Module, checkpoint: str | os.PathLike, key: str, device=None) -> nn.Module:
    """``network`` with the weights of a stage's checkpoint (``weights_only=True``), in eval mode on ``device``.

    Accepts both a bare state dict and ``{key: state dict}`` (what ignite's checkpointing writes).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise InputError(
            f"{path}: {key} checkpoint not found; expected the output of the bundle's '{key}' stage "
            f"(python -m common.pipeline bundles/tvd_score --stages {key})"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get(key), dict):
        state = state[key]
    network.load_state_dict(state)
    if device is not None:
        network = network.to(device)
    return network.eval()


class PredictedClass(nn.Module):
    """The classifier's predicted class (argmax of the logits): Y of the TVD score."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images).argmax(dim=1)


class ReconstructedClass(nn.Module):
    """The classifier's class of the autoencoder's reconstruction, ``classify(decode(encode(x)))``. On the real
    test split, against the class of the image itself, it shows whether the latent space keeps what the
    classifier uses: a latent diffusion model cannot draw samples of a class its autoencoder cannot represent."""

    def __init__(self, classify: nn.Module, encode: nn.Module, decode: nn.Module):
        super().__init__()
        self.classify, self.encode, self.decode = classify, encode, decode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classify(self.decode(self.encode(images)))


class FeatureOutput(nn.Module):
    """One feature from the regressor: ``regressor(x)[:, index] * sd + mean``.

    With ``mean=0, sd=1`` it is the standardised output the guidance differentiates (the target is then
    (v - mean) / sd); with the training statistics it is g(x) in the feature's own units, for the rejection.
    """

    def __init__(self, regressor: nn.Module, index: int, mean: float = 0.0, sd: float = 1.0):
        super().__init__()
        self.regressor = regressor
        self.index = int(index)
        self.mean = float(mean)
        self.sd = float(sd)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.regressor(images)[:, self.index] * self.sd + self.mean


class FeatureOutputs(nn.Module):
    """Every feature of the regressor in its own units, (B, k) in ``features`` order."""

    def __init__(self, regressor: nn.Module, stats: FeatureStatistics, features: Sequence[str]):
        super().__init__()
        self.regressor = regressor
        index = [stats.index(f) for f in features]
        self.register_buffer("index", torch.tensor(index, dtype=torch.long), persistent=False)
        self.register_buffer("mean", torch.tensor([stats.mean[i] for i in index]), persistent=False)
        self.register_buffer("sd", torch.tensor([stats.sd[i] for i in index]), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.regressor(images)[:, self.index.to(images.device)]
        return out * self.sd.to(out) + self.mean.to(out)


def feature_output(regressor: nn.Module, stats: FeatureStatistics, feature: str, standardised: bool) -> FeatureOutput:
    """:class:`FeatureOutput` of ``feature``: standardised (guidance) or in the feature's units (rejection)."""
    i = stats.index(feature)
    return FeatureOutput(regressor, i) if standardised else FeatureOutput(regressor, i, stats.mean[i], stats.sd[i])


class _Embed(nn.Module):
    def __init__(self, network: nn.Module | None):
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.network is None:
            return images.flatten(1)
        return self.network.embed(images)


def embedding(kind: str, classifier: nn.Module | None = None, regressor: nn.Module | None = None) -> nn.Module:
    """The embedding the coverage is measured in (the paper used VGG16 features for the ellipses).

    ``classifier`` (default): the classifier's penultimate layer, a learned space that exists for 2D and 3D
    inputs without a download; ``regressor``: the regressor's penultimate layer; ``pixels``: the flattened
    image (L2 in pixel space, dominated by position for the ellipses).
    """
    if kind not in EMBEDDINGS:
        raise InputError(f"coverage_embedding '{kind}' is unknown; expected one of {list(EMBEDDINGS)}")
    network = {"classifier": classifier, "regressor": regressor, "pixels": None}[kind]
    if kind != "pixels" and not hasattr(network, "embed"):
        raise InputError(f"coverage_embedding '{kind}': the {kind} has no embed() method (penultimate features)")
    return _Embed(network)


# --- sampling ------------------------------------------------------------------------------------------------


def sampling_scheduler(
    sampler: str,
    num_train_timesteps: int = 1000,
    schedule: str = "linear_beta",
    beta_start: float = 0.0015,
    beta_end: float = 0.0205,
    clip_sample: bool = True,
):
    """MONAI's ``DDIMScheduler`` (``sampler="ddim"``) or ``DDPMScheduler`` (``"ddpm"``, the paper's) on the schedule."""
    kwargs = dict(schedule=schedule, clip_sample=clip_sample, beta_start=beta_start, beta_end=beta_end)
    if sampler == "ddim":
        return DDIMScheduler(num_train_timesteps, **kwargs)
    if sampler == "ddpm":
        return DDPMScheduler(num_train_timesteps, **kwargs)
    raise InputError(f"sampler '{sampler}' is unknown; expected one of {list(SAMPLERS)}")


def seeded_generator(device, seed: int) -> torch.Generator:
    """A torch generator on ``device`` (the samplers draw their noise there) seeded with ``seed``."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


class FeatureSampler:
    """``sample_fn(n, target, generator) -> images`` of :func:`common.diffusion.conditional_predictions`.

    Draws ``n`` samples with :func:`common.diffusion.guided_sample`, guided towards the feature value in
    ``target`` (given in the feature's own units, one per sample): the guidance compares ``guide`` (the
    regressor's *standardised* output of the feature) with (target - mean) / sd, so rho acts on the same
    scale for every feature. ``guide=None`` (or ``target=None``) gives plain, unguided samples.

    Args:
        model: the eps-predicting diffusion network.
        scheduler: MONAI ``DDPMScheduler`` or ``DDIMScheduler`` (see :func:`sampling_scheduler`).
        sample_shape: (C, *spatial) of one sample in the diffusion space (latents for latent diffusion).
        guide: images -> (B,) standardised feature (:func:`feature_output` with ``standardised=True``).
        mean, sd: the feature's training statistics.
        rho: guidance step (paper: 0.1 for the ellipse features), a float or ``rho(t)``.
        rho_per_train_step: rho is per training timestep, as the paper's (scaled by T / steps when sampling
            with fewer steps, see :func:`common.diffusion.guided_sample`); False: per sampling step.
        num_inference_steps: steps of the sampler (DDIM: e.g. 50; DDPM: T).
        eta: DDIM noise weight.
        decode: latents -> images (latent diffusion); None in pixel space.
        device: where to sample.
        amp: the networks in bfloat16 autocast while sampling (:func:`common.diffusion.guided_step`).
    """

    def __init__(
        self,
        model: nn.Module,
        scheduler,
        sample_shape: Sequence[int],
        guide: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mean: float = 0.0,
        sd: float = 1.0,
        rho: float | Callable[[int], float] = 0.1,
        num_inference_steps: int | None = None,
        eta: float = 0.0,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device=None,
        rho_per_train_step: bool = True,
        amp: bool = False,
    ):
        if not sd > 0:
            raise ValueError(f"sd={sd}; expected the feature's (positive) standard deviation")
        self.model = model
        self.scheduler = scheduler
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.guide = guide
        self.mean = float(mean)
        self.sd = float(sd)
        self.rho = rho
        self.num_inference_steps = None if num_inference_steps is None else int(num_inference_steps)
        self.eta = float(eta)
        self.decode = decode
        self.device = torch.device(device) if device is not None else None
        self.rho_per_train_step = bool(rho_per_train_step)
        self.amp = bool(amp)

    def standardise(self, target: torch.Tensor | float) -> torch.Tensor:
        """(v - mean) / sd: the guidance target c0 in the regressor's standardised units."""
        return (torch.as_tensor(target, dtype=torch.float32) - self.mean) / self.sd

    def __call__(self, n: int, target: torch.Tensor | None = None, generator: torch.Generator | None = None):
        guided = self.guide is not None and target is not None
        c0 = self.standardise(target).to(self.device) if guided else None
        samples = guided_sample(
            self.model,
            self.scheduler,
            (int(n), *self.sample_shape),
            feature_fn=self.guide if guided else None,
            target=c0,
            rho=self.rho if guided else 0.0,
            decode=self.decode,
            num_inference_steps=self.num_inference_steps,
            eta=self.eta,
            generator=generator,
            device=self.device,
            rho_per_train_step=self.rho_per_train_step,
            amp=self.amp,
        )
        if self.decode is not None:
            with torch.no_grad(), frozen(*modules_of(self.decode)):
                samples = self.decode(samples)
        return samples


def feature_sampler(
    model: nn.Module,
    scheduler,
    sample_shape: Sequence[int],
    regressor: nn.Module | None = None,
    stats: FeatureStatistics | None = None,
    feature: str | None = None,
    **kwargs,
) -> FeatureSampler:
    """:class:`FeatureSampler` guided by ``feature`` of the regressor (``feature=None``: unguided)."""
    if feature is None:
        return FeatureSampler(model, scheduler, sample_shape, **kwargs)
    if regressor is None or stats is None:
        raise ValueError("a guided sampler needs the regressor and its feature statistics")
    guide = feature_output(regressor, stats, feature, standardised=True)
    return FeatureSampler(
        model, scheduler, sample_shape, guide=guide, mean=stats.mean_of(feature), sd=stats.sd_of(feature), **kwargs
    )


class RegionSampler:
    """``sample_fn(n, target, generator)`` of a *region* feature (the paper's "hippocampus", section 4.3): samples
    that keep one test item's region (its mask dilated by ``dilation`` voxels, paper: 2) while the rest varies.

    ``target`` holds the position of the item in ``regions`` (the same for the whole call). Two ways to constrain:

    - ``"guidance"`` (the paper's, Table 9: rho 0.4): DPS guidance (Eq. 8) with g(x) = M * x and c0 = M * x_known,
      the masked image compared in image space through the decoder; no rejection (no sd for a region).
    - ``"replace"``: the region is replaced at every step by the known image noised to that step's level
      (RePaint without resampling, :func:`common.diffusion.guided_step`); in latent space the known latent is
      the item's encoded posterior mean and the region is every latent cell the image region touches.

    Args:
        regions: ``[(image, mask)]`` per test item, each (C, *spatial) in image space (the preprocessing's output).
        encode: images -> scaled latents (latent diffusion, ``"replace"``); ``decode``: the inverse (both
            None in pixel space).
        Other arguments as :class:`FeatureSampler`.
    """

    MODES = ("guidance", "replace")

    def __init__(
        self,
        model: nn.Module,
        scheduler,
        sample_shape: Sequence[int],
        regions: Sequence[tuple[torch.Tensor, torch.Tensor]],
        mode: str = "guidance",
        rho: float | Callable[[int], float] = 0.4,
        dilation: int = 2,
        num_inference_steps: int | None = None,
        eta: float = 0.0,
        encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device=None,
        rho_per_train_step: bool = True,
        amp: bool = False,
    ):
        if mode not in self.MODES:
            raise InputError(f"region_mode '{mode}' is unknown; expected one of {list(self.MODES)}")
        if mode == "replace" and (encode is None) != (decode is None):
            raise ValueError("latent region replacement needs both encode and decode")
        self.model = model
        self.scheduler = scheduler
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.regions = list(regions)
        self.mode = mode
        self.rho = rho
        self.dilation = int(dilation)
        self.num_inference_steps = None if num_inference_steps is None else int(num_inference_steps)
        self.eta = float(eta)
        self.encode = encode
        self.decode = decode
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.rho_per_train_step = bool(rho_per_train_step)
        self.amp = bool(amp)

    def region(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(known image (1, C, *S), dilated mask (1, 1, *S)) of item ``index``, on the sampling device."""
        if not 0 <= index < len(self.regions):
            raise IndexError(f"region {index} of {len(self.regions)}")
        image, mask = self.regions[index]
        image = convert_to_tensor(image, track_meta=False).float().unsqueeze(0).to(self.device)
        mask = (convert_to_tensor(mask, track_meta=False).float().unsqueeze(0)[:, :1] > 0.5).float().to(self.device)
        return image, (dilate(mask, 2 * self.dilation + 1) if self.dilation > 0 else mask)

    def __call__(self, n: int, target: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        index = int(torch.as_tensor(target).reshape(-1)[0].round())
        image, mask = self.region(index)
        kwargs: dict[str, Any] = dict(
            num_inference_steps=self.num_inference_steps,
            eta=self.eta,
            generator=generator,
            device=self.device,
            amp=self.amp,
        )
        if self.mode == "guidance":
            known = (image * mask).flatten(1)
            samples = guided_sample(
                self.model,
                self.scheduler,
                (int(n), *self.sample_shape),
                feature_fn=_MaskedImage(mask),
                target=known.expand(int(n), -1),
                rho=self.rho,
                decode=self.decode,
                rho_per_train_step=self.rho_per_train_step,
                **kwargs,
            )
        else:
            region_image, region = image, mask
            if self.encode is not None:
                with torch.no_grad(), frozen(*modules_of(self.encode)):
                    region_image = self.encode(image)
                factor = image.shape[2] // region_image.shape[2]
                pool = torch.nn.functional.max_pool3d if mask.ndim == 5 else torch.nn.functional.max_pool2d
                region = pool(mask, kernel_size=factor, stride=factor) if factor > 1 else mask
            samples = guided_sample(
                self.model,
                self.scheduler,
                (int(n), *self.sample_shape),
                region=region,
                region_image=region_image,
                **kwargs,
            )
        if self.decode is not None:
            with torch.no_grad(), frozen(*modules_of(self.decode)):
                samples = self.decode(samples)
        return samples


class _MaskedImage(nn.Module):
    """g(x) = M * x, flattened: the "feature" of a region constraint by guidance."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images * self.mask).flatten(1)


def load_regions(items: Sequence[Mapping], indices: Sequence[int], transform, mask_key: str = "mask") -> list:
    """``[(image, mask)]`` of the test items at ``indices`` through ``transform`` (which loads ``mask_key``)."""
    regions = []
    for i in indices:
        item = items[int(i)]
        if not item.get(mask_key):
            raise DatalistError(
                f"test item {int(i)} ({item.get('image')}): no '{mask_key}'; a region feature needs a mask per item"
            )
        data = transform(dict(item))
        regions.append((data["image"], data[mask_key]))
    return regions


def region_values(
    items: Sequence[Mapping], feature: str, order_feature: str, n_values: int, selection: str = "quantiles", seed=0
) -> FeatureValues:
    """The test items whose regions are kept, chosen like :func:`feature_values` along ``order_feature`` (e.g. the
    hippocampal volume for the hippocampus region), so the local scores can be plotted against it."""
    chosen = feature_values(items, order_feature, n_values, selection, seed)
    return FeatureValues(feature, chosen.values, chosen.indices, chosen.classes, chosen.selection, order_feature)


@dataclass
class FeatureValues:
    """The target values of one feature, taken from test items: ``values[j]`` is item ``indices[j]``'s value."""

    feature: str
    values: np.ndarray
    indices: np.ndarray
    classes: np.ndarray
    selection: str
    # a region feature has no value of its own: ``values`` are then this feature's values of the chosen items
    order_feature: str | None = None


def feature_values(
    items: Sequence[Mapping], feature: str, n_values: int, selection: str = "quantiles", seed: int = 0
) -> FeatureValues:
    """``n_values`` values of ``feature`` taken from the test items (the paper: "sampled from the real test data").

    ``quantiles``: the items at the evenly spaced quantile levels (j + 0.5) / n_values of the feature (item
    of rank floor((j + 0.5) N / n_values) in sorted order), so the values follow the test distribution
    deterministically and are always real items' values. ``random``: ``n_values`` distinct items drawn with
    ``seed``. Either way sorted by value; ``classes`` are those items' labels (for class balancing).
    """
    v = np.array([float(item[feature]) for item in items], dtype=np.float64)
    n = len(v)
    if not 1 <= int(n_values) <= n:
        raise InputError(f"n_values={n_values}; expected 1 to the number of test items ({n})")
    n_values = int(n_values)
    if selection == "quantiles":
        order = np.argsort(v, kind="stable")
        ranks = np.floor((np.arange(n_values) + 0.5) * n / n_values).astype(np.int64)
        indices = order[np.minimum(ranks, n - 1)]
    elif selection == "random":
        indices = np.random.default_rng(seed).choice(n, size=n_values, replace=False)
    else:
        raise InputError(f"value_selection '{selection}' is unknown; expected one of {list(VALUE_SELECTIONS)}")
    indices = indices[np.argsort(v[indices], kind="stable")]
    labels = np.array([item.get("label", 0) for item in items])
    return FeatureValues(feature, v[indices], indices, labels[indices], selection)


@torch.no_grad()
def predict(loader, fns: Mapping[str, Callable[[torch.Tensor], Any]], device=None) -> dict[str, np.ndarray]:
    """Every function of ``fns`` applied to every batch's ``image``, concatenated; also ``label`` if present.

    Run on the real test split: the predicted classes give Var(Y), the reference of every score.
    """
    out: dict[str, list[np.ndarray]] = {name: [] for name in fns}
    labels = []
    with frozen(*modules_of(*fns.values())):
        for batch in loader:
            images = convert_to_tensor(batch["image"], track_meta=False).to(device)
            for name, fn in fns.items():
                out[name].append(torch.as_tensor(fn(images)).detach().cpu().numpy())
            if "label" in batch:
                labels.append(convert_to_tensor(batch["label"], track_meta=False).reshape(-1).cpu().numpy())
    result = {name: np.concatenate(parts) for name, parts in out.items()}
    if labels:
        result["label"] = np.concatenate(labels)
    return result


# --- scores and report ---------------------------------------------------------------------------------------


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def score_feature(
    result: ConditionalPredictions,
    values: FeatureValues,
    reference_predictions,
    class_balanced: bool = False,
    n_resamples: int = 5000,
    seed: int = 0,
) -> dict:
    """:func:`common.diffusion.feature_scores` plus what was sampled at each value (paper Fig. 10).

    Adds ``target_values`` (all values asked for), ``test_item_indices`` (the test items they came from),
    ``kept_per_value``, ``acceptance_per_value`` and
    ``kept_feature_mean`` (mean g(x) of the kept samples: how close the guidance got). When no value kept
    any sample the scores are ``None`` with an ``error`` line, so one failed feature still leaves a report.
    """
    extra = {
        "feature": values.feature,
        "target_values": values.values.tolist(),
        "value_selection": values.selection,
        "test_item_indices": values.indices.tolist(),
        "kept_per_value": result.kept.tolist(),
        "acceptance_per_value": [_finite_or_none(r) for r in result.acceptance_rate],
        "kept_feature_mean": [
            float(np.mean(g)) if g.size else None for g in (result.features or [np.zeros(0)] * len(result))
        ],
        "predicted_positive_rate": positive_rate(result),
    }
    if not (result.kept > 0).any():
        message = (
            f"feature '{values.feature}': no sample within the rejection tolerance at any of {len(result)} values "
            f"({int(result.drawn.sum())} drawn); the diffusion model or the regressor may be undertrained"
        )
        logger.warning(message)
        return {**extra, "global_score": None, "local_scores": [], "values": [], "error": message}
    classes = values.classes if class_balanced else None
    scores = feature_scores(result, reference_predictions, classes, n_resamples=n_resamples, seed=seed)
    # The other global score too (no bootstrap): with an imbalanced label the two differ, and the paper
    # reports the class-balanced one for its brain ROIs, the plain one for the (balanced) ellipses.
    used = scores["value_indices"]
    groups = [result.predictions[i] for i in used]
    other = "global_score_unbalanced" if class_balanced else "global_score_class_balanced"
    scores[other] = float(
        global_tvd_score(groups, reference_predictions, None if class_balanced else values.classes[used])
    )
    if values.order_feature is not None:  # a region: the sampler's targets were item indices
        scores["values"] = values.values.tolist()
        extra["order_feature"] = values.order_feature
    return {**extra, **scores}


def coverage_of(result: ConditionalPredictions, real_embeddings, ks: Sequence[int]) -> dict | None:
    """:func:`common.diffusion.sample_coverage` for the k smaller than the number of real samples (None if no
    sample was kept): coverage needs the k-th nearest *other* real sample."""
    n_real = int(np.asarray(real_embeddings).shape[0])
    usable = [int(k) for k in ks if 1 <= int(k) < n_real]
    if len(usable) < len(ks):
        logger.warning(
            "coverage: k=%s need more than %d real test samples; left out", sorted(set(ks) - set(usable)), n_real
        )
    if not usable or not any(e.shape[0] for e in (result.embeddings or [])):
        return None
    return sample_coverage(result, real_embeddings, usable)


def plain_sample_count(scores: Mapping[str, Mapping]) -> int:
    """How many unguided samples the coverage baseline draws: the largest pooled kept set of any feature, so
    the comparison never favours the guided samples (coverage grows with the number of samples)."""
    return max([int(s.get("kept_total", 0)) for s in scores.values()] + [1])


def positive_rate(result: ConditionalPredictions) -> float | None:
    """Share of the kept samples the classifier assigns to class 1. Against the real test split's rate it shows
    whether the generator draws one class too rarely, which lowers every Var(Y | V = v) and so raises the
    scores of all features alike (a label-independent feature too)."""
    kept = [np.asarray(p).reshape(-1) for p in result.predictions if np.asarray(p).size]
    return float((np.concatenate(kept) == 1).mean()) if kept else None


def test_summary(
    reference: Mapping[str, np.ndarray],
    items: Sequence[Mapping],
    features: Sequence[str],
    n_bins: int = 8,
    class_balanced: bool = False,
    plain: ConditionalPredictions | None = None,
) -> dict:
    """Classifier accuracy, Var(Y) and the regressor's R^2 per feature on the real test split (paper Table 8);
    the TVD score of each feature from the test data alone (:func:`common.metrics.binned_tvd_score`, ``n_bins``
    quantile bins of the true value: the reference the generated scores should approach); the positive rate
    of the unguided samples ``plain``."""
    classes = np.asarray(reference["classes"]).reshape(-1)
    labels = np.array([item["label"] for item in items])
    predicted = np.asarray(reference["features"]).reshape(len(items), -1)
    r2 = {}
    for j, feature in enumerate(features):
        truth = np.array([float(item[feature]) for item in items])
        total = float(((truth - truth.mean()) ** 2).sum())
        r2[feature] = _finite_or_none(1.0 - ((truth - predicted[:, j]) ** 2).sum() / total) if total > 0 else None
    data_scores = {}
    for feature in features:
        truth = [float(item[feature]) for item in items]
        balanced = binned_tvd_score(classes, truth, n_bins, labels)["global_score"]
        unbalanced = binned_tvd_score(classes, truth, n_bins)["global_score"]
        data_scores[feature] = {
            "global_score": balanced if class_balanced else unbalanced,
            "global_score_unbalanced" if class_balanced else "global_score_class_balanced": (
                unbalanced if class_balanced else balanced
            ),
            "n_bins": int(n_bins),
        }
    reconstructed = reference.get("reconstructed_classes")
    if reconstructed is not None:
        reconstructed = np.asarray(reconstructed).reshape(-1)
    return {
        "n_test": len(items),
        "classifier_accuracy": float((classes == labels).mean()),
        "prediction_variance": float(np.var(classes)),
        "predicted_positive_rate": float((classes == 1).mean()),
        "plain_predicted_positive_rate": None if plain is None else positive_rate(plain),
        "reconstruction_predicted_positive_rate": None if reconstructed is None else float((reconstructed == 1).mean()),
        "reconstruction_class_agreement": None if reconstructed is None else float((reconstructed == classes).mean()),
        "regressor_r2": r2,
        "data_scores": data_scores,
    }


def _json_ready(x):
    """NaN/Inf -> None, NumPy scalars / arrays -> Python, anything else (e.g. a ``rho(t)`` function) -> its
    ``str``, so the JSON is strict and a setting that is not a number never stops the report."""
    if isinstance(x, Mapping):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)):
        return [_json_ready(v) for v in (x.tolist() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (float, np.floating)):
        return _finite_or_none(x)
    if x is None or isinstance(x, (int, str)):
        return x
    return str(x)


def _number(x, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(float(x), spec)


def report_markdown(report: Mapping) -> str:
    """The markdown of :func:`write_report`: scores (paper Tables 1 and 4), coverage (Table 3), test set, settings."""
    lines = ["# TVD feature scores", "", scores_markdown(report["features"])]
    for feature, scores in report["features"].items():
        if scores.get("error"):
            lines.append(f"- {feature}: {scores['error']}")
    coverage = report.get("coverage") or {}
    ks = sorted({k for c in coverage.values() if c for k in c}, key=lambda k: -int(k.split("=")[1]))
    if ks:
        lines += [
            "",
            "## Coverage of the real test set",
            "",
            f"Embedding: {report['settings'].get('coverage_embedding')}",
            "",
        ]
        lines += ["| Sampling | " + " | ".join(ks) + " |", "|---|" + "---:|" * len(ks)]
        for name, cov in coverage.items():
            label = "plain (unguided)" if name == "plain" else f"constrained {name}"
            lines.append(f"| {label} | " + " | ".join(_number((cov or {}).get(k)) for k in ks) + " |")
    test = report.get("test") or {}
    if test:
        lines += ["", "## Real test split", "", f"- items: {test.get('n_test')}"]
        lines.append(f"- classifier accuracy: {_number(test.get('classifier_accuracy'))}")
        lines.append(
            f"- Var(Y) of its predictions (reference variance): {_number(test.get('prediction_variance'), '.4f')}"
        )
        for feature, r2 in (test.get("regressor_r2") or {}).items():
            lines.append(f"- regressor R^2 of {feature}: {_number(r2)}")
        rates = [f"real test split {_number(test.get('predicted_positive_rate'))}"]
        rates += [f"{f} {_number(s.get('predicted_positive_rate'))}" for f, s in report["features"].items()]
        if test.get("plain_predicted_positive_rate") is not None:
            rates.append(f"plain (unguided) {_number(test['plain_predicted_positive_rate'])}")
        lines.append("- share predicted as class 1: " + ", ".join(rates) + " (kept generated samples)")
        if test.get("reconstruction_predicted_positive_rate") is not None:
            lines.append(
                "- autoencoder reconstructions of the test split: share predicted as class 1 "
                f"{_number(test['reconstruction_predicted_positive_rate'])}, same class as the image "
                f"{_number(test.get('reconstruction_class_agreement'))}"
            )
        for feature, data in (test.get("data_scores") or {}).items():
            other = next((k for k in data if k.startswith("global_score_")), None)
            lines.append(
                f"- score of {feature} from the test data alone ({data['n_bins']} quantile bins of the true value, "
                f"a lower bound): {_number(data['global_score'])}"
                + (f" ({other[len('global_score_') :].replace('_', ' ')}: {_number(data[other])})" if other else "")
            )
    settings = report.get("settings") or {}
    if settings:
        lines += ["", "## Settings", ""] + [f"- {k}: {v}" for k, v in settings.items()]
    return "\n".join(lines) + "\n"


def write_report(
    output_dir: str | os.PathLike,
    scores: Mapping[str, Mapping],
    coverage: Mapping[str, Mapping | None],
    test: Mapping,
    settings: Mapping,
    train_items: Sequence[Mapping],
    class_names: Sequence[str] | None = None,
) -> dict:
    """``tvd_scores.json``, ``tvd_scores.md`` and one ``local_scores_<feature>.png`` (paper Fig. 5) per feature.

    Every file is written to a temporary sibling and renamed, so an interrupted evaluation never leaves a
    half-written report next to a complete one from an earlier run. Returns the report dictionary.
    """
    output_dir = Path(output_dir)
    report = _json_ready({"features": scores, "coverage": coverage, "test": test, "settings": settings})
    for feature, s in report["features"].items():
        if s.get("local_scores"):
            axis = s.get("order_feature") or feature
            plot_local_scores(
                s["values"],
                s["local_scores"],
                [item[axis] for item in train_items],
                [item["label"] for item in train_items],
                class_names,
                axis if axis == feature else f"{axis} of the item whose {feature} is kept",
                output_dir / f"local_scores_{feature}.png",
                title=f"TVD local scores: {feature} (global {_number(s.get('global_score'))})",
            )
    write_text_atomic(output_dir / "tvd_scores.md", report_markdown(report))
    write_text_atomic(output_dir / "tvd_scores.json", json.dumps(report, indent=1, allow_nan=False) + "\n")
    logger.info("TVD scores written to %s:\n%s", output_dir, scores_markdown(report["features"]))
    return report


# --- inference -----------------------------------------------------------------------------------------------


def describe_samples(
    images: torch.Tensor,
    classifier: nn.Module,
    regressor: nn.Module,
    stats: FeatureStatistics,
    features: Sequence[str],
    feature: str | None = None,
    value: float | None = None,
    tolerance: float | None = 0.3,
) -> dict[str, list]:
    """Per sample: g(x) of every feature (its units), the predicted class and probabilities, and whether it
    passes the rejection rule |g(x) - value| <= tolerance x sd of ``feature`` (guided samples only)."""
    with torch.no_grad(), frozen(classifier, regressor):
        g = FeatureOutputs(regressor, stats, features)(images).cpu()
        probabilities = torch.softmax(classifier(images), dim=1).cpu()
    columns: dict[str, list] = {"sample": list(range(images.shape[0]))}
    for j, f in enumerate(features):
        columns[f] = g[:, j].tolist()
    columns["predicted_class"] = probabilities.argmax(1).tolist()
    for c in range(probabilities.shape[1]):
        columns[f"probability_{c}"] = probabilities[:, c].tolist()
    if feature is not None and value is not None and tolerance is not None:
        g_f = FeatureOutput(regressor, stats.index(feature), stats.mean_of(feature), stats.sd_of(feature))
        with torch.no_grad(), frozen(regressor):
            off = (g_f(images).cpu().double() - float(value)).abs()
        columns["within_tolerance"] = (off <= tolerance * stats.sd_of(feature)).tolist()
    return columns


def draw_and_describe(
    sample_fn: Callable, n: int, target, generator, classifier, regressor, stats, features, feature, value, tolerance
) -> tuple[torch.Tensor, dict[str, list]]:
    """``n`` samples from ``sample_fn`` (guided to ``target`` or not) and their :func:`describe_samples` columns."""
    images = sample_fn(n, target, generator)
    return images, describe_samples(images, classifier, regressor, stats, features, feature, value, tolerance)


def local_score_at(report: Mapping, feature: str, value: float) -> float | None:
    """The local score of ``feature`` at ``value``, interpolated linearly between the evaluated values (a region
    feature along its ``order_feature``); values outside the evaluated range take the nearest end's score.
    None when the evaluation has no local score for it."""
    scores = (report.get("features") or {}).get(feature) or {}
    pairs = sorted(
        (v, s) for v, s in zip(scores.get("values") or [], scores.get("local_scores") or []) if s is not None
    )
    if not pairs:
        return None
    v, s = np.array(pairs, dtype=np.float64).reshape(-1, 2).T
    return float(np.interp(float(value), v, s))


def read_report(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: TVD report not found; run evaluate.json first (it writes tvd_scores.json)")
    return json.loads(path.read_text())


def check_mask_grid(image_file: str, mask_file: str) -> None:
    """A region mask must lie on its image's voxel grid: the preprocessing resizes both to the network size, so a
    mask of another shape would otherwise be stretched onto the image without a word."""
    import nibabel as nib

    image, mask = nib.load(image_file), nib.load(mask_file)
    if image.shape[:3] != mask.shape[:3] or not np.allclose(image.affine, mask.affine, atol=1e-3):
        raise InputError(
            f"{mask_file}: mask of shape {tuple(mask.shape)} does not lie on the grid of {image_file} "
            f"(shape {tuple(image.shape)}); expected the same shape and affine as the image"
        )


def roi_inference(
    input_image: str,
    input_mask: str | None,
    transform,
    classifier: nn.Module,
    regressor: nn.Module,
    stats: FeatureStatistics,
    features: Sequence[str],
    region_feature: str | None,
    guide_feature: str,
    sampler_kwargs: Mapping[str, Any],
    n_samples: int,
    report: Mapping,
    output_dir: str | os.PathLike,
    mask_key: str = "mask",
    seed: int = 0,
    tolerance: float | None = 0.3,
) -> dict:
    """Samples that share a new ROI's region (with ``input_mask``) or, without a mask, its value of
    ``guide_feature`` (as the regressor measures it); the classifier's decisions on them and on the ROI, and the
    local score at the ROI's feature values.

    Writes ``<stem>_sample_<i>.nii.gz`` (in the input's shape and affine: the pre-processing is inverted;
    intensities stay in the networks' [-1, 1]), ``<stem>_samples.png`` (gallery, the ROI first),
    ``<stem>_samples.csv`` (per-sample features and decisions) and ``<stem>_tvd.json`` (the summary, returned).
    ``sampler_kwargs``: ``model, scheduler, sample_shape, num_inference_steps, eta, encode, decode, device``,
    optionally ``rho_per_train_step`` and ``amp``, and ``rho`` (feature) / ``region_rho``, ``region_mode``,
    ``region_dilation`` (region).
    """
    from monai.transforms import Invertd

    from common.data import inference_items
    from common.output import SaveMapd, input_stem

    item = inference_items(input_image=input_image)[0]
    if input_mask:
        item[mask_key] = inference_items(input_image=input_mask)[0]["image"]
        check_mask_grid(item["image"], item[mask_key])
    data = transform(item)
    image = data["image"]
    device = sampler_kwargs.get("device")
    kw = dict(sampler_kwargs)
    generator = seeded_generator(device or "cpu", seed)
    with torch.no_grad(), frozen(classifier, regressor):
        x = convert_to_tensor(image, track_meta=False).unsqueeze(0).to(device)
        input_probabilities = torch.softmax(classifier(x), dim=1)[0].cpu()
        input_features = FeatureOutputs(regressor, stats, features)(x)[0].cpu()
    values = {f: float(input_features[j]) for j, f in enumerate(features)}
    shared = dict(
        num_inference_steps=kw["num_inference_steps"],
        eta=kw["eta"],
        decode=kw["decode"],
        device=device,
        rho_per_train_step=kw.get("rho_per_train_step", True),
        amp=kw.get("amp", False),
    )
    if input_mask:
        if region_feature is None:
            raise InputError("--input_mask given but the bundle has no region feature (region_features is empty)")
        sampler = RegionSampler(
            kw["model"],
            kw["scheduler"],
            kw["sample_shape"],
            [(image, data[mask_key])],
            mode=kw["region_mode"],
            rho=kw["region_rho"],
            dilation=kw["region_dilation"],
            encode=kw["encode"],
            **shared,
        )
        samples = sampler(n_samples, torch.zeros(n_samples), generator)
        constraint = {"kind": "region", "feature": region_feature}
    else:
        sampler = feature_sampler(
            kw["model"], kw["scheduler"], kw["sample_shape"], regressor, stats, guide_feature, rho=kw["rho"], **shared
        )
        samples = sampler(n_samples, torch.full((n_samples,), values[guide_feature]), generator)
        constraint = {"kind": "feature", "feature": guide_feature, "value": values[guide_feature]}
    target = (None, None) if input_mask else (guide_feature, values[guide_feature])
    columns = describe_samples(samples, classifier, regressor, stats, features, *target, tolerance)
    local = {f: local_score_at(report, f, v) for f, v in values.items()}
    if region_feature is not None:
        order = ((report.get("features") or {}).get(region_feature) or {}).get("order_feature")
        if order in values:
            local[region_feature] = local_score_at(report, region_feature, values[order])
    predicted = np.array(columns["predicted_class"])
    summary = {
        "input": str(item["image"]),
        "mask": str(item.get(mask_key)) if input_mask else None,
        "constraint": constraint,
        "input_predicted_class": int(input_probabilities.argmax()),
        "input_probabilities": input_probabilities.tolist(),
        "input_features": values,
        "local_scores_at_input": local,
        "n_samples": int(n_samples),
        "samples_predicted_class_1": float((predicted == 1).mean()),
        "samples_prediction_variance": float(np.var(predicted)),
    }
    output_dir = Path(output_dir)
    stem = input_stem(image)
    keys = [f"sample_{i:03d}" for i in range(n_samples)]
    # Each sample takes the ROI's metadata so Invertd undoes the same orientation / padding it went through.
    d = {"image": image, **{k: image.clone().copy_(samples[i].to(image.device)) for i, k in enumerate(keys)}}
    d = Invertd(keys=keys, transform=transform, orig_keys=["image"] * len(keys), nearest_interp=False)(d)
    SaveMapd(keys, output_dir)(d)
    titles = {"predicted_class": [summary["input_predicted_class"], *columns["predicted_class"]]}
    gallery = torch.cat([x.cpu(), samples.cpu()])
    save_samples(output_dir, gallery, titles, f"{stem}_samples", nifti=False, csv_columns=columns, first_title="input")
    write_text_atomic(output_dir / f"{stem}_tvd.json", json.dumps(_json_ready(summary), indent=1) + "\n")
    logger.info("ROI inference written to %s: %s", output_dir, summary)
    return summary


def check_target(feature: str | None, value: float | None, features: Sequence[str]) -> None:
    """Inference arguments: a feature named in ``features`` needs a value; no feature means unguided."""
    if feature is None or feature == "":
        if value is not None:
            raise InputError(f"--value {value} without --feature; expected --feature one of {list(features)}")
        return
    if feature not in features:
        raise InputError(f"--feature '{feature}' is unknown; expected one of {list(features)}")
    if value is None or not math.isfinite(float(value)):
        raise InputError(f"--feature {feature} needs --value (a finite number in the feature's units)")


def save_samples(
    output_dir: str | os.PathLike,
    images: torch.Tensor,
    columns: Mapping[str, list],
    stem: str,
    nifti: bool = True,
    csv_columns: Mapping[str, list] | None = None,
    first_title: str | None = None,
) -> Path:
    """Each sample as ``<stem>_<i>.nii.gz`` (identity affine, values in [-1, 1]; ``nifti=False``: none), a PNG
    grid titled by ``columns["predicted_class"]`` (``first_title``: the first image is not a sample), a CSV of
    ``csv_columns`` (default ``columns``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    arrays = images.detach().float().cpu().numpy()[:, 0]
    for i, array in enumerate(arrays if nifti else []):
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(output_dir / f"{stem}_{i:03d}.nii.gz"))
    n = len(arrays)
    cols = min(8, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.5 * rows), squeeze=False)
    try:
        for ax in axes.flat:
            ax.axis("off")
        for i, (ax, array) in enumerate(zip(axes.flat, arrays)):
            shown = array if array.ndim == 2 else array[..., array.shape[-1] // 2]
            ax.imshow(shown.T, cmap="gray", vmin=-1, vmax=1, origin="lower")
            name = first_title if (first_title and i == 0) else str(i - (1 if first_title else 0))
            ax.set_title(f"{name}: class {columns['predicted_class'][i]}", fontsize=7)
        fig.tight_layout()
        tmp = output_dir / f".{stem}.{os.getpid()}.partial.png"
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, output_dir / f"{stem}.png")
    finally:
        plt.close(fig)
    tmp = output_dir / f".{stem}.{os.getpid()}.partial.csv"
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        table = csv_columns if csv_columns is not None else columns
        writer.writerow(list(table))
        writer.writerows(zip(*table.values()))
    os.replace(tmp, output_dir / f"{stem}.csv")
    return output_dir / f"{stem}.png"


# --- training metrics ----------------------------------------------------------------------------------------


class _Column:
    """Output transform of one regression output: (pred[:, i], target[:, i]) of a decollated batch."""

    def __init__(self, index: int):
        self.index = int(index)
        self.pair = from_engine(["pred", "label"])

    def __call__(self, output):
        preds, targets = self.pair(output)
        if isinstance(preds, torch.Tensor) and preds.ndim == 2:
            return preds[:, self.index], targets[:, self.index]
        return [p.reshape(-1)[self.index] for p in preds], [t.reshape(-1)[self.index] for t in targets]


def r2_metrics(features: Sequence[str], prefix: str = "val_r2_") -> dict:
    """Ignite ``R2Score`` of each regressor output (coefficient of determination; the same in standardised
    and original units, as R^2 is invariant to an affine change of the target), keyed ``val_r2_<feature>``."""
    from ignite.metrics.regression import R2Score

    return {f"{prefix}{f}": R2Score(output_transform=_Column(i)) for i, f in enumerate(features)}
