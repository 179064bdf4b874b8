"""Keep freed memory in the process for reuse: the CPU encoder's allocations stop page-faulting.

A CPU forward pass allocates a fresh tensor per layer, each as large as a window times the layer's
channels (tens to hundreds of MB). glibc serves blocks that large with mmap and unmaps them on free,
so every layer of every batch faults in and zeroes its output afresh: on the bundled demo model that
is over half of the encoder's time (1.17 s against 0.44 s a 30 s window on 2 cores). PyTorch keeps
no CPU cache of its own (its docs suggest jemalloc or tcmalloc through LD_PRELOAD); the same effect
is two glibc settings, made here at run time: serve large blocks from the heap (`M_MMAP_MAX` 0) and
never give its free top back to the kernel (`M_TRIM_THRESHOLD`). With fixed windows the shapes repeat
batch after batch, so the heap settles after a batch or two and is reused from then on. With windows
of every length (`--chunking full`) free pieces pile up between live blocks; the runner then gives
the free pages back every few batches (`give_back_freed_memory`), which keeps memory flat for one
round of page faults each time.

Only on Linux with glibc; elsewhere `keep_freed_memory` does nothing and says so.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1       # glibc <malloc.h>
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1      # the largest int mallopt takes (it saturates on 64-bit: never reached by a trim)


def _glibc_function(name: str, argtypes: tuple, restype):
    """glibc's `name` from this process's own symbols, or None elsewhere. Cheap enough to call per batch:
    no `find_library` (it runs ldconfig) and no `platform.libc_ver` (it reads the Python binary)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return None
        function = getattr(ctypes.CDLL(None), name)
    except (ValueError, OSError, AttributeError):   # no such confstr name (not glibc), no symbol
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


def keep_freed_memory() -> bool:
    """Make glibc serve large blocks from the heap and keep them after free; True if it took effect.

    Process-wide and inherited by forked workers. Worth it where a process allocates the same large
    blocks again and again (CPU encoding); a CUDA process does not need it (PyTorch caches device
    memory itself)."""
    mallopt = _glibc_function("mallopt", (ctypes.c_int, ctypes.c_int), ctypes.c_int)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def give_back_freed_memory() -> bool:
    """Return the heap's free pages to the kernel now (glibc `malloc_trim`); True if it took effect.

    For a kept heap whose block sizes keep changing (windows of every length): free pieces too small
    for the next block pile up between the live ones. An occasional trim bounds that, and costs one
    round of page faults."""
    trim = _glibc_function("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
    if trim is None:
        return False
    trim(0)
    return True
