"""The attribution-constraint loss: values, and a double-backprop gradient that matches finite differences."""

import pytest
import torch
from torch import nn

from common.engines import epoch_lr_scheduler
from common.errors import InputError
from common.losses import AttributionConstraintLoss
from common.networks import PatchGANClassifier


class Tiny(nn.Module):
    """A smooth toy classifier (tanh), so finite differences of its input gradient are accurate."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("mode", ["unsupervised", "supervised", "ross"])
def test_double_backprop_gradient_matches_finite_differences(mode):
    torch.manual_seed(0)
    model = Tiny().double()
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    mask = (torch.rand(4, 1, 6, 6) > 0.7).double()
    loss_fn = AttributionConstraintLoss(alpha=3.0, method="G", mode=mode)
    _assert_weight_gradient_matches_finite_differences(model, loss_fn, x, y, mask)


def _assert_weight_gradient_matches_finite_differences(model, loss_fn, x, y, mask):
    loss_fn(model, x, y, mask)["loss"].backward()
    weight = model.conv.weight
    analytic = weight.grad.clone()
    eps = 1e-6

    def loss_with(delta, index):
        with torch.no_grad():
            weight[index] += delta
        value = loss_fn(model, x, y, mask)["loss"].item()  # needs autograd: the loss holds a gradient
        with torch.no_grad():
            weight[index] -= delta
        return value

    for index in [(0, 0, 0, 0), (1, 0, 1, 2), (2, 0, 2, 1)]:
        numeric = (loss_with(eps, index) - loss_with(-eps, index)) / (2 * eps)
        assert analytic[index].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_constraint_values():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(4, 1, 6, 6)
    y = torch.tensor([0, 1, 0, 1])
    out = AttributionConstraintLoss(alpha=2.0, method="G", mode="unsupervised")(model, x, y)
    healthy = out["attribution"][y == 0]
    expected = torch.nn.functional.softplus(healthy).mean()  # BCE(sigmoid(A), 0) per voxel
    assert torch.allclose(out["attribution_loss"], expected, atol=1e-6)
    assert torch.allclose(out["loss"], out["bce"] + 2.0 * expected, atol=1e-6)
    ross = AttributionConstraintLoss(alpha=1.0, mode="ross")(model, x, y)
    assert torch.allclose(ross["attribution_loss"], (ross["attribution"][y == 0] ** 2).mean(), atol=1e-8)
    plain = AttributionConstraintLoss(alpha=0.0)(model, x, y)
    assert plain["attribution"] is None and torch.allclose(plain["loss"], plain["bce"])
    with pytest.raises(ValueError, match="needs lesion masks"):
        AttributionConstraintLoss(mode="supervised")(model, x, y)


def test_the_constraint_moves_healthy_attribution_negative():
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(8, 1, 6, 6)
    y = torch.tensor([0, 1] * 4)
    loss_fn = AttributionConstraintLoss(alpha=50.0, mode="unsupervised")
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = loss_fn(model, x, y)["attribution_loss"].item()
    for _ in range(60):
        optimiser.zero_grad()
        loss_fn(model, x, y)["loss"].backward()
        optimiser.step()
    assert loss_fn(model, x, y)["attribution_loss"].item() < before


class TinyNormed(nn.Module):
    """Tiny with a batch norm, whose running statistics stay fixed (momentum 0) so that repeated
    training-mode calls see the same function (finite differences)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.norm = nn.BatchNorm2d(3, momentum=0.0)
        self.head = nn.Linear(3, 1)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-0.5, 0.5)
            self.norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).mean((2, 3)))


# Not "detached": it holds the batch statistics constant on purpose, so its gradient is not the full one.
@pytest.mark.parametrize("mode", ["unsupervised", "supervised", "ross"])
def test_running_statistics_constraint_gradient_matches_finite_differences(mode):
    torch.manual_seed(0)
    model = TinyNormed().double()
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    mask = (torch.rand(4, 1, 6, 6) > 0.7).double()
    loss_fn = AttributionConstraintLoss(alpha=3.0, method="G", mode=mode, batch_norm="running")
    _assert_weight_gradient_matches_finite_differences(model, loss_fn, x, y, mask)
    assert model.training  # the attribution pass put it back in training mode


def test_running_statistics_map_is_the_inference_map_of_each_constrained_image():
    torch.manual_seed(0)
    model = TinyNormed()
    x = torch.randn(6, 1, 6, 6)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    out = AttributionConstraintLoss(alpha=2.0, batch_norm="running")(model, x, y)
    model.eval()
    healthy = x[y == 0].clone().requires_grad_(True)
    (inference_map,) = torch.autograd.grad(model(healthy).sum(), healthy)
    assert out["attribution"].shape == (3, 1, 6, 6)
    assert torch.allclose(out["attribution"], inference_map, atol=1e-6)
    assert torch.allclose(out["attribution_loss"], torch.nn.functional.softplus(inference_map).mean(), atol=1e-6)
    # The training-mode map of the same images differs: it goes through the batch statistics.
    model.train()
    batch_map = AttributionConstraintLoss(alpha=2.0, batch_norm="batch")(model, x, y)["attribution"][y == 0]
    assert not torch.allclose(batch_map, inference_map, atol=1e-3)
    # The classification term still comes from the training forward pass.
    assert torch.allclose(out["logits"], model(x), atol=1e-6)
    with pytest.raises(ValueError, match="batch_norm 'frozen' is unknown"):
        AttributionConstraintLoss(batch_norm="frozen")


def test_detached_map_normalises_each_image_with_the_batch_statistics_held_constant():
    torch.manual_seed(0)
    model = TinyNormed()
    x = torch.randn(6, 1, 6, 6)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    running = (model.norm.running_mean.clone(), model.norm.running_var.clone())
    out = AttributionConstraintLoss(alpha=2.0, batch_norm="detached")(model, x, y)
    assert model.training and model.norm.running_mean.equal(running[0]) and model.norm.running_var.equal(running[1])
    with torch.no_grad():
        features = model.conv(x)
    expected = TinyNormed()
    expected.load_state_dict(model.state_dict())
    expected.norm.running_mean.copy_(features.mean((0, 2, 3)))
    expected.norm.running_var.copy_(features.var((0, 2, 3), unbiased=False))
    expected.eval()
    healthy = x[y == 0].clone().requires_grad_(True)
    (per_image_map,) = torch.autograd.grad(expected(healthy).sum(), healthy)
    assert torch.allclose(out["attribution"], per_image_map, atol=1e-5)
    # the batch statistics differ from the running ones, so this is not the running-statistics map
    running_map = AttributionConstraintLoss(alpha=2.0, batch_norm="running")(model, x, y)["attribution"]
    assert not torch.allclose(running_map, per_image_map, atol=1e-3)
    # a weight scale before the batch norm leaves the detached map unchanged (the running one grows)
    with torch.no_grad():
        model.conv.weight.mul_(10.0)
        model.conv.bias.mul_(10.0)
    scaled = AttributionConstraintLoss(alpha=2.0, batch_norm="detached")(model, x, y)["attribution"]
    assert torch.allclose(scaled, out["attribution"], atol=1e-4)


@pytest.mark.parametrize("spatial_dims,shape", [(2, (2, 1, 64, 64)), (3, (1, 1, 32, 32, 32))])
def test_patchgan_classifier(spatial_dims, shape):
    model = PatchGANClassifier(spatial_dims)
    x = torch.randn(shape)
    assert model(x).shape == (shape[0], 1)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d))]
    assert len(norms) == 3  # C128, C256, C512; none after the first layer
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]


def test_constrained_trainer_runs_the_constraint():
    from torch.utils.data import DataLoader

    from common.engines import ConstrainedClassifierTrainer

    torch.manual_seed(0)
    images = torch.randn(8, 1, 6, 6)
    data = [{"image": images[i], "label": torch.tensor(i % 2), "mask": (images[i] > 1).float()} for i in range(8)]
    model = Tiny()
    weights = [p.detach().clone() for p in model.parameters()]
    trainer = ConstrainedClassifierTrainer(
        device="cpu",
        max_epochs=1,
        train_data_loader=DataLoader(data, batch_size=4),
        network=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        loss_function=AttributionConstraintLoss(alpha=5.0, mode="supervised"),
    )
    trainer.run()
    out = trainer.state.output
    assert out["attribution"].shape == (4, 1, 6, 6) and out["attribution_loss"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_constrained_trainer_clips_the_gradient_norm():
    from torch.utils.data import DataLoader

    from common.engines import ConstrainedClassifierTrainer

    norms = {}
    for max_norm in (None, 1e-3):
        torch.manual_seed(0)
        images = torch.randn(4, 1, 6, 6)
        data = [{"image": images[i], "label": torch.tensor(i % 2)} for i in range(4)]
        model = Tiny()
        # Plain SGD: the step is the (clipped) gradient, so its norm shows the clipping.
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        trainer = ConstrainedClassifierTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=DataLoader(data, batch_size=4),
            network=model,
            optimizer=optimizer,
            loss_function=AttributionConstraintLoss(alpha=100.0),
            max_grad_norm=max_norm,
        )
        trainer.run()
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        norms[max_norm] = (after - before).norm().item()
    assert norms[1e-3] == pytest.approx(1e-3, rel=1e-3)
    assert norms[None] > 10 * norms[1e-3]


def _one_constrained_step(device: str, amp: bool) -> torch.Tensor:
    """Parameter gradient of one G-constrained step of the PatchGAN classifier through the trainer."""
    from torch.utils.data import DataLoader

    from common.engines import ConstrainedClassifierTrainer

    torch.manual_seed(0)
    images = torch.randn(4, 1, 32, 32)
    data = [{"image": images[i], "label": torch.tensor(i % 2), "mask": (images[i] > 1).float()} for i in range(4)]
    model = PatchGANClassifier(2).to(device)
    trainer = ConstrainedClassifierTrainer(
        device=device,
        max_epochs=1,
        train_data_loader=DataLoader(data, batch_size=4),
        network=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        loss_function=AttributionConstraintLoss(alpha=10.0, mode="supervised"),
        amp=amp,
    )
    trainer.run()
    return torch.cat([p.grad.flatten().float().cpu() for p in model.parameters()])


def test_constrained_trainer_amp_is_ignored_on_cpu():
    assert torch.equal(_one_constrained_step("cpu", amp=True), _one_constrained_step("cpu", amp=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bfloat16 autocast runs on CUDA only")
def test_constrained_trainer_bf16_double_backprop_matches_float32_on_cuda():
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    full = _one_constrained_step("cuda", amp=False)
    mixed = _one_constrained_step("cuda", amp=True)
    assert not torch.equal(full, mixed)  # autocast did run
    assert torch.nn.functional.cosine_similarity(full, mixed, dim=0) > 0.99


def test_epoch_lr_schedules():
    optimizer = torch.optim.Adam(torch.nn.Linear(2, 1).parameters(), lr=1e-3)
    cosine = epoch_lr_scheduler(optimizer, "cosine", 4)
    rates = []
    for _ in range(4):
        optimizer.step()
        cosine.step()
        rates.append(cosine.get_last_lr()[0])
    assert rates == sorted(rates, reverse=True) and rates[-1] < 1e-9  # annealed to zero over the epochs
    optimizer = torch.optim.Adam(torch.nn.Linear(2, 1).parameters(), lr=1e-3)
    constant = epoch_lr_scheduler(optimizer, "constant", 4)
    optimizer.step()
    constant.step()
    assert constant.get_last_lr() == [1e-3]
    with pytest.raises(InputError, match="lr_schedule 'step' is unknown; expected one of cosine, constant"):
        epoch_lr_scheduler(optimizer, "step", 4)
