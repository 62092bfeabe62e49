"""models/: parameter counts by hand, shapes, FLOPs, bf16, grouped BatchNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models


def conv(k, cin, cout, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


def dense(cin, cout):
    return cin * cout + cout


def bn(c):
    return 2 * c


def test_alexnet_parameter_count_by_hand():
    convs = conv(11, 3, 96) + conv(5, 96, 256) + conv(3, 256, 384) + conv(3, 384, 384) + conv(3, 384, 256)
    fcs = dense(6 * 6 * 256, 4096) + dense(4096, 4096) + dense(4096, 1000)
    assert convs + fcs == 62_378_344
    assert (
        models.count_params(models.init_shapes(models.create("alexnet", 1000), (1, 227, 227, 3))["params"])
        == convs + fcs
    )


def test_alexnet_bn_parameter_count_by_hand():
    widths = [(11, 3, 96), (5, 96, 256), (3, 256, 384), (3, 384, 384), (3, 384, 256)]
    convs = sum(conv(k, i, o, bias=False) + bn(o) for k, i, o in widths)
    fcs = dense(9216, 4096) + dense(4096, 4096) + dense(4096, 1000)
    variables = models.init_shapes(models.create("alexnet_bn", 1000), (1, 227, 227, 3))
    assert models.count_params(variables["params"]) == convs + fcs == 62_379_720
    # Running mean and variance of every BN layer.
    assert models.count_params(variables["batch_stats"]) == 2 * (96 + 256 + 384 + 384 + 256)


def resnet50_by_hand(num_classes=1000):
    total = conv(7, 3, 64, bias=False) + bn(64)
    cin = 64
    for width, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        for b in range(blocks):
            total += conv(1, cin, width, False) + bn(width)
            total += conv(3, width, width, False) + bn(width)
            total += conv(1, width, 4 * width, False) + bn(4 * width)
            if b == 0:
                total += conv(1, cin, 4 * width, False) + bn(4 * width)
            cin = 4 * width
    return total + dense(2048, num_classes)


@pytest.mark.parametrize("name", ["resnet50", "resnet50_v1"])
def test_resnet50_parameter_count(name):
    assert resnet50_by_hand() == 25_557_032
    params = models.init_shapes(models.create(name, 1000), (1, 224, 224, 3))["params"]
    assert models.count_params(params) == 25_557_032


def test_cifar_models_parameter_counts_by_hand():
    # ResNet-20: 3 stages of 3 basic blocks, widths 16/32/64, projection shortcuts.
    stem = conv(3, 3, 16, False) + bn(16)
    total, cin = stem, 16
    for width in (16, 32, 64):
        for _b in range(3):
            total += conv(3, cin, width, False) + bn(width) + conv(3, width, width, False) + bn(width)
            if cin != width:
                total += conv(1, cin, width, False) + bn(width)
            cin = width
    total += dense(64, 10)
    assert total == 272_474  # "0.27M" in He et al. 2016, table 6
    assert (
        models.count_params(models.init_shapes(models.create("cifar_resnet20", 10), (1, 32, 32, 3))["params"]) == total
    )
    widths = [(3, 64), (64, 192), (192, 384), (384, 256), (256, 256)]
    alex = (
        sum(conv(3, i, o, False) + bn(o) for i, o in widths)
        + dense(4 * 4 * 256, 512)
        + dense(512, 512)
        + dense(512, 10)
    )
    assert (
        models.count_params(models.init_shapes(models.create("cifar_alexnet_bn", 10), (1, 32, 32, 3))["params"]) == alex
    )


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_output_shapes(name):
    size = models.image_size(name)
    model = models.create(name, 7)
    shapes = models.init_shapes(model, (2, size, size, 3))
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, size, size, 3)), train=False), shapes)
    assert out.shape == (2, 7) and out.dtype == jnp.float32


def test_small_models_run_forward_and_train_mode():
    for name in ["cifar_resnet8", "cifar_alexnet_bn"]:
        model = models.create(name, 10)
        x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
        variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x, train=False)
        logits, updates = model.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(2)}
        )
        assert logits.shape == (4, 10) and bool(jnp.all(jnp.isfinite(logits)))
        assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


@pytest.mark.slow
def test_zero_init_last_bn_makes_blocks_identity():
    model = models.create("resnet50", 10, zero_init_last_bn=True)
    params = models.init_shapes(model, (1, 64, 64, 3))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    assert float(jnp.abs(variables["params"]["stage1_block1"]["bn3"]["scale"]).sum()) == 0.0
    assert float(variables["params"]["stage1_block1"]["bn1"]["scale"].sum()) == 64.0
    assert params["params"]["stage1_block1"]["bn3"]["scale"].shape == (256,)


def test_v1_and_v15_put_the_stride_in_different_places():
    x = jnp.zeros((1, 64, 64, 3))
    for name, strided in [("resnet50", "conv2"), ("resnet50_v1", "conv1")]:
        model = models.create(name, 10)
        variables = model.init(jax.random.key(0), x, train=False)
        _, inter = model.apply(variables, x, train=False, capture_intermediates=True)
        block = inter["intermediates"]["stage2_block1"]
        # Input of stage 2 is 16x16 (64 / 4); the strided conv outputs 8x8.
        assert block[strided]["__call__"][0].shape[1] == 8
        other = "conv1" if strided == "conv2" else "conv2"
        assert block[other]["__call__"][0].shape[1] == (16 if strided == "conv2" else 8)


def test_bf16_compute_is_close_to_float32():
    x = jax.random.normal(jax.random.key(3), (8, 32, 32, 3))
    # XLA's convolutions: this holds on every CPU (oneDNN's bf16 path is in test_convolutions.py).
    f32 = models.create("cifar_resnet20", 10, conv_impl="xla")
    bf16 = models.create("cifar_resnet20", 10, dtype=jnp.bfloat16, conv_impl="xla")
    variables = f32.init(jax.random.key(0), x, train=False)
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    want = f32.apply(variables, x, train=True, mutable=["batch_stats"])[0]
    got, stats = bf16.apply(variables, x, train=True, mutable=["batch_stats"])
    assert got.dtype == jnp.float32
    assert jax.tree.leaves(stats)[0].dtype == jnp.float32
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32
    scale = float(jnp.abs(want).max())
    assert float(jnp.abs(got - want).max()) < 0.05 * scale
    assert float(jnp.abs(want).max()) > 0


def test_flops_per_image():
    resnet = models.flops_per_image(models.create("resnet50", 1000), (1, 224, 224, 3))
    # Published: 4.1 GMACs (He et al. 2016: 3.8 GFLOPs counted as multiply-adds for v1;
    # torchvision's v1.5 card: 4.09 GMACs). XLA counts a multiply-add as 2 FLOPs.
    assert abs(resnet / 2 / 4.09e9 - 1) < 0.05
    alexnet = models.flops_per_image(models.create("alexnet", 1000), (1, 227, 227, 3))

    # Hand count of multiply-adds, output positions x taps that fall inside the
    # image (XLA does not count taps on the zero padding).
    def valid_taps(size, kernel, pad):
        return sum(min(i + kernel - pad, size) - max(i - pad, 0) for i in range(size))

    macs = 55 * 55 * 96 * 11 * 11 * 3
    macs += valid_taps(27, 5, 2) ** 2 * 96 * 256
    macs += valid_taps(13, 3, 1) ** 2 * (256 * 384 + 384 * 384 + 384 * 256)
    macs += 9216 * 4096 + 4096 * 4096 + 4096 * 1000
    assert abs(alexnet / 2 / macs - 1) < 0.05
    # The usual count including padded taps is 1.135 GMACs for this layout.
    full = 55 * 55 * 96 * 363 + 27 * 27 * 256 * 2400 + 13 * 13 * (384 * 2304 + 384 * 3456 + 256 * 3456) + 58_621_952
    assert abs(full / 1.135e9 - 1) < 0.01


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match=r"Unknown model 'resnet51'; choose from \['alexnet', 'alexnet_bn'"):
        models.create("resnet51", 10)


def numpy_batch_norm(x, eps=1e-5):
    axes = tuple(range(x.ndim - 1))
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    return (x - mean) / np.sqrt(var + eps), mean, var


def test_grouped_batch_norm_whole_batch_equals_flax_batch_norm():
    x = jax.random.normal(jax.random.key(0), (8, 5, 5, 6)) * 3 + 1
    ours = models.BatchNorm(use_running_average=False)
    ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
    v_ours = ours.init(jax.random.key(0), x)
    v_ref = ref.init(jax.random.key(0), x)
    y_ours, s_ours = ours.apply(v_ours, x, mutable=["batch_stats"])
    y_ref, s_ref = ref.apply(v_ref, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y_ours, y_ref, atol=1e-5)
    np.testing.assert_allclose(s_ours["batch_stats"]["mean"], s_ref["batch_stats"]["mean"], atol=1e-6)
    np.testing.assert_allclose(s_ours["batch_stats"]["var"], s_ref["batch_stats"]["var"], atol=1e-5)


def test_ghost_batch_norm_equals_numpy_per_slice():
    x = np.random.default_rng(0).normal(size=(12, 4, 4, 3)).astype(np.float32) * 2 + 0.5
    module = models.BatchNorm(use_running_average=False, group_size=4)
    variables = module.init(jax.random.key(0), x)
    y, stats = module.apply(variables, x, mutable=["batch_stats"])
    slices = [numpy_batch_norm(x[i : i + 4].astype(np.float64)) for i in range(0, 12, 4)]
    np.testing.assert_allclose(y, np.concatenate([s[0] for s in slices]), atol=1e-5)
    mean = np.mean([s[1] for s in slices], axis=0)
    var = np.mean([s[2] for s in slices], axis=0)
    np.testing.assert_allclose(stats["batch_stats"]["mean"], 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(stats["batch_stats"]["var"], 0.9 + 0.1 * var, atol=1e-6)
    # Ghost batches differ from whole-batch statistics on this data.
    whole = numpy_batch_norm(x.astype(np.float64))[0]
    assert np.abs(np.asarray(y) - whole).max() > 1e-2
    with pytest.raises(ValueError, match="group size 5 does not divide the batch of 12"):
        models.BatchNorm(use_running_average=False, group_size=5).init(jax.random.key(0), x)
