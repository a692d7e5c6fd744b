"""Each bundle as its training would leave it, with untrained networks: the checkpoints and small JSON files
its inference config reads, and the ids that only shorten an inference run. Used by the tests that run a
bundle's inference without training it first."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from common.diffusion.latent import write_latent_scale
from common.tvd import write_feature_statistics
from tests.bundle_runner import REPO


@dataclass
class Case:
    """How a bundle's inference is run: its configs, its checkpoints (file -> config id, or -> {key: config id}
    for a checkpoint of several networks), a scan shape, the map it writes for ``scan.nii.gz``, shortening ids."""

    checkpoints: dict
    scan_shape: tuple
    output: str
    configs: list = field(default_factory=lambda: ["inference.json"])
    run_overrides: list = field(default_factory=list)


CASES = {
    "vagan": Case({"model.pt": "network_def"}, (37, 41), "scan_effect.nii.gz"),
    "icam": Case(
        {
            "model.pt": {
                "content_encoder": "content_encoder_def",
                "attribute_encoder": "attribute_encoder_def",
                "generator": "generator_def",
                "classifier": "classifier_def",
            }
        },
        (37, 41),
        "scan_fa_mean.nii.gz",
        # an untrained classifier is never confident: accept any sampled latent after a few draws
        run_overrides=[("n_samples", 2), ("fallback_thresholds", [0.0]), ("sample_max_draws", 20)],
    ),
    "acat": Case(
        {"model.pt": "network_def", "classifier.pt": "baseline", "autoencoder.pt": "autoencoder"},
        (37, 41, 5),
        "scan_saliency.nii.gz",
        run_overrides=[("cf_steps", 2)],
    ),
    "tvd_score": Case(
        {
            "classifier.pt": "classifier_def",
            "regressor.pt": "regressor_def",
            "autoencoder.pt": "autoencoder_def",
            "diffusion.pt": "diffusion_def",
        },
        (20, 18, 22),
        "scan_sample_000.nii.gz",
        configs=["train.json", "inference.json"],
        run_overrides=[("n_samples", 2), ("num_inference_steps", 2)],
    ),
    "attr_constraint": Case({"model.pt": "network_def"}, (37, 41), "scan_attribution.nii.gz"),
}


def bundle_parser(bundle: str, root: Path | None = None, configs=None) -> ConfigParser:
    """The bundle's inference configs (or ``configs``, e.g. with a preset merged), parsed lazily."""
    parser = ConfigParser()
    names = configs or CASES[bundle].configs
    parser.read_config([str(REPO / "bundles" / bundle / "configs" / name) for name in names])
    if root is not None:
        parser["bundle_root"] = str(root)
    return parser


def write_untrained_bundle(bundle: str, root: Path, configs=None) -> None:
    """What training leaves under bundle_root, with untrained networks: every checkpoint the inference config
    loads, and the small JSON files it reads (thresholds, feature statistics, latent scale, TVD report).
    ``configs``: the networks of these configs instead (a preset merged on the inference config)."""
    torch.manual_seed(0)
    parser = bundle_parser(bundle, configs=configs)
    models = root / "models"
    models.mkdir(parents=True)
    for name, ids in CASES[bundle].checkpoints.items():
        if isinstance(ids, dict):
            state = {key: parser.get_parsed_content(net_id).state_dict() for key, net_id in ids.items()}
        else:
            state = parser.get_parsed_content(ids).state_dict()
        torch.save(state, models / name)
    if bundle == "attr_constraint":
        (models / "thresholds.json").write_text(json.dumps({"G": 0.0}))
    if bundle == "tvd_score":
        items = [{"volume": 1500.0, "ventricle_volume": 2000.0}, {"volume": 1900.0, "ventricle_volume": 2600.0}]
        write_feature_statistics(models / "regressor_stats.json", items, parser["features"])
        write_latent_scale(models / "latent_scale.json", 1.0)
        (root / "eval").mkdir()
        (root / "eval" / "tvd_scores.json").write_text(json.dumps({"features": {}, "settings": {}}))
