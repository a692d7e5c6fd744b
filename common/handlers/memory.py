"""Keep the resident memory of a long run over many volumes flat on glibc."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
GLIBC_INITIAL_MMAP_THRESHOLD = 128 * 1024


def _glibc():
    """The C library when it is glibc (it has ``mallopt``), else None (macOS, musl without it, Windows)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


class ReturnFreedMemory:
    """Fix glibc's mmap threshold, so that the arrays of each case go back to the system when they are freed.

    glibc raises its mmap threshold (up to 32 MiB) each time a block it had mmapped is freed; from then on the
    volumes of an inference run (a few MB each, of sizes that change with each case's resizing and inversion) are
    carved out of the heap, whose freed space is rarely returned, and the run's resident memory grows case after case
    though nothing leaks (200 3D cases of attr_constraint, `benchmarks/batch_inference.py`: +11 % and +23 % after
    the first 20). Pinning the threshold at its initial value (the same as the environment variable
    ``MALLOC_MMAP_THRESHOLD_=131072``) keeps them in mmap. Our own because no maintained library exposes
    ``mallopt``; nothing happens where the C library is not glibc.
    """

    def __init__(self, mmap_threshold: int = GLIBC_INITIAL_MMAP_THRESHOLD, logger_name: str = "ReturnFreedMemory"):
        self.mmap_threshold = int(mmap_threshold)
        self.logger = logging.getLogger(logger_name)

    def attach(self, engine=None) -> bool:
        """Set the threshold for the whole process (the engine is not needed); returns whether it was set."""
        libc = _glibc()
        if libc is None:
            return False
        done = bool(libc.mallopt(ctypes.c_int(M_MMAP_THRESHOLD), ctypes.c_int(self.mmap_threshold)))
        if not done:
            self.logger.warning(f"glibc refused mmap threshold {self.mmap_threshold}; memory may grow over long runs")
        return done
