"""Feature-guided diffusion sampling (common.diffusion, TVD-score paper Eq. 8) on MONAI's schedulers.

Tiny CPU problems: 1x8x8 images, 1x4x4x4 latents, the paper's schedule (T = 1000, linear beta
0.0015 -> 0.0205). Hand computations use their own float64 schedule, not the scheduler's tensors.
"""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from common.diffusion import guided_sample, guided_step, normalised_guidance, piecewise_rho, reject_off_target
from tests.toys import PrecisionRecorder, tiny_diffusion_unet

T, BETA_START, BETA_END = 1000, 0.0015, 0.0205
BETAS = torch.linspace(BETA_START, BETA_END, T, dtype=torch.float64)
ABAR = torch.cumprod(1 - BETAS, dim=0)


def ddpm(**kwargs) -> DDPMScheduler:
    return DDPMScheduler(T, schedule="linear_beta", beta_start=BETA_START, beta_end=BETA_END, **kwargs)


def ddim(steps: int, **kwargs) -> DDIMScheduler:
    scheduler = DDIMScheduler(T, schedule="linear_beta", beta_start=BETA_START, beta_end=BETA_END, **kwargs)
    scheduler.set_timesteps(steps)
    return scheduler


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mean_intensity(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


class LinearEps(nn.Module):
    """eps = A x + b + 1e-3 t on the flattened sample; records the timesteps and whether grad was enabled."""

    def __init__(self, n: int, seed: int = 0):
        super().__init__()
        g = seeded(seed)
        self.lin = nn.Linear(n, n)
        with torch.no_grad():
            self.lin.weight.copy_(0.1 * torch.randn(n, n, generator=g))
            self.lin.bias.copy_(0.1 * torch.randn(n, generator=g))
        self.timesteps: list[torch.Tensor] = []
        self.grad_enabled: list[bool] = []

    def forward(self, x, timesteps):
        self.timesteps.append(timesteps.clone())
        self.grad_enabled.append(torch.is_grad_enabled())
        out = self.lin(x.flatten(1)) + 1e-3 * timesteps.to(x.dtype)[:, None]
        return out.reshape(x.shape)


class ConvEps(nn.Module):
    """A small non-linear eps-model with dropout (must be off: eval mode)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Dropout(0.5), nn.Conv2d(4, 1, 3, padding=1)
        )

    def forward(self, x, timesteps):
        return self.net(x) + 1e-3 * timesteps.to(x.dtype).reshape(-1, 1, 1, 1)


class Regressor(nn.Module):
    """A non-linear g with dropout (must be off while guiding)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x)


class GaussianEps(nn.Module):
    """The exact eps-predictor E[eps | x_t] for data x0 ~ N(mu, s^2 I)."""

    def __init__(self, mu: float = 0.0, s: float = 0.5):
        super().__init__()
        self.mu, self.s = mu, s
        self.abar = ABAR.float()
        self.grad_enabled: list[bool] = []

    def forward(self, x, timesteps):
        self.grad_enabled.append(torch.is_grad_enabled())
        a = self.abar[timesteps].reshape(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


def posterior(x: torch.Tensor, x0: torch.Tensor, z: torch.Tensor, t: int) -> torch.Tensor:
    """Eq. 8, second line, by hand (float64): posterior mean + sigma_t z."""
    abar, abar_prev, beta = ABAR[t], ABAR[t - 1], BETAS[t]
    mean = (1 - beta).sqrt() * (1 - abar_prev) / (1 - abar) * x + abar_prev.sqrt() * beta / (1 - abar) * x0
    sigma = ((1 - abar_prev) / (1 - abar) * beta).sqrt()
    return mean + sigma * z


# --- rho = 0: exactly MONAI's step -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, eta",
    [
        (lambda: ddpm(), 0.0),  # clip_sample=True (MONAI's default)
        (lambda: ddpm(clip_sample=False), 0.0),
        (lambda: ddim(50, clip_sample=False), 0.0),
        (lambda: ddim(50, clip_sample=False), 0.7),  # DDIM with noise: same generator draw
    ],
)
@pytest.mark.parametrize("t", [999, 500, 0])
def test_rho_zero_is_monai_step(make, eta, t):
    scheduler = make()
    if isinstance(scheduler, DDIMScheduler):
        t = int(scheduler.timesteps[{999: 0, 500: 25, 0: -1}[t]])
    model = LinearEps(64)
    x = torch.randn(3, 1, 8, 8, generator=seeded(1))
    timesteps = torch.full((3,), t, dtype=torch.long)
    eps = model(x, timesteps=timesteps)
    kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    expected, _ = scheduler.step(eps, t, x, generator=seeded(7), **kwargs)
    for feature_fn, rho in [(mean_intensity, 0.0), (None, 0.5), (mean_intensity, lambda t: 0.0)]:
        model.grad_enabled.clear()
        out = guided_step(model, scheduler, x, t, feature_fn, 0.3, rho, generator=seeded(7), eta=eta)
        assert torch.equal(out, expected)
        assert model.grad_enabled == [False]  # no backward when there is no guidance
        assert torch.equal(model.timesteps[-1], timesteps)


def test_rho_zero_sample_is_plain_monai_loop():
    scheduler, model = ddpm(), GaussianEps()
    gen = seeded(3)
    x = torch.randn(2, 1, 8, 8, generator=gen)
    for t in scheduler.timesteps:
        eps = model(x, timesteps=torch.full((2,), int(t), dtype=torch.long))
        x, _ = scheduler.step(eps, int(t), x, generator=gen)
    model.grad_enabled.clear()
    out = guided_sample(model, scheduler, (2, 1, 8, 8), mean_intensity, 0.5, 0.0, generator=seeded(3))
    assert torch.equal(out, x)
    assert not any(model.grad_enabled)


# --- the guided step against Eq. 8 by hand --------------------------------------------------------------


def test_guided_step_matches_eq8_by_hand():
    t, rho, seed = 300, 0.1, 7
    scheduler = ddpm(clip_sample=False)
    model = LinearEps(64)
    x = torch.randn(3, 1, 8, 8, generator=seeded(2))
    c0 = torch.tensor([0.5, -0.2, 0.1])
    out = guided_step(model, scheduler, x, t, mean_intensity, c0, rho, generator=seeded(seed))
    assert model.grad_enabled == [True]
    assert torch.equal(model.timesteps[-1], torch.full((3,), t, dtype=torch.long))

    a, b = model.lin.weight.detach().double(), model.lin.bias.detach().double()
    xf = x.flatten(1).double()
    sa, s1 = ABAR[t].sqrt(), (1 - ABAR[t]).sqrt()
    eps = xf @ a.T + b + 1e-3 * t
    x0 = (xf - s1 * eps) / sa  # the correct DDPM estimate (the paper prints (1 - abar) instead of sqrt)
    g = x0.mean(1)
    # d/dx ||c0 - mean(x0_hat)||^2 = -2 (c0 - g) * (1/64) * (1 - s1 * colsum(A)) / sa, analytically
    grad = -2 * (c0.double() - g)[:, None] * (1 - s1 * a.sum(0))[None, :] / (64 * sa)
    z = torch.randn(3, 1, 8, 8, generator=seeded(seed)).flatten(1).double()
    expected = posterior(xf, x0, z, t) - rho * grad / grad.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out.flatten(1).double(), expected, atol=1e-4, rtol=1e-4)

    # the printed Eq. 8 ((1 - abar_t) eps, a typo) gives a visibly different step
    x0_typo = (xf - (1 - ABAR[t]) * eps) / sa
    grad_typo = -2 * (c0.double() - x0_typo.mean(1))[:, None] * (1 - (1 - ABAR[t]) * a.sum(0))[None, :] / (64 * sa)
    typo = posterior(xf, x0_typo, z, t) - rho * grad_typo / grad_typo.norm(dim=1, keepdim=True)
    assert (out.flatten(1).double() - typo).abs().max() > 1e-3  # 10x the tolerance above


def test_normalised_guidance_has_norm_rho_and_models_stay_as_they_were():
    scheduler = ddpm(clip_sample=False)
    model, g = ConvEps().train(), Regressor().train()
    x = torch.randn(4, 1, 8, 8, generator=seeded(5))
    rho = piecewise_rho(0.03, 0.04, 400)
    for t, expected_rho in [(500, 0.03), (401, 0.03), (400, 0.04), (100, 0.04)]:
        plain = guided_step(model, scheduler, x, t, generator=seeded(1))
        guided = guided_step(model, scheduler, x, t, g, torch.tensor([1.0, -1.0, 0.0, 2.0]), rho, generator=seeded(1))
        again = guided_step(model, scheduler, x, t, g, torch.tensor([1.0, -1.0, 0.0, 2.0]), rho, generator=seeded(1))
        assert torch.equal(guided, again)  # dropout off: eval mode
        norms = (plain - guided).flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.full((4,), expected_rho), atol=1e-6, rtol=1e-5)
    assert model.training and g.training  # modes restored
    assert all(p.requires_grad and p.grad is None for p in [*model.parameters(), *g.parameters()])

    # a zero gradient (g does not depend on x) is no move, not NaN
    flat = guided_step(model, scheduler, x, 500, lambda im: 0 * im.flatten(1).sum(1), 1.0, 0.1, generator=seeded(1))
    assert torch.equal(flat, guided_step(model, scheduler, x, 500, generator=seeded(1)))
    grad = torch.zeros(2, 1, 4, 4)
    grad[1, 0, 0, 0] = 3.0
    torch.testing.assert_close(normalised_guidance(grad)[1, 0, 0, 0], torch.tensor(1.0))
    assert torch.equal(normalised_guidance(grad)[0], torch.zeros(1, 4, 4))


def test_guided_step_with_monai_diffusion_unet():
    unet = tiny_diffusion_unet()
    scheduler = ddpm()
    x = torch.randn(2, 1, 8, 8, generator=seeded(0))
    plain = guided_step(unet, scheduler, x, 600, generator=seeded(4))
    guided = guided_step(unet, scheduler, x, 600, mean_intensity, torch.tensor([0.5, -0.5]), 0.1, generator=seeded(4))
    torch.testing.assert_close((plain - guided).flatten(1).norm(dim=1), torch.full((2,), 0.1))


@pytest.mark.parametrize("guided", [False, True])
def test_amp_runs_the_networks_in_bfloat16_and_keeps_the_update_float32(guided):
    # ConvEps, not the untrained MONAI UNet: that one's zero-initialised output conv gives eps = 0 in any precision
    unet, g = PrecisionRecorder(ConvEps().eval()), PrecisionRecorder(Regressor())
    scheduler = ddpm(clip_sample=False)  # clipping x0_hat would hide eps from the update
    x = torch.randn(3, 1, 8, 8, generator=seeded(0))
    guide = dict(feature_fn=g, target=torch.tensor([0.5, 0.0, -0.5]), rho=0.1) if guided else {}
    full = guided_step(unet, scheduler, x, 600, generator=seeded(4), **guide)
    assert unet.calls == [False] and g.calls == ([False] if guided else [])
    unet.calls.clear(), g.calls.clear()
    mixed = guided_step(unet, scheduler, x, 600, generator=seeded(4), amp=True, **guide)
    assert unet.calls == [True] and g.calls == ([True] if guided else [])
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed).all()
    # bfloat16 keeps 8 bits of mantissa: the same step to about 1e-2, yet not bit-identical (autocast was on)
    torch.testing.assert_close(mixed, full, rtol=0.0, atol=0.05)
    assert not torch.equal(mixed, full)


def test_amp_sampling_passes_amp_to_every_step():
    unet = PrecisionRecorder(tiny_diffusion_unet())
    samples = guided_sample(unet, ddim(5), (2, 1, 8, 8), generator=seeded(1), amp=True)
    assert unet.calls == [True] * 5
    assert samples.dtype == torch.float32


# --- guidance works: a short guided sampling run ---------------------------------------------------------


@pytest.mark.parametrize("sampler, steps", [("ddim", 50), ("ddpm", None)])
def test_guided_sampling_moves_mean_towards_target(sampler, steps):
    scheduler = ddim(T, clip_sample=False) if sampler == "ddim" else ddpm(clip_sample=False)
    model, target, shape = GaussianEps(mu=0.0, s=0.5), 0.5, (6, 1, 8, 8)
    kwargs = {"num_inference_steps": steps, "sampler": sampler}
    plain = guided_sample(model, scheduler, shape, mean_intensity, target, 0.0, generator=seeded(11), **kwargs)
    model.grad_enabled.clear()
    guided = guided_sample(model, scheduler, shape, mean_intensity, target, 0.1, generator=seeded(11), **kwargs)
    assert all(model.grad_enabled)
    err_plain = (mean_intensity(plain) - target).abs()
    err_guided = (mean_intensity(guided) - target).abs()
    assert (err_guided < err_plain).all(), (err_guided, err_plain)
    assert err_guided.mean() < 0.5 * err_plain.mean()
    assert err_plain.mean() > 0.3  # unguided samples sit near the data mean 0, far from the target


def test_sampler_must_match_scheduler_and_ddpm_stride_warns():
    with pytest.raises(ValueError, match="sampler"):
        guided_sample(GaussianEps(), ddpm(), (1, 1, 8, 8), sampler="ddim")
    with pytest.warns(UserWarning, match="DDPM sampling with 5"):
        guided_sample(GaussianEps(), ddpm(), (1, 1, 8, 8), num_inference_steps=5)


# --- region constraint (inpainting) ----------------------------------------------------------------------


def test_region_is_known_image_noised_to_t_minus_1():
    t, seed = 500, 3
    scheduler, model = ddpm(clip_sample=False), LinearEps(64)
    x = torch.randn(2, 1, 8, 8, generator=seeded(0))
    known = torch.randn(1, 1, 8, 8, generator=seeded(1))
    region = torch.zeros(1, 1, 8, 8)
    region[..., :, :4] = 1
    out = guided_step(model, scheduler, x, t, region=region, region_image=known, generator=seeded(seed))
    gen = seeded(seed)
    torch.randn(2, 1, 8, 8, generator=gen)  # the step's noise comes first
    z = torch.randn(2, 1, 8, 8, generator=gen).double()
    noised = ABAR[t - 1].sqrt() * known.double() + (1 - ABAR[t - 1]).sqrt() * z
    torch.testing.assert_close(out[..., :4].double(), noised[..., :4], atol=1e-5, rtol=1e-5)
    plain = guided_step(model, scheduler, x, t, generator=seeded(seed))
    assert torch.equal(out[..., 4:], plain[..., 4:])


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_region_is_exact_after_sampling(sampler):
    scheduler = ddim(20, clip_sample=False) if sampler == "ddim" else ddpm(clip_sample=False)
    model = GaussianEps()
    known = torch.randn(1, 1, 8, 8, generator=seeded(1)) * 0.5
    region = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    region[..., 2:6, 2:6] = True
    # region only (feature_fn None: no gradient), and region together with feature guidance
    for feature_fn, rho in [(None, 0.4), (mean_intensity, 0.1)]:
        model.grad_enabled.clear()
        out = guided_sample(
            model, scheduler, (3, 1, 8, 8), feature_fn, 0.5, rho, region=region, region_image=known, generator=seeded(2)
        )
        assert any(model.grad_enabled) == (feature_fn is not None)
        assert torch.equal(out[:, :, 2:6, 2:6], known[:, :, 2:6, 2:6].expand(3, 1, 4, 4))
        outside = ~region.expand(3, 1, 8, 8)
        assert (out[outside] - known.expand(3, 1, 8, 8)[outside]).abs().min() > 0
        assert not torch.equal(out[0], out[1])  # samples still differ outside the region


# --- latent diffusion: guidance through a decoder --------------------------------------------------------


class LinearDecoder(nn.Module):
    """Latent 1x4x4x4 -> image 1x8x8 by a fixed linear map."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(64, 64, generator=seeded(9)) / 8)
            self.lin.bias.copy_(torch.randn(64, generator=seeded(10)))

    def decode(self, z):
        return self.lin(z.flatten(1)).reshape(z.shape[0], 1, 8, 8)


def test_latent_guidance_through_decoder_by_hand():
    t, rho, seed = 250, 0.2, 4
    scheduler, model, decoder = ddpm(clip_sample=False), LinearEps(64, seed=3), LinearDecoder()
    z_t = torch.randn(2, 1, 4, 4, 4, generator=seeded(6))
    c0 = torch.tensor([[1.0], [-0.5]])
    out = guided_step(model, scheduler, z_t, t, mean_intensity, c0, rho, decode=decoder.decode, generator=seeded(seed))
    assert out.shape == z_t.shape

    a, b = model.lin.weight.detach().double(), model.lin.bias.detach().double()
    m, c = decoder.lin.weight.detach().double(), decoder.lin.bias.detach().double()
    sa, s1 = ABAR[t].sqrt(), (1 - ABAR[t]).sqrt()

    def x0_hat(zf):
        return (zf - s1 * (zf @ a.T + b + 1e-3 * t)) / sa

    def loss(zf):  # sum_b (c0_b - mean(D(x0_hat(z_b))))^2
        g = (x0_hat(zf) @ m.T + c).mean(1)
        return ((c0.double()[:, 0] - g) ** 2).sum()

    zf = z_t.flatten(1).double()
    grad = torch.autograd.functional.jacobian(loss, zf)
    noise = torch.randn(2, 1, 4, 4, 4, generator=seeded(seed)).flatten(1).double()
    expected = posterior(zf, x0_hat(zf), noise, t) - rho * grad / grad.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out.flatten(1).double(), expected, atol=1e-4, rtol=1e-4)

    # guiding on the latent itself (decoder ignored) would be a different step
    no_decoder = guided_step(model, scheduler, z_t, t, mean_intensity, c0, rho, generator=seeded(seed))
    assert (no_decoder - out).abs().max() > 1e-2


# --- rejection rule --------------------------------------------------------------------------------------


def test_reject_off_target_by_hand():
    features = torch.tensor([0.0, 0.29, 0.31, -0.29, 1.0])
    assert reject_off_target(features, 0.0, 1.0).tolist() == [True, True, False, True, False]
    assert reject_off_target(features, 0.0, 2.0).tolist() == [True, True, True, True, False]
    assert reject_off_target(features, 0.0, 1.0, tolerance=0.1).tolist() == [True, False, False, False, False]
    per_sample = [0.0, 0.0, 0.31, 0.5, 0.8]
    assert reject_off_target(features, per_sample, 1.0).tolist() == [True, True, True, False, True]
    assert reject_off_target(features[:, None], per_sample, 1.0).tolist() == [True, True, True, False, True]
    two = torch.tensor([[0.0, 0.0], [0.2, 0.5], [0.2, 0.1]])
    assert reject_off_target(two, 0.0, [1.0, 1.0]).tolist() == [True, False, True]
    assert reject_off_target(two, 0.0, [1.0, 2.0]).tolist() == [True, True, True]
    assert reject_off_target(two, 0.0, [0.5, 2.0]).tolist() == [True, False, False]
    with pytest.raises(ValueError):
        reject_off_target(features, 0.0, 0.0)
