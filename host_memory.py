"""Host memory: keeps freed memory inside the process, so that each training step reuses its
pages (`keep_freed_memory`), and tells how much more the process may use (`available_bytes`).

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
import os
import pathlib

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


CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")
# (limit, usage) file names: cgroup v2, then v1's memory controller.
CGROUP_FILES = (("memory.max", "memory.current"), ("memory.limit_in_bytes", "memory.usage_in_bytes"))


def available_bytes() -> int:
    """How much more memory this process may allocate before the kernel refuses or kills it.

    The kernel's estimate of what can be allocated without swapping (MemAvailable), or less
    where a memory cgroup holding the process (a container, a SLURM job's allocation) has less
    room left under its limit, at any level of its hierarchy.
    """
    available = _meminfo_bytes("MemAvailable")
    for limit, usage in _cgroup_limits():
        available = min(available, max(limit - usage, 0))
    return available


def _meminfo_bytes(field: str) -> int:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        name, value = line.split(":", 1)
        if name == field:
            return int(value.split()[0]) * 1024
    raise RuntimeError(f"/proc/meminfo has no {field}")


def _cgroup_limits() -> list[tuple[int, int]]:
    """(limit, usage) of every memory cgroup above this process that sets a limit."""
    found = []
    for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers not in ("", "memory"):
            continue
        mounts = [CGROUP_ROOT, CGROUP_ROOT / "unified"] if controllers == "" else [CGROUP_ROOT / "memory"]
        for mount in mounts:
            # Inside a cgroup namespace the process's path is not under the mount; its root then holds the limit.
            directory = mount / path.lstrip("/") if (mount / path.lstrip("/")).is_dir() else mount
            while True:
                found += _limit_in(directory)
                if directory == mount or not directory.is_relative_to(mount):
                    break
                directory = directory.parent
    return found


def _limit_in(directory: pathlib.Path) -> list[tuple[int, int]]:
    for limit_file, usage_file in CGROUP_FILES:
        try:
            limit = (directory / limit_file).read_text().strip()
            usage = int((directory / usage_file).read_text())
        except (OSError, ValueError):
            continue
        # v2 writes "max" for no limit; v1 a number near 2**63.
        if limit != "max" and int(limit) < os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"):
            return [(int(limit), usage)]
    return []
