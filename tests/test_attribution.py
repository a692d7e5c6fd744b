"""Baseline attributions (Captum) and the differentiable attributions used for training."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.utils import set_determinism
from torch import nn

from common.attribution import METHODS, attribute, differentiable_attribution
from tests.toys import LinearScore

REPO = Path(__file__).resolve().parents[1]


def toy_classifier(spatial_dims: int, channels: int = 8, logits: int = 1) -> nn.Module:
    conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    pool = nn.AdaptiveAvgPool2d if spatial_dims == 2 else nn.AdaptiveAvgPool3d
    return nn.Sequential(
        conv(1, channels, 3, padding=1),
        nn.ReLU(),
        conv(channels, channels, 3, padding=1, stride=2),
        nn.ReLU(),
        pool(1),
        nn.Flatten(),
        nn.Linear(channels, logits),
    ).eval()


@pytest.mark.parametrize("spatial_dims,shape", [(2, (2, 1, 24, 20)), (3, (2, 1, 12, 14, 10))])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_returns_the_input_shape(spatial_dims, shape, method):
    torch.manual_seed(0)
    model = toy_classifier(spatial_dims)
    x = torch.randn(shape)
    amap = attribute(model, x, method, n_steps=16, n_samples=8, window=4, stride=2, baselines=None)
    assert amap.shape == x.shape
    assert torch.isfinite(amap).all() and amap.abs().sum() > 0
    if method == "grad_cam":
        assert (amap >= 0).all()


def test_closed_forms_on_a_linear_model():
    torch.manual_seed(0)
    x = torch.randn(3, 1, 10, 12)
    model = LinearScore((1, 10, 12)).eval()
    w = model.w.detach()
    grad = attribute(model, x, "gradient")
    assert torch.allclose(grad, w.expand_as(x), atol=1e-6)
    # Class 0 is explained by the negated logit.
    assert torch.allclose(attribute(model, x, "gradient", target_class=0), -w.expand_as(x), atol=1e-6)
    ig = attribute(model, x, "integrated_gradients", n_steps=50)
    assert torch.allclose(ig, (w * x), atol=1e-5)
    # One reference: every sample gives exactly (x - x') w on a linear model.
    ref = torch.randn(1, 1, 10, 12)
    eg = attribute(model, x, "expected_gradients", baselines=ref, n_samples=3)
    assert torch.allclose(eg, (x - ref) * w, atol=1e-5)
    # Several references: Captum draws them at random (numpy's global generator), so the estimate
    # is (x - sampled mean ref) w. Over 400 draws its relative error is ~0.04 (0.015-0.06 over 20
    # seeds); a bound of 0.15 fails only if the references were not averaged at all.
    set_determinism(seed=0)
    refs = torch.randn(4, 1, 10, 12)
    eg = attribute(model, x, "expected_gradients", baselines=refs, n_samples=400)
    expected = (x - refs.mean(0, keepdim=True)) * w
    assert ((eg - expected).norm() / expected.norm()).item() < 0.15
    single = (x - refs[:1]) * w
    assert ((single - expected).norm() / expected.norm()).item() > 0.15
    occ = attribute(model, x, "occlusion", window=1, stride=1)
    assert torch.allclose(occ, w * x, atol=1e-5)


def test_integrated_gradients_completeness_on_a_network():
    torch.manual_seed(1)
    model = toy_classifier(2)
    x = torch.randn(1, 1, 16, 16)
    ig = attribute(model, x, "integrated_gradients", n_steps=200)
    gap = (model(x) - model(torch.zeros_like(x))).item()
    assert ig.sum().item() == pytest.approx(gap, rel=0.02, abs=1e-4)


def test_grad_cam_uses_the_named_layer():
    model = toy_classifier(2)
    x = torch.randn(1, 1, 16, 16)
    by_name = attribute(model, x, "grad_cam", layer="2")
    by_default = attribute(model, x, "grad_cam")
    early = attribute(model, x, "grad_cam", layer="0")
    assert torch.allclose(by_name, by_default)
    assert not torch.allclose(early, by_default)


def test_multi_logit_target():
    torch.manual_seed(0)
    model = toy_classifier(2, logits=4)
    x = torch.randn(2, 1, 16, 16)
    maps = [attribute(model, x, "gradient", target_class=c) for c in range(4)]
    assert not torch.allclose(maps[0], maps[3])


@pytest.mark.slow
def test_integrated_gradients_on_a_volume_fits_in_4_gb():
    """200-step IG on 1x1x96x112x96, measured as the peak resident memory of a fresh process."""
    script = (
        "import resource, torch\n"
        "from tests.test_attribution import toy_classifier\n"
        "from common.attribution import attribute\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(1, 1, 96, 112, 96)\n"
        "a = attribute(toy_classifier(3), x, 'integrated_gradients', n_steps=200)\n"
        "assert a.shape == x.shape and torch.isfinite(a).all()\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    peak_kib = int(proc.stdout.strip().splitlines()[-1])
    assert peak_kib < 4 * 1024 * 1024, f"peak {peak_kib / 1024**2:.2f} GiB"


@pytest.mark.parametrize("method", ["G", "IG", "EG", "IEG"])
def test_training_attributions_are_differentiable(method):
    torch.manual_seed(0)
    model = LinearScore((1, 6, 6)).train()
    x = torch.randn(4, 1, 6, 6)
    amap, logits = differentiable_attribution(model, x, method, generator=torch.Generator().manual_seed(0))
    assert amap.shape == x.shape and logits.shape == (4, 1)
    assert amap.requires_grad
    # Double backprop reaches the weights: d/dw sum(A^2) is non-zero.
    (amap**2).sum().backward()
    assert model.w.grad is not None and model.w.grad.abs().sum() > 0


def test_training_attribution_values():
    torch.manual_seed(0)
    model = LinearScore((1, 5, 5))
    w = model.w.detach()
    x = torch.randn(3, 1, 5, 5)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    grad, logits = differentiable_attribution(model, x, "G")
    assert torch.allclose(grad, w.expand_as(x)) and torch.allclose(logits, model(x))
    ig, _ = differentiable_attribution(model, x, "IG", generator=gen())
    assert torch.allclose(ig, w * x, atol=1e-6)  # linear: IG is exact for any alpha
    eg, _ = differentiable_attribution(model, x, "EG", generator=gen())
    assert torch.allclose(eg, (x - torch.roll(x, 1, 0)) * w, atol=1e-6)
    always_null, _ = differentiable_attribution(model, x, "IEG", p_null=1.0, generator=gen())
    assert torch.allclose(always_null, ig, atol=1e-6)
    never_null, _ = differentiable_attribution(model, x, "IEG", p_null=0.0, generator=gen())
    assert torch.allclose(never_null, eg, atol=1e-6)
    with pytest.raises(ValueError, match="needs references"):
        differentiable_attribution(model, x[:1], "EG")
