"""ICAM's test-time pieces: fixed-class FA maps, sampling fall-backs, the image classifier, patient items."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from common.engines import RejectionSamplingError, feature_attribution
from common.errors import DatalistError, InputError
from common.icam_maps import (
    ICAMFeatureMaps,
    ICAMImageClassifier,
    decode_latent_path,
    embed_2d,
    interpolate_latents,
    interpolation_pairs,
    patient_items,
)
from common.networks import AttributeClassifier, AttributeEncoder, ContentEncoder, Generator

SIZE = (32, 32)


def _networks(bias: float):
    """Narrow networks for 32x32 images; the classifier's bias decides which class random latents get."""
    torch.manual_seed(0)
    nets = (
        ContentEncoder(2, channels=(8, 16, 32), num_res_blocks=1),
        AttributeEncoder(2, channels=(8, 16, 16, 16)),
        Generator(2, content_channels=32, up_channels=(16, 8), num_res_blocks=1),
        AttributeClassifier(image_size=SIZE),
    )
    with torch.no_grad():
        nets[3].classifier.weight.mul_(0.01)
        nets[3].classifier.bias.fill_(bias)
    return nets


def test_target_class_overrides_the_prediction():
    nets = _networks(bias=-20.0)  # every latent (and image) is class 0 with p ~ 1
    x = torch.rand(2, 1, *SIZE) * 2 - 1
    # By prediction (class 0) the maps need class-1 latents, which this classifier never gives.
    with pytest.raises(RejectionSamplingError):
        feature_attribution(*nets, x, n_samples=2, max_draws=300)
    fa = feature_attribution(*nets, x, n_samples=2, max_draws=300, target_class=0)
    assert fa.mean_map.shape == x.shape and fa.variance_map.shape == x.shape and fa.translated.shape == x.shape
    assert float(fa.variance_map.max()) > 0.0  # two different latents, two different translations


def test_feature_maps_fall_back_to_lower_thresholds_then_fail_clearly():
    nets = _networks(bias=0.0)  # p(class) ~ 0.5 for every latent: p > 0.9 is never reached
    x = torch.rand(1, 1, *SIZE) * 2 - 1
    strict = ICAMFeatureMaps(*nets, target_class=1, n_samples=3, max_draws=300)
    with pytest.raises(RejectionSamplingError, match="p > 0.9"):
        strict(x)
    lenient = ICAMFeatureMaps(*nets, target_class=1, n_samples=3, max_draws=300, fallback_thresholds=[0.5, 0.0])
    assert lenient(x).shape == x.shape and lenient.fallbacks == 1
    both = ICAMFeatureMaps(*nets, target_class=1, n_samples=3, threshold=0.0, output="all")
    assert both(x).shape == (1, 3, *SIZE)
    # Re-seeded at every call: the same image gives the same maps whatever came before.
    torch.testing.assert_close(both(x), both(x))


def test_image_classifier_reads_the_attribute_mean():
    _, encoder, _, classifier = _networks(bias=0.0)
    encoder.eval()
    x = torch.rand(3, 1, *SIZE)
    logits = ICAMImageClassifier(encoder, classifier)(x)
    torch.testing.assert_close(logits, classifier(encoder(x)[0]))
    assert logits.shape == (3, 1)


def test_patient_items_need_the_pair_and_the_ground_truth(tmp_path):
    image = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), image)
    good = {"image": "a.nii.gz", "healthy": "a.nii.gz", "mask": "a.nii.gz", "label": 1}
    control = {"image": "a.nii.gz", "label": 0}  # controls need neither key
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": [control, good, dict(good)]}))
    assert len(patient_items(str(datalist), "test")) == 2
    assert len(patient_items(str(datalist), "test", max_cases=1)) == 1
    datalist.write_text(json.dumps({"test": [control, {"image": "a.nii.gz", "mask": "a.nii.gz", "label": 1}]}))
    with pytest.raises(DatalistError, match=r"missing key\(s\) \['healthy'\]"):
        patient_items(str(datalist), "test")


def test_latent_tools_embed_interpolate_and_check_pairs():
    features = np.random.default_rng(0).normal(size=(6, 1, 2, 2))
    for method in ("pca", "tsne"):
        assert embed_2d(features, method).shape == (6, 2)
    with pytest.raises(ValueError, match="embedding_method"):
        embed_2d(features, "umap")
    start, end = torch.zeros(1, 2, 2), torch.ones(1, 2, 2)
    line = interpolate_latents(start, end, 5)
    assert line.shape == (5, 1, 2, 2) and torch.equal(line[0], start) and torch.equal(line[-1], end)
    torch.testing.assert_close(line[:, 0, 0, 0], torch.linspace(0, 1, 5))
    nets = _networks(bias=0.0)
    x = torch.rand(1, 1, *SIZE) * 2 - 1
    path = decode_latent_path(nets[0], nets[2], nets[3], x, line)
    assert path.decoded.shape == (5, 1, *SIZE)
    torch.testing.assert_close(path.fa_maps, path.decoded - x)
    torch.testing.assert_close(path.probabilities, torch.sigmoid(nets[3](line).view(-1)))
    assert interpolation_pairs([1, 0, 1, 0]) == [(1, 0)]  # (first control, first patient)
    assert interpolation_pairs([1, 0, 1, 0], [[3, 2]]) == [(3, 2)]
    with pytest.raises(InputError, match="expected \\[control"):
        interpolation_pairs([1, 0, 1, 0], [[0, 1]])  # patient first
    with pytest.raises(InputError, match="classes 0 and 1"):
        interpolation_pairs([1, 1])
