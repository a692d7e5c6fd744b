"""ICAM training as an Ignite trainer, plus rejection sampling and FA maps (Bass et al., NeurIPS 2020).

One Ignite iteration takes one pair batch (``image_0``: class 0, ``image_1``: class 1, as many of
each) and makes exactly one kind of update; the schedule follows appendix A.7 ("the content
discriminator is updated twice, followed by the update of the encoders, generators, and domain
discriminators, i.e. each training iteration uses 3 batches") and the original code's ``d_iter = 3``:

- iterations ``i`` (1-based, ``engine.state.iteration``, counted over the whole run) with
  ``i % 3 != 0`` (1, 2, 4, 5, ...): the content discriminator D^c learns the class of ``E^c(x)``
  (Eq. 1), its gradient norm clipped to 5 as in DRIT++/ICAM;
- iterations with ``i % 3 == 0`` (3, 6, ...): one forward pass of the DRIT++ translation graph, then
  the domain discriminator D on real vs (detached) translated images, then one step of the encoders,
  generator and attribute classifier on all other terms of Eq. 5 (D and D^c frozen, D already updated).

The translation graph (x0 of class 0, x1 of class 1; content c = E^c(x) with training noise,
attribute z = reparameterised E^a(x); the classifier reads the attribute mean, as in the original):

- cross translation: ``x0->1 = G(c0, z1)``, ``x1->0 = G(c1, z0)``; FA maps ``x0->1 - x0``, ``x1->0 - x1``;
- self reconstruction: ``G(c0, z0)``, ``G(c1, z1)`` (Eq. 3);
- random translation: ``G(c0, r1)``, ``G(c1, r0)`` with ``r_k ~ N(0, I)`` rejection-sampled to class k
  (p > ``rejection_threshold``; if none is found within ``rejection_max_draws`` the unfiltered draws are
  used, as the original did, and ``rejection_fallback`` is 1), re-encoded for the latent regression (Eq. 2);
- second cross translation back: ``G(E^c(x0->1), E^a(x1->0)) ~ x0`` and ``G(E^c(x1->0), E^a(x0->1)) ~ x1`` (Eq. 4).

Deviations from the original code, all deliberate:

- one domain discriminator scores both kinds of translated images (the code kept two copies, one for
  cross and one for random translations; Eq. 5 has one ``L^D_adv``); the generator still gets one
  adversarial and one class term per kind;
- all terms of the encoders/generator objective go into one backward pass and one optimiser step (the
  version of the original read for this port zeroed the generator's and content encoder's gradients
  between its two backward passes, so only the attribute encoder kept the reconstruction, FA-map and
  content terms' gradients);
- classification losses are BCE-with-logits on raw logits (the code applied a softmax first);
- no learning-rate scheduler is created (the code created one and never stepped it); pass a MONAI/Ignite
  LR handler if decay is wanted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from monai.engines import Trainer
from torch import nn
from torch.utils.data import DataLoader

from common.data.pairs import prepare_pair_batch
from common.engines.distributed import unwrap
from common.engines.precision import bf16_autocast
from common.losses.icam import (
    GENERATOR_TERMS,
    ICAMLossWeights,
    attribute_classification_loss,
    content_discriminator_loss,
    content_encoder_adversarial_loss,
    content_l2,
    domain_discriminator_losses,
    feature_attribution_l1,
    generator_adversarial_loss,
    kl_divergence,
    latent_regression_l1,
    reconstruction_losses,
    regression_loss,
    weighted_total,
)
from common.networks.modes import no_parameter_grads

SCALAR_KEYS = (
    "generator_loss",
    *(term for term in GENERATOR_TERMS if term != "regression"),
    "domain_discriminator_loss",
    "domain_discriminator_adversarial",
    "domain_discriminator_class",
    "content_discriminator_loss",
    "accuracy",
    "rejection_fallback",
    "content_discriminator_updated",
)
IMAGE_KEYS = ("image", "map", "translated")


class RejectionSamplingError(RuntimeError):
    """No attribute latent of the wanted class was found within the allowed number of draws."""


def is_content_discriminator_iteration(iteration: int, period: int = 3) -> bool:
    """Whether 1-based ``iteration`` updates D^c (``iteration % period != 0``) or D and the generator side."""
    return iteration % period != 0


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def sample_attribute(
    classifier: nn.Module,
    shape: Sequence[int],
    target_class: int,
    threshold: float = 0.9,
    max_draws: int = 10_000,
    generator: torch.Generator | None = None,
    draw_batch: int = 256,
) -> torch.Tensor:
    """Rejection sampling (paper 3.2, A.2): ``shape[0]`` latents ``z ~ N(0, I)`` with ``p(target_class|z) > threshold``.

    Latents of ``shape[1:]`` are drawn ``max(draw_batch, shape[0])`` at a time on the classifier's device
    (``generator`` must live there too) until enough are accepted; the classifier's raw logit gives
    ``p(1 | z) = sigmoid(logit)``. Raises :class:`RejectionSamplingError` after ``max_draws`` draws.
    """
    if target_class not in (0, 1):
        raise ValueError(f"target_class={target_class}; expected 0 or 1")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold={threshold}; expected a probability in [0, 1)")
    needed, latent_shape = int(shape[0]), tuple(int(s) for s in shape[1:])
    device = _device_of(classifier)
    if needed == 0:
        return torch.empty((0, *latent_shape), device=device)
    accepted: list[torch.Tensor] = []
    n_accepted = draws = 0
    with torch.no_grad():
        while n_accepted < needed and draws < max_draws:
            n = min(max(draw_batch, needed), max_draws - draws)
            z = torch.randn((n, *latent_shape), generator=generator, device=device)
            draws += n
            logit = classifier(z).float().view(n)
            # p(0 | z) = 1 - sigmoid(logit) = sigmoid(-logit), without the cancellation of 1 - p.
            p_target = torch.sigmoid(logit if target_class == 1 else -logit)
            keep = z[p_target > threshold]
            accepted.append(keep)
            n_accepted += keep.shape[0]
    if n_accepted < needed:
        raise RejectionSamplingError(
            f"rejection sampling found {n_accepted} of {needed} attribute latents of class {target_class} with "
            f"p > {threshold} in {draws} draws from N(0, I); train the classifier longer or lower the threshold"
        )
    return torch.cat(accepted)[:needed]


class FeatureAttribution(NamedTuple):
    """Mean and variance FA maps over the sampled translations, and the first translated image."""

    mean_map: torch.Tensor
    variance_map: torch.Tensor
    translated: torch.Tensor


@contextmanager
def _eval_mode(*modules: nn.Module):
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def feature_attribution(
    content_encoder: nn.Module,
    attribute_encoder: nn.Module,
    generator: nn.Module,
    classifier: nn.Module,
    x: torch.Tensor,
    n_samples: int = 50,
    threshold: float = 0.9,
    max_draws: int = 10_000,
    rng: torch.Generator | None = None,
    chunk_size: int = 8,
    target_class: int | Sequence[int] | torch.Tensor | None = None,
) -> FeatureAttribution:
    """ICAM's test-time FA maps (A.2, Fig. 6): translate each image of ``x`` to the class opposite its prediction.

    In eval mode (no content noise, attribute = encoder mean) each image's class is predicted from its
    attribute latent, ``n_samples`` latents of the opposite class are rejection-sampled (p > ``threshold``,
    the code's 0.9 and 50 samples) and decoded with the image's own content; FA map = translated - x.
    Returns maps of ``x``'s shape: the mean and the (population) variance over the samples, and the first
    translation. ``chunk_size`` bounds how many translations go through the generator at once (3D volumes).
    ``target_class`` (one class for all images, or one per image) fixes the class translated to instead, as
    the NCC(-) / NCC(+) evaluation does (patients to 0, controls to 1, whatever the prediction).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples}; expected at least 1")
    means, variances, translations = [], [], []
    with _eval_mode(content_encoder, attribute_encoder, generator, classifier), torch.no_grad():
        content = content_encoder(x)
        mu, _ = attribute_encoder(x)
        if target_class is None:
            opposite = (classifier(mu).view(-1) <= 0).long()  # predicted 0 (logit <= 0) -> translate to 1
        else:
            opposite = torch.as_tensor(target_class, dtype=torch.long).view(-1).expand(x.shape[0])
        for i in range(x.shape[0]):
            z = sample_attribute(classifier, (n_samples, *mu.shape[1:]), int(opposite[i]), threshold, max_draws, rng)
            image = x[i : i + 1]
            # Sums in float64: the variance as E[M^2] - E[M]^2 would lose digits in float32.
            total = torch.zeros_like(image, dtype=torch.float64)
            total_sq = torch.zeros_like(total)
            first = None
            for start in range(0, n_samples, chunk_size):
                chunk = z[start : start + chunk_size]
                fake = generator(content[i : i + 1].expand(chunk.shape[0], *content.shape[1:]), chunk)
                fa_map = (fake - image).double()
                total += fa_map.sum(0, keepdim=True)
                total_sq += fa_map.pow(2).sum(0, keepdim=True)
                first = fake[:1] if first is None else first
            mean = total / n_samples
            means.append(mean.to(x.dtype))
            variances.append((total_sq / n_samples - mean.pow(2)).clamp_min(0).to(x.dtype))
            translations.append(first)
    return FeatureAttribution(torch.cat(means), torch.cat(variances), torch.cat(translations))


class ICAMTrainer(Trainer):
    """Ignite trainer for ICAM (a ``monai.engines.Trainer``: handlers, metrics and AMP as usual).

    Args:
        device: where to train.
        max_epochs: epochs of ``epoch_length`` iterations (each iteration is one batch and one update kind).
        train_data_loader: batches of ``image_0`` (class 0) and ``image_1`` (class 1), equally many.
        content_encoder, attribute_encoder, generator, classifier: E^c, E^a, G and the attribute classifier.
        domain_discriminator: D, returning ``(real_fake_logit, class_logit)``.
        content_discriminator: D^c, returning one class logit per content tensor.
        optimizer: Adam over E^c, E^a, G and the classifier (paper: lr 1e-4, betas (0.5, 0.999)).
        domain_optimizer: Adam over D (lr 1e-4, betas (0.5, 0.999)).
        content_optimizer: Adam over D^c (lr 4e-5, betas (0.5, 0.999)).
        loss_weights: the lambdas (:class:`common.losses.icam.ICAMLossWeights`, paper A.7 by default).
        content_discriminator_period: D^c is updated on iterations ``i % period != 0`` (3: two of three).
        content_grad_clip: max gradient norm of D^c's update (5, as the original; ``None``: no clipping).
        rejection_threshold: class probability a random attribute needs in training (0.5: the code's argmax).
        rejection_max_draws: draws per class before falling back to unfiltered N(0, I) latents.
        regression_keys: batch keys of the regression targets of ``image_0`` and ``image_1``; enables the
            regression variant (the classifier needs ``regression=True``).
        epoch_length: iterations per epoch (default ``len(train_data_loader)``).
        amp: bfloat16 autocast on CUDA (no GradScaler needed: bfloat16 has float32's range); ignored on CPU.
        prepare_batch, non_blocking, postprocessing, key_train_metric, additional_metrics, train_handlers:
            as for MONAI trainers.
        optim_set_to_none: ``zero_grad(set_to_none=...)``.

    ``engine.state.output`` holds :data:`SCALAR_KEYS` as floats (terms unweighted; ``generator_loss`` is the
    weighted total; values of the update not made this iteration are those of its last update, NaN
    before the first) and, from the first generator update on, :data:`IMAGE_KEYS` tensors (up to two inputs
    per class, their FA maps and cross translations) for :class:`common.handlers.TensorBoardOutputImages`.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        content_encoder: nn.Module,
        attribute_encoder: nn.Module,
        generator: nn.Module,
        classifier: nn.Module,
        domain_discriminator: nn.Module,
        content_discriminator: nn.Module,
        optimizer: torch.optim.Optimizer,
        domain_optimizer: torch.optim.Optimizer,
        content_optimizer: torch.optim.Optimizer,
        loss_weights: ICAMLossWeights | None = None,
        content_discriminator_period: int = 3,
        content_grad_clip: float | None = 5.0,
        rejection_threshold: float = 0.5,
        rejection_max_draws: int = 1000,
        regression_keys: tuple[str, str] | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = prepare_pair_batch,
        amp: bool = False,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        train_handlers: Sequence | None = None,
        optim_set_to_none: bool = True,
    ):
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            postprocessing=postprocessing,
            amp=amp,
            decollate=False,
        )
        if content_discriminator_period < 2:
            raise ValueError(
                f"content_discriminator_period={content_discriminator_period}; expected at least 2 so that both "
                "the content discriminator and the generator get updates"
            )
        if not 0.0 <= rejection_threshold < 1.0:
            raise ValueError(f"rejection_threshold={rejection_threshold}; expected a probability in [0, 1)")
        if regression_keys is not None and getattr(classifier, "regressor", None) is None:
            raise ValueError("regression_keys given but the classifier has no regression head (regression=True)")
        self.content_encoder = content_encoder
        self.attribute_encoder = attribute_encoder
        self.generator = generator
        self.classifier = classifier
        self.domain_discriminator = domain_discriminator
        self.content_discriminator = content_discriminator
        self.optimizer = optimizer
        self.domain_optimizer = domain_optimizer
        self.content_optimizer = content_optimizer
        self.loss_weights = loss_weights or ICAMLossWeights()
        self.content_discriminator_period = int(content_discriminator_period)
        self.content_grad_clip = content_grad_clip
        self.rejection_threshold = float(rejection_threshold)
        self.rejection_max_draws = int(rejection_max_draws)
        self.regression_keys = regression_keys
        self.optim_set_to_none = optim_set_to_none
        self.use_amp = bool(amp) and torch.device(device).type == "cuda"
        self.latest: dict = {key: float("nan") for key in SCALAR_KEYS}
        if regression_keys is not None:
            self.latest["regression"] = float("nan")

    def _autocast(self):
        return bf16_autocast(self.use_amp)

    def _networks(self) -> tuple[nn.Module, ...]:
        return (
            self.content_encoder,
            self.attribute_encoder,
            self.generator,
            self.classifier,
            self.domain_discriminator,
            self.content_discriminator,
        )

    def _iteration(self, engine, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("ICAMTrainer needs a batch of image_0/image_1 pairs")
        x0, x1 = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        if x0.shape != x1.shape:
            raise ValueError(
                f"image_0 {tuple(x0.shape)} and image_1 {tuple(x1.shape)} differ; cross translation pairs "
                "each class-0 image with a class-1 image, so a batch needs as many images of each class of one size"
            )
        for network in self._networks():
            network.train()
        if is_content_discriminator_iteration(engine.state.iteration, self.content_discriminator_period):
            self.latest["content_discriminator_loss"] = self._content_discriminator_step(x0, x1)
            self.latest["content_discriminator_updated"] = 1.0
        else:
            targets = self._regression_targets(batchdata, engine.state.device) if self.regression_keys else None
            self.latest.update(self._translation_step(x0, x1, targets))
            self.latest["content_discriminator_updated"] = 0.0
        return dict(self.latest)

    def _regression_targets(self, batchdata: dict, device) -> torch.Tensor:
        targets = [torch.as_tensor(batchdata[key], dtype=torch.float32).view(-1, 1) for key in self.regression_keys]
        return torch.cat(targets).to(device)

    def _content_discriminator_step(self, x0: torch.Tensor, x1: torch.Tensor) -> float:
        labels = _class_labels(x0, x1)
        with torch.no_grad(), self._autocast():
            content = unwrap(self.content_encoder)(torch.cat([x0, x1]))
        with self._autocast():
            logits = self.content_discriminator(content).float()
        loss = self.loss_weights.content_adversarial * content_discriminator_loss(logits, labels)
        self.content_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        loss.backward()
        if self.content_grad_clip is not None:
            nn.utils.clip_grad_norm_(self.content_discriminator.parameters(), self.content_grad_clip)
        self.content_optimizer.step()
        return float(loss.detach())

    def _random_attribute(self, like: torch.Tensor, target_class: int) -> tuple[torch.Tensor, bool]:
        try:
            z = sample_attribute(
                unwrap(self.classifier), like.shape, target_class, self.rejection_threshold, self.rejection_max_draws
            )
            return z.to(like.dtype), False
        except RejectionSamplingError:
            # Early in training the classifier may accept nothing; the original then used unfiltered draws.
            return torch.randn_like(like), True

    def _translation_step(self, x0: torch.Tensor, x1: torch.Tensor, regression_targets: torch.Tensor | None) -> dict:
        n = x0.shape[0]
        x = torch.cat([x0, x1])
        labels = _class_labels(x0, x1)
        opposite = 1.0 - labels  # class of each translation of [x0, x1]
        with self._autocast():
            content = self.content_encoder(x)
            mu, logvar = self.attribute_encoder(x)
        mu, logvar = mu.float(), logvar.float()
        attribute_encoder = unwrap(self.attribute_encoder)  # its methods; forward passes go through DDP
        z = attribute_encoder.reparameterize(mu, logvar)
        c0, c1 = content.split(n)
        z0, z1 = z.split(n)
        random0, fallback0 = self._random_attribute(z0, 0)
        random1, fallback1 = self._random_attribute(z1, 1)
        random_z = torch.cat([random1, random0])  # attributes of G(c0, r1) and G(c1, r0)

        with self._autocast():
            class_logits = self.classifier(mu)
            # One generator call (norms are per image): cross, self and random translations.
            fakes = self.generator(torch.cat([c0, c1, c0, c1, c0, c1]), torch.cat([z1, z0, z0, z1, random_z]))
            translated, self_reconstruction, random_translated = fakes.float().split(2 * n)
            content_translated = self.content_encoder(translated)
            mu_fake, logvar_fake = self.attribute_encoder(torch.cat([translated, random_translated]))
        mu_translated, mu_random = mu_fake.float().split(2 * n)
        logvar_translated = logvar_fake.float()[: 2 * n]
        z_translated = attribute_encoder.reparameterize(mu_translated, logvar_translated)
        ct0, ct1 = content_translated.split(n)  # content of x0->1 (from x0) and of x1->0 (from x1)
        zt1, zt0 = z_translated.split(n)  # attribute of x0->1 (class 1) and of x1->0 (class 0)
        with self._autocast():
            cycle = self.generator(torch.cat([ct0, ct1]), torch.cat([zt0, zt1])).float()

        domain_terms = self._domain_discriminator_step(x, labels, translated, random_translated)

        w = self.loss_weights
        # Frozen here, the discriminators run outside their DDP wrappers: a wrapped forward whose parameters get no
        # gradient leaves DDP waiting for them.
        domain_discriminator, content_discriminator = (
            unwrap(self.domain_discriminator),
            unwrap(self.content_discriminator),
        )
        with no_parameter_grads(domain_discriminator, content_discriminator), self._autocast():
            fake_real_fake, fake_class = domain_discriminator(torch.cat([translated, random_translated]))
            content_logits = content_discriminator(content)
        rf_translated, rf_random = fake_real_fake.float().split(2 * n)
        class_translated, class_random = fake_class.float().split(2 * n)
        self_l1, self_l2 = reconstruction_losses(self_reconstruction, x)
        cycle_l1, cycle_l2 = reconstruction_losses(cycle, x)
        terms = {
            "content_adversarial": content_encoder_adversarial_loss(content_logits.float()),
            "domain_adversarial": generator_adversarial_loss(rf_translated) + generator_adversarial_loss(rf_random),
            "domain_class": attribute_classification_loss(class_translated, opposite)
            + attribute_classification_loss(class_random, opposite),
            "attribute_bce": attribute_classification_loss(class_logits.float(), labels),
            "kl": kl_divergence(mu, logvar),
            "content_l2": content_l2(content.float()),
            "fa_map_l1": feature_attribution_l1(translated, x),
            "latent_regression": latent_regression_l1(mu_random, random_z),
            "self_reconstruction_l1": self_l1,
            "self_reconstruction_l2": self_l2,
            "cycle_reconstruction_l1": cycle_l1,
            "cycle_reconstruction_l2": cycle_l2,
        }
        if regression_targets is not None:
            with self._autocast():
                prediction = unwrap(self.classifier).regress(mu)
            terms["regression"] = regression_loss(prediction.float(), regression_targets)
        total = weighted_total(terms, w.generator_term_weights())
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        total.backward()
        self.optimizer.step()

        accuracy = ((class_logits.detach().float() > 0).float() == labels).float().mean()
        shown = torch.cat([x0[:2], x1[:2]]), torch.cat([translated[:n][:2], translated[n:][:2]])
        return {
            "generator_loss": float(total.detach()),
            **{name: float(value.detach()) for name, value in terms.items()},
            **domain_terms,
            "accuracy": float(accuracy),
            "rejection_fallback": float(fallback0 or fallback1),
            "image": shown[0].detach(),
            "map": (shown[1] - shown[0]).detach(),
            "translated": shown[1].detach(),
        }

    def _domain_discriminator_step(
        self, x: torch.Tensor, labels: torch.Tensor, translated: torch.Tensor, random_translated: torch.Tensor
    ) -> dict[str, float]:
        n_fake = translated.shape[0]
        with self._autocast():
            real_fake, real_class = self.domain_discriminator(x)
            fake_real_fake, _ = self.domain_discriminator(torch.cat([translated, random_translated]).detach())
        adversarial, classification = domain_discriminator_losses(
            real_fake.float(), fake_real_fake.float().split(n_fake), real_class.float(), labels
        )
        w = self.loss_weights
        loss = w.domain_adversarial * adversarial + w.domain_class_discriminator * classification
        self.domain_optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        loss.backward()
        self.domain_optimizer.step()
        return {
            "domain_discriminator_loss": float(loss.detach()),
            "domain_discriminator_adversarial": float(adversarial.detach()),
            "domain_discriminator_class": float(classification.detach()),
        }


def _class_labels(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """``(n0 + n1, 1)`` float labels: 0 for the images of ``x0``, 1 for those of ``x1``."""
    return torch.cat([x0.new_zeros(x0.shape[0], 1), x0.new_ones(x1.shape[0], 1)]).float()
