"""ICAM's objective (Bass et al., NeurIPS 2020, Eq. 1-5, appendix A.7) as small functions and one set of weights.

Eq. 5 with the A.7 / original-code defaults (:class:`ICAMLossWeights`)::

    min_{G, E^c, E^a} max_{D, D^c}  lambda_Dc L^Dc_adv + lambda_D L^D_adv + lambda_DBCE L^D_BCE + lambda_BCE L^Ea_BCE
                                    + lambda_KL L^za_KL + lambda_M L^M_1 + lambda_za L^za_1
                                    + lambda_rec (L^rec_1 + L^cc_1 + L^rec_2 + L^cc_2)

- ``L^Dc_adv`` (Eq. 1): :func:`content_discriminator_loss` for D^c (classify the class of a content
  tensor) and :func:`content_encoder_adversarial_loss` for E^c, whose target is 0.5 for every image:
  ``BCE(D^c(E^c(x)), 0.5) = -(log D^c + log(1 - D^c)) / 2``, the symmetric form of Eq. 1 (the code's
  default ``D_content_dis_cls_all1 = 0.5``), rather than flipping the labels.
- ``L^D_adv`` and ``L^D_BCE``: :func:`domain_discriminator_losses` (D: real vs fake and the class of real
  images, the class term weighted lambda_DBCE = 1) and :func:`generator_adversarial_loss` /
  :func:`attribute_classification_loss` on translated images (G: fool D and be of the target class,
  lambda_DBCE = 5).
- ``L^Ea_BCE``: :func:`attribute_classification_loss` of the attribute classifier (lambda_BCE = 10).
- ``L^za_KL``: :func:`kl_divergence` of ``N(mu, exp(logvar))`` from ``N(0, I)`` (lambda_KL = 0.01).
- ``L^M_1``: :func:`feature_attribution_l1`, the L1 norm of the FA map ``translated - input`` (lambda_M = 10).
- ``L^za_1`` (Eq. 2): :func:`latent_regression_l1`, re-encode ``G(E^c(x), z_r)`` and compare with ``z_r``.
- ``L^rec_{1,2}`` (Eq. 3) and ``L^cc_{1,2}`` (Eq. 4): :func:`reconstruction_losses`, L1 *and* L2 for
  both the self and the cycle reconstruction, each weighted lambda_rec = 100. Eq. 5 and the original
  code (``lambda_rec``, ``lambda_rec_cc``, ``lambda_l2_rec``, ``lambda_l2_rec_cc``, all 100) include all
  four; the ablation (section 4.2) shows the L2 terms helped, so both are on by default and
  ``reconstruction_l2=0`` gives the ICAM_FA ablation.
- Section 3.2's "L2 regularisation to prevent explosion of gradients" is :func:`content_l2`, the mean
  square of the content latent (the code's ``lambda_kl_zc = 0.01``).
- The regression variant adds :func:`regression_loss`, the MSE of the regression head against a target
  value (the original used SmoothL1 with the classification weight; MSE is the plain regression loss).

Every norm is a mean over elements and batch, except the KL term: summed over the latent of an image and
averaged over the batch, so its weight does not depend on the batch size (the code summed over the batch).
All classification losses take raw logits (BCE-with-logits): the original's softmax before
BCE-with-logits, which squashed the logits twice, is not reproduced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Terms of the encoders' + generator's + attribute classifier's objective, in the trainer's output.
GENERATOR_TERMS = (
    "content_adversarial",
    "domain_adversarial",
    "domain_class",
    "attribute_bce",
    "kl",
    "content_l2",
    "fa_map_l1",
    "latent_regression",
    "self_reconstruction_l1",
    "self_reconstruction_l2",
    "cycle_reconstruction_l1",
    "cycle_reconstruction_l2",
    "regression",
)


@dataclass(frozen=True)
class ICAMLossWeights:
    """The lambdas of Eq. 5; defaults are the paper's A.7 values (= the original code's defaults).

    Attributes:
        content_adversarial: lambda_Dc, content discriminator and content encoder (1).
        domain_adversarial: lambda_D, real/fake term of D and of G (1).
        domain_class_discriminator: lambda_DBCE in D's update, class of real images (1).
        domain_class_generator: lambda_DBCE in G's update, class of translated images (5).
        attribute_bce: lambda_BCE, the attribute classifier (10).
        kl: lambda_KL, attribute latent KL (0.01).
        fa_map: lambda_M, L1 of the FA map (10; by the project's notes on the authors' code, their sweep found 15
            slightly better on their lesion data).
        latent_regression: lambda_za, Eq. 2 (1).
        reconstruction_l1: lambda_rec for the L1 self and cycle reconstruction (100).
        reconstruction_l2: lambda_rec for the L2 self and cycle reconstruction (100).
        content_l2: the content latent's L2 regulariser (0.01, the code's ``lambda_kl_zc``).
        regression: the regression head's MSE, used only by the regression variant (10, as lambda_BCE).
    """

    content_adversarial: float = 1.0
    domain_adversarial: float = 1.0
    domain_class_discriminator: float = 1.0
    domain_class_generator: float = 5.0
    attribute_bce: float = 10.0
    kl: float = 0.01
    fa_map: float = 10.0
    latent_regression: float = 1.0
    reconstruction_l1: float = 100.0
    reconstruction_l2: float = 100.0
    content_l2: float = 0.01
    regression: float = 10.0

    def generator_term_weights(self) -> dict[str, float]:
        """Weight of each of :data:`GENERATOR_TERMS`."""
        return {
            "content_adversarial": self.content_adversarial,
            "domain_adversarial": self.domain_adversarial,
            "domain_class": self.domain_class_generator,
            "attribute_bce": self.attribute_bce,
            "kl": self.kl,
            "content_l2": self.content_l2,
            "fa_map_l1": self.fa_map,
            "latent_regression": self.latent_regression,
            "self_reconstruction_l1": self.reconstruction_l1,
            "self_reconstruction_l2": self.reconstruction_l2,
            "cycle_reconstruction_l1": self.reconstruction_l1,
            "cycle_reconstruction_l2": self.reconstruction_l2,
            "regression": self.regression,
        }


def binary_logit_loss(logits: torch.Tensor, target: float | torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits of raw ``logits`` against ``target`` (a constant or a tensor of ``logits``' shape)."""
    if not isinstance(target, torch.Tensor):
        target = torch.full_like(logits, float(target))
    return F.binary_cross_entropy_with_logits(logits, target.to(logits).view_as(logits))


def attribute_classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``L^Ea_BCE`` (classifier on the attribute latent) and the class term of D / G: BCE on raw logits."""
    return binary_logit_loss(logits, labels)


def content_discriminator_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """D^c's side of Eq. 1: tell the class of each content tensor."""
    return binary_logit_loss(logits, labels)


def content_encoder_adversarial_loss(logits: torch.Tensor) -> torch.Tensor:
    """E^c's side of Eq. 1: make D^c answer 0.5 for every content tensor, whatever its class."""
    return binary_logit_loss(logits, 0.5)


def domain_discriminator_losses(
    real_logits: torch.Tensor,
    fake_logits: Sequence[torch.Tensor],
    real_class_logits: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """D's ``(adversarial, class)`` losses: real -> 1 and each kind of fake -> 0 (fake kinds averaged, so
    real and fake weigh the same), and the class of the *real* images (fakes' classes are G's business)."""
    fake = torch.stack([binary_logit_loss(logits, 0.0) for logits in fake_logits]).mean()
    return binary_logit_loss(real_logits, 1.0) + fake, attribute_classification_loss(real_class_logits, labels)


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """G's side of ``L^D_adv`` (non-saturating): D should call translated images real."""
    return binary_logit_loss(fake_logits, 1.0)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` summed over an image's latent, averaged over the batch."""
    kl = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())
    return kl.flatten(1).sum(1).mean()


def feature_attribution_l1(translated: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``L^M_1``: mean absolute FA map ``translated - image``, which keeps the map small and local."""
    return F.l1_loss(translated, image)


def latent_regression_l1(reencoded: torch.Tensor, sampled: torch.Tensor) -> torch.Tensor:
    """``L^za_1`` (Eq. 2): mean ``|E^a(G(E^c(x), z_r)) - z_r|``."""
    return F.l1_loss(reencoded, sampled)


def reconstruction_losses(reconstructed: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L1, L2)`` of a self (Eq. 3) or cycle (Eq. 4) reconstruction: mean absolute and mean squared error."""
    return F.l1_loss(reconstructed, image), F.mse_loss(reconstructed, image)


def content_l2(content: torch.Tensor) -> torch.Tensor:
    """Mean square of the content latent (section 3.2: keeps its gradients from exploding)."""
    return content.pow(2).mean()


def regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The regression variant's MSE between the regression head and the target value of each image."""
    return F.mse_loss(prediction, target.to(prediction).view_as(prediction))


def weighted_total(terms: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """``sum(weights[name] * terms[name])`` over ``terms``; a term without a weight is an error, not a 0."""
    missing = set(terms) - set(weights)
    if missing:
        raise KeyError(f"no weight for loss terms {sorted(missing)}")
    return torch.stack([weights[name] * value for name, value in terms.items()]).sum()
