"""ICAM trainer and objective: update schedule, loss terms, learning, rejection sampling, FA maps."""

import math

import pytest
import torch
from ignite.engine import Events
from torch.utils.data import DataLoader, Dataset

import common.engines.icam as icam_engine
from common.engines import (
    ICAMTrainer,
    RejectionSamplingError,
    feature_attribution,
    is_content_discriminator_iteration,
    sample_attribute,
)
from common.engines.icam import IMAGE_KEYS, SCALAR_KEYS
from common.losses import ICAMLossWeights
from common.losses.icam import (
    GENERATOR_TERMS,
    attribute_classification_loss,
    binary_logit_loss,
    content_encoder_adversarial_loss,
    domain_discriminator_losses,
    feature_attribution_l1,
    generator_adversarial_loss,
    kl_divergence,
    latent_regression_l1,
    reconstruction_losses,
    regression_loss,
    weighted_total,
)
from common.networks import (
    AttributeClassifier,
    AttributeEncoder,
    ContentDiscriminator,
    ContentEncoder,
    DomainDiscriminator,
    Generator,
)

SIZE = (32, 32)
GENERATOR_SIDE = ("content_encoder", "attribute_encoder", "generator", "classifier")


class SquarePairs(Dataset):
    """Class 0: dim noise; class 1: the same kind of noise plus a bright 8x8 square at a random place."""

    def __init__(self, n: int, seed: int):
        rng = torch.Generator().manual_seed(seed)
        self.x0 = torch.rand(n, 1, *SIZE, generator=rng) * 0.4 - 0.8
        self.x1 = torch.rand(n, 1, *SIZE, generator=rng) * 0.4 - 0.8
        self.age = torch.rand(2, n, generator=rng)  # regression targets
        for i in range(n):
            row, col = torch.randint(4, 20, (2,), generator=rng).tolist()
            self.x1[i, :, row : row + 8, col : col + 8] = 0.8

    def __len__(self):
        return len(self.x0)

    def __getitem__(self, i):
        return {"image_0": self.x0[i], "image_1": self.x1[i], "age_0": self.age[0, i], "age_1": self.age[1, i]}


def _networks(regression=False):
    """Narrow versions of the paper's networks for 32x32 images (attribute latent 2x2, content 8x8)."""
    return dict(
        content_encoder=ContentEncoder(2, channels=(8, 16, 32), num_res_blocks=1),
        attribute_encoder=AttributeEncoder(2, channels=(8, 16, 16, 16)),
        generator=Generator(2, content_channels=32, up_channels=(16, 8), num_res_blocks=1),
        classifier=AttributeClassifier(image_size=SIZE, regression=regression),
        domain_discriminator=DomainDiscriminator(2, channels=(8, 16, 32, 64), image_size=SIZE),
        content_discriminator=ContentDiscriminator(2, in_channels=32, channels=32, content_size=(8, 8)),
    )


def _trainer(data, iterations, batch_size=2, lr=1e-4, seed=0, **kwargs):
    torch.manual_seed(seed)
    nets = _networks(regression=kwargs.get("regression_keys") is not None)
    betas = (0.5, 0.999)
    generator_side = [p for name in GENERATOR_SIDE for p in nets[name].parameters()]
    trainer = ICAMTrainer(
        "cpu",
        1,
        DataLoader(data, batch_size=batch_size, shuffle=True),
        **nets,
        optimizer=torch.optim.Adam(generator_side, lr=lr, betas=betas),
        domain_optimizer=torch.optim.Adam(nets["domain_discriminator"].parameters(), lr=lr, betas=betas),
        content_optimizer=torch.optim.Adam(nets["content_discriminator"].parameters(), lr=0.4 * lr, betas=betas),
        epoch_length=iterations,
        **kwargs,
    )
    return trainer, nets


def _snapshot(nets):
    return {name: [p.detach().clone() for p in net.parameters()] for name, net in nets.items()}


def _changed(before, nets):
    return {
        name: any(not torch.equal(a, b) for a, b in zip(before[name], net.parameters())) for name, net in nets.items()
    }


def test_schedule_updates_the_content_discriminator_on_two_of_three_iterations():
    assert [is_content_discriminator_iteration(i) for i in range(1, 7)] == [True, True, False, True, True, False]
    trainer, nets = _trainer(SquarePairs(12, seed=0), iterations=6)
    changes, flags, snapshot = [], [], {}
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: snapshot.update(_snapshot(nets)))

    def record(engine):
        changes.append(_changed(snapshot, nets))
        flags.append(engine.state.output["content_discriminator_updated"])

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record)
    trainer.run()
    content_iterations = [1, 2, 4, 5]
    for iteration, changed in enumerate(changes, start=1):
        expect_content = iteration in content_iterations
        assert changed["content_discriminator"] == expect_content, f"iteration {iteration}"
        # The domain discriminator and every network of the generator side move together, on the others only.
        for name in ("domain_discriminator", *GENERATOR_SIDE):
            assert changed[name] == (not expect_content), f"{name} at iteration {iteration}"
    assert flags == [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_every_loss_term_is_finite_and_reported(batch_size):
    trainer, _ = _trainer(SquarePairs(6, seed=1), iterations=3, batch_size=batch_size)
    trainer.run()
    out = trainer.state.output
    assert set(SCALAR_KEYS) | set(IMAGE_KEYS) <= set(out)
    assert {term for term in GENERATOR_TERMS if term != "regression"} <= set(out)
    for key in SCALAR_KEYS:
        assert isinstance(out[key], float) and math.isfinite(out[key]), key
    assert out["accuracy"] in {i / (2 * batch_size) for i in range(2 * batch_size + 1)}
    # The total is the weighted sum of the reported (unweighted) terms.
    weights = ICAMLossWeights().generator_term_weights()
    total = sum(weights[term] * out[term] for term in GENERATOR_TERMS if term in out)
    assert out["generator_loss"] == pytest.approx(total, rel=1e-5)
    shown = min(batch_size, 2) * 2
    assert out["image"].shape == out["map"].shape == out["translated"].shape == (shown, 1, *SIZE)
    assert torch.allclose(out["map"], out["translated"] - out["image"])


def test_training_falls_back_to_unfiltered_latents_when_rejection_sampling_finds_none():
    trainer, nets = _trainer(SquarePairs(6, seed=1), iterations=3, rejection_max_draws=50)
    with torch.no_grad():
        nets["classifier"].classifier.weight.zero_()
        nets["classifier"].classifier.bias.fill_(-10.0)  # no latent is ever of class 1
    trainer.run()
    assert trainer.state.output["rejection_fallback"] == 1.0
    assert math.isfinite(trainer.state.output["generator_loss"])


def test_trainer_and_feature_attribution_run_in_3d():
    torch.manual_seed(0)
    size = (16, 16, 16)
    nets = dict(
        content_encoder=ContentEncoder(3, channels=(4, 8, 16), num_res_blocks=1),
        attribute_encoder=AttributeEncoder(3, channels=(4, 8, 8, 8)),
        generator=Generator(3, content_channels=16, up_channels=(8, 4), num_res_blocks=1),
        classifier=AttributeClassifier(image_size=size),
        domain_discriminator=DomainDiscriminator(3, channels=(4, 8, 16), image_size=size),
        content_discriminator=ContentDiscriminator(3, in_channels=16, channels=16, content_size=(4, 4, 4)),
    )
    data = [{"image_0": torch.rand(1, *size) - 0.5, "image_1": torch.rand(1, *size)} for _ in range(4)]
    generator_side = [p for name in GENERATOR_SIDE for p in nets[name].parameters()]
    trainer = ICAMTrainer(
        "cpu",
        1,
        DataLoader(data, batch_size=2),
        **nets,
        optimizer=torch.optim.Adam(generator_side),
        domain_optimizer=torch.optim.Adam(nets["domain_discriminator"].parameters()),
        content_optimizer=torch.optim.Adam(nets["content_discriminator"].parameters()),
        epoch_length=3,
    )
    trainer.run()
    assert all(math.isfinite(trainer.state.output[key]) for key in SCALAR_KEYS)
    with torch.no_grad():
        nets["classifier"].classifier.weight.fill_(3.0)
    x = torch.stack([item["image_0"] for item in data[:2]])
    maps = feature_attribution(*(nets[name] for name in GENERATOR_SIDE), x, n_samples=3, chunk_size=2)
    assert all(m.shape == x.shape for m in maps)


def test_regression_variant_reports_its_term_and_bad_batches_fail_clearly():
    trainer, _ = _trainer(SquarePairs(4, seed=2), iterations=3, regression_keys=("age_0", "age_1"))
    trainer.run()
    assert math.isfinite(trainer.state.output["regression"])
    no_head = dict(optimizer=None, domain_optimizer=None, content_optimizer=None, regression_keys=("age_0", "age_1"))
    with pytest.raises(ValueError, match="regression head"):
        ICAMTrainer("cpu", 1, DataLoader(SquarePairs(2, seed=2)), **_networks(regression=False), **no_head)

    class Unequal(SquarePairs):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            return {**item, "image_1": torch.cat([item["image_1"], item["image_1"]])}

    trainer, _ = _trainer(Unequal(3, seed=2), iterations=3)
    with pytest.raises(ValueError, match="as many images of each class"):
        trainer.run()


def test_training_separates_the_classes_in_the_attribute_space():
    # lr 1e-3 instead of the paper's 1e-4 so that 80 generator updates suffice on this easy toy.
    trainer, nets = _trainer(SquarePairs(64, seed=1), iterations=240, lr=1e-3, seed=0)
    trainer.run()
    held_out = SquarePairs(50, seed=2)
    encoder, classifier = nets["attribute_encoder"].eval(), nets["classifier"]
    with torch.no_grad():
        logits0 = classifier(encoder(held_out.x0)[0]).view(-1)
        logits1 = classifier(encoder(held_out.x1)[0]).view(-1)
    accuracy = ((logits0 <= 0).float().mean() + (logits1 > 0).float().mean()) / 2
    assert accuracy >= 0.8


def _classifier(weight, bias):
    classifier = AttributeClassifier(latent_size=(2, 2))
    with torch.no_grad():
        classifier.classifier.weight.fill_(weight)
        classifier.classifier.bias.fill_(bias)
    return classifier


@pytest.mark.parametrize("target_class", [0, 1])
def test_sample_attribute_returns_only_accepted_latents(target_class):
    classifier = _classifier(1.0, 0.0)
    z = sample_attribute(
        classifier, (20, 1, 2, 2), target_class, threshold=0.9, generator=torch.Generator().manual_seed(0)
    )
    assert z.shape == (20, 1, 2, 2)
    p_one = torch.sigmoid(classifier(z)).view(-1)
    p_target = p_one if target_class == 1 else 1 - p_one
    assert (p_target > 0.9).all()
    again = sample_attribute(classifier, (20, 1, 2, 2), target_class, 0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(z, again)


def test_sample_attribute_fails_clearly_when_nothing_is_accepted():
    never_one = _classifier(0.0, -10.0)  # p(1 | z) = sigmoid(-10) for every z
    with pytest.raises(RejectionSamplingError, match=r"class 1 with p > 0\.9 in 500 draws.*train .* longer or lower"):
        sample_attribute(never_one, (3, 1, 2, 2), 1, threshold=0.9, max_draws=500)
    assert sample_attribute(never_one, (3, 1, 2, 2), 0, threshold=0.9).shape == (3, 1, 2, 2)
    with pytest.raises(ValueError, match="target_class"):
        sample_attribute(never_one, (3, 1, 2, 2), 2)


def _fa_networks():
    torch.manual_seed(0)
    nets = _networks()
    with torch.no_grad():
        nets["classifier"].classifier.weight.fill_(2.0)  # sharp enough that p > 0.9 is common under N(0, I)
    return nets


def test_feature_attribution_maps(monkeypatch):
    nets = _fa_networks()
    x = SquarePairs(1, seed=3)
    x = torch.cat([x.x0, x.x1])
    requested = []

    def recording_sampler(classifier, shape, target_class, *args, **kwargs):
        requested.append(target_class)
        return sample_attribute(classifier, shape, target_class, *args, **kwargs)

    monkeypatch.setattr(icam_engine, "sample_attribute", recording_sampler)
    for net in nets.values():
        net.train()
    args = (nets["content_encoder"], nets["attribute_encoder"], nets["generator"], nets["classifier"], x)
    mean, variance, translated = feature_attribution(*args, n_samples=4, rng=torch.Generator().manual_seed(1))
    assert mean.shape == variance.shape == translated.shape == x.shape
    assert variance.abs().sum() > 0 and (variance >= 0).all()
    assert all(net.training for net in nets.values())  # modes restored
    # Each image goes to the class opposite its prediction from the attribute mean.
    with torch.no_grad():
        predicted = (nets["classifier"](nets["attribute_encoder"](x)[0]).view(-1) > 0).long()
    assert requested == (1 - predicted).tolist()

    single = feature_attribution(*args, n_samples=1, rng=torch.Generator().manual_seed(1))
    assert torch.equal(single.translated - x, single.mean_map)
    assert torch.equal(single.variance_map, torch.zeros_like(x))
    # Eval mode: no content noise, so the same draws give the same maps.
    repeat = feature_attribution(*args, n_samples=1, rng=torch.Generator().manual_seed(1))
    assert torch.equal(single.mean_map, repeat.mean_map)


def test_losses_match_hand_computed_values():
    mu = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # Per element -(1 + logvar - mu^2 - exp(logvar)) / 2: image 1: 0.5 + (1 - ln 2) / 2; image 2: 0 + 2.
    assert kl_divergence(mu, logvar).item() == pytest.approx((0.5 + (1 - math.log(2)) / 2 + 2.0) / 2)
    assert kl_divergence(torch.zeros(3, 1, 2, 2), torch.zeros(3, 1, 2, 2)).item() == 0.0

    ln2 = math.log(2.0)
    logits = torch.tensor([[0.0], [2.0]])
    assert binary_logit_loss(logits, torch.tensor([[1.0], [0.0]])).item() == pytest.approx(
        (ln2 + math.log(1 + math.e**2)) / 2
    )
    # Raw logits: a confident logit costs almost nothing (a softmax over one output would pin p at 1 for both).
    assert attribute_classification_loss(torch.tensor([[20.0]]), torch.tensor([[1.0]])).item() < 1e-8
    assert attribute_classification_loss(torch.tensor([[20.0]]), torch.tensor([[0.0]])).item() == pytest.approx(20.0)
    # Eq. 1 for E^c: -(log D + log(1 - D)) / 2 with D = sigmoid(logit); least at logit 0 (D^c undecided).
    d = torch.sigmoid(torch.tensor(-1.0))
    expected = -(torch.log(d) + torch.log(1 - d)).item() / 2
    assert content_encoder_adversarial_loss(torch.tensor([[-1.0]])).item() == pytest.approx(expected)
    assert content_encoder_adversarial_loss(torch.tensor([[0.0]])).item() == pytest.approx(ln2)
    assert generator_adversarial_loss(torch.tensor([[0.0], [0.0]])).item() == pytest.approx(ln2)
    adversarial, classification = domain_discriminator_losses(
        torch.tensor([[0.0]]),
        [torch.tensor([[0.0]]), torch.tensor([[math.log(3.0)]])],
        torch.tensor([[3.0], [-3.0]]),
        torch.tensor([[1.0], [0.0]]),
    )
    # real: ln 2; fakes: mean of ln 2 and -ln(1 - 3/4) = ln 4.
    assert adversarial.item() == pytest.approx(ln2 + (ln2 + math.log(4.0)) / 2)
    assert classification.item() == pytest.approx(math.log(1 + math.exp(-3.0)))

    image, translated = torch.zeros(1, 1, 1, 2), torch.tensor([[[[1.0, -3.0]]]])
    assert feature_attribution_l1(translated, image).item() == pytest.approx(2.0)
    l1, l2 = reconstruction_losses(translated, image)
    assert (l1.item(), l2.item()) == pytest.approx((2.0, 5.0))
    assert latent_regression_l1(torch.tensor([0.5, 1.0]), torch.tensor([0.0, 0.0])).item() == pytest.approx(0.75)
    assert regression_loss(torch.tensor([[1.0], [2.0]]), torch.tensor([0.0, 4.0])).item() == pytest.approx(2.5)


def test_default_weights_are_the_papers_and_every_term_needs_one():
    w = ICAMLossWeights()
    assert (w.content_adversarial, w.domain_adversarial, w.attribute_bce, w.kl) == (1, 1, 10, 0.01)
    assert (w.fa_map, w.latent_regression, w.reconstruction_l1, w.reconstruction_l2) == (10, 1, 100, 100)
    assert (w.domain_class_discriminator, w.domain_class_generator) == (1, 5)
    assert set(w.generator_term_weights()) == set(GENERATOR_TERMS)
    terms = {"kl": torch.tensor(2.0), "fa_map_l1": torch.tensor(0.5)}
    assert weighted_total(terms, w.generator_term_weights()).item() == pytest.approx(0.01 * 2 + 10 * 0.5)
    with pytest.raises(KeyError, match="made_up"):
        weighted_total({"made_up": torch.tensor(1.0)}, w.generator_term_weights())
