"""Where the engine's memory comes from: glibc's malloc, set up so the resident size follows what is alive.

No torch here: the worker calls ``configure_heap`` first thing, before any other thread allocates.
"""

from __future__ import annotations

import ctypes
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameters (malloc.h)
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 1024**2


def configure_heap() -> None:
    """Serve every allocation of 1 MiB or more (weights, activations, Hessians) from its own mmap, and every
    thread from one arena.

    glibc raises its mmap threshold to the size of each mmapped block freed (up
    to 32 MiB), after which a layer's tensors come from the heap, whose holes a
    later, differently sized tensor cannot always reuse: at width 1024 that added
    about 140 MiB to a layer's peak. With a fixed threshold a freed tensor goes
    back to the OS at once, so the resident size follows what is alive.
    A worker runs its job on a thread of its own, which glibc serves from an arena
    of its own made of 64 MiB heaps. In a real worker on a 24-layer width-1024 model
    a layer's tensors were found in free space of 20 such heaps (~600 MiB resident
    mid-layer, given back only by the trim at the layer's end), and the worker's
    peak was ~430 MiB above the same job with one arena (bench/RESULTS.md). One
    arena, set before any other thread allocates (``workers/__main__.py`` calls this
    first), keeps every thread in the main heap. Only where memory comes from
    changes, never a computed value.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(M_ARENA_MAX, 1)


def release_heap() -> None:
    """Hand a released layer's freed buffers back to the OS.

    glibc keeps freed memory in its heap, so without this the resident size
    creeps up with every layer and peak memory grows with depth.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
