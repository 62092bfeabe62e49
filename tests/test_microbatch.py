"""Micro-batches: the compiled step's memory and size do not grow with the number of micro-steps,
and microbatch_size="auto" takes the largest micro-batch whose step fits.

Memory is XLA's analysis of the compiled step (what `compile_step.fit_train_step` checks before a run),
not a process's resident size, so the figures do not depend on the machine's load."""

import functools
import os
import pathlib
import re
import subprocess
import sys

import pytest

import compile_step
import microbatch
import run_setup
from configs import demo

REPO = pathlib.Path(__file__).resolve().parents[1]
# conftest.py gives this process 4 devices.
DEVICES = 4
ENOUGH = 1 << 50  # bytes: more than any machine, so nothing is refused
SIZE = 32


def demo_setup(batch_size: int, micro, loop: str = "auto"):
    """The demo's model and optimizer on 32x32 one-channel images (activations outweigh the parameters)."""
    config = demo.get_config()
    config.update(batch_size=batch_size, microbatch_size=micro, microbatch_loop=loop, image_size=SIZE)
    return run_setup.prepare_model(config, 10, num_train=1797, channels=1)


@functools.cache  # tests ask for the same steps; they only read them
def compiled_step(batch_size: int, micro, loop: str = "auto", available: int = ENOUGH) -> run_setup.Setup:
    return compile_step.fit_train_step(demo_setup(batch_size, micro, loop), available)


def temporaries(setup: run_setup.Setup) -> int:
    return setup.train_step.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_step_memory_stays_flat_with_the_number_of_micro_steps():
    """16 examples per device per micro-step: 1, 4 and 16 micro-steps take the temporaries of one
    (within 25%: the loop's carry, the gradient sum among it); unrolled, 4 micro-steps take more."""
    one, four, sixteen = (temporaries(compiled_step(DEVICES * 16 * n, 16)) for n in (1, 4, 16))
    assert four <= 1.25 * one and sixteen <= 1.25 * one, (one, four, sixteen)
    unrolled = temporaries(compiled_step(DEVICES * 16 * 4, 16, loop="unroll"))
    assert unrolled >= 2 * one, (one, unrolled)


def test_compiled_step_of_64_micro_steps_is_the_size_of_2():
    """The compiled program (and with it the compile time) does not grow with the micro-steps: one
    micro-step body in a loop. Counted in HLO instructions of the optimised module."""

    def instructions(num_micro: int) -> int:
        text = compiled_step(DEVICES * num_micro, 1).train_step.as_text()
        return sum(" = " in line for line in text.splitlines())

    two, sixty_four = instructions(2), instructions(64)
    assert sixty_four <= 1.05 * two, (two, sixty_four)


def test_auto_takes_the_largest_micro_batch_that_fits():
    """Per-device share 32: "auto" with room for the 8-example step but not the 16-example one
    takes 8 (4 micro-steps); with room for everything, the whole share in one step."""
    batch = DEVICES * 32
    need = {n: microbatch_memory(batch, n) for n in (32, 16, 8)}
    assert need[32] > need[16] > need[8]
    room = (need[8] + need[16]) // 2
    fitted = compiled_step(batch, "auto", available=room)
    assert (fitted.micro_size, fitted.num_micro) == (8, 4)
    whole = compiled_step(batch, "auto")
    assert (whole.micro_size, whole.num_micro) == (32, 1)


def microbatch_memory(batch: int, micro: int) -> int:
    """The step's memory as fit_train_step counts it, from XLA's analysis and the batch's bytes."""
    step = compiled_step(batch, micro).train_step
    analysis = step.memory_analysis()
    per_device = (
        2 * analysis.temp_size_in_bytes  # the last execution's and the next one's
        + analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    input_batches = 2 * batch * (SIZE * SIZE * 4 + 4)  # float32 one-channel images, int32 labels
    return DEVICES * per_device + input_batches


def test_a_step_that_does_not_fit_names_a_micro_batch_that_does():
    batch = DEVICES * 32
    need = {n: microbatch_memory(batch, n) for n in (32, 16)}
    with pytest.raises(ValueError, match=r"with 32 examples per device per micro-step.*microbatch_size=16 should fit"):
        compiled_step(batch, 0, available=(need[16] + need[32]) // 2)
    with pytest.raises(ValueError, match=r"no micro-batch fits"):
        compiled_step(batch, "auto", available=1 << 20)


def test_the_noise_probe_is_compiled_with_the_step_and_counted_in_its_memory():
    """A run of one micro-step measures the noise scale with a probe (two gradients of the
    micro-step, noise_scale_every_steps apart): fit_train_step compiles it with the step and counts
    its memory. With room for the step but not the probe, "auto" takes two micro-steps (whose
    gradients measure it without a probe) and a fixed microbatch_size is refused, naming the probe."""
    batch = DEVICES * 32
    setup = compiled_step(batch, 32)
    assert setup.num_micro == 1 and setup.noise.probes and setup.noise_probe is not None
    step_need = microbatch_memory(batch, 32)
    input_batches = 2 * batch * (SIZE * SIZE * 4 + 4)
    probe_need = DEVICES * program_bytes(setup.noise_probe.memory_analysis()) + input_batches
    assert probe_need > step_need, (probe_need, step_need)  # two batches and two gradients
    room = (step_need + probe_need) // 2
    fitted = compiled_step(batch, "auto", available=room)
    assert (fitted.micro_size, fitted.num_micro, fitted.noise_probe) == (16, 2, None)
    with pytest.raises(
        ValueError, match=r"the noise-scale probe .* needs .* microbatch_size=16 should fit .*noise_scale=False"
    ):
        compiled_step(batch, 32, available=room)


def fed_memory(batch: int, micro: int) -> int:
    """The memory of the host-fed step as fit_train_step counts it: the larger of its micro-step
    (train state, gradient sum, one micro-batch) and its update, plus two micro-batches the input
    pipeline holds."""
    step = compiled_step(batch, micro, loop="host").train_step
    micro_bytes = batch // (batch // DEVICES // micro) * (SIZE * SIZE * 4 + 4)
    return max(DEVICES * program_bytes(c.memory_analysis()) for c in (step.micro, step.finish)) + 2 * micro_bytes


def program_bytes(analysis) -> int:
    return (
        2 * analysis.temp_size_in_bytes  # the last execution's and the next one's
        + analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def test_a_batch_larger_than_memory_is_fed_from_the_host():
    """Per-device share 4,096 of 32x32 float32 images: the global batch alone (64 MiB, and the next
    one beside it) does not fit in 48 MiB, so no compiled step fits; "auto" feeds micro-batches from
    the host, the largest whose step fits, and evaluates in micro-batch-sized batches."""
    batch, room = DEVICES * 4096, 48 << 20
    assert 2 * batch * SIZE * SIZE * 4 > room  # hand count: this batch and the next
    fitted = compiled_step(batch, "auto", available=room)
    assert fitted.fed and fitted.num_micro * fitted.micro_size == 4096
    assert fed_memory(batch, fitted.micro_size) <= room < fed_memory(batch, 2 * fitted.micro_size)
    # The micro-step's arguments hold one micro-batch, not the batch.
    arguments = fitted.train_step.micro.memory_analysis().argument_size_in_bytes
    assert arguments < fitted.micro_size * SIZE * SIZE * 4 + (4 << 20), arguments


def test_evaluation_takes_micro_batch_sized_batches():
    """Without eval_batch_size, a run of 4 micro-steps evaluates in batches of a quarter of its
    global batch (synthetic data: the pipeline's batches are the evaluated ones)."""
    config = demo.get_config()
    config.update(dataset="synthetic", batch_size=DEVICES * 64, microbatch_size=16, eval_batch_size=0, num_classes=10)
    setup = compile_step.fit_train_step(run_setup.prepare(config), ENOUGH)
    assert setup.num_micro == 4 and not setup.fed
    assert next(setup.data.eval_batches())["image"].shape[0] == DEVICES * 16
    config.microbatch_loop = "host"
    fed = compile_step.fit_train_step(run_setup.prepare(config), ENOUGH)
    assert fed.fed and next(fed.data.eval_batches())["image"].shape[0] == DEVICES * 16


def test_micro_batch_sizes_hold_whole_ghost_batches():
    assert microbatch.candidates(12, None) == [12, 6, 4, 3, 2, 1]
    assert microbatch.candidates(256, 64) == [256, 128, 64]


def test_loop_kind_keeps_xla_convolutions_out_of_loops_on_cpu():
    assert microbatch.loop_kind("auto", "onednn", "cpu") == "scan"
    assert microbatch.loop_kind("auto", "xla", "cpu") == "unroll"
    assert microbatch.loop_kind("auto", "lax", "gpu") == "scan"
    assert microbatch.loop_kind("unroll", "onednn", "cpu") == "unroll"
    assert microbatch.loop_kind("host", "xla", "cpu") == "unroll"  # the notebook's step_gradient


def memory_cgroup(limit: int) -> pathlib.Path | None:
    """A new memory cgroup below this process's, limited to `limit` bytes (cgroup v1 or v2), or None
    where this machine does not let the tests make one."""
    for line in pathlib.Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "memory":
            parent, limit_file = pathlib.Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "memory.limit_in_bytes"
        elif controllers == "" and "memory" in pathlib.Path("/sys/fs/cgroup/cgroup.controllers").read_text():
            parent, limit_file = pathlib.Path("/sys/fs/cgroup") / path.lstrip("/"), "memory.max"
        else:
            continue
        group = parent / f"largebatch_test_{os.getpid()}"
        try:
            group.mkdir()
            (group / limit_file).write_text(str(limit))
            return group
        except OSError:
            return None
    return None


@pytest.mark.slow
def test_auto_fits_the_step_under_a_memory_cgroup(tmp_path):
    """main.py in a 4 GiB memory cgroup (as a container or a SLURM job limits it): CIFAR ResNet-8 at
    batch 16,384 needs ~14 GiB of temporaries in one step; "auto" takes a micro-batch that fits the
    cgroup's room, logs it, and trains a step there."""
    limit = 4 << 30
    group = memory_cgroup(limit)
    if group is None:
        pytest.skip("this machine does not let the tests make a memory cgroup (no writable cgroup fs)")
    try:
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        command = [sys.executable, "main.py", "--config=configs/cifar10_lars.py", "--config.dataset=synthetic",
                   "--config.model=cifar_resnet8", "--config.batch_size=16384", "--config.microbatch_size=auto",
                   "--config.num_train_steps=1", "--config.eval_batch_size=1000",
                   f"--workdir={tmp_path / 'run'}"]  # fmt: skip
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                              preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())))  # fmt: skip
    finally:
        group.rmdir()
    assert done.returncode == 0, done.stderr[-3000:]
    chosen = re.search(r"microbatch_size=auto: (\d+) examples per device per micro-step \((\d+) micro-steps\); "
                       r"the step needs ([\d.]+) GiB of ([\d.]+) GiB", done.stderr)  # fmt: skip
    assert chosen, done.stderr[-3000:]
    micro, steps, need, room = int(chosen[1]), int(chosen[2]), float(chosen[3]), float(chosen[4])
    assert micro * steps == 16384 and 16384 % micro == 0 and steps > 1
    assert need <= room <= limit / 2**30  # the room is the cgroup's, not the machine's
