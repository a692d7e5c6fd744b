"""Test helper: make the Kth trainer checkpoint of a training process stop half-way through its write.

Installed by ``tests/configs/slow_checkpoint.json`` in the process that trains. On the Kth ``torch.save`` of a
checkpoint that holds a ``trainer``, half the bytes are written and flushed, ``marker`` is created, and the process
sleeps, so that a test can SIGKILL it in the middle of a checkpoint write.
"""

import io
import time
from pathlib import Path

import torch


def install(marker: str, nth: int = 2) -> None:
    real_save = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        if not (isinstance(obj, dict) and "trainer" in obj):
            return real_save(obj, f, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] < nth:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        if hasattr(f, "write"):
            f.write(data[: len(data) // 2])
            f.flush()
        else:
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2])
                out.flush()
        Path(marker).write_text("writing")
        time.sleep(300)

    torch.save = save
