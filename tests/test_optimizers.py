"""optimizers.py: LAMB and momentum SGD against NumPy, the schedules by hand, the factory from a config."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from test_lars import STEPS, gradient, numpy_schedule, random_params

import optimizers
from configs import default


def test_lamb_matches_numpy_reference():
    b1, b2, eps, wd, lr = 0.9, 0.999, 1e-6, 1e-2, 1e-2
    params = random_params()
    m = {k: {n: np.zeros_like(w) for n, w in v.items()} for k, v in params.items()}
    s = {k: {n: np.zeros_like(w) for n, w in v.items()} for k, v in params.items()}
    expected = {k: {n: w.copy() for n, w in v.items()} for k, v in params.items()}
    for t in range(1, 6):
        grads = gradient(expected, t)
        for layer, leaves in expected.items():
            for name, w in leaves.items():
                g = grads[layer][name]
                m[layer][name] = b1 * m[layer][name] + (1 - b1) * g
                s[layer][name] = b2 * s[layer][name] + (1 - b2) * g**2
                adam = (m[layer][name] / (1 - b1**t)) / (np.sqrt(s[layer][name] / (1 - b2**t)) + eps)
                if w.ndim <= 1:
                    step = adam
                else:
                    u = adam + wd * w
                    step = np.linalg.norm(w) / np.linalg.norm(u) * u
                expected[layer][name] = w - lr * step
    with jax.enable_x64(True):
        optimizer = optimizers.lamb(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
        state = optimizer.init(jax.tree.map(jnp.asarray, params))
        got = jax.tree.map(jnp.asarray, params)
        for t in range(1, 6):
            updates, state = optimizer.update(jax.tree.map(jnp.asarray, gradient(jax.device_get(got), t)), state, got)
            got = optax.apply_updates(got, updates)
        got = jax.device_get(got)
    for layer, leaves in expected.items():
        for name, want in leaves.items():
            np.testing.assert_allclose(got[layer][name], want, rtol=1e-6)


def test_momentum_sgd_decays_kernels_only():
    params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
    grads = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    optimizer = optimizers.momentum_sgd(0.1, momentum=0.9, weight_decay=0.5)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * (1 + 0.5 * 2), rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], -0.1, rtol=1e-6)


def test_warmup_poly_equals_numpy_schedule():
    schedule = optimizers.warmup_poly_schedule(2.0, STEPS, warmup_steps=5, end_lr=1e-4)
    np.testing.assert_allclose(
        [float(schedule(t)) for t in range(STEPS + 1)],
        [numpy_schedule(t) for t in range(STEPS + 1)],
        rtol=1e-6,
        atol=1e-7,
    )


def test_schedules_by_hand():
    poly = optimizers.warmup_poly_schedule(10.0, total_steps=100, warmup_steps=20, end_lr=1e-4)
    assert float(poly(0)) == 0.0
    np.testing.assert_allclose(float(poly(10)), 5.0, rtol=1e-6)
    np.testing.assert_allclose(float(poly(20)), 10.0, rtol=1e-6)
    np.testing.assert_allclose(float(poly(60)), 1e-4 + (10 - 1e-4) * 0.25, rtol=1e-6)
    np.testing.assert_allclose(float(poly(100)), 1e-4, rtol=1e-5)
    step = optimizers.goyal_schedule(3.2, warmup_steps=5, boundaries=[30, 60, 80])
    np.testing.assert_allclose(
        [float(step(t)) for t in (0, 5, 29, 30, 59, 60, 80)], [0, 3.2, 3.2, 0.32, 0.32, 0.032, 0.0032], rtol=1e-5
    )
    cosine = optimizers.warmup_cosine_schedule(1.0, total_steps=110, warmup_steps=10)
    np.testing.assert_allclose([float(cosine(t)) for t in (5, 10, 60, 110)], [0.5, 1.0, 0.5, 0.0], atol=1e-6)


def test_create_from_config_and_reject_unknown_names():
    config = ml_collections.ConfigDict(default.get_config())
    config.update(optimizer="sgd", learning_rate=0.1, weight_decay=0.5, momentum=0.9, exclude="ndim<=1")
    schedule = optimizers.create_schedule(config, total_steps=100, warmup_steps=0, decay_boundaries=())
    params = {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}
    grads = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    optimizer = optimizers.create_optimizer(config, schedule)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    # poly(2) at step 0 without warmup: the peak LR 0.1; kernels decayed, biases not.
    np.testing.assert_allclose(updates["kernel"], -0.1 * (1 + 0.5 * 2), rtol=1e-6)
    np.testing.assert_allclose(updates["bias"], -0.1, rtol=1e-6)
    config.optimizer = "adamw"
    with pytest.raises(ValueError, match=r"Unknown optimizer 'adamw'; choose from \('lars', 'sgd', 'lamb'\)"):
        optimizers.create_optimizer(config, schedule)
    config.lr_schedule = "exp"
    with pytest.raises(ValueError, match=r"Unknown lr_schedule 'exp'; choose from \('poly', 'step', 'cosine'\)"):
        optimizers.create_schedule(config, 100, 0, ())
