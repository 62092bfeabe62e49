"""The train step compiled for a run's shapes, checked against the memory this process may use
(`fit_train_step`, which also picks microbatch_size="auto" and host-fed micro-batches), and the
notebook's `step_gradient`."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import host_memory
import input_pipeline
import microbatch
import run_setup
import steps
from run_setup import Setup
from steps import FedStep, TrainState, on_mesh


def jit_train_step(setup: Setup):
    """The jitted train step of the training loop: (state, batch, key) -> (state, metrics); donates the state."""
    step = steps.make_train_step(
        _loss_fn(setup),
        setup.optimizer,
        setup.schedule,
        setup.config.batch_size,
        setup.mesh,
        setup.num_micro,
        run_setup.loop_kind(setup.config),
        setup.noise,
    )
    return jax.jit(on_mesh(step, setup.mesh), donate_argnums=0)


def jit_noise_probe(setup: Setup):
    """The jitted noise-scale probe of runs of one micro-step (steps.make_noise_probe):
    (state, batch, next_batch, key) -> the state's noise-scale averages after the probe."""
    probe = steps.make_noise_probe(_loss_fn(setup), setup.optimizer, setup.config.batch_size, setup.noise)
    return jax.jit(on_mesh(probe, setup.mesh))


def _loss_fn(setup: Setup):
    return steps.make_loss_fn(setup.model, setup.config, setup.num_classes)


def fit_train_step(setup: Setup, available: int | None = None) -> Setup:
    """Compiles the train step for the run's shapes and checks that it fits in this process's memory.

    With microbatch_size="auto", picks the largest micro-batch (a divisor of the per-device
    share, whole ghost batches) whose step fits, and logs it. With microbatch_loop="auto", a
    global batch that does not fit in one compiled step is fed from the host micro-batch by
    micro-batch (`FedStep`), and evaluation then takes micro-batch-sized batches unless
    eval_batch_size says otherwise.

    Args:
      setup: from `prepare`.
      available: bytes the step may use; default: what this process may still allocate
        (host_memory.available_bytes), the least over all processes.

    Returns:
      `setup` with `train_step` compiled (and, for "auto", its model and micro-steps).
    Raises:
      ValueError: the step does not fit; the message gives its memory and a microbatch_size that fits.
    """
    config = setup.config
    if available is None:
        available = host_memory.available_bytes()
        if jax.process_count() > 1:  # every process compiles the same step
            # In MiB: JAX gathers 32-bit integers unless x64 is on, and bytes pass 2**31.
            mib = multihost_utils.process_allgather(np.int32(available // 2**20))
            available = int(np.min(mib)) * 2**20
    auto = config.microbatch_size == microbatch.AUTO
    feeds = {microbatch.AUTO: (False, True), microbatch.FED: (True,)}.get(config.microbatch_loop, (False,))
    for fed in feeds:
        fitted, memory = _compiled(setup, _micro_sizes(setup)[0] if auto else setup.micro_size, fed, available)
        while auto and memory.total > available:
            smaller = _smaller_that_fit(fitted, memory, available)
            if not smaller:
                break
            fitted, memory = _compiled(setup, smaller[0], fed, available)
        if memory.total <= available:
            break
    else:
        raise ValueError(_too_big(fitted, memory, available))
    if auto or fed != feeds[0]:
        logging.info(
            "microbatch_size=%s: %d examples per device per micro-step (%d micro-steps%s); the step needs %s of %s.",
            config.microbatch_size,
            fitted.micro_size,
            fitted.num_micro,
            ", fed from the host: the global batch does not fit in memory at once" if fed else "",
            microbatch.gb(memory.total),
            microbatch.gb(available),
        )
    if fitted.fed and fitted.data is not None:
        fitted.data.micro_batch_rows(fitted.num_micro)  # the pipeline can cut its batches
    return _with_eval_batch(fitted)


def _with_eval_batch(setup: Setup) -> Setup:
    """Without an eval_batch_size, a micro-stepped run evaluates in batches of one micro-step's
    global size: a forward pass over the whole global batch may not fit where its step does."""
    if setup.config.eval_batch_size or setup.num_micro == 1 or setup.data is None:
        return setup
    rows = setup.config.batch_size // setup.num_micro // jax.process_count()
    return dataclasses.replace(setup, data=dataclasses.replace(setup.data, local_eval_batch=rows))


def _compiled(setup: Setup, micro: int, fed: bool, available: int) -> tuple[Setup, "microbatch.StepMemory"]:
    """`setup` with `micro` examples per device per micro-step, its train step compiled (fed from
    the host or not), and its memory; where the step fits in `available` and the run probes the
    noise scale (one micro-step), the probe compiled too and its memory counted beside the step's."""
    per_device = setup.config.batch_size // setup.mesh.size
    model = run_setup.create_model(setup.config, setup.num_classes, run_setup.bn_group_size(setup.config, micro))
    setup = dataclasses.replace(setup, model=model, num_micro=per_device // micro)
    rows = setup.config.batch_size // setup.num_micro if fed else setup.config.batch_size
    batch = _abstract_batch(setup, rows)
    local_devices = len(setup.mesh.local_devices)
    batch_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in batch.values()) // jax.process_count()
    state, key = run_setup.abstract_state(setup), jax.random.key(0)
    if fed:
        setup, memory = _fed_step(setup, state, batch, key, batch_bytes)
    else:
        compiled = jit_train_step(setup).lower(state, batch, key).compile()
        setup = dataclasses.replace(setup, train_step=compiled)
        memory = microbatch.StepMemory.of(compiled, local_devices, batch_bytes)
    if memory.total > available or not setup.noise.probes_within(setup.steps.total):
        return setup, memory
    probe = jit_noise_probe(setup).lower(state, batch, batch, key).compile()
    memory = dataclasses.replace(memory, probe=microbatch.StepMemory.of(probe, local_devices, batch_bytes))
    return dataclasses.replace(setup, noise_probe=probe), memory


def _fed_step(setup: Setup, state, batch: dict, key, batch_bytes: int) -> tuple[Setup, "microbatch.StepMemory"]:
    """`setup` with its train step compiled as a FedStep of `batch`-sized micro-batches, and its memory."""
    start, micro_fn, finish = steps.make_fed_step_fns(
        _loss_fn(setup), setup.optimizer, setup.schedule, setup.config.batch_size, setup.num_micro, setup.noise
    )
    replicated = NamedSharding(setup.mesh, P())
    carry = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), jax.eval_shape(start, state)
    )
    start = jax.jit(start).lower(state).compile()
    micro_fn = jax.jit(on_mesh(micro_fn, setup.mesh), donate_argnums=1)
    micro_fn = micro_fn.lower(state, carry, batch, key, jax.ShapeDtypeStruct([], jnp.int32)).compile()
    finish = jax.jit(on_mesh(finish, setup.mesh), donate_argnums=0).lower(state, carry).compile()
    local_devices = len(setup.mesh.local_devices)
    memory = max(
        (microbatch.StepMemory.of(c, local_devices, batch_bytes, fed=True) for c in (micro_fn, finish)),
        key=lambda m: m.total,
    )
    return dataclasses.replace(setup, train_step=FedStep(start, micro_fn, finish, setup.num_micro)), memory


def _abstract_batch(setup: Setup, rows: int) -> dict:
    """The shapes of a global training batch of `rows` examples, sharded over "data"."""
    sharding = NamedSharding(setup.mesh, P("data"))
    image_shape = (rows, setup.image_size, setup.image_size, setup.channels)
    return {
        "image": jax.ShapeDtypeStruct(image_shape, jnp.float32, sharding=sharding),
        "label": jax.ShapeDtypeStruct(image_shape[:1], jnp.int32, sharding=sharding),
    }


def _micro_sizes(setup: Setup) -> list[int]:
    """The micro-batch sizes the run could take, largest first (whole ghost batches with a ghost bn_group)."""
    per_device = setup.config.batch_size // setup.mesh.size
    ghost = None if setup.config.bn_group in ("device", "global") else run_setup.bn_group_size(setup.config, per_device)
    return microbatch.candidates(per_device, ghost)


def _smaller_that_fit(setup: Setup, memory: "microbatch.StepMemory", available: int) -> list[int]:
    """Smaller micro-batch sizes whose step should fit (`StepMemory.estimate`)."""
    micro = setup.micro_size
    return [n for n in _micro_sizes(setup) if n < micro and memory.estimate(n / micro) <= available]


def _too_big(setup: Setup, memory: "microbatch.StepMemory", available: int) -> str:
    fitting = _smaller_that_fit(setup, memory, available)
    hint = (
        f"microbatch_size={fitting[0]} should fit (or 'auto')"
        if fitting
        else "no micro-batch fits (the train state and the batch alone do not): use a smaller batch_size or more "
        "processes"
    )
    fed = ", fed from the host" if memory.fed else ""
    return (
        f"{memory.describe()} with {setup.micro_size} examples per device per micro-step{fed}, "
        f"but this process may use {microbatch.gb(available)}; {hint}"
        + (", or noise_scale=False." if memory.probe and memory.probe.own > memory.own else ".")
    )


def step_gradient(setup: Setup, state: TrainState, batch: dict):
    """The gradient the training step computes for `batch` at `state` (same micro-steps, same dropout key).

    Args:
      setup: from `prepare` or `restore_state`.
      state: the train state.
      batch: one global batch, NumPy rows of this process ({"image", "label"}).

    Returns:
      The gradient pytree (mean over the global batch).
    """
    fn = steps.make_grad_fn(_loss_fn(setup), setup.mesh, setup.num_micro, run_setup.loop_kind(setup.config))
    sharding = NamedSharding(setup.mesh, P("data"))
    key = jax.random.key(setup.config.seed + 1)
    return jax.jit(on_mesh(fn, setup.mesh))(state, input_pipeline.to_global(batch, sharding), key)[0]
