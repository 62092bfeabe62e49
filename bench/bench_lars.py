"""Times one LARS update on the ResNet-50 parameter tree against optax peers.

    python -m bench.bench_lars [--repeats 50]

Prints milliseconds per update for lars.lars (paper formula, default
exclusions), optax.lars and optax.sgd(momentum), all jitted with donated
state, on the 161 real ResNet-50 leaf shapes (25,557,032 parameters), and the
ratios against optax.lars.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lars
import models


def resnet50_tree():
    shapes = models.init_shapes(models.create("resnet50", 1000), (1, 224, 224, 3))["params"]
    keys = jax.random.split(jax.random.key(0), len(jax.tree.leaves(shapes)))
    leaves = [jax.random.normal(k, s.shape, s.dtype) * 0.05 for k, s in zip(keys, jax.tree.leaves(shapes))]
    return jax.tree.unflatten(jax.tree.structure(shapes), leaves)


def time_update(optimizer, params, grads, repeats):
    state = optimizer.init(params)

    @jax.jit
    def step(params, state):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params, state = step(params, state)
    jax.block_until_ready(params)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        params, state = step(params, state)
        jax.block_until_ready(params)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    params = resnet50_tree()
    grads = jax.tree.map(lambda w: jnp.flip(w) * 0.1, params)
    n = sum(int(x.size) for x in jax.tree.leaves(params))
    print(f"ResNet-50 tree: {len(jax.tree.leaves(params))} tensors, {n:,} parameters, {jax.devices()[0].device_kind}")
    peers = {
        "lars.lars (paper)": lars.lars(0.1, weight_decay=5e-5),
        "lars.lars (optax formula)": lars.lars(0.1, weight_decay=5e-5, formula="optax"),
        "optax.lars": optax.lars(
            0.1, weight_decay=5e-5, weight_decay_mask=lars.lars_mask(), trust_ratio_mask=lars.lars_mask()
        ),
        "optax.sgd(momentum)": optax.sgd(0.1, momentum=0.9),
    }
    # Interleave the peers over rounds so drift in machine speed hits all alike.
    results = {name: [] for name in peers}
    for _ in range(3):
        for name, optimizer in peers.items():
            results[name].append(time_update(optimizer, params, grads, args.repeats))
    reference = min(results["optax.lars"])
    print(f"{'optimizer':28s} {'ms/update':>10s} {'vs optax.lars':>14s}")
    for name, times in results.items():
        print(f"{name:28s} {min(times):10.2f} {min(times) / reference:14.2f}")


if __name__ == "__main__":
    main()
