"""Checkpoints that a kill cannot leave half-written or missing."""

from __future__ import annotations

from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver


class _RemoveAfterSave(BaseSaveHandler):
    """A save handler that defers the removals ignite asks for until the next file is safely on disk.

    ignite's ``Checkpoint`` removes the oldest file *before* it writes the new one once ``n_saved`` files exist, so
    with ``n_saved=1`` a kill during the write would leave no checkpoint at all. A ``BaseSaveHandler``, or ignite
    would not ask it to remove anything."""

    def __init__(self, handler):
        self.handler = handler
        self.pending: list[str] = []

    def __call__(self, checkpoint, filename, metadata=None):
        self.handler(checkpoint, filename, metadata)
        # A fixed file name (MONAI's ``key_metric_filename``, e.g. model.pt) was just replaced in place: removing
        # "the old one" would remove it.
        if getattr(self.handler, "filename", None) is None:
            for old in self.pending:
                if old != filename:
                    self.handler.remove(old)
        self.pending = []

    def remove(self, filename: str) -> None:
        self.pending.append(filename)

    def __getattr__(self, name):  # dirname, save_on_rank, ... of the wrapped DiskSaver
        return getattr(self.handler, name)


class AtomicCheckpointSaver(CheckpointSaver):
    """``monai.handlers.CheckpointSaver`` for which a kill at any moment leaves the previous checkpoint loadable.

    Each file is written to a temporary file in the same folder and renamed into place (ignite's
    ``DiskSaver(atomic=True)``), and the file it replaces is removed only after that (:class:`_RemoveAfterSave`), so
    the newest ``checkpoint_epoch=N.pt`` on disk is always complete and ``--resume true`` can load it. A kill during
    a write leaves a ``tmp*`` file in the folder, which nothing reads.

    Why a subclass: MONAI builds its ``DiskSaver`` with ``atomic=False`` (because ignite's temporary files used to be
    readable by their owner only; ignite 0.5 adds group and other read permission after the rename) and offers no
    option for it. Same arguments as ``CheckpointSaver``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler._atomic = True
                checkpoint.save_handler = _RemoveAfterSave(checkpoint.save_handler)
