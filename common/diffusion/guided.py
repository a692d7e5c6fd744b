"""Feature-guided diffusion sampling of the TVD-score paper (section 2.2 Eq. 3, section 3.3 Eq. 8, appendix D).

To estimate the score at a feature value v, the paper samples from P(X | V = v) with a diffusion model
and DPS guidance (Chung et al. 2023) by a regressor g with a *normalised* gradient (Augustin et al. 2022).
Per step (Eq. 8):

    x0_hat   = (x_t - sqrt(1 - abar_t) eps(x_t, t)) / sqrt(abar_t)
    x'_{t-1} = DDPM posterior mean(x_t, x0_hat) + sigma_t z,   sigma_t^2 = (1 - abar_{t-1}) / (1 - abar_t) beta_t
    x_{t-1}  = x'_{t-1} - rho * grad / ||grad||_2,             grad = d/dx_t ||c0 - g(x0_hat)||^2

What comes from MONAI and what is ours:

- The schedule (``betas``, ``alphas_cumprod``), the timesteps (``set_timesteps``, ``timesteps``), the
  unguided update x'_{t-1} (``step``) and q(x_t | x_0) (``add_noise``) are MONAI's
  :class:`~monai.networks.schedulers.DDPMScheduler` / :class:`~monai.networks.schedulers.DDIMScheduler`,
  called as they are: with rho = 0 a guided step *is* ``scheduler.step`` (same eps, same generator draw).
  ``DDPMScheduler`` with the default ``variance_type="fixed_small"`` uses exactly the paper's sigma_t.
- The guidance term is our own code: no maintained library (MONAI, diffusers) implements DPS with a
  per-sample normalised gradient of a regression loss.
- The paper prints x0_hat with ``(1 - abar_t) eps``; that is a typo: the DDPM/DPS estimate (Ho et al. 2020
  Eq. 15, Chung et al. 2023, and MONAI's own ``step``) uses ``sqrt(1 - abar_t) eps``, which we use.
- x0_hat for the guidance is the *unclipped* estimate (Eq. 8 has no clipping, and clamping to [-1, 1]
  would zero the gradient wherever it is active); the scheduler's ``clip_sample`` only affects x'_{t-1},
  exactly as in MONAI.
- Latent diffusion: ``decode`` maps x0_hat to image space and the gradient flows through it (the paper's
  brain ROI setup, appendix C.4). Pass what the latents were scaled by, e.g.
  ``decode=lambda z: autoencoder.decode_stage_2_outputs(z / scale_factor)``.
- DDIM (not in the paper, which samples with DDPM; offered for speed): the guidance term is applied the
  same way, after MONAI's DDIM step, to x_{t_prev}; rho is then a displacement per DDIM step, so a rho
  tuned for 1000 DDPM steps moves the sample less in total with fewer steps.
- Mixed precision (``amp=True``, not in the paper; for speed): the networks (eps-model, decoder, g) run under
  ``torch.autocast`` in bfloat16; x_t, eps, the scheduler's update and the guidance direction stay float32.
  bfloat16 rather than float16 because the guidance gradient is not loss-scaled: float16's narrow exponent
  range could underflow it, bfloat16's is float32's. Faster where the hardware has bfloat16 units (1.74x per
  guided sample on an AVX512-BF16 CPU), slower where autocast emulates them; it moves samples more than float32
  rounding does (benchmarks/results/tvd_sampling_precision.md), so the bundle leaves it off by default.
- Region constraint (the paper's "hippocampus" feature, "akin to an inpainting task"): after each step the
  region (mask 1 = keep) is replaced by the known image noised to the step's target level with
  ``scheduler.add_noise`` (RePaint, Lugmayr et al. 2022, without its resampling jumps); after the last
  step the region is the known image exactly.

Paper settings (appendix D): T = 1000, linear beta 0.0015 -> 0.0205
(``DDPMScheduler(1000, "linear_beta", beta_start=0.0015, beta_end=0.0205)``); rho = 0.1 for the ellipse
features, ``piecewise_rho(0.03, 0.04, 400)`` for hippocampal volume, 0.4 for the hippocampus region;
samples whose g-value lies more than 0.3 sd from the target are discarded (:func:`reject_off_target`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from monai.utils import optional_import

from common.networks.modes import frozen, modules_of

tqdm, has_tqdm = optional_import("tqdm", name="tqdm")

Rho = float | Callable[[int], float]

__all__ = ["guided_step", "guided_sample", "reject_off_target", "piecewise_rho", "predict_x0", "normalised_guidance"]


class piecewise_rho:  # noqa: N801 (used like the function it replaced; a class so reports can print it)
    """rho(t) = ``rho_above`` for t > ``boundary``, else ``rho_at_or_below`` (paper, hippocampal volume:
    ``piecewise_rho(0.03, 0.04, 400)``)."""

    def __init__(self, rho_above: float, rho_at_or_below: float, boundary: int = 400):
        self.rho_above, self.rho_at_or_below, self.boundary = float(rho_above), float(rho_at_or_below), int(boundary)

    def __call__(self, t: int) -> float:
        return self.rho_above if t > self.boundary else self.rho_at_or_below

    def __repr__(self) -> str:
        return f"piecewise_rho({self.rho_above}, {self.rho_at_or_below}, {self.boundary})"


def _rho_at(rho: Rho, t: int) -> float:
    return float(rho(t)) if callable(rho) else float(rho)


def _per_sample(values: torch.Tensor | float | Sequence[float], n: int, like: torch.Tensor) -> torch.Tensor:
    """Targets as (n, k): a scalar for every sample, (n,) one per sample, (n, ...) per sample and feature."""
    values = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    if values.numel() == 1:
        return values.reshape(1, 1).expand(n, 1)
    if values.shape[0] != n:
        raise ValueError(f"expected a scalar target or one per sample ({n}), got shape {tuple(values.shape)}")
    return values.reshape(n, -1)


def _check_scheduler(scheduler: Any) -> None:
    if not isinstance(scheduler, (DDPMScheduler, DDIMScheduler)):
        raise TypeError(f"scheduler must be a MONAI DDPMScheduler or DDIMScheduler, got {type(scheduler).__name__}")
    if scheduler.prediction_type != "epsilon":
        raise ValueError(
            f"guidance needs an eps-predicting model (prediction_type='epsilon'), got {scheduler.prediction_type!r}"
        )


def predict_x0(scheduler: DDPMScheduler | DDIMScheduler, x_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """Unclipped x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), differentiable in x_t and eps.

    The paper's printed Eq. 8 has (1 - abar_t) eps; that is a typo relative to DDPM (Ho et al. Eq. 15) and
    DPS (Chung et al.); the sqrt is also what MONAI's ``step`` uses for its ``pred_original_sample``.
    """
    abar = scheduler.alphas_cumprod[int(t)].to(device=x_t.device, dtype=x_t.dtype)
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def normalised_guidance(grad: torch.Tensor) -> torch.Tensor:
    """grad / ||grad||_2 per sample (over all non-batch dimensions); a zero gradient stays zero."""
    norm = grad.flatten(1).norm(dim=1).reshape(-1, *([1] * (grad.ndim - 1)))
    return torch.where(norm > 0, grad / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(grad))


def _prev_timestep(scheduler: DDPMScheduler | DDIMScheduler, t: int) -> int:
    """The noise level that ``scheduler.step(…, t, …)`` targets (negative after the last step)."""
    if isinstance(scheduler, DDIMScheduler):
        return t - scheduler.num_train_timesteps // scheduler.num_inference_steps
    return t - 1  # MONAI's DDPMScheduler.step always uses the posterior q(x_{t-1} | x_t, x_0)


def _networks_precision(device: torch.device, amp: bool):
    """Where the networks run: bfloat16 autocast with ``amp`` (see the module notes), else as they are."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if amp else nullcontext()


def _scheduler_step(
    scheduler: DDPMScheduler | DDIMScheduler,
    eps: torch.Tensor,
    t: int,
    x_t: torch.Tensor,
    generator: torch.Generator | None,
    eta: float,
) -> torch.Tensor:
    """x'_{t-1}: MONAI's own update, unchanged (DDPM posterior mean + sigma_t z, or DDIM)."""
    if isinstance(scheduler, DDIMScheduler):
        x_prev, _ = scheduler.step(eps, t, x_t, eta=eta, generator=generator)
    else:
        x_prev, _ = scheduler.step(eps, t, x_t, generator=generator)
    return x_prev


def _region_fill(
    scheduler: DDPMScheduler | DDIMScheduler,
    x_prev: torch.Tensor,
    t: int,
    region: torch.Tensor,
    region_image: torch.Tensor,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Region (1 = keep) replaced by the known x0 noised to the step's target level, q(x_{t-1} | x_0)."""
    region_image = region_image.to(device=x_prev.device, dtype=x_prev.dtype)
    prev = _prev_timestep(scheduler, t)
    if prev < 0:  # after the last step: the clean known image
        known = region_image.expand_as(x_prev)
    else:
        noise = torch.randn(x_prev.shape, generator=generator, dtype=x_prev.dtype, device=x_prev.device)
        level = torch.full((x_prev.shape[0],), prev, dtype=torch.long, device=x_prev.device)
        known = scheduler.add_noise(region_image.expand_as(x_prev), noise, level)
    mask = region.to(device=x_prev.device, dtype=x_prev.dtype)
    return mask * known + (1 - mask) * x_prev


def guided_step(
    model: Callable[..., torch.Tensor],
    scheduler: DDPMScheduler | DDIMScheduler,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    target: torch.Tensor | float | Sequence[float] | None = None,
    rho: Rho = 0.0,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    region: torch.Tensor | None = None,
    region_image: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    eta: float = 0.0,
    model_kwargs: Mapping[str, Any] | None = None,
    amp: bool = False,
) -> torch.Tensor:
    """One guided step (paper Eq. 8) for a batch: x_t at training timestep ``t`` -> x_{t-1}.

    Args:
        model: eps-predictor called as ``model(x_t, timesteps=<(B,) long tensor>, **model_kwargs)`` (MONAI
            ``DiffusionModelUNet``; pass e.g. ``context`` through ``model_kwargs``).
        scheduler: MONAI ``DDPMScheduler`` or ``DDIMScheduler`` (``prediction_type="epsilon"``); for DDIM
            ``set_timesteps`` must have been called (its step size is T // num_inference_steps).
        x_t: (B, C, *spatial) current sample, in the diffusion space (latents for latent diffusion).
        t: current training timestep (an element of ``scheduler.timesteps``).
        feature_fn: g, the feature regressor: image batch -> (B,) or (B, k). None: no guidance.
        target: c0, scalar or one per sample ((B,) or (B, k)).
        rho: step size of the normalised guidance, a float or ``rho(t)``; 0 disables guidance (no backward).
        decode: maps x0_hat to g's input space (latent diffusion); the gradient flows through it.
        region, region_image: optional region constraint: mask (1 = keep) and the known x0, both in the
            space of x_t (broadcastable to it); the region of x_{t-1} is set to ``region_image`` noised to
            the target level (exactly ``region_image`` after the last step).
        generator: torch generator for the step noise (and then the region noise), on x_t's device.
        eta: DDIM noise weight (DDIM only; 0 = deterministic DDIM).
        amp: run the eps-model, ``decode`` and g in bfloat16 autocast; the update itself stays float32.

    Returns:
        x_{t-1} = x'_{t-1} - rho * grad / ||grad|| (per-sample norm), where x'_{t-1} is exactly
        ``scheduler.step(eps, t, x_t, generator=generator)[0]`` and grad = d/dx_t sum_b ||c0_b - g(x0_hat_b)||^2,
        differentiated through the eps-model, x0_hat and ``decode`` (as in DPS).
    """
    _check_scheduler(scheduler)
    if (region is None) != (region_image is None):
        raise ValueError("region and region_image must be given together")
    t = int(t)
    rho_t = _rho_at(rho, t)
    guide = feature_fn is not None and rho_t != 0.0
    if guide and target is None:
        raise ValueError("a target c0 is needed for feature guidance")
    kwargs = dict(model_kwargs or {})
    timesteps = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)

    networks = _networks_precision(x_t.device, amp)
    with frozen(*modules_of(model, feature_fn, decode)), torch.no_grad():
        if guide:
            # Our own code (no library does DPS with a normalised gradient): the gradient of the regression
            # loss w.r.t. x_t, through the eps-model, Tweedie's x0_hat and the decoder.
            with torch.enable_grad():
                x_in = x_t.detach().requires_grad_(True)
                with networks:
                    eps = model(x_in, timesteps=timesteps, **kwargs).to(x_t.dtype)
                x0_hat = predict_x0(scheduler, x_in, eps, t)
                with networks:
                    features = feature_fn(decode(x0_hat) if decode is not None else x0_hat)
                features = features.reshape(x_t.shape[0], -1).to(x_t.dtype)
                c0 = _per_sample(target, x_t.shape[0], features)
                loss = (c0 - features).pow(2).sum()
                (grad,) = torch.autograd.grad(loss, x_in)
            eps = eps.detach()
        else:
            with networks:
                eps = model(x_t, timesteps=timesteps, **kwargs).to(x_t.dtype)
        if eps.shape != x_t.shape:
            raise ValueError(f"model output {tuple(eps.shape)} must be eps of the sample's shape {tuple(x_t.shape)}")

        x_prev = _scheduler_step(scheduler, eps, t, x_t, generator, eta)  # x'_{t-1}, MONAI's update
        if guide:
            x_prev = x_prev - rho_t * normalised_guidance(grad)
        if region is not None:
            x_prev = _region_fill(scheduler, x_prev, t, region, region_image, generator)
    return x_prev


def _default_device(model: Any) -> torch.device:
    for module in modules_of(model):
        for p in module.parameters():
            return p.device
    return torch.device("cpu")


def guided_sample(
    model: Callable[..., torch.Tensor],
    scheduler: DDPMScheduler | DDIMScheduler,
    shape: Sequence[int],
    feature_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    target: torch.Tensor | float | Sequence[float] | None = None,
    rho: Rho = 0.0,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    region: torch.Tensor | None = None,
    region_image: torch.Tensor | None = None,
    *,
    num_inference_steps: int | None = None,
    sampler: str | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    progress: bool = False,
    rho_per_train_step: bool = False,
    amp: bool = False,
) -> torch.Tensor:
    """Guided sampling from x_T ~ N(0, I) to x_0 with :func:`guided_step` at every timestep.

    Plain MONAI sampling when ``rho`` is 0 or ``feature_fn`` is None (and no region is given).

    Args:
        shape: (B, C, *spatial) of the samples (of the latents for latent diffusion).
        num_inference_steps: if given, ``scheduler.set_timesteps(num_inference_steps)``; None keeps the
            scheduler's current timesteps (all T for a fresh ``DDPMScheduler``; a fresh ``DDIMScheduler`` too).
            MONAI's ``DDPMScheduler.step`` always uses the one-step posterior q(x_{t-1} | x_t, x0), so DDPM with
            fewer than T steps is not a proper sampler (a warning is given); use DDIM for fewer steps.
        sampler: "ddpm" or "ddim"; must match the scheduler's class; None: taken from the scheduler.
        eta: DDIM noise weight (0: deterministic DDIM). Guidance with DDIM is applied after MONAI's DDIM step,
            exactly as after the DDPM step: x_{t_prev} = DDIM(x_t, eps) - rho(t) grad / ||grad||.
        generator: used for x_T (unless ``noise`` is given), then for each step's noise; on the sample's device.
        noise: x_T itself (its device is then used).
        device: where to sample; default: the model's parameter device, else CPU.
        rho_per_train_step: ``rho`` is the paper's step per *training* timestep (tuned for DDPM over all T steps);
            with fewer sampling steps each step then moves by rho(t) x (T / steps), so the total guidance of a
            50-step DDIM run matches the 1000-step DDPM run it stands in for. False: rho per sampling step.
        amp: the networks in bfloat16 autocast at every step (see :func:`guided_step`).
        Other arguments: see :func:`guided_step`.

    Returns:
        x_0, in the diffusion space (decode latents yourself; for the rejection rule compute
        ``feature_fn(decode(samples))`` and call :func:`reject_off_target`).
    """
    _check_scheduler(scheduler)
    kind = "ddim" if isinstance(scheduler, DDIMScheduler) else "ddpm"
    if sampler is not None and sampler.lower() != kind:
        raise ValueError(
            f"sampler={sampler!r} but the scheduler is a {type(scheduler).__name__}; "
            f"use MONAI's {'DDIMScheduler' if sampler.lower() == 'ddim' else 'DDPMScheduler'}"
        )
    if num_inference_steps is not None:
        scheduler.set_timesteps(num_inference_steps)
    if kind == "ddpm" and len(scheduler.timesteps) < scheduler.num_train_timesteps:
        warnings.warn(
            f"DDPM sampling with {len(scheduler.timesteps)} < {scheduler.num_train_timesteps} steps: MONAI's "
            "DDPMScheduler.step uses the one-step posterior q(x_{t-1}|x_t,x0) whatever the stride; use DDIM",
            stacklevel=2,
        )
    if noise is not None:
        x = noise.clone()
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"noise shape {tuple(x.shape)} differs from shape {tuple(shape)}")
    else:
        device = torch.device(device) if device is not None else _default_device(model)
        x = torch.randn(tuple(shape), generator=generator, device=device)

    timesteps = scheduler.timesteps
    stride = scheduler.num_train_timesteps / len(timesteps) if rho_per_train_step else 1.0
    step_rho = rho if stride == 1.0 else (lambda t: _rho_at(rho, t) * stride)
    steps = tqdm(timesteps, desc=f"guided {kind}") if progress and has_tqdm else timesteps
    with frozen(*modules_of(model, feature_fn, decode)), torch.no_grad():
        for t in steps:
            x = guided_step(
                model,
                scheduler,
                x,
                int(t),
                feature_fn=feature_fn,
                target=target,
                rho=step_rho,
                decode=decode,
                region=region,
                region_image=region_image,
                generator=generator,
                eta=eta,
                model_kwargs=model_kwargs,
                amp=amp,
            )
    return x


def reject_off_target(
    features: torch.Tensor | Sequence[float],
    target: torch.Tensor | float | Sequence[float],
    feature_sd: torch.Tensor | float | Sequence[float],
    tolerance: float = 0.3,
) -> torch.Tensor:
    """Keep mask of the paper's rejection rule (appendix D.1): |g(x) - c0| <= tolerance * sd.

    Args:
        features: g-values of the samples, (N,) or (N, k).
        target: c0, a scalar or one per sample ((N,) or (N, k)).
        feature_sd: standard deviation of the feature (over the real data), scalar or per feature (k,).
        tolerance: in units of sd (paper: 0.3).

    Returns:
        (N,) bool; with several features a sample is kept when every feature is within tolerance.
    """
    features = torch.as_tensor(features, dtype=torch.float64)
    n = features.shape[0]
    features = features.reshape(n, -1)
    c0 = _per_sample(target, n, features)
    sd = torch.as_tensor(feature_sd, dtype=torch.float64, device=features.device).reshape(1, -1)
    if (sd <= 0).any():
        raise ValueError("feature_sd must be positive")
    return ((features - c0).abs() <= tolerance * sd).all(dim=1)
