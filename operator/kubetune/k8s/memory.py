"""The operator process's malloc: few arenas, so memory freed by one thread serves the next.

glibc gives each thread that allocates while another holds the lock an arena of its own, up to
8 per core. The operator's ~90 threads (reconcile workers, status patchers, Event posters, the
informer's watches) each parse API replies, so a burst leaves each of those arenas holding
freed, fragmented memory that no other thread reuses and that is never given back. Two arenas
serve threads that mostly wait on the API server as well as sixteen do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # glibc's malloc.h
ARENAS = 2


def limit_malloc_arenas(arenas: int = ARENAS, environ: dict[str, str] | None = None) -> bool:
    """Cap glibc's arenas for the threads started from now on (call it before any is). False:
    not glibc (nothing to cap), or MALLOC_ARENA_MAX is set, which glibc read at start and which
    stands."""
    if "MALLOC_ARENA_MAX" in (os.environ if environ is None else environ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, arenas))
