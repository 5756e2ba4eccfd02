"""Keep freed memory inside the process (glibc), so that large temporaries reuse pages instead of faulting.

A refined attention layer allocates and frees several ``(B, H, N, N)`` map stacks per call (tens of MB at the
batch sizes of inference). glibc's malloc serves blocks that large with ``mmap`` and unmaps them on free, or trims
the top of its heap after they are freed. Either way the next call touches fresh pages, which the kernel faults in
and zero-fills one page at a time: a cost a plain ViT, which materialises no maps, hardly pays
(``docs/performance.md`` has the measurement). Preloading jemalloc or tcmalloc avoids it as well; this needs no
extra library.
"""
import ctypes
import os
import sys

__all__ = ['keep_freed_memory']

# mallopt(3) parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2 ** 31 - 1

ENV_OPT_OUT = 'REFINER_KEEP_FREED_MEMORY'


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse: no ``mmap`` for large blocks, no trimming of the heap.

    The ``refiner`` command calls this at start-up; library users can call it themselves, once, early. The
    process' resident memory then stays near its peak, the usual trade of a caching allocator (torch's CUDA
    allocator makes the same one on GPUs).

    Returns:
        True when applied; False where it does not apply: not Linux, a libc without ``mallopt`` (e.g. musl),
        or the environment variable ``REFINER_KEEP_FREED_MEMORY=0``.
    """
    if not sys.platform.startswith('linux') or os.environ.get(ENV_OPT_OUT, '1') == '0':
        return False
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
