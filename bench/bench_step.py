"""Training-step images/s: our jitted step (oneDNN and XLA convolutions, float32 and bfloat16)
against PyTorch CPU eager (float32 and bfloat16 autocast) on the same networks.

    .venv/bin/pip install -r bench/requirements.txt   # torch, CPU build
    python -m bench.bench_step            # 3 models x 2 batch sizes
    python -m bench.bench_step --quick    # 1 batch size per model, 3 timed steps
    python -m bench.bench_step --quick --max_isa AVX2   # as an AVX2-only CPU runs it
    python -m bench.bench_step --noise_scale   # what the gradient noise scale costs the step

Ours is the training loop's own step (run_setup.prepare_model + compile_step.jit_train_step
from the model's configs/ file: forward, backward, LARS, metrics, non-finite
guard) with conv_impl "onednn" in float32 and bfloat16 (where oneDNN has
bfloat16 convolutions on this CPU: AVX512-BF16 or AMX) and "xla" (XLA:CPU's
own kernels) in float32; and, end to end, `main.py --config.dataset=synthetic`
(the real loop: data iterator, logging, no I/O), img/s over its last logged
steps. The peer is bench/torch_models.py (same layer shapes and parameter
counts) in channels_last with a foreach LARS, torch using every core, in
float32 and under torch.autocast("cpu", bfloat16). Each measurement runs in a
fresh process, both sides with glibc's malloc keeping freed memory
(host_memory.py, as main.py runs); the figure is the best of `--steps` timed steps after one
warm-up step. "% peak" is 3 x forward FLOPs per image (XLA's count of the
lax formulation) x our float32 images/s over the matmul peak (bench/machine.py).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from bench.machine import cpu_description, matmul_peak

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    config: str  # configs/ module
    size: int
    classes: int
    batches: tuple[int, ...]
    quick_batch: int


MODELS = [
    Model("resnet50", "resnet50_lars", 224, 1000, (16, 32), 16),
    Model("alexnet_bn", "alexnet_lars", 227, 1000, (64, 128), 64),
    Model("cifar_resnet20", "cifar10_lars", 32, 10, (128, 256), 256),
]


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measurement: `who` is "ours", "torch" or "end_to_end"."""

    who: str
    model: str
    batch: int
    steps: int
    conv_impl: str = "onednn"
    dtype: str = "float32"
    devices: int = 1
    # glibc's malloc keeps freed memory (host_memory.py), as main.py has it. PyTorch gets it too:
    # its CPU allocator returns large blocks to the kernel as XLA's does, and gains as much.
    keep_memory: bool = True
    noise_scale: bool = True  # ours: the step measures the gradient noise scale (with micro-steps)
    microbatch_size: int = -1  # ours: the config's own when < 0


# --noise_scale: the cost of the gradient noise scale, on the study's three cells (configs/cifar10_study.py:
# CIFAR ResNet-8, 256 images per micro-step, ghost BatchNorm of 64) and on ResNet-50 with one micro-step
# (the probe measures) and with four (the micro-steps measure). (model, config, batch, microbatch_size)
NOISE_CELLS = [
    ("cifar_resnet8", "cifar10_study", 128, 128),
    ("cifar_resnet8", "cifar10_study", 2048, 256),
    ("cifar_resnet8", "cifar10_study", 8192, 256),
    ("resnet50", "resnet50_lars", 16, 16),
    ("resnet50", "resnet50_lars", 64, 16),
]


def model(name: str) -> Model:
    if name == "cifar_resnet8":  # the study's network (--noise_scale only)
        return Model("cifar_resnet8", "cifar10_study", 32, 10, (), 0)
    return next(m for m in MODELS if m.name == name)


def limit_isa(isa: str):
    """Makes this process and the cells it starts run as on a CPU whose vector ISA stops at `isa`
    (e.g. AVX2 on an AVX-512 machine): oneDNN's (ours and PyTorch's) and PyTorch's own kernels, XLA's
    code generation and OpenBLAS. The cores, caches and memory stay this machine's."""
    os.environ.update(
        ONEDNN_MAX_CPU_ISA=isa,
        ATEN_CPU_CAPABILITY=isa.lower(),
        MKL_ENABLE_INSTRUCTIONS=isa,
        OPENBLAS_CORETYPE={"AVX2": "Haswell"}[isa],
        LARGEBATCH_XLA_MAX_ISA=isa,
    )
    os.environ["XLA_FLAGS"] = xla_flags(1)  # this process's matmul peak


def xla_flags(devices: int) -> str:
    flags = f"--xla_force_host_platform_device_count={devices}"
    isa = os.environ.get("LARGEBATCH_XLA_MAX_ISA")
    return f"{flags} --xla_cpu_max_isa={isa}" if isa else flags


def measure(cell: Cell) -> float:
    """Seconds per training step of `cell`, measured in a fresh process (nothing cached between cells)."""
    env = dict(os.environ, XLA_FLAGS=xla_flags(cell.devices))
    command = [sys.executable, "-m", "bench.bench_step", "--cell", json.dumps(dataclasses.asdict(cell))]
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"{cell} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def time_ours(cell: Cell) -> float:
    """Our training step; who "probe": the noise-scale probe of runs of one micro-step."""
    import importlib

    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import compile_step
    import run_setup

    spec = model(cell.model)
    config = importlib.import_module(f"configs.{spec.config}").get_config()
    config.update(batch_size=cell.batch, eval_batch_size=cell.batch, conv_impl=cell.conv_impl, dtype=cell.dtype)
    config.noise_scale = cell.noise_scale
    if cell.microbatch_size >= 0:
        config.microbatch_size = cell.microbatch_size
    setup = run_setup.prepare_model(config, spec.classes, num_train=1_281_167)
    state, step = run_setup.init_state(setup), compile_step.jit_train_step(setup)
    sharding = NamedSharding(setup.mesh, P("data"))
    rng = np.random.default_rng(0)
    batch = {
        "image": jax.device_put(rng.standard_normal((cell.batch, spec.size, spec.size, 3), np.float32), sharding),
        "label": jax.device_put(rng.integers(0, spec.classes, cell.batch).astype(np.int32), sharding),
    }
    key = jax.random.key(0)
    if cell.who == "probe":
        probe = compile_step.jit_noise_probe(setup)
        step = lambda state, batch, key: (state, {"loss": probe(state, batch, batch, key)})  # noqa: E731
    times = []
    for _ in range(cell.steps + 1):
        start = time.perf_counter()
        state, metrics = step(state, batch, key)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
    return min(times[1:])


def noise_scale_table(steps: int):
    """The cost of the gradient noise scale: the step with it and without, and the probe amortised
    over its period (configs/default.py's noise_scale_every_steps), in one run per cell."""
    from configs import default

    every = default.get_config().noise_scale_every_steps
    print("| model | batch | micro-steps | step without (s) | step with (s) | probe (s) | cost of the noise scale |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for name, _, batch, micro in NOISE_CELLS:
        cell = dict(model=name, batch=batch, steps=steps, microbatch_size=micro)
        without = measure(Cell(who="ours", noise_scale=False, **cell))
        with_it = measure(Cell(who="ours", **cell))
        num_micro = batch // micro
        probe = measure(Cell(who="probe", **cell)) if num_micro == 1 else 0.0
        cost = (with_it + probe / every) / without - 1
        probe_text = f"{probe:.3f} every {every} steps" if probe else "-"
        print(f"| {name} | {batch} | {num_micro} | {without:.3f} | {with_it:.3f} | {probe_text} | {100 * cost:+.1f}% |",
              flush=True)  # fmt: skip


def time_torch(cell: Cell) -> float:
    import contextlib

    import torch

    from bench import torch_models

    spec = model(cell.model)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    net = torch_models.create(spec.name, spec.classes).to(memory_format=torch.channels_last)
    optimizer = torch_models.LARS(net.parameters(), lr=0.1)
    images = torch.randn(cell.batch, 3, spec.size, spec.size).to(memory_format=torch.channels_last)
    labels = torch.randint(0, spec.classes, (cell.batch,))
    bf16 = cell.dtype == "bfloat16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    for _ in range(cell.steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = torch.nn.functional.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return min(times[1:])


def time_end_to_end(cell: Cell) -> float:
    """main.py on the synthetic data set: the median step time of its logged steps after the first two logs."""
    spec = model(cell.model)
    steps = max(cell.steps, 3) * 3
    with tempfile.TemporaryDirectory() as workdir:
        overrides = dict(dataset="synthetic", batch_size=cell.batch, eval_batch_size=cell.batch, num_train_steps=steps,
                         log_every_steps=max(steps // 6, 1), checkpoint_every_steps=10**9, eval_every_steps=10**9,
                         conv_impl=cell.conv_impl, dtype=cell.dtype)  # fmt: skip
        command = [sys.executable, "main.py", f"--config=configs/{spec.config}.py", f"--workdir={workdir}/run"]
        command += [f"--config.{k}={v}" for k, v in overrides.items()]
        env = dict(os.environ, XLA_FLAGS=xla_flags(1))
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        records = [json.loads(line) for line in open(f"{workdir}/run/metrics.jsonl")]
    times = sorted(r["step_time"] for r in records if r["kind"] == "train")[: max(len(records) - 2, 1)]
    return times[len(times) // 2]


def run_cell(cell: Cell) -> float:
    if cell.keep_memory:  # before torch or jax start their threads
        import host_memory

        host_memory.keep_freed_memory()
    if cell.who in ("ours", "probe"):
        return time_ours(cell)
    if cell.who == "torch":
        return time_torch(cell)
    return time_end_to_end(cell)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one batch size per model, 3 timed steps")
    parser.add_argument("--steps", type=int, default=0, help="timed steps per cell (default 5, quick 3)")
    parser.add_argument("--models", default=",".join(m.name for m in MODELS))
    parser.add_argument("--max_isa", choices=["AVX2"], help="run every cell as on a CPU with this ISA at most")
    parser.add_argument("--noise_scale", action="store_true", help="only the cost of the gradient noise scale")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # TensorFlow (the input pipeline's import, here and in every cell) as main.py has it: without its
    # oneDNN rewrites, whose banner it prints on CPUs with AVX512-VNNI.
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
    if args.max_isa:
        limit_isa(args.max_isa)
    if args.cell:
        print(json.dumps({"seconds": run_cell(Cell(**json.loads(args.cell)))}))
        return

    import models
    import run_setup

    steps = args.steps or (3 if args.quick else 5)
    if args.noise_scale:
        print(f"{cpu_description()}; best of {steps} steps", flush=True)
        return noise_scale_table(steps)
    peak = matmul_peak()
    from models import onednn

    bf16 = onednn.bfloat16_supported()
    emulated = f"; vector ISA limited to {args.max_isa} (--max_isa)" if args.max_isa else ""
    print(f"{cpu_description()}{emulated}; matmul peak {peak / 1e9:.0f} GFLOP/s; best of {steps} steps", flush=True)
    if not bf16:
        print("No bfloat16 convolutions on this CPU (oneDNN needs AVX512-BF16 or AMX): bf16 columns n/a.")
    print("| model | batch | ours oneDNN f32 | oneDNN f32, 2 devices | ours oneDNN bf16 | ours XLA f32 "
          "| end to end (synthetic) | PyTorch f32 | PyTorch bf16 autocast | f32: ours/PyTorch | bf16: ours/PyTorch "
          "| % of peak |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for spec in (m for m in MODELS if m.name in args.models.split(",")):
        config = __import__(f"configs.{spec.config}", fromlist=["x"]).get_config()
        config.conv_impl = "lax"
        flops = models.flops_per_image(run_setup.create_model(config, spec.classes, None), (1, spec.size, spec.size, 3))
        for batch in (spec.quick_batch,) if args.quick else spec.batches:

            def rate(batch=batch, spec=spec, **kw) -> float:
                return batch / measure(Cell(model=spec.name, batch=batch, steps=steps, **kw))

            ours = rate(who="ours")
            two_devices = rate(who="ours", devices=2)  # the same cores as 2 XLA devices x half the threads
            ours_bf16 = rate(who="ours", dtype="bfloat16") if bf16 else None
            xla = rate(who="ours", conv_impl="xla")
            end_to_end = rate(who="end_to_end")
            torch_f32 = rate(who="torch")
            # Without bf16 hardware PyTorch's autocast emulates it (CIFAR ResNet-20 on AVX2: 23 img/s
            # against 286 in f32), minutes per cell that say nothing about a bf16 machine.
            torch_bf16 = rate(who="torch", dtype="bfloat16") if bf16 else None
            bf16_cells = (
                (f"{ours_bf16:.2f}", f"{torch_bf16:.2f}", f"{ours_bf16 / torch_bf16:.2f}") if bf16 else ("n/a",) * 3
            )
            print(
                f"| {spec.name} ({spec.size}) | {batch} | {ours:.2f} | {two_devices:.2f} | {bf16_cells[0]} | {xla:.2f} "
                f"| {end_to_end:.2f} "
                f"| {torch_f32:.2f} | {bf16_cells[1]} | {ours / torch_f32:.2f} | {bf16_cells[2]} "
                f"| {100 * 3 * flops * ours / peak:.0f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
