"""Keeps freed host memory inside the process, so that each training step reuses its pages.

XLA:CPU allocates one buffer for all of a step's temporaries (490 MB for the
CIFAR ResNet-20 at batch 256) and frees it when the step ends. glibc's malloc
serves a request that large with mmap and gives it back with munmap, so every
step starts on fresh pages, and the kernel takes a page fault and zeroes a page
for every 4 KiB the step writes: 125,000 faults and 0.45 s of system time in a
1.2 s step on a 2-core AVX2 machine (bench/RESULTS.md). glibc can only be told
not to do this through its tunables (mallopt): one arena for all threads, no
mmap, no trimming. Then the buffer comes from the heap and the next step gets
the same pages back: 0 faults, and that step 12% shorter (17-21% end to end in
main.py). The price is that the process keeps its peak heap until it exits,
which a training process needs again every step anyway.
"""

import ctypes

# glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# mallopt takes an int; glibc stores the trim threshold as a size_t, so -1 is SIZE_MAX: never trim.
NEVER_TRIM = -1


def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse instead of returning it to the kernel.

    Call it first thing in the process, before any library starts threads: a
    thread that has already allocated keeps its own arena, whose large blocks
    still come from mmap.

    Returns:
      Whether malloc took the settings; False where the C library is not glibc
      (then nothing changes and training runs as before, only slower).
    """
    try:  # the C library already in the process, whose malloc XLA and torch use
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, NEVER_TRIM))
    return all(mallopt(option, value) == 1 for option, value in settings)
