"""AutoencoderKL stage of the TVD score: the KL-VAE loss and its trainer (learning, adversarial warm-up, 3D)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.data import DataLoader
from monai.handlers import from_engine
from monai.networks.nets import PatchDiscriminator
from monai.utils import CommonKeys as Keys
from torch import nn

from common.engines import AutoencoderKLTrainer
from common.engines.autoencoder import SCALAR_KEYS
from common.losses import AutoencoderKLLoss
from tests.toys import tiny_autoencoder_kl

SIZE = (16, 16)


def _autoencoder(spatial_dims=2):
    return tiny_autoencoder_kl(spatial_dims, seed=None)


def _discriminator(spatial_dims=2, num_layers_d=2):
    return PatchDiscriminator(spatial_dims=spatial_dims, num_layers_d=num_layers_d, channels=8, in_channels=1)


def _data(n=4, size=SIZE, seed=0):
    rng = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(1, *size, generator=rng)} for _ in range(n)]


def _trainer(data, max_epochs, autoencoder, discriminator=None, lr=1e-3, **kwargs):
    return AutoencoderKLTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=DataLoader(data, batch_size=2, shuffle=False),
        network=autoencoder,
        optimizer=torch.optim.Adam(autoencoder.parameters(), lr=lr),
        loss_function=AutoencoderKLLoss(),
        discriminator=discriminator,
        d_optimizer=None if discriminator is None else torch.optim.Adam(discriminator.parameters(), lr=lr),
        **kwargs,
    )


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _params_changed(before, module):
    params = dict(module.named_parameters())
    return any(not torch.equal(before[name], p) for name, p in params.items())


class MSEPerceptual(nn.Module):
    """Stand-in for MONAI's PerceptualLoss, whose pretrained weights cannot be downloaded here."""

    def forward(self, x, y):
        return ((x - y) ** 2).mean()


def test_kl_is_zero_for_the_standard_normal_and_matches_the_closed_form():
    loss = AutoencoderKLLoss()
    x = torch.rand(2, 1, 8, 8)
    zeros, ones = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    assert float(loss(x, zeros, ones, x)["kl"]) == pytest.approx(0.0, abs=1e-7)

    rng = np.random.default_rng(0)
    mu = rng.normal(size=(3, 2, 4, 4, 4))
    sigma = rng.uniform(0.2, 2.0, size=mu.shape)
    expected = np.mean(0.5 * np.sum(mu**2 + sigma**2 - np.log(sigma**2) - 1, axis=(1, 2, 3, 4)))
    kl = loss(torch.rand(3, 1, 8, 8, 8), torch.tensor(mu), torch.tensor(sigma), torch.rand(3, 1, 8, 8, 8))["kl"]
    # Summed over the latent, averaged over the batch: not a mean over all elements, not a batch sum.
    assert float(kl) == pytest.approx(expected, rel=1e-5)


def test_l1_and_weighted_total_with_and_without_a_perceptual_term():
    torch.manual_seed(0)
    recon, target = torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    mu, sigma = torch.randn(2, 1, 4, 4), torch.rand(2, 1, 4, 4) + 0.5
    plain = AutoencoderKLLoss(kl_weight=0.01)(recon, mu, sigma, target)
    assert float(plain["l1"]) == pytest.approx(float((recon - target).abs().mean()), rel=1e-6)
    assert float(plain["perceptual"]) == 0.0
    assert float(plain["loss"]) == pytest.approx(float(plain["l1"] + 0.01 * plain["kl"]), rel=1e-6)

    terms = AutoencoderKLLoss(kl_weight=0.01, perceptual_loss=MSEPerceptual(), perceptual_weight=0.5)(
        recon, mu, sigma, target
    )
    mse = float(((recon - target) ** 2).mean())
    assert float(terms["perceptual"]) == pytest.approx(mse, rel=1e-6)
    assert float(terms["loss"]) == pytest.approx(float(terms["l1"] + 0.01 * terms["kl"]) + 0.5 * mse, rel=1e-6)
    with pytest.raises(ValueError, match="differ"):
        AutoencoderKLLoss()(recon, mu, sigma, target[:, :, :4])


def test_trainer_learns_to_reconstruct_and_reports_every_term():
    torch.manual_seed(0)
    data = _data()
    autoencoder = _autoencoder()
    images = torch.stack([item["image"] for item in data])
    with torch.no_grad():
        before = float((autoencoder.reconstruct(images) - images).abs().mean())
    trainer = _trainer(data, max_epochs=15, autoencoder=autoencoder)  # 2 iterations per epoch: 30 updates
    l1 = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: l1.append(e.state.output["l1"]))
    trainer.run()
    assert trainer.state.epoch == 15 and len(l1) == 30
    assert np.mean(l1[-4:]) < 0.8 * np.mean(l1[:4])
    autoencoder.eval()
    with torch.no_grad():
        after = float((autoencoder.reconstruct(images) - images).abs().mean())
    assert after < 0.75 * before

    out = trainer.state.output
    assert {Keys.IMAGE, Keys.PRED, Keys.LOSS, *SCALAR_KEYS} <= set(out)
    assert out[Keys.PRED].shape == out[Keys.IMAGE].shape == (2, 1, *SIZE)
    assert not out[Keys.PRED].requires_grad and not out[Keys.LOSS].requires_grad
    assert out[Keys.LOSS].dtype == torch.float32 and out[Keys.LOSS].ndim == 0
    assert float(out[Keys.LOSS]) == pytest.approx(out["l1"] + 1e-7 * out["kl"], rel=1e-5)
    assert out["kl"] > 0 and out["perceptual"] == out["g_adv"] == out["d_loss"] == 0.0
    # What the bundle's StatsHandler/TensorBoardStatsHandler read.
    logged = from_engine(["loss", *SCALAR_KEYS], first=True)(out)
    assert all(math.isfinite(float(v)) for v in logged)


def test_adversarial_term_and_discriminator_start_together_after_the_warm_up():
    torch.manual_seed(0)
    autoencoder, discriminator = _autoencoder(), _discriminator()
    trainer = _trainer(_data(), 2, autoencoder, discriminator, adversarial_weight=0.1, adversarial_warmup_epochs=1)
    g_adv, d_loss, changes, snapshots = {1: [], 2: []}, {1: [], 2: []}, {}, {}

    def start(engine):
        snapshots["ae"], snapshots["d"] = _state(autoencoder), _state(discriminator)

    def iteration(engine):
        g_adv[engine.state.epoch].append(engine.state.output["g_adv"])
        d_loss[engine.state.epoch].append(engine.state.output["d_loss"])

    def end(engine):
        changes[engine.state.epoch] = {
            "ae": _params_changed(snapshots["ae"], autoencoder),
            "d_params": _params_changed(snapshots["d"], discriminator),
            # Buffers too: during the warm-up the discriminator must not even run in train mode.
            "d_state": any(not torch.equal(snapshots["d"][k], v) for k, v in discriminator.state_dict().items()),
        }

    trainer.add_event_handler(Events.EPOCH_STARTED, start)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, iteration)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, end)
    trainer.run()
    assert g_adv[1] == d_loss[1] == [0.0, 0.0]
    assert all(v > 0 for v in g_adv[2] + d_loss[2])
    assert changes[1] == {"ae": True, "d_params": False, "d_state": False}
    assert changes[2] == {"ae": True, "d_params": True, "d_state": True}
    out = trainer.state.output
    total = out["l1"] + 1e-7 * out["kl"] + 0.1 * out["g_adv"]
    assert float(out[Keys.LOSS]) == pytest.approx(total, rel=1e-5)


def test_discriminator_is_frozen_in_eval_mode_for_the_generator_and_trains_only_in_its_own_step():
    torch.manual_seed(0)
    discriminator = _discriminator()
    trainer = _trainer(_data(n=2), 1, _autoencoder(), discriminator, adversarial_weight=0.1)
    calls, logits = [], []

    def hook(module, args, output):
        calls.append((module.training, any(p.requires_grad for p in module.parameters()), args[0].requires_grad))
        logits.append(output[-1].detach())

    discriminator.register_forward_hook(hook)
    trainer.run()
    # Generator term: eval mode, no parameter gradients, gradients flow to the reconstruction.
    # Then its own step on the detached reconstruction and on the real images, in train mode.
    assert calls == [(False, False, True), (True, True, False), (True, True, False)]
    assert not discriminator.training
    assert all(p.requires_grad for p in discriminator.parameters())
    # Least squares (MONAI's, on leaky-ReLU(0.05) logits): the generator wants its patches called real (1),
    # the discriminator calls the reconstruction fake (0) and the image real (1), averaging the two.
    scores = [F.leaky_relu(x, 0.05) for x in logits]
    out = trainer.state.output
    assert out["g_adv"] == pytest.approx(float(((scores[0] - 1) ** 2).mean()), rel=1e-5)
    expected_d = 0.5 * float((scores[1] ** 2).mean() + ((scores[2] - 1) ** 2).mean())
    assert out["d_loss"] == pytest.approx(expected_d, rel=1e-5)


def test_invalid_adversarial_settings_fail_clearly():
    autoencoder = _autoencoder()
    loader = DataLoader(_data(n=2), batch_size=2)
    optimizer = torch.optim.Adam(autoencoder.parameters())
    common = dict(device="cpu", max_epochs=1, train_data_loader=loader, network=autoencoder, optimizer=optimizer)
    with pytest.raises(ValueError, match="d_optimizer"):
        AutoencoderKLTrainer(**common, loss_function=AutoencoderKLLoss(), discriminator=_discriminator())
    with pytest.raises(ValueError, match="adversarial_weight"):
        AutoencoderKLTrainer(**common, loss_function=AutoencoderKLLoss(), adversarial_weight=-0.1)


def test_trainer_runs_in_3d_with_a_discriminator():
    torch.manual_seed(0)
    autoencoder, discriminator = _autoencoder(spatial_dims=3), _discriminator(spatial_dims=3, num_layers_d=1)
    trainer = _trainer(_data(n=2, size=(8, 8, 8)), 1, autoencoder, discriminator, adversarial_weight=0.1)
    trainer.run()
    out = trainer.state.output
    assert trainer.state.iteration == 1
    assert out[Keys.PRED].shape == (2, 1, 8, 8, 8)
    assert all(math.isfinite(out[k]) for k in SCALAR_KEYS) and out["g_adv"] > 0 and out["d_loss"] > 0
