"""Least squares on Gaussian inputs, whose gradient noise is known in closed form
(../shared/notes/noise_scale_reference.md), trained by the project's own steps.

Loss 1/2 (w.x - y)^2, x ~ N(0, I_d), y = w*.x + e, e ~ N(0, s^2). With a = w - w*, the
per-example gradient is (a.x - e) x, so G = a and tr(Sigma) = (d + 1)|a|^2 + s^2 d; on a block
l of the parameters, G_l = a_l and tr(Sigma_l) = d_l |a|^2 + |a_l|^2 + s^2 d_l. The parameters
are two tensors, "a" (LARS, trust ratio ~eta / beta) and "b" (excluded: ratio 1), and the
learning rate is zero, so every step measures at the same parameters.

`measure` runs the training step (steps.make_train_step, its FedStep, or the noise probe of
runs of one micro-step) on fresh batches and returns the logged figures (noise_scale.scalars
and layer_scalars). Run as a script, it is one process of a jax.distributed job on localhost
and prints process 0's figures as JSON.
"""

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import input_pipeline  # noqa: E402
import lars  # noqa: E402
import noise_scale  # noqa: E402
import steps  # noqa: E402

DIM, DIM_A = 64, 32  # d, and the size of the LARS tensor "a" (the rest is "b")
LABEL_NOISE = 1.0  # s
ETA, BETA = 100.0, 1000.0  # trust coefficient and weight decay: tensor a's trust ratio is ~0.1


def parameters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(w*, w) in float64, with |w - w*| = 1."""
    rng = np.random.default_rng(seed)
    w_star = rng.normal(size=DIM)
    a = rng.normal(size=DIM)
    return w_star, w_star + a / np.linalg.norm(a)


def exact(w_star: np.ndarray, w: np.ndarray, batch_size: int) -> dict[str, float]:
    """The figures the logs must converge to: noise_scale.scalars' and per tensor."""
    a = w - w_star
    blocks = {"a": a[:DIM_A], "b": a[DIM_A:]}
    grad_sq = {k: float(v @ v) for k, v in blocks.items()}
    trace = {k: len(v) * float(a @ a) + float(v @ v) + LABEL_NOISE**2 * len(v) for k, v in blocks.items()}
    # Tensor a's trust ratio eta |w_a| / (|g_a| + beta |w_a|), at the batch gradient's mean norm.
    w_a = np.linalg.norm(w[:DIM_A])
    ratio = ETA * w_a / (np.sqrt(grad_sq["a"] + trace["a"] / batch_size) + BETA * w_a)
    weights = {"a": ratio**2, "b": 1.0}
    figures = {
        "grad_sq_true": sum(grad_sq.values()),
        "grad_cov_trace": sum(trace.values()),
        "grad_sq_true_lars": sum(weights[k] * grad_sq[k] for k in blocks),
        "grad_cov_trace_lars": sum(weights[k] * trace[k] for k in blocks),
    }
    figures["grad_noise_scale"] = figures["grad_cov_trace"] / figures["grad_sq_true"]
    figures["grad_noise_scale_lars"] = figures["grad_cov_trace_lars"] / figures["grad_sq_true_lars"]
    layers = {k: {"grad_sq_true": grad_sq[k], "grad_cov_trace": trace[k]} for k in blocks}
    return figures | {"layers": layers}


def loss_fn(params, batch_stats, x, y, key):
    """steps.make_loss_fn's signature: mean 1/2 (w.x - y)^2, no BatchNorm, no logits to score."""
    w = jnp.concatenate([params["a"], params["b"]])
    loss = jnp.mean(0.5 * jnp.square(x @ w - y))
    return loss, (batch_stats, jnp.zeros((x.shape[0], 1)))


def batches(w_star: np.ndarray, batch_size: int, seed: int):
    """Fresh global batches {"image": x, "label": y} (float32), the same in every process."""
    rng = np.random.default_rng(seed)
    while True:
        x = rng.normal(size=(batch_size, DIM))
        y = x @ w_star + LABEL_NOISE * rng.normal(size=batch_size)
        yield {"image": x.astype(np.float32), "label": y.astype(np.float32)}


def measure(
    mesh: Mesh, batch_size: int, num_micro: int, count: int, *, layout: str = "compiled", seed: int = 1
) -> dict:
    """The logged figures after `count` measurements at fixed parameters.

    Args:
      mesh: the devices (of every process), axis "data".
      batch_size: the global batch.
      num_micro: micro-steps per step (1: the probe measures, on this batch and the next).
      count: measurements (steps), averaged over a window of `count` steps.
      layout: "compiled" (the jitted step, micro-steps in a scan) or "fed" (steps.FedStep:
        micro-batches fed from the host).
      seed: the batches' seed.
    """
    w_star, w = parameters()
    params = {"a": jnp.asarray(w[:DIM_A], jnp.float32), "b": jnp.asarray(w[DIM_A:], jnp.float32)}
    schedule = optax.constant_schedule(0.0)
    optimizer = lars.lars(schedule, weight_decay=BETA, trust_coefficient=ETA, exclude=["^b$"])
    noise = noise_scale.Settings(enabled=True, probe_every=0 if num_micro > 1 else 1, decay=1.0 - 1.0 / count)
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(
        steps.TrainState(jnp.zeros([], jnp.int32), params, {}, optimizer.init(params), noise_scale.init(params)),
        replicated,
    )
    rows = NamedSharding(mesh, P("data"))
    key = jax.random.key(0)
    stream = _local_rows(batches(w_star, batch_size, seed))
    if layout == "fed":
        start, micro, finish = steps.make_fed_step_fns(loss_fn, optimizer, schedule, batch_size, num_micro, noise)
        step = steps.FedStep(jax.jit(start), jax.jit(micro, donate_argnums=1), jax.jit(finish), num_micro)
        micro_batches = (input_pipeline.to_global(b, rows) for b in _micro_batches(stream, num_micro))
        for _ in range(count):
            state, _ = jax.block_until_ready(step(state, micro_batches, key))
    else:
        step = jax.jit(steps.make_train_step(loss_fn, optimizer, schedule, batch_size, mesh, num_micro, "scan", noise))
        probe = jax.jit(steps.make_noise_probe(loss_fn, optimizer, batch_size, noise)) if num_micro == 1 else None
        global_batches = (input_pipeline.to_global(b, rows) for b in stream)
        batch = next(global_batches)
        for _ in range(count):
            following = next(global_batches)
            if probe is not None:
                state = state.replace(noise_scale=jax.block_until_ready(probe(state, batch, following, key)))
            # One program at a time, as in the training loop: XLA:CPU's in-process all-reduce
            # waits for every device's thread, and many queued programs can take them all.
            state, _ = jax.block_until_ready(step(state, batch, key))
            batch = following
    assert np.array_equal(np.concatenate([state.params["a"], state.params["b"]]), w.astype(np.float32))
    averages = jax.device_get(state.noise_scale)
    return noise_scale.scalars(averages, lars=True) | {"layers": noise_scale.layer_scalars(averages)}


def _local_rows(stream):
    """This process's rows of each global batch (consecutive, as input_pipeline gives them)."""
    for batch in stream:
        rows = len(batch["label"]) // jax.process_count()
        yield {k: v[jax.process_index() * rows : (jax.process_index() + 1) * rows] for k, v in batch.items()}


def _micro_batches(stream, num_micro: int):
    """Each batch's rows as `num_micro` consecutive micro-batches, as the pipeline feeds a FedStep."""
    for batch in stream:
        rows = len(batch["label"]) // num_micro
        for i in range(num_micro):
            yield {k: v[i * rows : (i + 1) * rows] for k, v in batch.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--num_micro", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    args = parser.parse_args()
    import cluster

    cluster.start(args.coordinator, args.num_processes, args.process_id, heartbeat_timeout=60)
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    figures = measure(Mesh(np.asarray(devices), ("data",)), args.batch_size, args.num_micro, args.count)
    if jax.process_index() == 0:
        print(json.dumps(figures), flush=True)
    cluster.leave_together(timeout=60)  # process 0 hosts the runtime: it goes last


if __name__ == "__main__":
    main()
