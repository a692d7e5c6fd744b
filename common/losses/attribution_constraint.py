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
the graph (double backprop). ``batch_norm`` says which batch-norm statistics the constrained map is
taken with (the paper does not say):

- ``batch``: the training forward pass, with the statistics of the whole batch. For G the
  classification term reuses the attribution's forward pass. Through the batch statistics each
  image's map then also carries the other images' logits (the gradient of the summed logits with
  respect to one image includes the others' dependence on the batch mean and variance), and it is
  not the map that inference computes.
- ``running``: the classification term from the training forward pass; the map of the constrained
  images only (healthy ones, or annotated patients in the supervised mode) from a second pass with
  the running statistics, i.e. per image and exactly as evaluation and inference compute it. The
  running statistics lag behind the weights, so the constraint can inflate the weights before a
  batch norm to inflate the map, which the batch statistics of the classification pass then undo.
- ``detached``: as ``running``, but the second pass normalises with the statistics that the
  classification pass measured on this batch, held constant: each image's map is its own (no
  terms through the other images), and it scales with the weights as the classification does.
Each L_A is a mean over voxels and images, so alpha_A does not depend on the image size; the
paper's alpha_A values (1e8 for G) belong to its own reduction and scale: see the bundle docs for
the calibrated value.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from common.attribution import differentiable_attribution
from common.engines.distributed import unwrap

CONSTRAINT_MODES = ("unsupervised", "supervised", "ross", "none")
BATCH_NORM_STATISTICS = ("batch", "running", "detached")


class AttributionConstraintLoss(nn.Module):
    """Classification loss plus an attribution constraint; call with the model and the batch.

    Args:
        alpha: weight alpha_A of the attribution term.
        method: attribution used in the constraint: ``G`` (default), ``IG``, ``EG`` or ``IEG``.
        mode: one of :data:`CONSTRAINT_MODES`.
        p_null: IEG's probability of the null baseline (0.25).
        batch_norm: statistics of the constrained map, one of :data:`BATCH_NORM_STATISTICS` (see the
            module's docstring).
    """

    def __init__(
        self,
        alpha: float = 1.0,
        method: str = "G",
        mode: str = "unsupervised",
        p_null: float = 0.25,
        batch_norm: str = "batch",
    ):
        super().__init__()
        if mode not in CONSTRAINT_MODES:
            raise ValueError(f"mode '{mode}' is unknown; expected one of {CONSTRAINT_MODES}")
        if batch_norm not in BATCH_NORM_STATISTICS:
            raise ValueError(f"batch_norm '{batch_norm}' is unknown; expected one of {BATCH_NORM_STATISTICS}")
        self.batch_norm = batch_norm
        self.alpha = float(alpha)
        self.method = method
        self.mode = mode
        self.p_null = p_null

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """Returns ``{"loss", "bce", "attribution_loss", "logits", "attribution"}`` (attribution may be None).

        ``attribution`` holds the map of every image (``batch_norm="batch"``) or of the constrained
        images only (``"running"``, ``"detached"``; None when the batch has none)."""
        y = y.reshape(-1).to(x.dtype)
        if self.mode == "none" or self.alpha == 0.0:
            logits = model(x)
            bce = F.binary_cross_entropy_with_logits(logits.reshape(-1), y)
            zero = bce.new_zeros(())
            return {"loss": bce, "bce": bce, "attribution_loss": zero, "logits": logits, "attribution": None}
        if self.batch_norm != "batch":
            return self._with_separate_attribution_pass(model, x, y, mask)
        attribution, logits = differentiable_attribution(model, x, self.method, p_null=self.p_null)
        bce = F.binary_cross_entropy_with_logits(logits.reshape(-1), y)
        return self._result(bce, self._constraint(attribution, y, mask), logits, attribution)

    def _result(self, bce, term, logits, attribution) -> dict:
        return {
            "loss": bce + self.alpha * term,
            "bce": bce,
            "attribution_loss": term,
            "logits": logits,
            "attribution": attribution,
        }

    def _with_separate_attribution_pass(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask) -> dict:
        # The plain module: a second forward through a DDP wrapper would prepare its gradient
        # reduction twice; the parameters (and their reduction hooks) are the same.
        plain = unwrap(model)
        measured = {}
        if self.batch_norm == "detached":
            norms = [m for m in plain.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
            hooks = [norm.register_forward_hook(_record_input_statistics(measured)) for norm in norms]
            try:
                logits = model(x)
            finally:
                for hook in hooks:
                    hook.remove()
        else:
            logits = model(x)
        bce = F.binary_cross_entropy_with_logits(logits.reshape(-1), y)
        selected = self._constrained_images(y, mask)
        attribution = None
        term = logits.sum() * 0.0  # keeps the graph when no image of the constrained class is here
        if bool(selected.any()):
            was_training = plain.training
            # New tensors are swapped in and the originals put back afterwards, never written in
            # place: the attribution graph keeps the statistics it normalised with for its backward.
            kept = {norm: (norm.running_mean, norm.running_var) for norm in measured}
            plain.eval()
            try:
                for norm, (mean, var) in measured.items():
                    norm.running_mean, norm.running_var = mean, var
                references = torch.roll(x, shifts=1, dims=0)[selected] if self.method in ("EG", "IEG") else None
                attribution, _ = differentiable_attribution(
                    plain, x[selected], self.method, references=references, p_null=self.p_null
                )
            finally:
                for norm, (mean, var) in kept.items():
                    norm.running_mean, norm.running_var = mean, var
                plain.train(was_training)
            term = self._constraint(attribution, y[selected], None if mask is None else mask[selected])
        return self._result(bce, term, logits, attribution)

    def _constrained_images(self, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.mode == "supervised":
            if mask is None:
                raise ValueError("the supervised constraint needs lesion masks (a 'mask' per patient)")
            return y > 0.5
        return y < 0.5

    def _constraint(self, attribution: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        selected = self._constrained_images(y, mask)
        if not bool(selected.any()):
            return attribution.sum() * 0.0  # keeps the graph; no image of the constrained class here
        a = attribution[selected]
        if self.mode == "ross":
            return (a**2).mean()
        target = mask.to(a.dtype)[selected] if self.mode == "supervised" else torch.zeros_like(a)
        return F.binary_cross_entropy_with_logits(a, target)


def _record_input_statistics(measured: dict):
    """A forward hook that stores, per batch norm, the batch mean and biased variance of its input as
    constants: what the layer normalised with in training mode."""

    def hook(norm: _BatchNorm, inputs, output):
        data = inputs[0].detach()
        dims = [0, *range(2, data.ndim)]
        measured[norm] = (data.mean(dims), data.var(dims, unbiased=False))

    return hook
