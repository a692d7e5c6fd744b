"""ICAM at validation, evaluation and inference time: the pieces the ``bundles/icam`` configs wire together.

- :class:`ICAMImageClassifier`: image -> attribute-encoder mean -> the attribute classifier's logit, the
  classifier ICAM is trained with, as one network of images (accuracy, inference probability, and Captum
  baselines if one wants them on ICAM's own classifier).
- :class:`ICAMFeatureMaps`: image -> FA maps by rejection sampling of the attribute space
  (:func:`common.engines.feature_attribution`): translate to a fixed class (NCC(-): patients to 0,
  NCC(+): controls to 1) or to the class opposite the prediction (inference, paper Fig. 6).
- :class:`PairedAttributionEvaluator`: an :class:`common.evaluation.AttributionEvaluator` that also maps
  each patient's paired class-0 image (``healthy``: the same subject without the disease effect), so one
  run gives NCC(-) and NCC(+) against the same ground truth, plus the classifier's accuracy;
  :func:`paired_ncc_metrics` makes its NCC handlers.
- :class:`FeatureAttributiond`: the inference transform writing the mean / variance FA maps and one
  translated image as ``MetaTensor`` s that ``Invertd`` brings back to the input's space.
- :func:`paired_image_transforms`: loads ``image``, its pair and the ground truth on the network grid;
  :func:`patient_items`: the patients of a datalist split that have them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.handlers import from_engine
from monai.transforms import Compose, MapTransform
from monai.utils import convert_to_tensor
from torch import nn

from common.data import load_datalist
from common.data.transforms import image_transforms, source_file
from common.engines.batches import PrepareKeys
from common.engines.icam import FeatureAttribution, RejectionSamplingError, feature_attribution
from common.errors import DatalistError
from common.evaluation import AttributionEvaluator, MapMethod
from common.handlers import NCC

logger = logging.getLogger(__name__)

OUTPUTS = ("mean", "variance", "translated", "all")


class ICAMImageClassifier(nn.Module):
    """``classifier(attribute_encoder(x).mu)``: ICAM's class logit for images, ``(B, 1)`` raw logits.

    The attribute mean is used (no sampling), as the trainer's classification loss and the FA maps do.
    """

    def __init__(self, attribute_encoder: nn.Module, classifier: nn.Module):
        super().__init__()
        self.attribute_encoder = attribute_encoder
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.attribute_encoder(x)
        return self.classifier(mu)


class ICAMFeatureMaps(nn.Module):
    """FA maps of images by sampling the attribute space: ``translated - x`` over ``n_samples`` latents.

    Args:
        content_encoder, attribute_encoder, generator, classifier: the trained ICAM networks.
        target_class: 0 or 1 to translate every image to that class; ``None``: to the class opposite
            the prediction (inference).
        n_samples: sampled attribute latents per image (the original code: 50).
        threshold: a sampled latent is kept if the classifier gives it the target class with p > threshold
            (the original code: 0.9).
        fallback_thresholds: if fewer than ``n_samples`` latents pass ``threshold`` within ``max_draws``
            draws, sample again with each of these thresholds in turn (validation during training uses
            ``[0.5, 0.0]``: the classifier may not be confident yet, and 0 accepts any latent); when none is
            left, :class:`common.engines.RejectionSamplingError` is raised with its message (inference).
        max_draws: latents drawn per image before giving up.
        seed: seeds the sampler at every call, so maps are reproducible and do not depend on the order of
            the images; ``None`` uses torch's global generator.
        chunk_size: translations per generator call.
        output: what :meth:`forward` returns: ``mean`` / ``variance`` map, the first ``translated`` image,
            or ``all`` three as channels ``[mean, variance, translated]``.
    """

    def __init__(
        self,
        content_encoder: nn.Module,
        attribute_encoder: nn.Module,
        generator: nn.Module,
        classifier: nn.Module,
        target_class: int | None = None,
        n_samples: int = 50,
        threshold: float = 0.9,
        fallback_thresholds: Sequence[float] = (),
        max_draws: int = 10_000,
        seed: int | None = 0,
        chunk_size: int = 8,
        output: str = "mean",
    ):
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"output '{output}' is unknown; expected one of {OUTPUTS}")
        if target_class not in (None, 0, 1):
            raise ValueError(f"target_class={target_class}; expected 0, 1 or None (opposite of the prediction)")
        self.content_encoder = content_encoder
        self.attribute_encoder = attribute_encoder
        self.generator = generator
        self.classifier = classifier
        self.target_class = target_class
        self.n_samples = int(n_samples)
        self.threshold = float(threshold)
        self.fallback_thresholds = [float(t) for t in fallback_thresholds]
        self.max_draws = int(max_draws)
        self.seed = seed
        self.chunk_size = int(chunk_size)
        self.output = output
        self.fallbacks = 0  # calls that needed a fallback threshold

    def _generator(self, device: torch.device) -> torch.Generator | None:
        # Re-seeded on every call: an image's maps do not depend on what was mapped before it.
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(int(self.seed))

    def maps(self, x: torch.Tensor) -> FeatureAttribution:
        """Mean and variance FA maps and the first translation of each image of ``x`` (B, C, *spatial)."""
        device = next(self.classifier.parameters()).device
        x = convert_to_tensor(x, track_meta=False).to(device)
        kwargs = dict(
            n_samples=self.n_samples,
            max_draws=self.max_draws,
            rng=self._generator(device),
            chunk_size=self.chunk_size,
            target_class=self.target_class,
        )
        nets = (self.content_encoder, self.attribute_encoder, self.generator, self.classifier)
        thresholds = [self.threshold, *self.fallback_thresholds]
        for i, threshold in enumerate(thresholds):
            try:
                return feature_attribution(*nets, x, threshold=threshold, **kwargs)
            except RejectionSamplingError as err:
                if i + 1 == len(thresholds):
                    raise
                if i == 0:
                    self.fallbacks += 1
                    if self.fallbacks == 1:  # once per run, not once per image
                        logger.warning("%s; sampling with p > %s instead", err, thresholds[i + 1])
        raise AssertionError("unreachable")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fa = self.maps(x)
        if self.output == "all":
            return torch.cat([fa.mean_map, fa.variance_map, fa.translated], dim=1)
        return {"mean": fa.mean_map, "variance": fa.variance_map, "translated": fa.translated}[self.output]


class FeatureAttributiond(MapTransform):
    """Adds ``mean_key``, ``variance_key`` and ``translated_key`` for ``image_key`` (channel-first, one item).

    Each output is a ``MetaTensor`` carrying the image's metadata and transform trace, so ``Invertd`` with
    ``orig_keys=image_key`` brings it back to the input's space (shape and affine).
    """

    def __init__(
        self,
        feature_maps: ICAMFeatureMaps,
        image_key: str = "image",
        mean_key: str = "fa_mean",
        variance_key: str = "fa_variance",
        translated_key: str = "translated",
    ):
        super().__init__([image_key])
        self.feature_maps = feature_maps
        self.names = (mean_key, variance_key, translated_key)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            x = torch.as_tensor(image).as_subclass(torch.Tensor)[None]
            try:
                fa = self.feature_maps.maps(x)
            except RejectionSamplingError as err:
                raise RejectionSamplingError(
                    f"{source_file(image)}: {err} (or accept lower probabilities with fallback thresholds, e.g. the "
                    "inference config's --fallback_thresholds '[0.5]')"
                ) from err
            meta = image.meta if isinstance(image, MetaTensor) else {}
            ops = image.applied_operations if isinstance(image, MetaTensor) else []
            for name, value in zip(self.names, (fa.mean_map, fa.variance_map, fa.translated)):
                d[name] = MetaTensor(value[0].to(x.device), meta=dict(meta), applied_operations=list(ops))
        return d


def _predicted_labels(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.reshape(logits.shape[0], -1)
    return (logits[:, 0] > 0).float() if logits.shape[1] == 1 else logits.argmax(1).float()


class PairedAttributionEvaluator(AttributionEvaluator):
    """Maps of every patient image (``map_<name>``) and of its paired class-0 image (``pair_map_<name>``).

    Each batch item holds a patient ``image_key`` (class 1), its pair ``pair_key`` (class 0, e.g. the same
    subject without the effect) and the ground truth ``target_key``. ``methods`` map the patient images
    (ICAM: translation to class 0, NCC(-)); ``pair_methods`` map the pairs (translation to class 1,
    NCC(+)). With a ``classifier`` (raw logits: one column thresholded at 0, or several argmax-ed) the
    output also holds ``class_pred`` and ``class_label`` (1 for the patients, 0 for the pairs) for
    :class:`common.handlers.ClassificationRate`. Output keys besides those: ``image``, ``pair_image``,
    ``target``.
    """

    def __init__(
        self,
        device,
        val_data_loader,
        methods: Mapping[str, MapMethod],
        pair_methods: Mapping[str, MapMethod] | None = None,
        classifier: nn.Module | None = None,
        metrics: Mapping | None = None,
        image_key: str = "image",
        pair_key: str = "healthy",
        target_key: str = "mask",
        val_handlers: Sequence | None = None,
    ):
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            methods=methods,
            metrics=metrics,
            prepare_batch=PrepareKeys(image_key, target_key),
            val_handlers=val_handlers,
        )
        self.pair_methods = dict(pair_methods or {})
        self.classifier = classifier
        self.pair_key = pair_key

    def _iteration(self, engine, batchdata):
        output = super()._iteration(engine, batchdata)
        pair = convert_to_tensor(batchdata[self.pair_key], track_meta=False).to(engine.state.device)
        output["pair_image"] = pair
        for name, method in self.pair_methods.items():
            output[f"pair_map_{name}"] = method(pair)
        if self.classifier is not None:
            images = output["image"]
            was_training = self.classifier.training
            self.classifier.eval()
            with torch.no_grad():
                logits = self.classifier(torch.cat([images, pair])).float()
            self.classifier.train(was_training)
            output["class_pred"] = _predicted_labels(logits)
            output["class_label"] = torch.cat([images.new_ones(images.shape[0]), pair.new_zeros(pair.shape[0])])
        return output


def paired_ncc_metrics(methods: Sequence[str], absolute: bool = True) -> dict:
    """``ncc_minus_<m>`` (maps of the patients, NCC(-)) for every method, then ``ncc_plus_<m>`` (maps of
    their class-0 pairs, NCC(+)): NCC handlers of |map| and |ground truth| (ICAM's metric) for a
    :class:`PairedAttributionEvaluator`. The first is the evaluator's key metric."""
    metrics = {}
    for prefix, direction in (("map_", "minus"), ("pair_map_", "plus")):
        for m in methods:
            transform = from_engine([f"{prefix}{m}", "target"])
            metrics[f"ncc_{direction}_{m}"] = NCC(absolute=absolute, output_transform=transform)
    return metrics


def paired_image_transforms(
    spatial_dims: int,
    spatial_size: Sequence[int] | None,
    pair_key: str = "healthy",
    target_key: str = "mask",
    keep: Sequence[str] = ("label",),
    **kwargs,
) -> Compose:
    """Load ``image``, its pair ``pair_key`` (each scaled on its own, as any input is) and the ground truth
    ``target_key`` (resampled linearly), all on the network grid; ``kwargs`` go to
    :func:`common.data.transforms.image_transforms` (``intensity``, ``resize``, ...)."""
    pair = image_transforms(spatial_dims, spatial_size, image_key=pair_key, **kwargs)
    image = image_transforms(spatial_dims, spatial_size, map_keys=[target_key], keep=[*keep, pair_key], **kwargs)
    return Compose([pair, image])


def patient_items(
    datalist: str,
    split: str,
    dataset_dir: str | None = None,
    required_keys: Sequence[str] = ("healthy", "mask"),
    max_cases: int = 0,
    positive: int = 1,
) -> list[dict]:
    """The first ``max_cases`` (0: all) items of ``split`` with ``label == positive``, each checked to hold
    ``required_keys`` (the pair and the ground truth; controls need neither)."""
    items = load_datalist(datalist, split, dataset_dir=dataset_dir)
    patients = [item for item in items if item["label"] == positive]
    if not patients:
        raise DatalistError(f"{datalist}: split '{split}' has no item with label {positive}; expected patients")
    for index, item in enumerate(patients):
        missing = [key for key in required_keys if item.get(key) is None]
        if missing:
            raise DatalistError(
                f"{datalist}: split '{split}', patient {index} ({item['image']}): missing key(s) {missing}; "
                f"expected {list(required_keys)} for every patient (the paired class-0 image and the ground truth)"
            )
    return patients[:max_cases] if max_cases else patients
