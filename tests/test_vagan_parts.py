"""VA-GAN networks and trainer pieces: architecture, schedule, penalty, updates."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.engines import VAGANTrainer, critic_steps_for, gradient_penalty
from common.networks import Classifier, CounterfactualMaps, Critic, EffectMap, MapGenerator
from tests.toys import LinearScore


@pytest.mark.parametrize("spatial_dims,shape", [(2, (2, 1, 32, 48)), (3, (1, 1, 16, 24, 16))])
def test_network_shapes(spatial_dims, shape):
    x = torch.randn(shape)
    generator = MapGenerator(spatial_dims).eval()
    assert generator(x).shape == x.shape
    assert Critic(spatial_dims)(x).shape == (shape[0], 1)
    for head in ("dense", "cam"):
        assert Classifier(spatial_dims, head=head).eval()(x).shape == (shape[0], 2)
    maps = CounterfactualMaps(generator)(x)
    assert torch.allclose(maps[:, :1], EffectMap(generator)(x))
    assert torch.allclose(maps[:, 1:], x + generator(x))


def test_architecture_follows_the_paper():
    def count(module, kind):
        return sum(isinstance(m, kind) for m in module.modules())

    assert count(Critic(2), nn.BatchNorm2d) == 0  # no batch norm in the critic (paper 3.4.2)
    assert count(Critic(2), nn.MaxPool2d) == 4
    assert count(MapGenerator(2), nn.BatchNorm2d) > 10  # batch norm everywhere but the output
    assert isinstance(MapGenerator(2).output.conv, nn.Conv2d)
    assert count(Classifier(2, head="dense"), nn.MaxPool2d) == 4
    assert count(Classifier(2, head="cam"), nn.MaxPool2d) == 2  # CAM net omits the last two poolings
    with pytest.raises(ValueError, match="divisible by 8"):
        MapGenerator(2)(torch.randn(1, 1, 30, 32))


def test_critic_schedule():
    steps = [critic_steps_for(g) for g in range(0, 202)]
    assert steps[:25] == [100] * 25 and steps[25] == 5 and steps[99] == 5
    assert steps[100] == 100 and steps[101] == 5 and steps[200] == 100
    assert critic_steps_for(3, steps=5, boost=25, boost_first=5) == 25
    assert critic_steps_for(7, steps=5, boost=25, boost_first=5, boost_every=0) == 5


def test_gradient_penalty_uses_the_norm_over_all_voxels():
    critic = LinearScore((1, 6, 5))
    real, fake = torch.randn(3, 1, 6, 5), torch.randn(3, 1, 6, 5)
    expected = (critic.w.detach().norm() - 1.0) ** 2  # the gradient is w wherever we look
    assert torch.allclose(gradient_penalty(critic, real, fake), expected, atol=1e-5)


class Pairs(Dataset):
    def __init__(self, n=8, size=16):
        self.n, self.size, self.served = n, size, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.served += 1
        x0 = torch.randn(1, self.size, self.size) * 0.1
        x1 = x0.clone()
        x1[:, 4:8, 4:8] += 1.0
        return {"image_0": x0, "image_1": x1}


def _trainer(data, **kwargs):
    torch.manual_seed(0)
    generator, critic = MapGenerator(2), Critic(2)
    opt = dict(lr=1e-3, betas=(0.0, 0.9))
    trainer = VAGANTrainer(
        "cpu",
        1,
        DataLoader(data, batch_size=2),
        generator,
        critic,
        torch.optim.Adam(generator.parameters(), **opt),
        torch.optim.Adam(critic.parameters(), **opt),
        **kwargs,
    )
    return trainer, generator, critic


def _snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def _changed(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_generator_update_leaves_the_critic_alone():
    data = Pairs()
    trainer, generator, critic = _trainer(data, critic_steps=0, critic_steps_boost=0, boost_first=0, epoch_length=1)
    g0, c0 = _snapshot(generator), _snapshot(critic)
    trainer.run()
    assert _changed(g0, generator) and not _changed(c0, critic)
    out = trainer.state.output
    assert out["critic_steps"] == 0 and out["map"].shape == out["image"].shape


def test_critic_steps_and_accumulation_consume_batches():
    data = Pairs(n=64)
    trainer, generator, critic = _trainer(
        data, critic_steps=3, critic_steps_boost=3, boost_first=0, accumulation_steps=2, epoch_length=1
    )
    c0 = _snapshot(critic)
    trainer.run()
    assert _changed(c0, critic)
    # 3 critic updates x 2 mini-batches + the generator's 2 mini-batches, 2 images each.
    assert data.served >= (3 * 2 + 2) * 2
    out = trainer.state.output
    assert out["critic_steps"] == 3
    assert {"critic_loss", "generator_loss", "wasserstein", "gradient_penalty", "map_l1"} <= set(out)
