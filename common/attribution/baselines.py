"""Baseline attribution methods for any classifier, through Captum.

``attribute(model, x, method, ...)`` returns a map with the input's shape (B, C, *spatial) for
``gradient``, ``guided_backprop``, ``integrated_gradients``, ``expected_gradients``,
``occlusion`` and ``grad_cam`` (upsampled to the input size). Every method that evaluates the
network on many perturbed copies of the input is chunked (``internal_batch_size``), so a 3D
volume does not hold hundreds of copies in memory at once.

Targets. A classifier with one output logit (binary, sigmoid) is explained for class 1 by the
logit and for class 0 by the negated logit; a multi-logit classifier is explained for the
``target_class`` column. The same convention is used for every method so maps are comparable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from captum.attr import (
    GradientShap,
    GuidedBackprop,
    IntegratedGradients,
    LayerAttribution,
    LayerGradCam,
    Occlusion,
    Saliency,
)
from torch import nn

METHODS = ("gradient", "guided_backprop", "integrated_gradients", "expected_gradients", "occlusion", "grad_cam")

# Input elements per chunk of perturbed copies: a 96x112x96 volume gives chunks of 8 copies.
DEFAULT_ELEMENTS_PER_CHUNK = 2**23


class ClassScore(nn.Module):
    """Wraps a classifier so that Captum's ``target`` always indexes a score column.

    A single-logit model gets two columns, (-logit, logit), i.e. the log-odds for class 0 and 1.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        out = out.reshape(out.shape[0], -1)
        return torch.cat([-out, out], dim=1) if out.shape[1] == 1 else out


def default_chunk(
    inputs: torch.Tensor, n_copies: int, elements: int = DEFAULT_ELEMENTS_PER_CHUNK, per_batch: bool = False
) -> int:
    """How many perturbed copies to evaluate at once, within a budget of input elements per pass.

    ``per_batch=False``: copies of one input (Captum's IG counts its internal batch in rows).
    ``per_batch=True``: copies of the whole batch (expected-gradients samples and occlusion
    perturbations are applied to every input of the batch at once).
    """
    per_copy = max(1, inputs.numel() if per_batch else inputs[0].numel())
    return int(max(1, min(n_copies, elements // per_copy)))


def last_conv_layer(model: nn.Module) -> nn.Module:
    """The last convolution of the model (Grad-CAM's default layer)."""
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    if not convs:
        raise ValueError("grad_cam needs a convolutional layer; pass layer= explicitly")
    return convs[-1]


def _resolve_layer(model: nn.Module, layer: nn.Module | str | None) -> nn.Module:
    if layer is None:
        return last_conv_layer(model)
    if isinstance(layer, str):
        return model.get_submodule(layer)
    return layer


def attribute(
    model: nn.Module,
    inputs: torch.Tensor,
    method: str,
    target_class: int | torch.Tensor = 1,
    n_steps: int = 200,
    baselines: torch.Tensor | None = None,
    n_samples: int = 200,
    window: int | tuple[int, ...] = 10,
    stride: int | tuple[int, ...] = 5,
    layer: nn.Module | str | None = None,
    internal_batch_size: int | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """Attribution map of ``method`` for ``inputs`` (B, C, *spatial), same shape as the input.

    Args:
        model: the classifier (put in eval mode by the caller).
        method: one of :data:`METHODS`.
        target_class: class to explain (int, or one per batch item).
        n_steps: integrated-gradients steps (200 as in ICAM's baselines).
        baselines: IG baseline (default zeros); for expected gradients the reference images
            (B_ref, C, *spatial) drawn at random, default zeros.
        n_samples: expected-gradients samples per input.
        window, stride: occlusion block and stride in voxels (ICAM used 10^3 and 5).
        layer: Grad-CAM layer (module or its name); default the last convolution.
        relu: Grad-CAM keeps positive evidence only (``False``: signed, the attribution
            constraint paper's NoConsGC).
        internal_batch_size: perturbed copies per forward pass (default: by input size).
    """
    if method not in METHODS:
        raise ValueError(f"attribution method '{method}' is unknown; expected one of {METHODS}")
    spatial_dims = inputs.ndim - 2
    scorer = ClassScore(model)
    target = target_class
    inputs = inputs.detach()
    if method == "gradient":
        return Saliency(scorer).attribute(inputs, target=target, abs=False).detach()
    if method == "guided_backprop":
        return GuidedBackprop(scorer).attribute(inputs, target=target).detach()
    if method == "integrated_gradients":
        chunk = internal_batch_size or default_chunk(inputs, n_steps)
        base = torch.zeros_like(inputs) if baselines is None else baselines
        ig = IntegratedGradients(scorer)
        return ig.attribute(inputs, baselines=base, target=target, n_steps=n_steps, internal_batch_size=chunk).detach()
    if method == "expected_gradients":
        return _expected_gradients(scorer, inputs, target, baselines, n_samples, internal_batch_size)
    if method == "occlusion":
        windows = _per_axis(window, spatial_dims)
        strides = _per_axis(stride, spatial_dims)
        positions = 1
        for size, w, s in zip(inputs.shape[2:], windows, strides):
            positions *= max(1, (size - w) // s + 1)
        chunk = internal_batch_size or default_chunk(inputs, positions, per_batch=True)
        return (
            Occlusion(scorer)
            .attribute(
                inputs,
                sliding_window_shapes=(inputs.shape[1], *windows),
                strides=(inputs.shape[1], *strides),
                baselines=0.0,
                target=target,
                perturbations_per_eval=chunk,
            )
            .detach()
        )
    # grad_cam
    cam = LayerGradCam(scorer, _resolve_layer(model, layer)).attribute(inputs, target=target, relu_attributions=relu)
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    cam = LayerAttribution.interpolate(cam.detach(), tuple(inputs.shape[2:]), interpolate_mode=mode)
    return cam.expand(-1, inputs.shape[1], *([-1] * spatial_dims)).contiguous()


def _per_axis(value: int | tuple[int, ...], spatial_dims: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (int(value),) * spatial_dims


def _expected_gradients(
    scorer: Callable, inputs: torch.Tensor, target, references: torch.Tensor | None, n_samples: int, chunk: int | None
) -> torch.Tensor:
    """Expected gradients (Erion et al.) = Captum's GradientShap without input noise, chunked over samples."""
    if references is None:
        references = torch.zeros_like(inputs[:1])
    gradient_shap = GradientShap(scorer)
    chunk = chunk or default_chunk(inputs, n_samples, per_batch=True)
    total = torch.zeros_like(inputs)
    done = 0
    while done < n_samples:
        k = min(chunk, n_samples - done)
        part = gradient_shap.attribute(inputs, baselines=references, n_samples=k, stdevs=0.0, target=target)
        total += part.detach() * k
        done += k
    return total / n_samples
