"""ICAM networks: shapes in 2D and 3D, noise and sampling modes, raw logits, norms, gradient flow."""

import pytest
import torch
from torch import nn

from common.networks import (
    AttributeClassifier,
    AttributeEncoder,
    ContentDiscriminator,
    ContentEncoder,
    DomainDiscriminator,
    Generator,
)
from common.networks.icam import attribute_latent_size

CASES = [(2, (32, 32)), (2, (64, 48)), (3, (32, 40, 32))]


@pytest.mark.parametrize("spatial_dims,size", CASES)
def test_network_shapes(spatial_dims, size):
    torch.manual_seed(0)
    d, b = spatial_dims, 2
    x = torch.rand(b, 1, *size) * 2 - 1
    content_encoder, attribute_encoder, generator = ContentEncoder(d), AttributeEncoder(d), Generator(d)
    content = content_encoder(x)
    assert content.shape == (b, 64, *(s // 4 for s in size))
    mu, logvar = attribute_encoder(x)
    latent = (b, 1, *(s // 16 for s in size))
    assert mu.shape == latent and logvar.shape == latent
    assert tuple(mu.shape[2:]) == attribute_latent_size(size)
    z = attribute_encoder.reparameterize(mu, logvar)
    image = generator(content, z)
    assert image.shape == x.shape
    assert image.abs().max() <= 1.0  # Tanh output
    real_fake, domain = DomainDiscriminator(d, image_size=size)(image)
    assert real_fake.shape == (b, 1) and domain.shape == (b, 1)
    assert ContentDiscriminator(d, content_size=content.shape[2:])(content).shape == (b, 1)
    classifier = AttributeClassifier(image_size=size, regression=True)
    assert classifier(z).shape == (b, 1) and classifier.regress(z).shape == (b, 1)
    with pytest.raises(RuntimeError):
        AttributeClassifier(image_size=size).regress(z)


def test_paper_latent_sizes_and_discriminator_depth():
    with torch.no_grad():
        mu, _ = AttributeEncoder(2).eval()(torch.zeros(1, 1, 128, 160))
    assert mu.shape == (1, 1, 8, 10)  # the 2D attribute space of the HCP slices
    assert attribute_latent_size((128, 160, 128)) == (8, 10, 8)  # paper A.1: 3D latent 8x10x8
    assert AttributeClassifier(image_size=(128, 160, 128)).classifier.in_features == 640

    def strided(net):
        return sum(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in net.modules())

    assert strided(DomainDiscriminator(2)) == 6
    assert strided(DomainDiscriminator(2, image_size=(128, 160))) == 6
    assert strided(DomainDiscriminator(2, image_size=(32, 32))) == 4  # stops before 1x1 maps
    assert strided(ContentDiscriminator(2, content_size=(32, 40))) == 3
    assert strided(ContentDiscriminator(2, content_size=(8, 8))) == 2


def test_content_noise_only_in_training():
    torch.manual_seed(0)
    encoder, x = ContentEncoder(2), torch.randn(1, 1, 32, 32)
    encoder.train()
    first, second = encoder(x), encoder(x)
    assert (first - second).std() > 0.5  # N(0, 1) noise on every element, independently drawn
    encoder.eval()
    assert torch.equal(encoder(x), encoder(x))
    # The noise is the only difference: in eval the output equals the noiseless features.
    assert torch.allclose((first - encoder(x)).std(), torch.tensor(1.0), atol=0.1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_discriminator_instance_norm_is_really_applied(spatial_dims):
    instance = (nn.InstanceNorm2d, nn.InstanceNorm3d)

    def count(net):
        return sum(isinstance(m, instance) for m in net.modules())

    size = (32,) * spatial_dims
    assert count(DomainDiscriminator(spatial_dims, image_size=size)) == 4
    assert count(DomainDiscriminator(spatial_dims, norm=None)) == 0
    assert count(ContentDiscriminator(spatial_dims)) == 3
    assert count(ContentDiscriminator(spatial_dims, norm=None)) == 0
    with pytest.raises(ValueError, match="unknown"):
        DomainDiscriminator(spatial_dims, norm="Instance2d")
    # Bias-free convolutions followed by instance norm make the score independent of the image's contrast.
    torch.manual_seed(0)
    net, x = DomainDiscriminator(spatial_dims, image_size=size).eval(), torch.randn(1, 1, *size)
    with torch.no_grad():
        assert torch.allclose(net(x)[0], net(5 * x)[0], atol=1e-3)
        plain = DomainDiscriminator(spatial_dims, norm=None, image_size=size).eval()
        assert not torch.allclose(plain(x)[0], plain(5 * x)[0], atol=1e-3)


def test_gradients_reach_both_encoders():
    torch.manual_seed(0)
    content_encoder, attribute_encoder, generator = ContentEncoder(2), AttributeEncoder(2), Generator(2)
    x = torch.randn(2, 1, 32, 32)
    mu, logvar = attribute_encoder(x)
    image = generator(content_encoder(x), attribute_encoder.reparameterize(mu, logvar))
    (image - x).abs().mean().backward()
    for name, module in (("content", content_encoder), ("attribute", attribute_encoder), ("generator", generator)):
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} gets no gradient"


def test_classifier_returns_raw_logits():
    torch.manual_seed(0)
    classifier = AttributeClassifier(latent_size=(2, 2))
    with torch.no_grad():
        classifier.classifier.weight.fill_(3.0)
        logits = classifier(torch.cat([torch.ones(1, 1, 2, 2), -torch.ones(1, 1, 2, 2)]))
    assert logits.shape == (2, 1)
    assert logits[0] > 1 and logits[1] < 0  # no sigmoid/softmax squashing into [0, 1]
    # One logit per image: a softmax over a single output would always be 1.
    assert not torch.allclose(logits[0], logits[1])
    with pytest.raises(ValueError):
        AttributeClassifier()


def test_reparameterize_samples_in_training_and_returns_mu_in_eval():
    torch.manual_seed(0)
    encoder = AttributeEncoder(2)
    mu, logvar = torch.zeros(4096, 1, 2, 2), torch.full((4096, 1, 2, 2), 2 * torch.log(torch.tensor(3.0)))
    encoder.train()
    first, second = encoder.reparameterize(mu, logvar), encoder.reparameterize(mu, logvar)
    assert not torch.equal(first, second)
    assert abs(first.std().item() - 3.0) < 0.1  # std = exp(logvar / 2)
    encoder.eval()
    assert torch.equal(encoder.reparameterize(mu, logvar), mu)
    assert not torch.equal(encoder.reparameterize(mu, logvar, sample=True), mu)
