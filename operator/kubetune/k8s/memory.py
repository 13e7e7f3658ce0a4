"""The operator process's malloc: few arenas, so memory freed by one thread serves the next, and
large blocks of their own, so a burst's big replies go back to the system when freed.

glibc gives each thread that allocates while another holds the lock an arena of its own, up to
8 per core. The operator's ~90 threads (reconcile workers, status patchers, Event posters, the
informer's watches) each parse API replies, so a burst leaves each of those arenas holding
freed, fragmented memory that no other thread reuses and that is never given back. Two arenas
serve threads that mostly wait on the API server as well as sixteen do.

glibc also raises its mmap threshold to the size of each large block freed (up to 32 MiB), so
after the first multi-MB list reply every later one lands in the heap, whose top a live object
then pins: a fixed threshold keeps each such block a mapping of its own, unmapped when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX, M_MMAP_THRESHOLD = -8, -3  # glibc's malloc.h
ARENAS = 2
MMAP_THRESHOLD = 256 << 10  # bytes; glibc's starting value is 128 KiB


def limit_malloc_arenas(arenas: int = ARENAS, environ: dict[str, str] | None = None) -> bool:
    """Cap glibc's arenas for the threads started from now on (call it before any is). False:
    not glibc (nothing to cap), or MALLOC_ARENA_MAX is set, which glibc read at start and which
    stands."""
    return _mallopt(M_ARENA_MAX, arenas, "MALLOC_ARENA_MAX", environ)


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD, environ: dict[str, str] | None = None) -> bool:
    """Every block of `threshold` bytes or more its own mapping, for good. False: not glibc, or
    MALLOC_MMAP_THRESHOLD_ is set and stands."""
    return _mallopt(M_MMAP_THRESHOLD, threshold, "MALLOC_MMAP_THRESHOLD_", environ)


def _mallopt(option: int, value: int, variable: str, environ: dict[str, str] | None) -> bool:
    if variable in (os.environ if environ is None else environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(option, value))
