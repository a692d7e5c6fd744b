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
- The attribute latent space (paper Figs. 8, 9; ``configs/latent.json``): :func:`latent_space_report` writes a 2D
  embedding of the test images' attribute means (:func:`attribute_codes`, :func:`embed_2d`, :func:`save_embedding`)
  and interpolation strips between and within classes with their FA maps (:func:`interpolate_latents`,
  :func:`decode_latent_path`, :func:`sample_class_latents`, :func:`save_interpolation_figure`).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from monai.data import DataLoader, MetaTensor  # noqa: E402
from monai.handlers import from_engine  # noqa: E402
from monai.transforms import Compose, MapTransform  # noqa: E402
from monai.utils import convert_to_tensor  # noqa: E402
from torch import nn  # noqa: E402

from common.data import load_datalist  # noqa: E402
from common.data.transforms import image_transforms, source_file  # noqa: E402
from common.engines.batches import PrepareKeys  # noqa: E402
from common.engines.icam import (  # noqa: E402
    FeatureAttribution,
    RejectionSamplingError,
    _device_of,
    _eval_mode,
    feature_attribution,
    sample_attribute,
)
from common.errors import DatalistError, InputError  # noqa: E402
from common.evaluation import AttributionEvaluator, MapMethod  # noqa: E402
from common.handlers import NCC  # noqa: E402

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
        progress=None,
    ):
        self.pair_methods = dict(pair_methods or {})  # before the base class's __init__: its records need the names
        self.classifier = classifier
        self.pair_key = pair_key
        super().__init__(
            device=device,
            val_data_loader=val_data_loader,
            methods=methods,
            metrics=metrics,
            prepare_batch=PrepareKeys(image_key, target_key),
            val_handlers=val_handlers,
            progress=progress,
        )

    def _output_names(self) -> list[str]:
        names = super()._output_names() + [f"pair_map_{name}" for name in self.pair_methods]
        return names + (["class_pred", "class_label"] if self.classifier is not None else [])

    def _inputs(self, engine, batchdata, images) -> list[torch.Tensor]:
        return [images, self._pair(engine, batchdata)]

    def _pair(self, engine, batchdata) -> torch.Tensor:
        return convert_to_tensor(batchdata[self.pair_key], track_meta=False).to(engine.state.device)

    def _iteration(self, engine, batchdata):
        output = super()._iteration(engine, batchdata)
        output["pair_image"] = self._pair(engine, batchdata)
        return output

    def _maps(self, engine, batchdata, images) -> dict:
        maps = super()._maps(engine, batchdata, images)
        pair = self._pair(engine, batchdata)
        for name, method in self.pair_methods.items():
            maps[f"pair_map_{name}"] = method(pair)
        if self.classifier is not None:
            was_training = self.classifier.training
            self.classifier.eval()
            with torch.no_grad():
                logits = self.classifier(torch.cat([images, pair])).float()
            self.classifier.train(was_training)
            maps["class_pred"] = _predicted_labels(logits)
            maps["class_label"] = torch.cat([images.new_ones(images.shape[0]), pair.new_zeros(pair.shape[0])])
        return maps


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
    return Compose([pair, image]).flatten()


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


# ----------------------------------------------------------------------------------------------------------------------
# The attribute latent space (paper Figs. 8 and 9): an embedding of the test images' attribute means by class, and
# decodings along straight lines in the attribute space with one image's content. ``configs/latent.json`` runs
# :func:`latent_space_report`, which chains the small functions below.

EMBEDDING_METHODS = ("pca", "tsne")


class AttributeCodes(NamedTuple):
    """Attribute-encoder means of a data set: ``mu`` (N, C, *latent), ``labels`` (N,), the classifier's
    ``probabilities`` of class 1 given ``mu`` (N,), and the source ``files``."""

    mu: torch.Tensor
    labels: torch.Tensor
    probabilities: torch.Tensor
    files: list[str]


class LatentPath(NamedTuple):
    """Images decoded along a path of attribute latents with one content: ``decoded`` and ``fa_maps``
    (decoded - input), each (steps, C, *spatial), and the classifier's ``probabilities`` of class 1 (steps,)."""

    decoded: torch.Tensor
    fa_maps: torch.Tensor
    probabilities: torch.Tensor


def load_networks(checkpoint: str | os.PathLike, networks: Mapping[str, nn.Module], map_location=None) -> str:
    """Load the state dicts saved under ``networks``' names (e.g. ``model.pt`` of the ICAM training) into them."""
    path = Path(checkpoint)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found; train first (configs/train.json writes models/model.pt)")
    state = torch.load(path, map_location=map_location, weights_only=True)
    missing = [name for name in networks if name not in state]
    if missing:
        raise InputError(f"{path}: no state for {missing}; expected the keys {sorted(networks)}")
    for name, network in networks.items():
        network.load_state_dict(state[name])
    return str(path)


def _probability(classifier: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(classifier(z).float().reshape(-1))


def attribute_codes(
    attribute_encoder: nn.Module,
    classifier: nn.Module,
    dataset,
    batch_size: int = 8,
    num_workers: int = 0,
    image_key: str = "image",
    label_key: str = "label",
) -> AttributeCodes:
    """E^a means (eval mode, no sampling) of every item of ``dataset``, in order, with labels and p(class 1 | mu)."""
    device = _device_of(attribute_encoder)
    mus, labels, probabilities, files = [], [], [], []
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    with _eval_mode(attribute_encoder, classifier), torch.no_grad():
        for batch in loader:
            images = batch[image_key]
            if isinstance(images, MetaTensor):
                names = images.meta.get("filename_or_obj", [""] * images.shape[0])
                files += [str(n) for n in (names if isinstance(names, (list, tuple)) else [names])]
            else:
                files += [""] * images.shape[0]
            mu, _ = attribute_encoder(convert_to_tensor(images, track_meta=False).to(device))
            mus.append(mu.float().cpu())
            probabilities.append(_probability(classifier, mu).cpu())
            labels.append(torch.as_tensor(batch[label_key]).reshape(-1).long().cpu())
    if not mus:
        raise InputError("the data set for the attribute latent space is empty")
    return AttributeCodes(torch.cat(mus), torch.cat(labels), torch.cat(probabilities), files)


def embed_2d(features, method: str = "pca", seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2D coordinates (N, 2) of ``features`` (N, ...; flattened): scikit-learn PCA or t-SNE.

    t-SNE's perplexity is capped at (N - 1) / 3 so that small sets (tests, a few images) still embed.
    """
    if method not in EMBEDDING_METHODS:
        raise ValueError(f"embedding_method '{method}' is unknown; expected one of {EMBEDDING_METHODS}")
    x = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    if x.shape[0] < 2:
        raise ValueError(f"{x.shape[0]} image(s) to embed; expected at least 2")
    if x.shape[1] < 2:  # a one-number latent: the second axis is 0
        x = np.concatenate([x, np.zeros((x.shape[0], 2 - x.shape[1]))], axis=1)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    from sklearn.manifold import TSNE

    perplexity = min(float(perplexity), (x.shape[0] - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def _atomic_savefig(fig, path: Path, dpi: int, palette: bool = False) -> None:
    """Save ``fig`` as PNG through a temporary name; ``palette``: 256 colours (a third of the size for grids of
    images)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.png")
    if palette:
        from PIL import Image

        fig.set_dpi(dpi)
        fig.canvas.draw()
        rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
        rgb.quantize(colors=256).save(tmp, format="PNG", optimize=True)
    else:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def _atomic_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def save_embedding(coords: np.ndarray, codes: AttributeCodes, output_dir: str | os.PathLike, method: str = "pca"):
    """``latent_embedding.csv`` (index, file, label, probability of class 1, x, y; one row per image) and
    ``latent_embedding.png`` (the 2D points coloured by class). Returns both paths."""
    output_dir = Path(output_dir)
    labels = codes.labels.numpy()
    rows = [
        [i, codes.files[i], int(labels[i]), f"{float(codes.probabilities[i]):.6f}", f"{xy[0]:.6f}", f"{xy[1]:.6f}"]
        for i, xy in enumerate(coords)
    ]
    csv_path = output_dir / "latent_embedding.csv"
    _atomic_csv(csv_path, ["index", "file", "label", "probability", "x", "y"], rows)
    fig, ax = plt.subplots(figsize=(4.2, 3.8))
    for label, colour, name in ((0, "tab:blue", "class 0 (control)"), (1, "tab:red", "class 1 (patient)")):
        chosen = labels == label
        if chosen.any():
            ax.scatter(
                coords[chosen, 0], coords[chosen, 1], s=12, c=colour, alpha=0.75, label=f"{name}, n={chosen.sum()}"
            )
    ax.set_title(f"attribute-latent means ({'PCA' if method == 'pca' else 't-SNE'})", fontsize=9)
    ax.set_xlabel("component 1", fontsize=8)
    ax.set_ylabel("component 2", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    png_path = output_dir / "latent_embedding.png"
    _atomic_savefig(fig, png_path, dpi=80)
    return png_path, csv_path


def interpolate_latents(start: torch.Tensor, end: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """``steps`` latents on the straight line from ``start`` to ``end`` (both included): (steps, *start.shape)."""
    if steps < 2:
        raise ValueError(f"interpolation_steps={steps}; expected at least 2 (both ends)")
    if start.shape != end.shape:
        raise ValueError(f"latent shapes {tuple(start.shape)} and {tuple(end.shape)} differ")
    alpha = torch.linspace(0.0, 1.0, steps, dtype=start.dtype, device=start.device).view(-1, *[1] * start.dim())
    return (1 - alpha) * start + alpha * end


def decode_latent_path(
    content_encoder: nn.Module,
    generator: nn.Module,
    classifier: nn.Module,
    image: torch.Tensor,
    latents: torch.Tensor,
    chunk_size: int = 8,
) -> LatentPath:
    """Decode each latent of ``latents`` (steps, C, *latent) with the content of ``image`` (1, C, *spatial), as
    the FA maps do (eval mode); FA map = decoded - image."""
    device = _device_of(generator)
    image = convert_to_tensor(image, track_meta=False).to(device)
    latents = latents.to(device)
    decoded = []
    with _eval_mode(content_encoder, generator, classifier), torch.no_grad():
        content = content_encoder(image)
        for start in range(0, latents.shape[0], chunk_size):
            chunk = latents[start : start + chunk_size]
            decoded.append(generator(content.expand(chunk.shape[0], *content.shape[1:]), chunk))
        probabilities = _probability(classifier, latents)
    decoded = torch.cat(decoded).float()
    return LatentPath(decoded.cpu(), (decoded - image.float()).cpu(), probabilities.cpu())


def sample_class_latents(
    classifier: nn.Module,
    latent_shape: Sequence[int],
    target_class: int,
    n: int = 2,
    thresholds: Sequence[float] = (0.9,),
    max_draws: int = 10_000,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``n`` latents ``z ~ N(0, I)`` of ``target_class`` by rejection sampling, trying each threshold in turn."""
    for i, threshold in enumerate(thresholds):
        try:
            return sample_attribute(classifier, (n, *latent_shape), target_class, threshold, max_draws, generator)
        except RejectionSamplingError as err:
            if i + 1 == len(thresholds):
                raise
            logger.warning("%s; sampling with p > %s instead", err, thresholds[i + 1])
    raise ValueError("thresholds is empty; expected at least one")


def interpolation_pairs(labels, pairs: Sequence[Sequence[int]] = ()) -> list[tuple[int, int]]:
    """``(control, patient)`` indices into the data set: ``pairs`` checked against ``labels``, or the first
    image of class 0 and the first of class 1."""
    labels = [int(v) for v in labels]
    if not pairs:
        if 0 not in labels or 1 not in labels:
            raise InputError(f"the test images have labels {sorted(set(labels))}; interpolation needs classes 0 and 1")
        return [(labels.index(0), labels.index(1))]
    checked = []
    for pair in pairs:
        if len(pair) != 2:
            raise InputError(f"interpolation_pairs entry {list(pair)}; expected [control index, patient index]")
        control, patient = (int(i) for i in pair)
        for index, wanted in ((control, 0), (patient, 1)):
            if not 0 <= index < len(labels):
                raise InputError(
                    f"interpolation_pairs entry {list(pair)}: index {index} is not in 0..{len(labels) - 1}"
                )
            if labels[index] != wanted:
                raise InputError(
                    f"interpolation_pairs entry {list(pair)}: image {index} has label {labels[index]}; expected "
                    "[control (label 0) index, patient (label 1) index], indices as in latent_embedding.csv"
                )
        checked.append((control, patient))
    return checked


def _slice_2d(x: np.ndarray, index: int | None) -> np.ndarray:
    x = np.squeeze(x)
    return np.rot90(x if x.ndim == 2 else x[..., index])


def save_interpolation_figure(strips: Sequence[Mapping], path: str | os.PathLike, dpi: int = 70) -> Path:
    """One figure of interpolation strips (paper Fig. 9). Each strip is a mapping with ``title``, ``reference``
    (a list of ``(name, image)`` shown left of the two rows) and ``path`` (a :class:`LatentPath`): the decoded
    images with p(class 1) above each, and the FA maps below (red: brighter than the input, blue: darker).
    Volumes are shown at the axial slice where the strip's FA maps are largest."""
    steps = max(int(s["path"].decoded.shape[0]) for s in strips)
    fig, axes = plt.subplots(2 * len(strips), steps + 1, figsize=(1.15 * (steps + 1), 2.5 * len(strips)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, strip in enumerate(strips):
        latent_path = strip["path"]
        decoded, fa_maps = latent_path.decoded.numpy(), latent_path.fa_maps.numpy()
        index = None
        if np.squeeze(fa_maps[0]).ndim == 3:
            index = int(np.argmax(np.abs(fa_maps).reshape(-1, fa_maps.shape[-1]).sum(0)))
        vmax = float(np.abs(fa_maps).max()) or 1.0
        row_image, row_map = axes[2 * k], axes[2 * k + 1]
        for row, (name, image) in zip((row_image, row_map), strip["reference"]):
            row[0].imshow(_slice_2d(np.asarray(image), index), cmap="gray", vmin=-1, vmax=1)
            row[0].set_title(name, fontsize=7)
        for step in range(decoded.shape[0]):
            row_image[step + 1].imshow(_slice_2d(decoded[step], index), cmap="gray", vmin=-1, vmax=1)
            row_image[step + 1].set_title(f"p={float(latent_path.probabilities[step]):.2f}", fontsize=7)
            row_map[step + 1].imshow(_slice_2d(fa_maps[step], index), cmap="bwr", vmin=-vmax, vmax=vmax)
        row_map[1].set_title(f"FA |max| {vmax:.2f}", fontsize=6)
        row_image[1].text(0.0, 1.35, strip["title"], transform=row_image[1].transAxes, fontsize=8, ha="left")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.92, wspace=0.05, hspace=0.45)
    path = Path(path)
    _atomic_savefig(fig, path, dpi=dpi, palette=True)
    return path


def latent_space_report(
    content_encoder: nn.Module,
    attribute_encoder: nn.Module,
    generator: nn.Module,
    classifier: nn.Module,
    dataset,
    output_dir: str | os.PathLike,
    embedding_method: str = "pca",
    perplexity: float = 30.0,
    pairs: Sequence[Sequence[int]] = (),
    steps: int = 7,
    within_class: int = 1,
    thresholds: Sequence[float] = (0.9,),
    max_draws: int = 10_000,
    seed: int = 0,
    batch_size: int = 8,
    num_workers: int = 0,
    image_key: str = "image",
    label_key: str = "label",
) -> dict:
    """The attribute latent space of ``dataset`` (the test split), written to ``output_dir``:

    - ``latent_embedding.csv`` / ``.png``: a 2D ``embedding_method`` embedding of the flattened E^a means;
    - ``latent_interpolation.png`` / ``.csv``: for each ``(control, patient)`` pair (``pairs``, default the first
      of each class), the patient's content decoded with attribute latents on the line (a) from the control's to
      the patient's mean (between classes) and (b) between two latents rejection-sampled from ``within_class``
      (p > each of ``thresholds`` in turn, seeded by ``seed``); ``steps`` latents per line, both ends included.
      The CSV holds p(class 1) of every latent: ``strip`` (between / within), ``control``, ``patient``,
      ``step``, ``alpha`` (0 at the start), ``probability``.

    Returns the paths written, by name.
    """
    if within_class not in (0, 1):
        raise ValueError(f"within_class={within_class}; expected 0 or 1")
    output_dir = Path(output_dir)
    codes = attribute_codes(attribute_encoder, classifier, dataset, batch_size, num_workers, image_key, label_key)
    coords = embed_2d(codes.mu.flatten(1).numpy(), embedding_method, seed=seed, perplexity=perplexity)
    embedding_png, embedding_csv = save_embedding(coords, codes, output_dir, embedding_method)
    device = _device_of(classifier)
    rng = torch.Generator(device=device).manual_seed(int(seed))
    strips, rows = [], []
    for control, patient in interpolation_pairs(codes.labels.tolist(), pairs):
        image = torch.as_tensor(dataset[patient][image_key]).as_subclass(torch.Tensor)[None]
        control_image = torch.as_tensor(dataset[control][image_key]).as_subclass(torch.Tensor)[None]
        mu = codes.mu.to(device)
        ends = sample_class_latents(classifier, mu.shape[1:], within_class, 2, thresholds, max_draws, rng)
        lines = {
            "between": (
                interpolate_latents(mu[control], mu[patient], steps),
                f"control #{control} -> patient #{patient}",
            ),
            "within": (interpolate_latents(ends[0], ends[1], steps), f"within class {within_class}, two samples"),
        }
        for kind, (latents, label) in lines.items():
            decoded = decode_latent_path(content_encoder, generator, classifier, image, latents)
            reference = [(f"patient #{patient}", image[0])]
            if kind == "between":
                reference.append((f"control #{control}", control_image[0]))
            title = f"{label}: content of patient #{patient}; p(class 1) above, FA map (decoded - input) below"
            strips.append({"title": title, "reference": reference, "path": decoded})
            for step, p in enumerate(decoded.probabilities.tolist()):
                rows.append([kind, control, patient, step, f"{step / (steps - 1):.4f}", f"{p:.6f}"])
    interpolation_png = save_interpolation_figure(strips, output_dir / "latent_interpolation.png")
    interpolation_csv = output_dir / "latent_interpolation.csv"
    _atomic_csv(interpolation_csv, ["strip", "control", "patient", "step", "alpha", "probability"], rows)
    logger.info("attribute latent space of %d images written to %s", len(codes.files), output_dir)
    return {
        "latent_embedding.png": str(embedding_png),
        "latent_embedding.csv": str(embedding_csv),
        "latent_interpolation.png": str(interpolation_png),
        "latent_interpolation.csv": str(interpolation_csv),
    }
