"""What every benchmark prints about the machine it ran on: CPU model, vector flags, matmul peak."""

import os
import platform
import time

# The flags that decide which kernels run: AVX2/FMA, AVX-512, its bfloat16 extension, AMX.
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_description() -> str:
    """e.g. "AMD EPYC, 2 cores, flags: avx2 fma"."""
    model, flags = platform.processor(), set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    return f"{model}, {len(os.sched_getaffinity(0))} cores, flags: {' '.join(f for f in FLAGS if f in flags)}"


def matmul_peak() -> float:
    """float32 FLOP/s of a 2048^3 matmul: the faster of numpy's BLAS and XLA, best of 5."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    best = 0.0
    for fn, arg in [(lambda x: x @ x, a), (jax.jit(lambda x: x @ x), jnp.asarray(a))]:
        jax.block_until_ready(fn(arg))
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(fn(arg))
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best
