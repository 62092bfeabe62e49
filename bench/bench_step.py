"""Training-step images/s: our jitted step against PyTorch CPU eager on the same networks.

    .venv/bin/pip install -r bench/requirements.txt   # torch, CPU build
    python -m bench.bench_step            # 3 models x 2 batch sizes, ~15 min on 2 cores
    python -m bench.bench_step --quick    # 1 batch size per model, fewer steps, ~5 min

Ours is the training loop's own step (train.prepare_model + train.jit_train_step
from the model's configs/ file: forward, backward, LARS, metrics, non-finite
guard), once with the default convolution formulation (fast_conv, see
models/layers.conv2d), once with plain lax convolutions, and once with one XLA
CPU device per core (main.py --num_cpu_devices; the batch split over them). The peer is
bench/torch_models.py (same layer shapes and parameter counts) in channels_last
with a foreach LARS, torch using every core. Each cell runs in its own process;
the figure is the best of `--steps` timed steps after one warm-up step. The
matmul peak is the faster of numpy's and XLA's 2048^3 float32 matmul; "% peak" is
3 x forward FLOPs per image (XLA's count) x our best images/s over that peak.
"""

import argparse
import json
import os
import subprocess
import sys
import time

# (model, configs/ module, input size, classes, batch sizes, quick batch)
MODELS = [
    ("resnet50", "resnet50_lars", 224, 1000, (16, 32), 16),
    ("alexnet_bn", "alexnet_lars", 227, 1000, (64, 128), 64),
    ("cifar_resnet20", "cifar10_lars", 32, 10, (128, 256), 256),
]


def time_ours(config_name: str, batch: int, fast_conv: bool, steps: int, num_classes: int) -> dict:
    import importlib

    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import models
    import train

    config = importlib.import_module(f"configs.{config_name}").get_config()
    config.batch_size, config.eval_batch_size, config.fast_conv = batch, batch, fast_conv
    setup = train.prepare_model(config, num_classes, num_train=1_281_167)
    state = train.init_state(setup)
    step = train.jit_train_step(setup)
    size = setup.image_size
    sharding = NamedSharding(setup.mesh, P("data"))
    rng = np.random.default_rng(0)
    batch_arrays = {
        "image": jax.device_put(rng.standard_normal((batch, size, size, 3), np.float32), sharding),
        "label": jax.device_put(rng.integers(0, num_classes, batch).astype(np.int32), sharding),
    }
    key = jax.random.key(0)
    start = time.perf_counter()
    state, metrics = step(state, batch_arrays, key)
    jax.block_until_ready(metrics["loss"])
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, batch_arrays, key)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    flops = models.flops_per_image(setup.model, (1, size, size, 3))
    return {"seconds": min(times), "compile_s": compile_s, "flops_per_image": flops}


def time_torch(name: str, batch: int, steps: int, num_classes: int, size: int) -> dict:
    import torch

    from bench import torch_models

    torch.set_num_threads(os.cpu_count())
    model = torch_models.create(name, num_classes).to(memory_format=torch.channels_last)
    optimizer = torch_models.LARS(model.parameters(), lr=0.1)
    images = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times)}


def matmul_peak() -> float:
    import jax
    import jax.numpy as jnp
    import numpy as np

    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    best = {}
    for name, fn, arg in [("numpy", lambda x: x @ x, a), ("xla", jax.jit(lambda x: x @ x), jnp.asarray(a))]:
        jax.block_until_ready(fn(arg))
        times = []
        for _ in range(5):
            start = time.perf_counter()
            jax.block_until_ready(fn(arg))
            times.append(time.perf_counter() - start)
        best[name] = 2 * n**3 / min(times)
    return max(best.values())


def run_cell(args: list[str], devices: int = 1) -> dict:
    """One measurement in a fresh process (no compile caches or memory shared between cells)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    command = [sys.executable, "-m", "bench.bench_step", "--cell", *args]
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"cell {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one batch size per model, 3 timed steps")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per cell (default 5, quick 3)")
    parser.add_argument("--cell", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        kind, name, config_name, batch, steps, classes, size = args.cell
        batch, steps, classes, size = int(batch), int(steps), int(classes), int(size)
        if kind == "torch":
            result = time_torch(name, batch, steps, classes, size)
        elif kind == "peak":
            result = {"flops": matmul_peak()}
        else:
            result = time_ours(config_name, batch, kind == "fast", steps, classes)
        print(json.dumps(result))
        return

    steps = args.steps or (3 if args.quick else 5)
    peak = run_cell(["peak", "-", "-", "0", "0", "0", "0"])["flops"]
    print(f"{os.cpu_count()} cores, matmul peak {peak / 1e9:.0f} GFLOP/s; best of {steps} steps", flush=True)
    cores = os.cpu_count()
    print(
        f"| model | batch | ours img/s | ours, plain convs | ours, {cores} devices | PyTorch img/s "
        f"| ours/PyTorch | {cores} devices/PyTorch | % of matmul peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for name, config_name, size, classes, batches, quick_batch in MODELS:
        for batch in (quick_batch,) if args.quick else batches:
            common = [name, config_name, str(batch), str(steps), str(classes), str(size)]
            fast = run_cell(["fast", *common])
            plain = run_cell(["plain", *common])
            per_core = run_cell(["fast", *common], devices=cores)
            peer = run_cell(["torch", *common])
            ours, torch_rate = batch / fast["seconds"], batch / peer["seconds"]
            ours_per_core = batch / per_core["seconds"]
            percent = 100 * 3 * fast["flops_per_image"] * max(ours, ours_per_core) / peak
            print(
                f"| {name} ({size}) | {batch} | {ours:.2f} | {batch / plain['seconds']:.2f} | {ours_per_core:.2f} "
                f"| {torch_rate:.2f} | {ours / torch_rate:.2f} | {ours_per_core / torch_rate:.2f} | {percent:.0f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
