"""Attribution maps that stay in the autograd graph, for attribution constraints during training.

Captum's methods return detached maps; a training loss on the map (attribution-constraint paper,
Eq. 6-8) needs ``create_graph=True`` so the loss can be back-propagated to the weights (double
backprop). No maintained library offers that for the stochastic one-sample IG/EG estimators the
paper trains with, hence this module.

All maps are of the class-1 log-odds (the single logit, or ``logit[:, 1] - logit[:, 0]``) with the
input's shape. Methods (paper section III):

- ``G``: the plain gradient dF/dx (no input multiplication). It reuses the classification forward
  pass: the returned logits are the ones the gradient was taken of.
- ``IG``: one random alpha per image, null baseline: x * dF/dx(alpha x).
- ``EG``: one random alpha and another image of the batch (or of ``references``) as baseline x':
  (x - x') * dF/dx(x' + alpha (x - x')).
- ``IEG``: EG where each image uses the null baseline with probability ``p_null`` (0.25).

For IG/EG/IEG a separate forward pass at the interpolated inputs is needed; the returned logits
are then those of a plain forward pass on ``x``.
"""

from __future__ import annotations

import torch
from torch import nn

TRAINING_METHODS = ("G", "IG", "EG", "IEG")


def class_logit(outputs: torch.Tensor) -> torch.Tensor:
    """The class-1 log-odds per image from a single-logit or two-logit output, shape (B,)."""
    if isinstance(outputs, (tuple, list)):
        outputs = outputs[0]
    outputs = outputs.reshape(outputs.shape[0], -1)
    if outputs.shape[1] == 1:
        return outputs[:, 0]
    if outputs.shape[1] == 2:
        return outputs[:, 1] - outputs[:, 0]
    raise ValueError(f"classifier returns {outputs.shape[1]} logits; expected 1 (sigmoid) or 2 for a binary task")


def _input_gradient(model: nn.Module, points: torch.Tensor) -> torch.Tensor:
    points = points if points.requires_grad else points.requires_grad_(True)
    score = class_logit(model(points))
    (grad,) = torch.autograd.grad(score.sum(), points, create_graph=True)
    return grad


def _shape_alpha(alpha: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return alpha.reshape(-1, *([1] * (like.ndim - 1)))


def differentiable_attribution(
    model: nn.Module,
    x: torch.Tensor,
    method: str = "G",
    references: torch.Tensor | None = None,
    p_null: float = 0.25,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(attribution map, logits on ``x``) with the map differentiable w.r.t. the model weights.

    Args:
        model: the classifier, single logit or two logits.
        x: the batch (B, C, *spatial).
        method: ``G``, ``IG``, ``EG`` or ``IEG``.
        references: baselines for EG/IEG (B, C, *spatial); default the batch rolled by one, so
            each image is paired with another training image.
        p_null: IEG's probability of the null baseline.
        generator: RNG for alpha and IEG's choice (reproducibility).
    """
    if method not in TRAINING_METHODS:
        raise ValueError(f"training attribution '{method}' is unknown; expected one of {TRAINING_METHODS}")
    if method == "G":
        x = x.detach().requires_grad_(True)
        logits = model(x)
        (grad,) = torch.autograd.grad(class_logit(logits).sum(), x, create_graph=True)
        return grad, logits
    batch = x.shape[0]
    alpha = _shape_alpha(torch.rand(batch, generator=generator, device="cpu").to(x.device, x.dtype), x)
    if method == "IG":
        baseline = torch.zeros_like(x)
    else:
        if references is None:
            if batch < 2:
                raise ValueError(f"{method} with a batch of one needs references (another image as baseline)")
            references = torch.roll(x, shifts=1, dims=0)
        baseline = references.detach().to(x.dtype)
        if method == "IEG":
            null = torch.rand(batch, generator=generator, device="cpu") < p_null
            baseline = torch.where(_shape_alpha(null.to(x.device), x), torch.zeros_like(baseline), baseline)
    delta = x.detach() - baseline
    grad = _input_gradient(model, (baseline + alpha * delta).detach())
    return delta * grad, model(x)
