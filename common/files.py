"""Files written and found the same way everywhere: whole or not at all, and the newest training checkpoint.

Light on purpose (standard library only): ``common.pipeline`` uses it in the process that only supervises the
stages, which has no reason to import torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from common.errors import InputError


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write through a temporary sibling and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def latest_checkpoint(ckpt_dir: str) -> str:
    """The newest ``checkpoint_epoch=N.pt`` that a ``CheckpointSaver`` wrote in ``ckpt_dir`` (for resume)."""
    found = sorted(
        (int(m.group(1)), path)
        for path in Path(ckpt_dir).glob("*checkpoint_epoch=*.pt")
        if (m := re.search(r"checkpoint_epoch=(\d+)\.pt$", path.name))
    )
    if not found:
        raise InputError(f"{ckpt_dir}: no checkpoint_epoch=N.pt to resume from; expected a previous training run there")
    return str(found[-1][1])
