"""The gradient attribution constraint (Wargnier-Dauchelle et al., IEEE TMI 2023, Eq. 6-8).

    L = BCE(f(x), y) + alpha_A * L_A

- ``unsupervised``: L_A = BCE(sigmoid(A(x)), 0) over every voxel of the *healthy* images of the
  batch: their attribution towards "pathological" is pushed to be negative everywhere, so on a
  patient only the lesion can carry positive attribution.
- ``supervised``: L_A = BCE(sigmoid(A(x)), mask) over every voxel of annotated *patients*.
- ``ross``: the comparator of Ross et al.: L_A = mean A(x)^2 over healthy images ("right for the
  right reasons", the L2 of input gradients).
- ``none``: no constraint (the unconstrained baseline, same as alpha_A = 0).

A(x) is one of G, IG, EG, IEG from :func:`common.attribution.differentiable_attribution`, kept in
the graph (double backprop). For G the classification term reuses the attribution's forward pass.
Each L_A is a mean over voxels and images, so alpha_A does not depend on the image size; the
paper's alpha_A values (1e8 for G) belong to its own reduction and scale: see the bundle docs for
the calibrated value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.attribution import differentiable_attribution

CONSTRAINT_MODES = ("unsupervised", "supervised", "ross", "none")


class AttributionConstraintLoss(nn.Module):
    """Classification loss plus an attribution constraint; call with the model and the batch.

    Args:
        alpha: weight alpha_A of the attribution term.
        method: attribution used in the constraint: ``G`` (default), ``IG``, ``EG`` or ``IEG``.
        mode: one of :data:`CONSTRAINT_MODES`.
        p_null: IEG's probability of the null baseline (0.25).
    """

    def __init__(self, alpha: float = 1.0, method: str = "G", mode: str = "unsupervised", p_null: float = 0.25):
        super().__init__()
        if mode not in CONSTRAINT_MODES:
            raise ValueError(f"mode '{mode}' is unknown; expected one of {CONSTRAINT_MODES}")
        self.alpha = float(alpha)
        self.method = method
        self.mode = mode
        self.p_null = p_null

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """Returns ``{"loss", "bce", "attribution_loss", "logits", "attribution"}`` (attribution may be None)."""
        y = y.reshape(-1).to(x.dtype)
        if self.mode == "none" or self.alpha == 0.0:
            logits = model(x)
            bce = F.binary_cross_entropy_with_logits(logits.reshape(-1), y)
            zero = bce.new_zeros(())
            return {"loss": bce, "bce": bce, "attribution_loss": zero, "logits": logits, "attribution": None}
        attribution, logits = differentiable_attribution(model, x, self.method, p_null=self.p_null)
        bce = F.binary_cross_entropy_with_logits(logits.reshape(-1), y)
        term = self._constraint(attribution, y, mask)
        return {
            "loss": bce + self.alpha * term,
            "bce": bce,
            "attribution_loss": term,
            "logits": logits,
            "attribution": attribution,
        }

    def _constraint(self, attribution: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "supervised":
            if mask is None:
                raise ValueError("the supervised constraint needs lesion masks (a 'mask' per patient)")
            selected = y > 0.5
            target = mask.to(attribution.dtype)
        else:
            selected = y < 0.5
            target = torch.zeros_like(attribution)
        if not bool(selected.any()):
            return attribution.sum() * 0.0  # keeps the graph; no image of the constrained class here
        a = attribution[selected]
        if self.mode == "ross":
            return (a**2).mean()
        return F.binary_cross_entropy_with_logits(a, target[selected])
