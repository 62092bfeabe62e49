"""host_memory.keep_freed_memory: a large block freed by one thread comes back without page faults."""

import json
import subprocess
import sys
import textwrap

from conftest import REPO

BLOCK = 64 << 20  # over glibc's largest mmap threshold (32 MiB): served by mmap by default
PAGES = BLOCK // 4096

# In a fresh process (the settings must come before any thread allocates): a worker thread,
# as XLA's are, allocates the block, writes it, frees it, and does the same again; the
# minor page faults of each write are counted.
PROBE = textwrap.dedent(
    f"""
    import ctypes, json, resource, sys, threading
    import host_memory
    applied = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []

    def write_fresh_block():
        block = libc.malloc({BLOCK})
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        ctypes.memset(block, 1, {BLOCK})
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
        libc.free(block)

    def worker():
        write_fresh_block()
        write_fresh_block()

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    print(json.dumps({{"applied": applied, "faults": faults}}))
    """
)


def probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def test_freed_block_is_reused_without_page_faults():
    kept = probe("keep")
    assert kept["applied"] is True
    first, second = kept["faults"]
    assert first >= 0.9 * PAGES  # the first write meets fresh pages either way
    assert second <= 0.01 * PAGES, kept  # the same pages came back from the heap


def test_by_default_the_freed_block_returns_to_the_kernel():
    # The control: what XLA's per-step temporaries met before (a fault per page, every step).
    first, second = probe("default")["faults"]
    assert first >= 0.9 * PAGES
    assert second >= 0.9 * PAGES
