"""lars.py against an independent NumPy implementation of Algorithm 1 and optax."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lars
import trees

STEPS = 20
SHAPES = {
    "conv": {"kernel": (3, 3, 4, 8), "bias": (8,)},
    "bn": {"scale": (8,), "bias": (8,)},
    "dense": {"kernel": (32, 10), "bias": (10,)},
}


def random_params(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {
        layer: {name: rng.normal(size=shape).astype(dtype) for name, shape in leaves.items()}
        for layer, leaves in SHAPES.items()
    }


def gradient(params, t, seed=1):
    """A gradient that depends on the parameters (quadratic loss) plus noise."""
    out = {}
    for layer, leaves in params.items():
        out[layer] = {}
        for name, w in leaves.items():
            noise = np.random.default_rng([seed, t, hash(layer + name) % 1000]).normal(size=w.shape)
            out[layer][name] = (0.5 * np.asarray(w) + noise).astype(np.asarray(w).dtype)
    return out


def numpy_schedule(t, base_lr=2.0, warmup=5, total=STEPS, end=1e-4, power=2.0):
    if t < warmup:
        return base_lr * t / warmup
    return end + (base_lr - end) * (1 - (t - warmup) / (total - warmup)) ** power


def numpy_lars(params, *, momentum, nesterov, wd, eta, eps, formula, clip, excluded):
    """Algorithm 1 of arXiv:1708.03888, written out tensor by tensor."""
    params = {k: {n: w.copy() for n, w in v.items()} for k, v in params.items()}
    velocity = {k: {n: np.zeros_like(w) for n, w in v.items()} for k, v in params.items()}
    for t in range(STEPS):
        lr = numpy_schedule(t)
        grads = gradient(params, t)
        for layer, name in itertools.chain.from_iterable(
            [(layer, n) for n in leaves] for layer, leaves in params.items()
        ):
            w, g = params[layer][name], grads[layer][name]
            if excluded(layer, name, w):
                scaled = lr * g
            else:
                w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
                if formula == "paper":
                    denominator = g_norm + wd * w_norm + eps
                else:
                    denominator = np.linalg.norm(g + wd * w) + eps
                local = eta * w_norm / denominator if w_norm > 0 and g_norm > 0 else 1.0
                if clip:
                    local = min(local / lr, 1.0) if lr > 0 else 1.0
                scaled = lr * local * (g + wd * w)
            v = momentum * velocity[layer][name] + scaled
            velocity[layer][name] = v
            params[layer][name] = w - (momentum * v + scaled if nesterov else v)
    return params


def run_optax(optimizer, params, steps=STEPS):
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    for t in range(steps):
        grads = jax.tree.map(jnp.asarray, gradient(jax.device_get(params), t))
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def ndim_excluded(layer, name, w):
    return w.ndim <= 1


@pytest.mark.parametrize(
    "formula,nesterov,clip", list(itertools.product(["paper", "optax"], [False, True], [False, True]))
)
def test_matches_numpy_algorithm_1(formula, nesterov, clip):
    hyper = dict(momentum=0.9, nesterov=nesterov, wd=5e-4, eta=1e-3, eps=1e-9, formula=formula, clip=clip)
    # With clip the trust ratio must be large enough to be clipped sometimes.
    eta = 2.0 if clip else 1e-3
    hyper["eta"] = eta
    expected = numpy_lars(random_params(), excluded=ndim_excluded, **hyper)
    with jax.enable_x64(True):
        # optax evaluates schedules in float32; a float64 table of the same
        # warmup + poly schedule keeps this comparison about the optimizer.
        table = jnp.asarray([numpy_schedule(t) for t in range(STEPS + 1)], jnp.float64)
        schedule = lambda count: table[count]  # noqa: E731
        optimizer = lars.lars(
            schedule,
            momentum=0.9,
            nesterov=nesterov,
            weight_decay=5e-4,
            trust_coefficient=eta,
            eps=1e-9,
            formula=formula,
            clip=clip,
        )
        params = jax.tree.map(jnp.asarray, random_params())
        got, _ = run_optax(optimizer, params)
        got = jax.device_get(got)
    for layer, leaves in expected.items():
        for name, want in leaves.items():
            np.testing.assert_allclose(got[layer][name], want, rtol=1e-6, atol=1e-12)
    # The run must have moved the parameters, or the comparison says nothing.
    assert not np.allclose(expected["dense"]["kernel"], random_params()["dense"]["kernel"], rtol=1e-3)


def test_clip_changes_the_result():
    common = dict(momentum=0.9, nesterov=False, wd=5e-4, eta=2.0, eps=0.0, formula="paper")
    clipped = numpy_lars(random_params(), clip=True, excluded=ndim_excluded, **common)
    plain = numpy_lars(random_params(), clip=False, excluded=ndim_excluded, **common)
    assert not np.allclose(clipped["conv"]["kernel"], plain["conv"]["kernel"], rtol=1e-3)


def test_optax_formula_equals_optax_lars():
    schedule = optax.linear_schedule(0.5, 0.05, STEPS)
    ours = lars.lars(schedule, momentum=0.9, weight_decay=1e-3, trust_coefficient=1e-2, formula="optax", exclude=None)
    reference = optax.lars(schedule, weight_decay=1e-3, trust_coefficient=1e-2, momentum=0.9)
    params = jax.tree.map(jnp.asarray, random_params(dtype=np.float32))
    got, _ = run_optax(ours, params)
    want, _ = run_optax(reference, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_zero_norms_give_ratio_one_and_finite_updates():
    params = {"zero_kernel": jnp.zeros((4, 4)), "kernel": jnp.ones((4, 4)), "untouched": jnp.ones((3, 3))}
    grads = {"zero_kernel": jnp.ones((4, 4)), "kernel": jnp.ones((4, 4)), "untouched": jnp.zeros((3, 3))}
    for formula in lars.FORMULAS:
        optimizer = lars.lars(0.1, weight_decay=1e-4, formula=formula)
        state = optimizer.init(params)
        updates, state = optimizer.update(grads, state, params)
        ratios = lars.get_trust_ratios(state)
        assert float(ratios["zero_kernel"]) == 1.0
        assert float(ratios["untouched"]) == 1.0
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
        # ||w|| = 4, ||g|| = 4: paper 1e-3 * 4 / (4 + 1e-4 * 4); optax 1e-3 * 4 / ||g + 1e-4 w||.
        want = 1e-3 * 4 / (4 + 4e-4) if formula == "paper" else 1e-3 * 4 / (4 * (1 + 1e-4))
        np.testing.assert_allclose(float(ratios["kernel"]), want, rtol=1e-6)
    report = lars.trust_ratios(params, grads)
    assert report["zero_kernel"]["trust_ratio"] == 1.0 and report["untouched"]["trust_ratio"] == 1.0


def test_state_trust_ratios_equal_pure_function():
    params = jax.tree.map(jnp.asarray, random_params(dtype=np.float32))
    grads = jax.tree.map(jnp.asarray, gradient(random_params(dtype=np.float32), 0))
    for formula in lars.FORMULAS:
        optimizer = lars.lars(0.1, weight_decay=5e-4, formula=formula)
        _, state = optimizer.update(grads, optimizer.init(params), params)
        kept = trees.flatten_with_paths(lars.get_trust_ratios(state))
        pure = lars.trust_ratios(params, grads, weight_decay=5e-4, formula=formula)
        report = lars.mask_report(params)
        for path, ratio in kept.items():
            if report[path] == lars.LARS_RULE:
                np.testing.assert_allclose(float(ratio), pure[path]["trust_ratio"], rtol=1e-6)
                np.testing.assert_allclose(
                    pure[path]["param_norm"],
                    np.linalg.norm(np.asarray(trees.flatten_with_paths(params)[path])),
                    rtol=1e-6,
                )
            else:
                assert float(ratio) == 1.0


def test_trust_ratios_take_the_norms_the_caller_gives():
    """The training step passes the per-tensor norms it logs; LARS's ratio is then
    eta * ||w|| / (||g|| + beta * ||w||) of those figures (here 3x and 1/2x the true ones, so that
    the test can tell), by hand in float64."""
    params = jax.tree.map(jnp.asarray, random_params(dtype=np.float32))
    grads = jax.tree.map(jnp.asarray, gradient(random_params(dtype=np.float32), 0))
    optimizer = lars.lars(0.1, weight_decay=5e-4, trust_coefficient=1e-3)
    true_w = jax.tree.map(lambda w: np.linalg.norm(np.asarray(w, np.float64)), params)
    true_g = jax.tree.map(lambda g: np.linalg.norm(np.asarray(g, np.float64)), grads)
    given_w, given_g = jax.tree.map(lambda n: 3 * n, true_w), jax.tree.map(lambda n: n / 2, true_g)
    _, state = optimizer.update(
        grads,
        optimizer.init(params),
        params,
        param_norms=jax.tree.map(lambda n: jnp.float32(n), given_w),
        grad_norms=jax.tree.map(lambda n: jnp.float32(n), given_g),
    )
    ratio = lars.get_trust_ratios(state)["conv"]["kernel"]
    w, g = given_w["conv"]["kernel"], given_g["conv"]["kernel"]
    np.testing.assert_allclose(float(ratio), 1e-3 * w / (g + 5e-4 * w), rtol=1e-6)
    _, state = optimizer.update(grads, optimizer.init(params), params)  # without them: its own
    w, g = true_w["conv"]["kernel"], true_g["conv"]["kernel"]
    np.testing.assert_allclose(
        float(lars.get_trust_ratios(state)["conv"]["kernel"]), 1e-3 * w / (g + 5e-4 * w), rtol=1e-6
    )


def test_excluded_tensors_get_plain_momentum():
    params = jax.tree.map(jnp.asarray, random_params(dtype=np.float32))
    grads = jax.tree.map(jnp.asarray, gradient(random_params(dtype=np.float32), 0))
    optimizer = lars.lars(0.3, weight_decay=0.1)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    np.testing.assert_allclose(updates["bn"]["scale"], -0.3 * grads["bn"]["scale"], rtol=1e-6)
    np.testing.assert_allclose(updates["conv"]["bias"], -0.3 * grads["conv"]["bias"], rtol=1e-6)


def test_mask_report_covers_every_parameter_and_rejects_unmatched_regex():
    params = random_params()
    report = lars.mask_report(params)
    assert report == {
        "conv/kernel": "lars",
        "conv/bias": "ndim<=1",
        "bn/scale": "ndim<=1",
        "bn/bias": "ndim<=1",
        "dense/kernel": "lars",
        "dense/bias": "ndim<=1",
    }
    by_regex = lars.mask_report(params, exclude=[r"^bn/", r"bias$"])
    assert by_regex["bn/bias"] == r"^bn/" and by_regex["conv/bias"] == r"bias$"
    assert by_regex["dense/kernel"] == "lars"
    with pytest.raises(ValueError, match="match no parameter"):
        lars.mask_report(params, exclude=[r"bias$", r"BatchNorm_typo"])


def test_compiles_once_and_sharded_equals_unsharded():
    optimizer = lars.lars(0.1, weight_decay=5e-4)
    params = jax.tree.map(jnp.asarray, random_params(dtype=np.float32))
    grads = jax.tree.map(jnp.asarray, gradient(random_params(dtype=np.float32), 0))
    state = optimizer.init(params)
    update = jax.jit(optimizer.update)
    update(grads, state, params)
    update(jax.tree.map(lambda g: g * 2, grads), state, jax.tree.map(lambda w: w + 1, params))
    assert update._cache_size() == 1

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
    assert mesh.devices.size == 4

    def shard(x):
        # Shard the leading axis where it divides by 4, replicate otherwise.
        spec = jax.sharding.PartitionSpec("data") if x.ndim and x.shape[0] % 4 == 0 else jax.sharding.PartitionSpec()
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    sharded = jax.tree.map(shard, (grads, state, params))
    assert any(len(x.sharding.device_set) == 4 for x in jax.tree.leaves(sharded))
    got, _ = update(*sharded)
    want, _ = optimizer.update(grads, state, params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_works_under_inject_hyperparams():
    params = jax.tree.map(jnp.asarray, random_params(dtype=np.float32))
    grads = jax.tree.map(jnp.asarray, gradient(random_params(dtype=np.float32), 0))
    optimizer = optax.inject_hyperparams(lars.lars, static_args=("nesterov", "clip", "formula", "exclude"))(
        learning_rate=0.1, weight_decay=5e-4
    )
    state = optimizer.init(params)
    first, state = jax.jit(optimizer.update)(grads, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.2)
    # Momentum buffer v1 = 0.1*u; v2 = 0.9*v1 + 0.2*u = 0.29*u.
    second, state = jax.jit(optimizer.update)(grads, state, params)
    np.testing.assert_allclose(second["dense"]["kernel"], first["dense"]["kernel"] * 2.9, rtol=1e-5)
