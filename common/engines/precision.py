"""Mixed precision shared by the engines whose losses need no gradient scaling."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def bf16_autocast(enabled: bool) -> AbstractContextManager:
    """bfloat16 autocast on CUDA when ``enabled``, else a no-op. bfloat16 keeps float32's exponent range, so
    losses with second-order terms (double backprop) or many networks need no GradScaler."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled else nullcontext()
