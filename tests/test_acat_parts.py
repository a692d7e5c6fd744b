"""ACAT networks and saliency maps: slice classifiers, ACAT attention, autoencoder, counterfactual maps."""

import pytest
import torch
from captum.attr import LayerGradCam
from monai.networks.blocks import ResidualUnit
from torch import nn

from common.acat import SaliencyMaps, fine_tuning_groups
from common.attribution import attribute
from common.attribution.counterfactual import (
    counterfactual_saliency,
    latent_shift_saliency,
    normalise_per_sample,
    slice_grad_cam,
)
from common.networks import ACATClassifier, SliceAutoencoder, SliceClassifier, SliceCNN


@pytest.mark.parametrize("slices", [1, 5])
def test_shapes(slices):
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32, slices)
    assert SliceClassifier().eval()(x).shape == (2, 4)
    assert SliceClassifier(hemispheres=False).eval().slice_features(x).shape == (2, slices, 128)
    assert SliceClassifier().eval().slice_features(x).shape == (2, slices, 256)
    acat = ACATClassifier().eval()
    assert acat(x, torch.rand_like(x)).shape == (2, 4)
    ae = SliceAutoencoder().eval()
    z = ae.encode(x)
    assert z.shape == (2, slices, 64, 4, 4)  # spatial latent, X/8 x Y/8 per slice
    out = ae.decode(z)
    assert out.shape == x.shape and out.abs().max() <= 1.0
    assert torch.equal(ae(x), out)


def test_architecture():
    def count(module, kind):
        return sum(isinstance(m, kind) for m in module.modules())

    cnn = SliceCNN()
    assert len(cnn.layers) == 7 and count(cnn, nn.BatchNorm2d) == 7
    assert [layer.conv.stride[0] for layer in cnn.layers] == [1, 2, 1, 2, 1, 2, 1]
    acat = ACATClassifier()
    assert len(acat.saliency_cnn.layers) == 5  # no saliency layers after the last attention module
    assert acat.fusion.conv.in_channels == 3 and acat.fusion.conv.kernel_size == (1, 1)
    ae = SliceAutoencoder()
    assert count(ae.encoder, ResidualUnit) == 3 and count(ae.decoder, ResidualUnit) == 3
    with pytest.raises(ValueError, match="divisible by 8"):
        ae.encode(torch.zeros(1, 1, 20, 32, 2))
    with pytest.raises(ValueError, match="attention_layers"):
        ACATClassifier(attention_layers=(0, 3))


def test_halves_layout_and_round_trip():
    model = SliceClassifier()
    x = torch.randn(2, 1, 8, 6, 3)
    halves = model._to_halves(x)
    assert halves.shape == (2 * 3 * 2, 1, 4, 6)
    assert torch.equal(halves[0], x[0, :, :4, :, 0])  # volume 0, slice 0, left
    assert torch.equal(halves[1], x[0, :, 4:, :, 0].flip(1))  # its right half, mirrored
    assert torch.equal(halves[2], x[0, :, :4, :, 1])  # volume 0, slice 1
    assert torch.equal(model._from_halves(halves, 2), x)
    whole = SliceClassifier(hemispheres=False)
    assert torch.equal(whole._from_halves(whole._to_halves(x), 2), x)


def test_mirroring_the_volume_swaps_the_hemisphere_features():
    torch.manual_seed(0)
    model = SliceClassifier().eval()
    x = torch.randn(2, 1, 32, 32, 3)
    x[0, :, 4:10, 10:16, 1] += 3.0  # a "lesion" in the left hemisphere
    features = model.slice_features(x)
    mirrored = model.slice_features(x.flip(2))
    f = model.cnn.out_channels
    assert torch.allclose(mirrored[..., :f], features[..., f:], atol=1e-6)
    assert torch.allclose(mirrored[..., f:], features[..., :f], atol=1e-6)
    assert not torch.allclose(features[..., :f], features[..., f:], atol=1e-3)


def test_load_baseline_copies_both_branches_and_the_head():
    torch.manual_seed(0)
    baseline = SliceClassifier()
    for module in baseline.modules():  # non-default batch-norm statistics must be copied too
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
    for source in (baseline, baseline.state_dict()):
        acat = ACATClassifier().load_baseline(source)
        reference = baseline.cnn.state_dict()
        assert all(torch.equal(v, reference[k]) for k, v in acat.cnn.state_dict().items())
        assert all(torch.equal(v, reference[k]) for k, v in acat.saliency_cnn.state_dict().items())
        assert torch.equal(acat.head.weight, baseline.head.weight) and torch.equal(acat.head.bias, baseline.head.bias)


def test_acat_without_attention_is_the_baseline():
    """Masks forced to 0 and equal slice weights: F + F * 0 and the plain slice mean, i.e. the baseline."""
    torch.manual_seed(0)
    baseline = SliceClassifier().eval()
    acat = ACATClassifier().load_baseline(baseline).eval()
    x, saliency = torch.randn(2, 1, 32, 32, 3), torch.rand(2, 1, 32, 32, 3)
    assert not torch.allclose(acat(x, saliency), baseline(x), atol=1e-4)
    with torch.no_grad():
        for block in [*acat.attention.values(), acat.fusion]:
            block.conv.weight.zero_()
            block.conv.bias.fill_(-1e4)  # sigmoid(-1e4) == 0
        acat.slice_attention[-1].weight.zero_()
    assert torch.allclose(acat(x, saliency), baseline(x), atol=1e-6)


def test_closed_gates_start_next_to_the_baseline_and_still_learn():
    torch.manual_seed(0)
    baseline = SliceClassifier().eval()
    x, saliency = torch.randn(2, 1, 32, 32, 3), torch.rand(2, 1, 32, 32, 3)
    acat = ACATClassifier().load_baseline(baseline, gate_bias=-30.0).eval()
    assert torch.allclose(acat(x, saliency), baseline(x), atol=1e-5)  # sigmoid(-30) ~ 1e-13
    acat = ACATClassifier().load_baseline(baseline, gate_bias=-3.0).eval()
    masks = acat.attention_masks(x, saliency)
    assert all(
        torch.allclose(m, torch.full_like(m, torch.sigmoid(torch.tensor(-3.0)).item()))
        for k, m in masks.items()
        if k != "slices"
    )
    assert torch.allclose(masks["slices"], torch.full_like(masks["slices"], 1 / 3))
    acat(x, saliency).logsumexp(dim=1).sum().backward()
    # zero-initialised gate weights still get a gradient, so the gates can open
    assert all(block.conv.weight.grad.abs().sum() > 0 for block in [*acat.attention.values(), acat.fusion])
    assert acat.slice_attention[-1].weight.grad.abs().sum() > 0


def test_fine_tuning_groups_give_the_added_modules_their_own_rate():
    acat = ACATClassifier()
    base, added = fine_tuning_groups(acat, 1e-4, 1e-3)
    assert (base["lr"], added["lr"]) == (1e-4, 1e-3)
    assert len(base["params"]) + len(added["params"]) == len(list(acat.parameters()))
    assert {id(p) for p in added["params"]} == {id(p) for p in acat.added_parameters()}
    assert {id(p) for p in acat.saliency_cnn.parameters()} <= {id(p) for p in base["params"]}
    assert fine_tuning_groups(acat, 1e-4)[1]["lr"] == 1e-4


def test_attention_masks_and_gradients_reach_both_branches():
    torch.manual_seed(0)
    acat = ACATClassifier()
    x, saliency = torch.randn(2, 1, 32, 32, 3), torch.rand(2, 1, 32, 32, 3)
    masks = acat.attention_masks(x, saliency)
    assert masks["layer1"].shape == (2, 1, 32, 32, 3) and masks["layer3"].shape == (2, 1, 16, 16, 3)
    assert masks["layer5"].shape == (2, 1, 8, 8, 3) and masks["fused"].shape == (2, 1, 4, 4, 3)
    for name in ("layer1", "layer3", "layer5", "fused"):
        assert (masks[name] > 0).all() and (masks[name] < 1).all()
    assert torch.allclose(masks["slices"].sum(1), torch.ones(2))
    # The saliency input changes the prediction.
    acat.eval()
    assert not torch.allclose(acat(x, saliency), acat(x, torch.zeros_like(x)), atol=1e-5)
    acat.train()
    nn.functional.cross_entropy(acat(x, saliency), torch.tensor([1, 2])).backward()
    for name, p in acat.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


class IdentityAutoencoder(nn.Module):
    """z = s * x, D(z) = z / s with s = 1: a latent move is an image change, voxel for voxel."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.ones(()))

    def encode(self, volume):
        return volume * self.s

    def decode(self, z):
        return z / self.s


class RegionClassifier(nn.Module):
    """Two logits (-w m, w m) from m, the mean intensity of a 4x4 region of slice 1; blind elsewhere."""

    def __init__(self, w: float = 20.0):
        super().__init__()
        self.norm = nn.BatchNorm1d(1)  # train mode would use (and update) batch statistics
        self.linear = nn.Linear(1, 2)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[-w], [w]]))
            self.linear.bias.zero_()

    def forward(self, volume):
        return self.linear(self.norm(volume[:, :, 4:8, 8:12, 1].mean(dim=(1, 2, 3))[:, None]))


def region_mask(shape):
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[:, :, 4:8, 8:12, 1] = True
    return mask


def _toy(batch=2):
    torch.manual_seed(0)
    x = 0.1 * torch.randn(batch, 1, 16, 16, 3)
    x[0, :, 4:8, 8:12, 1] = -0.05  # p(class 0) = 0.88
    x[1, :, 4:8, 8:12, 1] = 0.05  # p(class 1) = 0.88
    classifier, autoencoder = RegionClassifier().train(), IdentityAutoencoder().train()
    return x, classifier, autoencoder


def test_counterfactual_map_finds_the_region_and_leaves_the_networks_alone():
    x, classifier, autoencoder = _toy()
    stats = classifier.norm.running_mean.clone()
    saliency, details = counterfactual_saliency(classifier, autoencoder, x, return_details=True)
    mask = region_mask(x.shape)
    assert saliency.shape == x.shape
    assert (saliency[~mask] == 0).all()  # the classifier is blind outside the region
    assert torch.allclose(saliency[mask], torch.ones(()))  # each target's map peaks (at 1) in the region
    maps = details["maps"]
    assert maps.shape == (2, 2, *x.shape[1:])
    assert torch.equal(maps.flatten(2).amax(2), torch.ones(2, 2))
    assert (details["probabilities"] > details["initial_probabilities"]).all()
    assert (details["latent_l1"] > 0).all()
    # The networks: no gradients, modes and flags as they were, no batch statistics taken.
    for model in (classifier, autoencoder):
        assert all(p.grad is None and p.requires_grad for p in model.parameters())
        assert all(m.training for m in model.modules())
    assert torch.equal(classifier.norm.running_mean, stats)
    # Each volume is optimised by its own loss: batch mates change nothing.
    alone, alone_details = counterfactual_saliency(classifier, autoencoder, x[1:], return_details=True)
    assert torch.allclose(alone, saliency[1:], atol=1e-6)
    assert torch.allclose(alone_details["probabilities"], details["probabilities"][1:], atol=1e-6)


def test_counterfactual_options():
    x, classifier, autoencoder = _toy()
    # No step: zero maps stay zero (no 0/0).
    assert torch.equal(counterfactual_saliency(classifier, autoencoder, x, steps=0), torch.zeros_like(x))
    one, details = counterfactual_saliency(
        classifier, autoencoder, x, targets=[0], optimizer="adam", return_details=True
    )
    assert (
        details["probabilities"].shape == (2, 1) and (details["probabilities"] > details["initial_probabilities"]).all()
    )
    assert (one[~region_mask(x.shape)] == 0).all()
    with pytest.raises(ValueError, match="optimizer"):
        counterfactual_saliency(classifier, autoencoder, x, optimizer="lbfgs")


def test_counterfactual_on_the_acat_networks():
    torch.manual_seed(0)
    classifier, autoencoder = SliceClassifier().eval(), SliceAutoencoder().eval()
    x = torch.rand(1, 1, 32, 32, 2) * 2 - 1
    saliency, details = counterfactual_saliency(classifier, autoencoder, x, steps=3, return_details=True)
    assert saliency.shape == x.shape and saliency.min() >= 0 and saliency.max() <= 1
    peaks = details["maps"].flatten(2).amax(2)
    assert ((peaks == 1) | (peaks == 0)).all() and (peaks == 1).any()
    assert all(p.grad is None for p in [*classifier.parameters(), *autoencoder.parameters()])


def test_latent_shift_lowers_the_predicted_class():
    x, classifier, autoencoder = _toy()
    saliency, details = latent_shift_saliency(classifier, autoencoder, x, return_details=True)
    assert torch.equal(details["target_class"], torch.tensor([0, 1]))
    assert (details["shifted_probability"] < details["probability"] - 0.1).all()
    assert (details["lambda"] < 0).all()
    mask = region_mask(x.shape)
    assert (saliency[~mask] == 0).all() and torch.allclose(saliency[mask], torch.ones(()))
    # Cohen et al.'s rule: the first (smallest) shift lowering p_c enough.
    _, first = latent_shift_saliency(classifier, autoencoder, x, drop=0.1, return_details=True)
    assert torch.equal(first["lambda"], torch.tensor([-1.0, -1.0])) and (details["lambda"] < -1).any()
    _, given = latent_shift_saliency(classifier, autoencoder, x, target_class=1, return_details=True)
    assert torch.equal(given["target_class"], torch.tensor([1, 1]))
    assert (given["shifted_probability"] <= given["probability"]).all()
    # a negative counterfactual: towards class 0 raises p_0 (positive lambda along its gradient)
    _, towards = latent_shift_saliency(classifier, autoencoder, x, towards_class=0, return_details=True)
    assert torch.equal(towards["target_class"], torch.tensor([0, 0])) and (towards["lambda"] > 0).all()
    assert (towards["shifted_probability"] > towards["probability"]).all()
    assert towards["shifted_probability"][1] > towards["probability"][1] + 0.1  # item 1 predicted class 1
    _, first_up = latent_shift_saliency(classifier, autoencoder, x, towards_class=0, drop=0.01, return_details=True)
    assert (first_up["lambda"] <= towards["lambda"]).all()
    with pytest.raises(ValueError, match="not both"):
        latent_shift_saliency(classifier, autoencoder, x, target_class=1, towards_class=0)
    assert all(p.grad is None for p in classifier.parameters()) and classifier.training


def test_normalise_per_sample():
    maps = torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, 0.0], [1e-30, 0.0, 0.0]])
    out = normalise_per_sample(maps)
    assert torch.equal(out, torch.tensor([[0.0, 1.0, 0.5], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_grad_cam_stays_in_the_half_slice_with_the_evidence(side):
    """A fresh network maps zeros to zero features (bias-free convolutions, default batch-norm
    statistics), so only the half slice holding the blob can have a non-zero cam."""
    torch.manual_seed(0)
    model = SliceClassifier().train()
    x = torch.zeros(2, 1, 32, 32, 3)
    rows = slice(4, 10) if side == "left" else slice(22, 28)
    x[:, :, rows, 12:18, 1] = 1.0
    evidence = torch.zeros_like(x, dtype=torch.bool)
    evidence[:, :, :16, :, 1] = side == "left"
    evidence[:, :, 16:, :, 1] = side == "right"
    for target in range(4):
        signed = slice_grad_cam(model, x, target, relu=False)
        assert signed.shape == x.shape
        assert (signed[~evidence] == 0).all() and signed[evidence].abs().sum() > 0
        cam = slice_grad_cam(model, x, target)
        assert (cam >= 0).all() and (cam[~evidence] == 0).all()
    assert model.training and all(p.grad is None for p in model.parameters())


def test_grad_cam_matches_captum_where_captum_applies():
    """Whole slices and one slice: the layer's batch is the model's, so Captum's LayerGradCam works."""
    torch.manual_seed(0)
    model = SliceClassifier(hemispheres=False).eval()
    x = torch.randn(2, 1, 32, 32, 1)
    ours = slice_grad_cam(model, x, torch.tensor([0, 3]))
    theirs = LayerGradCam(model, model.cnn.layers[-1]).attribute(x, target=[0, 3], relu_attributions=True)
    theirs = nn.functional.interpolate(theirs, size=(32, 32), mode="bilinear", align_corners=False)
    assert torch.allclose(ours[..., 0], theirs, atol=1e-6) and ours.abs().sum() > 0


def test_grad_cam_volume_weights_follow_the_formula():
    """channel_weights="volume": one weight per channel, the mean of dscore/dA over every half slice
    of the volume; "half_slice": per half slice. Checked against the activations and gradients
    captured by hand, and the two differ on a volume of several slices."""
    torch.manual_seed(0)
    model = SliceClassifier().eval()
    x = torch.randn(2, 1, 32, 32, 3)
    captured = []
    hook = model.cnn.layers[-1].register_forward_hook(lambda module, inputs, output: captured.append(output))
    logits = model(x)
    hook.remove()
    (gradient,) = torch.autograd.grad(logits[:, 2].sum(), captured[0])
    activation = captured[0].detach()
    per_volume = gradient.reshape(2, 6, *gradient.shape[1:]).mean(dim=(1, 3, 4))  # (B, C)
    expected = torch.stack([(per_volume[i // 6, :, None, None] * activation[i]).sum(0) for i in range(12)])
    expected = nn.functional.interpolate(expected.clamp(min=0)[:, None], size=(16, 32), mode="bilinear")
    expected = model._from_halves(expected, 2)
    volume_cam = slice_grad_cam(model, x, 2, channel_weights="volume")
    half_cam = slice_grad_cam(model, x, 2)
    peak = expected.max()  # an untrained network's cam is ~1e-5: compare relative to its peak
    assert peak > 0 and torch.allclose(volume_cam / peak, expected / peak, atol=1e-5)
    assert (volume_cam - half_cam).abs().max() > 0.1 * peak
    with pytest.raises(ValueError, match="channel_weights"):
        slice_grad_cam(model, x, 2, channel_weights="slice")


def test_saliency_maps_comparator_target():
    """gradient / Grad-CAM explain the predicted class unless comparator_target names one."""
    torch.manual_seed(0)
    model = SliceClassifier().eval()
    x = torch.randn(2, 1, 32, 32, 3)
    predicted = model(x).argmax(dim=1)
    other = int((predicted[0] + 1) % 4)
    for method in ("gradient", "grad_cam"):
        default = SaliencyMaps(model, method=method, tissue_only=False)(x)
        explicit = SaliencyMaps(model, method=method, tissue_only=False, comparator_target=int(predicted[0]))(x[:1])
        assert torch.allclose(default[:1], explicit, atol=1e-6)
        elsewhere = SaliencyMaps(model, method=method, tissue_only=False, comparator_target=other)(x[:1])
        assert not torch.allclose(elsewhere, explicit, atol=1e-3)
    with pytest.raises(ValueError, match="grad_cam_weights"):
        SaliencyMaps(model, method="grad_cam", grad_cam_weights="slice")


def test_grad_cam_and_gradient_for_acat_and_the_baseline():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 32, 32, 2)
    acat = ACATClassifier().eval()
    with pytest.raises(ValueError, match="saliency"):
        slice_grad_cam(acat, x, 1)
    cam = slice_grad_cam(acat, x, 1, saliency=torch.rand_like(x))
    assert cam.shape == x.shape and (cam >= 0).all()
    gradient = attribute(SliceClassifier().eval(), x, "gradient", target_class=2)
    assert gradient.shape == x.shape and torch.isfinite(gradient).all() and gradient.abs().sum() > 0
