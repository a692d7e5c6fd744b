"""A supervised classifier trainer whose loss also sees the model: attribution-constrained training.

``SupervisedTrainer`` hands its loss ``(prediction, label)``; an attribution constraint needs the
network and the input to differentiate the prediction with respect to the input (double
backprop), so this trainer calls ``loss_function(network, image, label, mask)`` instead, e.g.
:class:`common.losses.AttributionConstraintLoss`, which returns ``loss``, ``bce``,
``attribution_loss``, ``logits`` and ``attribution``. Everything else (handlers, metrics,
validation, checkpoints) is MONAI's.
"""

from __future__ import annotations

import torch
from monai.engines import SupervisedTrainer
from monai.utils import convert_to_tensor

from common.engines.precision import bf16_autocast


class ConstrainedClassifierTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` for losses of the form ``loss_function(network, x, y, mask) -> dict``.

    ``mask_key`` names the batch key of lesion masks (used by the supervised constraint; absent
    keys are passed as ``None``). ``amp`` runs the loss (forward, attribution and its double
    backprop) under bfloat16 autocast on CUDA and is ignored on CPU. MONAI's own ``amp`` (float16
    with a GradScaler) is not used: the scaled loss would also scale the input gradients inside
    the attribution loss, whose second-order terms then overflow float16; bfloat16 has float32's
    range and needs no scaler. ``max_grad_norm`` (optional) clips the parameters' gradient norm before each step: the
    constraint can make single batches produce very large gradients.
    """

    def __init__(self, *args, mask_key: str = "mask", max_grad_norm: float | None = None, amp: bool = False, **kwargs):
        super().__init__(*args, amp=False, **kwargs)
        self.mask_key = mask_key
        self.max_grad_norm = max_grad_norm
        self.use_bf16 = bool(amp) and torch.device(self.state.device).type == "cuda"

    def _iteration(self, engine, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        images, labels = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[:2]
        mask = batchdata.get(self.mask_key) if isinstance(batchdata, dict) else None
        if mask is not None:
            mask = convert_to_tensor(mask, track_meta=False).to(engine.state.device, non_blocking=engine.non_blocking)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with bf16_autocast(self.use_bf16):
            out = engine.loss_function(engine.network, images, labels, mask)
        out["loss"].backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_grad_norm)
        engine.optimizer.step()
        attribution = out.get("attribution")
        return {
            "image": images,
            "label": labels,
            "pred": out["logits"].detach(),
            "loss": out["loss"].detach(),
            "bce": float(out["bce"].detach()),
            "attribution_loss": float(out["attribution_loss"].detach()),
            "attribution": None if attribution is None else attribution[:4].detach(),
        }
