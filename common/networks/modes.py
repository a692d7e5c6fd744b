"""Temporary network modes shared by the samplers and saliency methods that differentiate through networks."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients inside; each submodule's mode and flags restored after.

    For gradients with respect to an *input* (a latent code, a noisy sample) through trained networks:
    dropout and batch-norm updates must not act, and no parameter gradient should be accumulated.
    """
    modes = [(m, m.training) for module in modules for m in module.modules()]
    flags = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    try:
        for module in modules:
            module.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def no_parameter_grads(*modules: nn.Module | None) -> Iterator[None]:
    """No parameter gradients inside, modes untouched: an adversary during its generator's step, whose loss
    goes through it (and through its batch statistics, as in training) but must only update the generator."""
    params = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def modules_of(*fns: Any) -> list[nn.Module]:
    """The modules behind callables: a module itself, or the owner of a bound method (``ae.decode``)."""
    modules = []
    for fn in fns:
        owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, nn.Module):
            modules.append(owner)
    return modules
