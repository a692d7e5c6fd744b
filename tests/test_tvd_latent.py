"""Latent-diffusion glue (common.diffusion.latent), the region feature (common.tvd.RegionSampler), the guidance step
per training timestep, and the local-score lookup of ROI inference: tiny CPU problems with closed-form checks."""

from __future__ import annotations

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

import common.tvd as tvd
from common.diffusion import (
    LatentDecoder,
    LatentEncoder,
    LatentNoisePrepareBatch,
    LatentTrainingInferer,
    guided_sample,
    latent_scale_factor,
    latent_shape,
    read_latent_scale,
    training_latent_scale,
)
from common.errors import InputError
from tests.toys import PrecisionRecorder, tiny_autoencoder_kl, tiny_diffusion_unet

T = 1000


def ddim(steps: int) -> DDIMScheduler:
    scheduler = DDIMScheduler(T, schedule="linear_beta", beta_start=0.0015, beta_end=0.0205)
    scheduler.set_timesteps(steps)
    return scheduler


def test_latent_shape_halves_once_per_level_after_the_first():
    assert latent_shape([16, 16, 16], [16, 32], 1) == [1, 8, 8, 8]
    assert latent_shape([32, 32], [8, 16, 32], 3) == [3, 8, 8]
    with pytest.raises(InputError, match="divisible by 2"):
        latent_shape([15, 16], [16, 32], 1)
    # the shape the autoencoder really produces
    z_mu, _ = tiny_autoencoder_kl().encode(torch.zeros(2, 1, 16, 16))
    assert list(z_mu.shape[1:]) == latent_shape([16, 16], [8, 8], 1)


def test_noise_and_training_inferer_work_in_the_latent_space():
    ae = tiny_autoencoder_kl()
    prepare = LatentNoisePrepareBatch(T, [1, 8, 8])
    images = torch.randn(3, 1, 16, 16)
    inputs, target, args, kwargs = prepare({"image": images})
    assert target.shape == (3, 1, 8, 8) and kwargs["noise"].shape == (3, 1, 8, 8)  # not the images' shape
    scheduler = DDPMScheduler(T, schedule="linear_beta", beta_start=0.0015, beta_end=0.0205)
    unet = tiny_diffusion_unet(2)
    ae.train()
    prediction = LatentTrainingInferer(scheduler, ae, scale_factor=0.5)(inputs, unet, *args, **kwargs)
    assert prediction.shape == (3, 1, 8, 8)
    assert not ae.training  # the autoencoder is only used, in eval mode


def test_scale_factor_is_one_over_the_latent_sd_and_is_reused_on_resume(tmp_path):
    ae = tiny_autoencoder_kl()
    loader = [{"image": torch.randn(4, 1, 16, 16)} for _ in range(2)]
    torch.manual_seed(1)
    scale = latent_scale_factor(ae, loader, max_batches=2)
    torch.manual_seed(1)
    with torch.no_grad():
        latents = torch.cat([ae.encode_stage_2_inputs(b["image"]).flatten() for b in loader])
    assert scale == pytest.approx(1.0 / float(latents.std()), rel=1e-5)
    path = tmp_path / "latent_scale.json"
    written = training_latent_scale(path, ae, loader)
    assert read_latent_scale(path) == pytest.approx(written)
    # resuming reads the saved number rather than measuring again (a fresh draw would differ)
    assert training_latent_scale(path, ae, [{"image": 5 * torch.randn(4, 1, 16, 16)}], resume=True) == written
    with pytest.raises(InputError, match="train_diffusion.json"):
        read_latent_scale(tmp_path / "missing.json")


def test_latent_decoder_and_encoder_undo_the_scale():
    ae = tiny_autoencoder_kl().eval()
    x = torch.randn(2, 1, 16, 16)
    z = LatentEncoder(ae, 4.0)(x)
    torch.testing.assert_close(z, ae.encode(x)[0] * 4.0)
    torch.testing.assert_close(LatentDecoder(ae, 4.0)(z), ae.decode(ae.encode(x)[0]))


def test_rho_per_train_step_scales_the_guidance_by_the_stride(monkeypatch):
    import common.diffusion.guided as guided

    seen = []
    step = guided.guided_step

    def spy(model, scheduler, x, t, **kwargs):
        seen.append((t, guided._rho_at(kwargs["rho"], t)))
        return step(model, scheduler, x, t, **kwargs)

    monkeypatch.setattr(guided, "guided_step", spy)
    rho = guided.piecewise_rho(0.03, 0.04, 400)
    for per_train_step, factor in ((False, 1.0), (True, 100.0)):  # 10 of 1000 steps: a stride of 100
        seen.clear()
        guided_sample(
            tiny_diffusion_unet(2), ddim(10), (1, 1, 8, 8), feature_fn=lambda x: x.mean((1, 2, 3)), target=0.0,
            rho=rho, rho_per_train_step=per_train_step, generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        assert len(seen) == 10
        assert all(r == pytest.approx(rho(t) * factor) for t, r in seen)


def test_region_replacement_keeps_the_known_region_exactly_in_pixel_space():
    unet = tiny_diffusion_unet(2)
    known = torch.rand(1, 8, 8) * 2 - 1
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:5, 3:6] = 1
    sampler = tvd.RegionSampler(unet, ddim(5), (1, 8, 8), [(known, mask)], mode="replace", dilation=0)
    samples = sampler(3, torch.zeros(3), torch.Generator().manual_seed(0))
    region = mask.bool().expand(3, 1, 8, 8)
    torch.testing.assert_close(samples[region], known.expand(3, 1, 8, 8)[region])
    assert not torch.allclose(samples[~region], known.expand(3, 1, 8, 8)[~region])
    # dilation grows the region: one more pixel on each side
    _, dilated = sampler.region(0)
    sampler.dilation = 1
    _, grown = sampler.region(0)
    assert dilated.sum() == 9 and grown.sum() == 25


def test_region_guidance_pulls_the_region_towards_the_known_image():
    unet = tiny_diffusion_unet(2)
    known = torch.full((1, 8, 8), 0.8)
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 2:6] = 1
    errors = {}
    for rho in (0.0, 0.05):
        sampler = tvd.RegionSampler(unet, ddim(10), (1, 8, 8), [(known, mask)], rho=rho, dilation=0)
        samples = sampler(4, torch.zeros(4), torch.Generator().manual_seed(0))
        errors[rho] = float((samples - 0.8)[:, :, 2:6, 2:6].abs().mean())
    assert errors[0.05] < 0.5 * errors[0.0]


def test_region_replacement_in_latent_space_pins_the_encoded_region():
    ae = tiny_autoencoder_kl().eval()
    scale = 2.0
    unet = tiny_diffusion_unet(2)
    known = torch.rand(1, 16, 16) * 2 - 1
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:8, 4:8] = 1
    sampler = tvd.RegionSampler(
        unet, ddim(3), (1, 8, 8), [(known, mask)], mode="replace", dilation=0,
        encode=LatentEncoder(ae, scale), decode=LatentDecoder(ae, scale),
    )  # fmt: skip
    seen = {}
    decode = sampler.decode
    sampler.decode = lambda z: seen.setdefault("z", z) is not None and decode(z)
    images = sampler(2, torch.zeros(2), torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 16, 16)
    with torch.no_grad():
        z_known = LatentEncoder(ae, scale)(known.unsqueeze(0))
    # the latent cells under the image region (4:8 -> 2:4) are the item's encoded latent
    torch.testing.assert_close(seen["z"][:, :, 2:4, 2:4], z_known[:, :, 2:4, 2:4].expand(2, 1, 2, 2))


def test_samplers_run_their_networks_in_bfloat16_with_amp():
    ae, scale = tiny_autoencoder_kl().eval(), 2.0
    known = torch.rand(1, 16, 16) * 2 - 1
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:8, 4:8] = 1
    # the decoder runs under autocast inside each guided step; the final decode of the samples stays float32
    for mode, decoder_calls in (("guidance", [True] * 3 + [False]), ("replace", [False])):
        unet, decoder = PrecisionRecorder(tiny_diffusion_unet(2)), PrecisionRecorder(LatentDecoder(ae, scale))
        sampler = tvd.RegionSampler(
            unet, ddim(3), (1, 8, 8), [(known, mask)], mode=mode, dilation=0,
            encode=LatentEncoder(ae, scale), decode=decoder, amp=True,
        )  # fmt: skip
        images = sampler(2, torch.zeros(2), torch.Generator().manual_seed(0))
        assert unet.calls == [True] * 3 and decoder.calls == decoder_calls, mode
        assert images.dtype == torch.float32 and torch.isfinite(images).all()
    unet = PrecisionRecorder(tiny_diffusion_unet(2))
    tvd.feature_sampler(unet, ddim(3), (1, 8, 8), num_inference_steps=3, amp=True)(2)
    assert unet.calls == [True] * 3


def test_region_sampler_rejects_unknown_modes():
    with pytest.raises(InputError, match="region_mode"):
        tvd.RegionSampler(tiny_diffusion_unet(2), ddim(3), (1, 8, 8), [], mode="inpaint")


def test_local_score_lookup_interpolates_and_clamps():
    report = {"features": {"volume": {"values": [1.0, 3.0, 2.0], "local_scores": [0.0, 1.0, 0.5]}}}
    assert tvd.local_score_at(report, "volume", 2.5) == pytest.approx(0.75)
    assert tvd.local_score_at(report, "volume", 0.0) == 0.0 and tvd.local_score_at(report, "volume", 9.0) == 1.0
    assert tvd.local_score_at(report, "size", 1.0) is None


def test_a_mask_off_the_images_grid_is_named(tmp_path):
    import nibabel as nib
    import numpy as np

    image, mask, shifted = tmp_path / "roi.nii.gz", tmp_path / "mask.nii.gz", tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), image)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 6), np.float32), np.eye(4)), mask)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), shifted)
    tvd.check_mask_grid(str(image), str(image))
    for bad in (mask, shifted):
        with pytest.raises(InputError, match=f"{bad.name}.*does not lie on the grid"):
            tvd.check_mask_grid(str(image), str(bad))
