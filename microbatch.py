"""Micro-batches: a global batch split into micro-steps whose gradients are summed before one update.

In the compiled step, each micro-batch takes its rows from every device's own share (no
communication). The micro-steps run as a `lax.scan` over one compiled micro-step, so the
step's memory and compile time do not grow with their number; XLA:CPU's own convolutions
run ~30x slower inside a loop, so with `conv_impl` "xla" or "lax" on CPU the micro-steps are
unrolled instead (straight-line code: memory grows with the number of micro-steps there).

When the global batch itself does not fit in memory (ImageNet's 32K batch is ~19 GiB of
float32 images), the host feeds it micro-batch by micro-batch ("host"): one compiled
micro-step adds a micro-batch's gradient to a running sum, and one compiled update applies
the mean. The input pipeline then yields micro-batches (consecutive examples of its stream,
so every step trains on the same examples as a compiled step of the whole batch would).
`microbatch_loop` overrides the choice; "auto" feeds from the host only when the compiled
step does not fit.

`microbatch_size="auto"` picks, among `candidates`, the largest micro-batch whose compiled
step (`StepMemory`) fits in the memory this process may use (train.fit_train_step); main.py
reports a step that does not fit in one `error:` line before it runs.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

LOOPS = ("auto", "scan", "unroll", "host")
AUTO = "auto"
FED = "host"  # micro-batches fed one at a time from the host
# Batches the input pipeline holds in host memory beside the step's own: the next one, ready,
# and one it assembles (Data prefetches one batch when fed from the host; SyntheticData cycles two).
INPUT_BATCHES = 2
# Buffers of XLA's temporaries the process may hold at once: XLA:CPU can allocate the next
# execution's before it has freed the last one's (a fed AlexNet-BN micro-step of 2,048 took a
# second 8 GiB buffer in main.py, bench/RESULTS.md).
TEMPORARY_BUFFERS = 2


def loop_kind(requested: str, impl: str, backend: str) -> str:
    """The loop of micro-steps inside a compiled step, "scan" or "unroll": `requested`, or
    otherwise what is fast with the convolutions `impl`."""
    if requested in ("scan", "unroll"):
        return requested
    return "unroll" if backend == "cpu" and impl in ("xla", "lax") else "scan"


def split(batch, mesh: Mesh, num_micro: int):
    """[B, ...] -> [num_micro, B / num_micro, ...], each micro-batch taking its rows from every
    device's own share, so the split needs no communication."""
    num_devices = mesh.size
    sharding = NamedSharding(mesh, P(None, "data"))

    def split_one(x):
        per_device = x.shape[0] // num_devices
        x = x.reshape((num_devices, num_micro, per_device // num_micro) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        x = x.reshape((num_micro, x.shape[1] * x.shape[2]) + x.shape[3:])
        return jax.lax.with_sharding_constraint(x, sharding)

    return jax.tree.map(split_one, batch)


def accumulate(micro_step, init, micro_batches, num_micro: int, kind: str):
    """Runs micro_step(carry, (micro_batch, index)) -> (carry, None) over the micro-batches.

    Args:
      micro_step: one micro-step, lax.scan's body.
      init: the carry before the first micro-step.
      micro_batches: from `split` (leading axis: the micro-step).
      num_micro: the number of micro-steps; 1 runs the body once on the whole batch, no loop.
      kind: "scan" or "unroll" (`loop_kind`).

    Returns:
      The carry after the last micro-step.
    """
    if num_micro == 1:
        return micro_step(init, (jax.tree.map(lambda x: x[0], micro_batches), 0))[0]
    if kind == "scan":
        return jax.lax.scan(micro_step, init, (micro_batches, jnp.arange(num_micro)))[0]
    carry = init
    for i in range(num_micro):
        carry, _ = micro_step(carry, (jax.tree.map(lambda x, i=i: x[i], micro_batches), i))
    return carry


def candidates(per_device: int, ghost: int | None) -> list[int]:
    """Micro-batch sizes for "auto", largest first: divisors of the per-device share that hold
    whole BatchNorm ghost batches (every divisor when BatchNorm groups by device or globally)."""
    sizes = [n for n in range(per_device, 0, -1) if per_device % n == 0]
    return [n for n in sizes if not ghost or n % ghost == 0]


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """What a training step holds at once on this process, in bytes: XLA's memory analysis of
    the compiled step, summed over this process's devices, and the batches the input pipeline
    holds in host memory while the step runs (`INPUT_BATCHES`)."""

    temporaries: int
    arguments: int  # the train state and the batch (fed: and the gradient sum)
    outputs: int
    aliased: int  # outputs written into donated arguments (the new train state)
    batch: int  # the bytes of one batch (fed: one micro-batch), also among the arguments
    fed: bool = False  # the batch is a micro-batch fed from the host
    # The noise-scale probe a step of one micro-step runs every noise_scale_every_steps (two
    # gradients of the micro-step, this batch and the next among its arguments), or None.
    probe: "StepMemory | None" = None

    @property
    def input(self) -> int:
        return INPUT_BATCHES * self.batch

    @property
    def own(self) -> int:
        """This program's bytes, without the probe's."""
        held = TEMPORARY_BUFFERS * self.temporaries
        return held + self.arguments + self.outputs - self.aliased + self.input

    @property
    def total(self) -> int:
        """The step's bytes, or the probe's where it needs more."""
        return max(self.own, self.probe.own if self.probe else 0)

    @classmethod
    def of(cls, compiled, local_devices: int, batch_bytes: int, fed: bool = False) -> "StepMemory":
        """The memory of a `jax.jit(...).lower(...).compile()` result (XLA reports one device's)
        whose batch takes `batch_bytes` in this process."""
        analysis = compiled.memory_analysis()
        return cls(
            temporaries=analysis.temp_size_in_bytes * local_devices,
            arguments=analysis.argument_size_in_bytes * local_devices,
            outputs=analysis.output_size_in_bytes * local_devices,
            aliased=analysis.alias_size_in_bytes * local_devices,
            batch=batch_bytes,
            fed=fed,
        )

    def estimate(self, fraction: float) -> float:
        """The total with a micro-batch `fraction` times this one's: XLA's temporaries scale with
        it, and so do the fed batch and the pipeline's (a compiled step holds the whole batch).
        Several micro-steps measure the noise scale without a probe: the step's own bytes."""
        scaling = TEMPORARY_BUFFERS * self.temporaries + (self.batch + self.input if self.fed else 0)
        return self.own - scaling * (1 - fraction)

    def describe(self) -> str:
        """e.g. "the train step needs 1.20 GiB (temporaries 2 x ..., ...)"."""
        if self.probe and self.probe.own > self.own:
            return f"the noise-scale probe (two gradients of a micro-step) needs {self.probe._figures()}"
        return f"the train step needs {self._figures()}"

    def _figures(self) -> str:
        return (
            f"{gb(self.own)} (temporaries {TEMPORARY_BUFFERS} x {gb(self.temporaries)}, "
            f"train state and batch {gb(self.arguments)}, input pipeline {gb(self.input)})"
        )


def gb(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"
