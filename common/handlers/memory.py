"""Keep the resident memory of a long run over many volumes flat on glibc."""

from __future__ import annotations

import ctypes
import os

from ignite.engine import Events


def _glibc():
    """The C library when it is glibc (it has ``malloc_trim`` and ``gnu_get_libc_version``), else None (macOS, musl,
    Windows)."""
    if os.name != "posix":
        return None
    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process, the C library's among them
    except (OSError, TypeError):
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "gnu_get_libc_version") else None


def trim_freed_heap(libc=None) -> bool:
    """Hand the heap memory glibc holds free back to the system (``malloc_trim(0)``); returns whether it could (glibc
    only). ``libc``: a handle from ``_glibc()`` kept by the caller, to look it up once."""
    libc = libc if libc is not None else _glibc()
    if libc is None:
        return False
    libc.malloc_trim(ctypes.c_size_t(0))
    return True


class ReturnFreedMemory:
    """After every iteration, hand the heap memory glibc holds free back to the system (``malloc_trim``).

    When glibc frees a block it had mmapped that is larger than its mmap threshold (up to 32 MiB), it raises the
    threshold to that block's size and its heap trim threshold to twice that; from then on the volumes of an
    inference run (a few MB each, of sizes that change with each case's resizing and inversion) are carved out of the
    heap, whose freed space is rarely returned, and the run's resident memory grows case after case though nothing
    leaks (200 3D cases of attr_constraint, `benchmarks/batch_inference.py`: +11 % and +23 % after the first 20).
    Trimming once per case returns that space; pinning the thresholds instead (``MALLOC_MMAP_THRESHOLD_``) also keeps
    the memory flat but mmaps every array of 128 KiB or more, the network's activations too, which made inference
    14-20 % slower. Our own because no maintained library exposes ``malloc_trim``; where the C library is not glibc
    the handler does not attach.
    """

    def __init__(self):
        self.libc = _glibc()

    def attach(self, engine) -> bool:
        """Trim after each of ``engine``'s iterations; returns whether it attached (glibc only)."""
        if self.libc is None:
            return False
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        return True

    def __call__(self, engine=None) -> None:
        trim_freed_heap(self.libc)
