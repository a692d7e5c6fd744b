"""Files written and found the same way everywhere: whole or not at all, the newest training checkpoint, and the
records a stopped run resumes from.

Light on purpose (standard library only): ``common.pipeline`` uses it in the process that only supervises the
stages, which has no reason to import torch.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from common.errors import InputError


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temporary sibling that is renamed to ``path`` once whole, so readers (and a run that
    resumes after a kill) never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` whole or not at all (:func:`write_atomic`)."""
    return write_atomic(path, lambda tmp: tmp.write_text(text))


# An evaluation that runs for hours (the TVD score's guided sampling, the attribution baselines on 3D volumes)
# records what it has done in this folder of its output folder, so that a rerun with resume picks up where it
# stopped; ``common.pipeline`` resumes a stage that wrote such a record, as it does a training stage that wrote a
# checkpoint.
EVALUATION_PROGRESS_DIR = "evaluation_progress"


def remove_evaluation_progress(output_dir: str | os.PathLike) -> None:
    """Delete the progress records under ``output_dir`` once the evaluation they belong to is written."""
    shutil.rmtree(Path(output_dir) / EVALUATION_PROGRESS_DIR, ignore_errors=True)


def save_record(path: str | os.PathLike, record: dict) -> Path:
    """``torch.save`` of an evaluation's progress record, whole or not at all."""
    import torch  # here, not at the top: common.pipeline imports this module without torch

    return write_atomic(path, lambda tmp: torch.save(record, tmp))


def read_record(path: str | os.PathLike, fields: Iterable[str], kind: str, writer: str) -> dict:
    """A progress record written by :func:`save_record` that holds ``fields`` (loaded with ``weights_only``); one
    InputError naming the file for anything else."""
    import torch

    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
        missing = [field for field in fields if field not in record]
        if missing:
            raise KeyError(", ".join(missing))
    except Exception as error:  # any unreadable or incomplete file gets the same message
        raise InputError(
            f"{path}: not {kind} ({type(error).__name__}: {error}); expected one written by {writer}: delete it, "
            "or run without resume"
        ) from error
    return record


def file_fingerprint(paths: Iterable[str | os.PathLike]) -> list[list]:
    """[file name, SHA-256 of its contents] of each file ([name, None] if missing): changes when a file is rewritten
    with other contents, e.g. a model retrained, so that records made with the old one are not taken for the new
    one's, and stays when a run folder is copied or moved."""
    result = []
    for path in map(Path, paths):
        if not path.is_file():
            result.append([path.name, None])
            continue
        digest = hashlib.sha256()
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        result.append([path.name, digest.hexdigest()])
    return result


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
