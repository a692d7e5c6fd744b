"""Saliency maps of the ACAT paper for slice classifiers: counterfactual, latent shift, Grad-CAM.

- :func:`counterfactual_saliency` (paper section 3.2, Eq. 3-4): for each target class, gradient
  descent in the autoencoder's latent space on cross-entropy towards the target plus an L1 bound on
  the latent move; the map is the mean over targets of |D(z0) - D(z'_t)|, each normalised to [0, 1].
- :func:`latent_shift_saliency` (Cohen et al. 2021, the paper's appendix F): one step along the
  gradient of the predicted class's probability, its size picked per volume from a grid.
- :func:`slice_grad_cam`: Grad-CAM on the last convolution of a :class:`SliceClassifier`.

The plain gradient map needs nothing new: ``common.attribution.baselines.attribute(model, volume,
"gradient", target_class=...)`` works on any module taking the volume, slice classifiers included.

The classifier is any module mapping a volume (B, C, X, Y, S) to logits (B, K) (a single logit is
read as binary, as in :class:`~common.attribution.baselines.ClassScore`); the autoencoder has
``encode(volume) -> z`` and ``decode(z) -> volume`` (:class:`~common.networks.acat.SliceAutoencoder`).
All functions run the networks in eval mode (batch norm must not use, nor update, batch statistics
while a map is computed) and give back every submodule's train/eval mode and every parameter's
``requires_grad`` as they were; no parameter receives a ``.grad``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.attribution.baselines import ClassScore
from common.networks.acat import ACATClassifier, SliceClassifier, slices_to_volume, volume_to_slices
from common.networks.modes import frozen

# Negative shifts (lower p_c), sorted by size so that among equally good shifts the smallest wins.
DEFAULT_LAMBDAS = (-1.0, -3.0, -10.0, -30.0, -100.0, -300.0)
GRAD_CAM_CHANNEL_WEIGHTS = ("half_slice", "volume")


def normalise_per_sample(maps: torch.Tensor) -> torch.Tensor:
    """Each sample divided by its own maximum; an all-zero map stays zero (no division by ~0)."""
    peak = maps.flatten(1).amax(dim=1).reshape(-1, *([1] * (maps.ndim - 1)))
    return torch.where(peak > 0, maps / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(maps))


def _within(maps: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    return maps if region is None else maps * region.to(maps.dtype)


def inside_window(volume: torch.Tensor, low: float = -1.0, high: float = 1.0, margin: int = 2) -> torch.Tensor:
    """1 where the (windowed, scaled) volume lies inside its intensity window, ``margin`` voxels
    in-plane away from any voxel at or beyond its limits; else 0. Volume (B, C, X, Y, S).

    A CT volume windowed to the brain (e.g. 0-80 HU -> [-1, 1], clipped) sits at the limits in air
    and bone, which cannot hold a lesion, and the voxels next to them mix tissue with air or bone.
    These sharp edges change most when a decoder's latent moves: without the margin the
    counterfactual maps peaked one voxel inside the window's edge in every case we looked at.
    """
    inside = ((volume > low) & (volume < high)).to(volume.dtype)
    if margin <= 0:
        return inside
    slices = volume_to_slices(inside)
    # erosion of the in-plane mask: a voxel stays if no outside voxel lies within `margin`
    outside = F.max_pool2d(1.0 - slices, kernel_size=2 * margin + 1, stride=1, padding=margin)
    return slices_to_volume(1.0 - outside, volume.shape[0])


def _class_index(target: int | torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    index = torch.as_tensor(target, device=device, dtype=torch.long).reshape(-1)
    return index.expand(batch_size) if index.numel() == 1 else index


def counterfactual_saliency(
    classifier: nn.Module,
    autoencoder: nn.Module,
    volume: torch.Tensor,
    targets: Sequence[int] | None = None,
    alpha: float = 100.0,
    steps: int = 20,
    step_size: float = 0.1,
    optimizer: str = "sgd",
    return_details: bool = False,
    region: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ACAT's counterfactual saliency map (B, C, X, Y, S) in [0, 1].

    For each target class t, z starts at z0 = E(x) and ``steps`` optimiser steps minimise
    g(z) = CE(f(D(z)), t) + alpha * mean|z - z0| (Eq. 4). The map of t is |D(z0) - D(z'_t)|,
    normalised by its own maximum per volume; the saliency is the mean over targets (default: every
    class, so no label is needed). The volumes of a batch are optimised together, each by its own
    loss (the per-volume losses are summed, so no volume's gradient depends on another's).

    The L1 term is the *mean* over a volume's latent elements, not the sum. With plain gradient
    descent the L1 term moves every element by ``step_size * alpha * d(reduction)/dz``: with a sum
    that is 0.1 * 100 = 10 latent units per element and step, whichever way the element lies from
    z0, so the latent oscillates with amplitude ~10 around z0 (noise everywhere) while the
    cross-entropy, whose gradient is spread over N ~ 10^5 elements (64 x 16 x 16 x 11 for a
    128x128x11 volume), has no say. With the mean, alpha / N is a threshold on each element's
    cross-entropy gradient: elements the classifier is sensitive to move, the others stay at z0 (up
    to oscillations of step_size * alpha / N, ~5e-5 for that volume). A classifier that averages
    over slices and positions spreads its gradient as 1/N too, so the trade-off does not change
    with the volume size. (On a toy 32x32x3 lesion task, N = 3072: with the mean the target
    probabilities rose from ~0.25 to ~0.98 with mean |z' - z0| ~ 0.005, and the map's maximum lay in
    the lesion for 70% of lesion volumes (96% with ``targets=[0]``); with the sum |z' - z0| was ~10
    and 0%.)

    Args:
        classifier: volume -> logits (B, K); a single logit is read as binary.
        autoencoder: with ``encode`` and ``decode``.
        volume: (B, C, X, Y, S).
        targets: target classes (default all K). The paper's localisation study (4.4) used the
            negative counterfactual only: ``targets=[0]``.
        alpha: weight of the L1 bound on the latent move (paper: 100).
        steps: optimiser steps per target (paper: 20).
        step_size: learning rate (the authors' code: 0.1 with plain gradient descent). Adam's steps
            are ~``step_size`` per element whatever the gradient scale, so use a smaller one with it.
        optimizer: ``"sgd"`` (plain gradient descent, the paper) or ``"adam"``.
        region: where a map may be non-zero (volume-shaped, 0/1), applied before each target's
            normalisation; e.g. the tissue inside the CT window (see :func:`inside_window`).
        return_details: also return a dict with ``targets`` (T,), ``initial_probabilities`` and
            ``probabilities`` (B, T) of each target before and after the search, ``latent_l1``
            (B, T) the mean |z' - z0|, and ``maps`` (B, T, C, X, Y, S) the normalised per-target maps.
    """
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer '{optimizer}' is unknown; expected 'sgd' or 'adam'")
    scorer = ClassScore(classifier)
    volume = volume.detach()
    batch = volume.shape[0]
    with frozen(classifier, autoencoder), torch.enable_grad():
        with torch.no_grad():
            z0 = autoencoder.encode(volume)
            reconstruction = autoencoder.decode(z0)
            start = scorer(reconstruction).softmax(dim=1)
        classes = list(range(start.shape[1])) if targets is None else [int(t) for t in targets]
        maps, final, distance = [], [], []
        for t in classes:
            label = torch.full((batch,), t, dtype=torch.long, device=volume.device)
            z = z0.clone().requires_grad_(True)
            opt = torch.optim.SGD([z], lr=step_size) if optimizer == "sgd" else torch.optim.Adam([z], lr=step_size)
            for _ in range(steps):
                logits = scorer(autoencoder.decode(z))
                move = (z - z0).abs().flatten(1).mean(dim=1)
                loss = F.cross_entropy(logits, label, reduction="sum") + alpha * move.sum()
                (z.grad,) = torch.autograd.grad(loss, z)
                opt.step()
            with torch.no_grad():
                counterfactual = autoencoder.decode(z)
                final.append(scorer(counterfactual).softmax(dim=1)[:, t])
                distance.append((z - z0).abs().flatten(1).mean(dim=1))
                maps.append(normalise_per_sample(_within((reconstruction - counterfactual).abs(), region)))
    per_target = torch.stack(maps, dim=1)
    saliency = per_target.mean(dim=1)
    if not return_details:
        return saliency
    details = {
        "targets": torch.tensor(classes),
        "initial_probabilities": start[:, classes],
        "probabilities": torch.stack(final, dim=1),
        "latent_l1": torch.stack(distance, dim=1),
        "maps": per_target,
    }
    return saliency, details


def latent_shift_saliency(
    classifier: nn.Module,
    autoencoder: nn.Module,
    volume: torch.Tensor,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    target_class: int | torch.Tensor | None = None,
    drop: float | None = None,
    return_details: bool = False,
    region: torch.Tensor | None = None,
    towards_class: int | torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Latent-shift saliency (Cohen et al. 2021) (B, C, X, Y, S) in [0, 1].

    z_lambda = z0 + lambda * d p_c(D(z0)) / d z0, with p_c the softmax probability of class c (the
    predicted class of D(z0) unless ``target_class`` is given). Lambda is chosen per volume from
    ``lambdas`` (negative: lower p_c) as the one giving the lowest p_c; ties go to the earliest in
    the grid (the default grid is sorted by size, so the smallest shift). The map is
    |D(z0) - D(z_lambda)| normalised per volume. The gradient is taken of the summed probabilities,
    which in eval mode gives each volume its own gradient.

    The lowest p_c favours the largest shifts, which leave the data manifold (the paper's appendix
    F); a wide grid makes that worse. ``drop`` (Cohen et al.'s search stopped at a drop of 0.15)
    instead takes the first lambda of the grid lowering p_c by at least ``drop`` (the lowest p_c
    where none does).

    ``towards_class``: instead of lowering p_c, raise the probability of this class (c = it, the
    shift goes up its gradient by |lambda|, the highest p_c wins, ``drop`` is a rise): a negative
    counterfactual with ``towards_class`` = "no lesion", as the paper's section 4.4 made with latent
    shift. Lowering the predicted class of a 4-class problem is not that: a "left" scan can lose
    "left" by gaining a lesion on the right.

    ``region``: as for :func:`counterfactual_saliency`.

    ``return_details``: also a dict with ``target_class``, ``lambda``, ``probability`` (p_c of
    D(z0)) and ``shifted_probability`` (p_c of D(z_lambda)), each (B,).
    """
    if not lambdas:
        raise ValueError("lambdas must not be empty")
    if towards_class is not None and target_class is not None:
        raise ValueError("give target_class (lower its probability) or towards_class (raise it), not both")
    # lowering p_c: z0 + lambda * grad with lambda < 0 and the lowest p_c; raising: the mirror image
    sign = 1.0 if towards_class is None else -1.0
    scorer = ClassScore(classifier)
    volume = volume.detach()
    batch = volume.shape[0]
    rows = torch.arange(batch, device=volume.device)
    with frozen(classifier, autoencoder), torch.enable_grad():
        with torch.no_grad():
            z0 = autoencoder.encode(volume)
        z = z0.clone().requires_grad_(True)
        reconstruction = autoencoder.decode(z)
        probabilities = scorer(reconstruction).softmax(dim=1)
        if towards_class is not None:
            c = _class_index(towards_class, batch, volume.device)
        elif target_class is None:
            c = probabilities.argmax(dim=1)
        else:
            c = _class_index(target_class, batch, volume.device)
        p_c = probabilities[rows, c]
        (gradient,) = torch.autograd.grad(p_c.sum(), z)
        reconstruction = reconstruction.detach()
        with torch.no_grad():
            shifted, p_shifted = [], []
            for lam in lambdas:
                image = autoencoder.decode(z0 + sign * lam * gradient)
                shifted.append(image)
                p_shifted.append(scorer(image).softmax(dim=1)[rows, c])
            p_grid = torch.stack(p_shifted, dim=1)
            best = (sign * p_grid).argmin(dim=1)
            if drop is not None:
                enough = sign * (p_grid - p_c.detach()[:, None]) <= -drop
                best = torch.where(enough.any(dim=1), enough.float().argmax(dim=1), best)
            chosen = torch.stack(shifted, dim=1)[rows, best]
    saliency = normalise_per_sample(_within((reconstruction - chosen).abs(), region))
    if not return_details:
        return saliency
    details = {
        "target_class": c,
        "lambda": sign * torch.tensor(lambdas, dtype=volume.dtype, device=volume.device)[best],
        "probability": p_c.detach(),
        "shifted_probability": p_grid[rows, best],
    }
    return saliency, details


def slice_grad_cam(
    classifier: SliceClassifier,
    volume: torch.Tensor,
    target_class: int | torch.Tensor,
    saliency: torch.Tensor | None = None,
    relu: bool = True,
    channel_weights: str = "half_slice",
) -> torch.Tensor:
    """Grad-CAM (B, 1, X, Y, S) on the last convolution layer of a slice classifier's CNN.

    Captum's ``LayerGradCam`` and MONAI's ``GradCAM`` cannot be used: they assume the layer's batch
    is the model's batch, but the slice CNN sees B*S*2 half slices while the logits are (B, K). So
    the activation A of the last layer (after its batch norm and ReLU) is captured by a forward hook
    and its gradient taken with ``torch.autograd.grad``: weights w_c = mean of dscore/dA_c, cam =
    ReLU(sum_c w_c A_c) (``relu=False``: signed). Grad-CAM averages the gradient over the layer's
    map, and a slice classifier's map is read two ways: ``channel_weights="half_slice"`` averages
    over each half slice on its own (each image the 2D CNN sees explained as its own input),
    ``"volume"`` over every half slice of the volume (one weight per channel and volume: the volume
    is the classifier's input). The paper does not say which. Each half's cam is
    upsampled bilinearly to (X/2, Y) on its own, so nothing leaks across the midline, the right half
    is un-mirrored and the halves and slices are put back in place.

    For an :class:`~common.networks.acat.ACATClassifier` pass its ``saliency`` input; the layer is
    the image branch's last layer (before the fused mask modulates it).
    """
    if isinstance(classifier, ACATClassifier) and saliency is None:
        raise ValueError("an ACAT classifier needs its saliency input")
    if channel_weights not in GRAD_CAM_CHANNEL_WEIGHTS:
        raise ValueError(f"channel_weights='{channel_weights}' is unknown; expected one of {GRAD_CAM_CHANNEL_WEIGHTS}")
    batch = volume.shape[0]
    captured: list[torch.Tensor] = []
    hook = classifier.cnn.layers[-1].register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        with frozen(classifier), torch.enable_grad():
            # The input requires grad so the graph reaches the activation with frozen parameters.
            inputs = volume.detach().requires_grad_(True)
            logits = classifier(inputs) if saliency is None else classifier(inputs, saliency.detach())
            logits = torch.cat([-logits, logits], dim=1) if logits.shape[1] == 1 else logits
            index = _class_index(target_class, batch, volume.device)
            score = logits[torch.arange(batch, device=volume.device), index].sum()
            activation = captured[-1]
            (gradient,) = torch.autograd.grad(score, activation)
    finally:
        hook.remove()
    if channel_weights == "half_slice":
        weights = gradient.mean(dim=(2, 3), keepdim=True)
    else:
        per_volume = gradient.reshape(batch, -1, *gradient.shape[1:]).mean(dim=(1, 3, 4), keepdim=True)
        weights = per_volume.expand(-1, gradient.shape[0] // batch, -1, -1, -1).reshape(*gradient.shape[:2], 1, 1)
    cam = (weights * activation.detach()).sum(dim=1, keepdim=True)
    if relu:
        cam = F.relu(cam)
    x, y = volume.shape[2:4]
    cam = F.interpolate(cam, size=(x // classifier.parts, y), mode="bilinear", align_corners=False)
    return classifier._from_halves(cam, batch)
