"""Layers shared by the models: convolution, grouped BatchNorm, local response normalization."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


class BatchNorm(nn.Module):
    """BatchNorm whose batch statistics are taken over groups of examples.

    `group_size` decides which examples share statistics:
      - None: the whole batch the module sees. Under `jax.jit` over a sharded
        global batch that is the global batch ("global BN", what a single big
        machine would compute).
      - G: consecutive groups of G examples ("ghost batches"). With G equal to
        the per-device batch this is per-device BN, which is what the paper's
        workers did: each normalised over its own slice of the global batch.
    The running averages are updated with the mean over groups of the group
    statistics, so every device keeps the same running averages.

    Parameters are named like flax.linen.BatchNorm's (scale, bias; batch_stats
    mean, var), statistics are computed in float32 whatever the compute dtype.
    With impl="onednn" the training-mode statistics, normalisation and their
    gradient are oneDNN's primitives (models/onednn.py), where each group lies
    within one device's shard; elsewhere (global statistics over several
    devices, float64) the formulation below. relu=True applies the ReLU that
    follows in the models, inside oneDNN's primitives where they run.
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    group_size: int | None = None
    dtype: Any = jnp.float32
    scale_init: Any = nn.initializers.ones
    impl: str = "xla"  # "onednn": oneDNN's primitives in training mode, where they apply
    relu: bool = False  # output relu(BN(x))

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)

        stats_dtype = jnp.promote_types(x.dtype, jnp.float32)  # float32, or float64 in tests
        batch = x.shape[0]
        group = batch if self.group_size is None else self.group_size
        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
            y = (x.astype(stats_dtype) - mean) * lax.rsqrt(var + self.epsilon)
        elif batch % group:
            raise ValueError(f"BatchNorm group size {group} does not divide the batch of {batch}.")
        elif (done := self._onednn(x, scale, bias, ra_mean, ra_var)) is not None:
            return done  # the ReLU included
        else:
            grouped = x.astype(stats_dtype).reshape((batch // group, group) + x.shape[1:])
            axes = tuple(range(1, grouped.ndim - 1))
            mean = jnp.mean(grouped, axis=axes, keepdims=True)
            var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
            y = ((grouped - mean) * lax.rsqrt(var + self.epsilon)).reshape(x.shape)
            if not self.is_initializing():
                reduce_axes = (0,) + axes
                group_mean = jnp.mean(mean, axis=reduce_axes)
                # Population (biased) variance, as flax.linen.BatchNorm keeps it.
                group_var = jnp.mean(var, axis=reduce_axes)
                self._update_running_averages(ra_mean, ra_var, group_mean, group_var)
        y = y * scale + bias
        return (nn.relu(y) if self.relu else y).astype(self.dtype)

    def _update_running_averages(self, ra_mean, ra_var, mean, var):
        """Exponential moving averages of the batch statistics (mean over groups), for evaluation."""
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var

    def _onednn(self, x, scale, bias, ra_mean, ra_var):
        """The training-mode output through oneDNN, or None where it does not apply."""
        if self.impl != "onednn" or self.is_initializing():
            return None
        from models import onednn

        done = onednn.batch_norm(x.astype(self.dtype), scale, bias, self.group_size, self.epsilon, self.relu)
        if done is None:
            return None
        y, mean, var = done
        mean, var = lax.stop_gradient(jnp.mean(mean, axis=0)), lax.stop_gradient(jnp.mean(var, axis=0))
        self._update_running_averages(ra_mean, ra_var, mean, var)
        return y.astype(self.dtype)


@jax.custom_vjp
def relu(x):
    """max(x, 0), whose gradient is masked by the output (y > 0, as PyTorch's ReLU), not the input.

    The same values and gradients as jax.nn.relu (0 at x == 0), but the backward pass keeps only y,
    so at a residual block's end, relu(BN(x) + shortcut), XLA computes the sum and the ReLU in one
    pass; with jax.nn.relu the sum is also kept for the backward mask and written out separately.
    """
    return jnp.maximum(x, 0)


def _relu_forward(x):
    y = jnp.maximum(x, 0)
    return y, y


def _relu_backward(y, dy):
    return (jnp.where(y > 0, dy, jnp.zeros_like(dy)),)


relu.defvjp(_relu_forward, _relu_backward)


def local_response_norm(x, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0):
    """Cross-channel LRN of Krizhevsky et al. (2012), NHWC.

    b = a / (k + alpha / size * sum_{window of `size` channels} a^2) ** beta,
    with alpha divided by the window size as in Caffe's LRN layer (the layer
    the LARS authors' AlexNet models use).
    """
    squares = jnp.square(x.astype(jnp.float32))
    half = size // 2
    window_sum = lax.reduce_window(
        squares, 0.0, lax.add, (1, 1, 1, size), (1, 1, 1, 1), ((0, 0), (0, 0), (0, 0), (half, half))
    )
    return (x / jnp.power(k + alpha / size * window_sum, beta)).astype(x.dtype)


def flatten(x):
    return x.reshape((x.shape[0], -1))


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))


# --------------------------------------------------------------------------
# Convolution: oneDNN, or formulated for XLA:CPU, or plain lax.
# --------------------------------------------------------------------------

_NHWC = ("NHWC", "HWIO", "NHWC")


def materialize(x, poison):
    """x in a buffer of its own: XLA cannot fuse x's producers into x's consumers.

    Why: XLA:CPU fuses cheap elementwise producers (BatchNorm, ReLU, the
    residual additions of several blocks) into every consumer, recomputing
    them. When the consumer is the transpose a convolution's weight gradient
    needs, the recomputation reads every input with a stride of one image and
    a single such transpose took 270 ms where the plain transpose of the
    stored value takes 4 ms (CIFAR ResNet-20, batch 256). An
    optimization_barrier does not stop it (XLA:CPU removes barriers before
    fusion); a conditional does.

    Args:
      x: any array.
      poison: a scalar bool, True gives an all-NaN result instead of x. It
        is the branch XLA cannot see through; `conv2d` passes "the kernel's
        first entry is NaN", a replicated value, so that the predicate needs
        no communication when x is sharded.

    Returns:
      x (the identity, in value and gradient, while poison is False).
    """
    return lax.cond(poison, lambda v: jnp.full_like(v, jnp.nan), lambda v: v, x)


CONV_IMPLS = ("onednn", "xla", "lax")


def conv_impl_for_backend(impl: str, backend: str) -> str:
    """The implementation a model uses on `backend`: oneDNN runs on CPU only, elsewhere plain lax."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"Unknown conv_impl {impl!r}; choose from {CONV_IMPLS}.")
    return impl if backend == "cpu" or impl == "lax" else "lax"


def conv2d(x, kernel, strides: tuple[int, int], padding, impl: str = "onednn"):
    """NHWC x HWIO convolution; the three implementations give the same values and gradients.

    "onednn": oneDNN's forward, backward-data and backward-weights primitives
    through the XLA FFI (models/onednn.py; CPU only). "xla": formulated for
    XLA:CPU's own kernels: 1x1 convolutions are plain dots (2-3x faster than
    XLA's convolution in both directions), and the input and output are
    materialized so the weight-gradient transposes read stored tensors (see
    `materialize`; on the backward pass this materializes the gradient
    arriving at the output). "lax": lax.conv_general_dilated as it stands.

    Args:
      x: [N, H, W, C] in the compute dtype.
      kernel: [KH, KW, C, O]: float32 parameters (onednn casts them itself and
        returns a float32 gradient), or already in x's dtype.
      strides: (height, width).
      padding: ((top, bottom), (left, right)) or "VALID".
      impl: "onednn", "xla" or "lax".
    """
    if padding == "VALID":
        padding = ((0, 0), (0, 0))
    if impl == "onednn":
        from models import onednn

        return onednn.conv2d(x, kernel, tuple(strides), tuple(p for pair in padding for p in pair))
    kernel = kernel.astype(x.dtype)
    if impl == "lax":
        return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)
    nan_kernel = jnp.isnan(kernel.reshape(-1)[0])
    x = materialize(x, nan_kernel)
    if kernel.shape[:2] == (1, 1) and _no_padding(padding):
        y = jnp.einsum("nhwc,co->nhwo", x[:, :: strides[0], :: strides[1], :], kernel[0, 0])
    else:
        y = lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC)
    return materialize(y, nan_kernel)


def _no_padding(padding) -> bool:
    return padding == "VALID" or all(tuple(p) == (0, 0) for p in padding)


class Conv(nn.Module):
    """A 2-D convolution with flax.linen.Conv's parameters (kernel HWIO, bias), computed by `conv2d`.

    Attributes:
      features: output channels.
      kernel_size: (height, width).
      strides: (height, width).
      padding: "SAME", "VALID", an int (both sides of both dims) or ((top, bottom), (left, right)).
      use_bias: add a bias.
      impl: "onednn", "xla" or "lax", see `conv2d` (same values and gradients).
      dtype: compute dtype; the parameters stay float32.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: Any = "SAME"
    use_bias: bool = True
    impl: str = "onednn"
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kh, kw = self.kernel_size
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32)
        padding = self.padding
        if isinstance(padding, int):
            padding = ((padding, padding), (padding, padding))
        elif padding == "SAME":
            padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), tuple(self.strides), "SAME")
        y = conv2d(x.astype(self.dtype), kernel, tuple(self.strides), padding, self.impl)
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
        return y


class Dense(nn.Module):
    """A fully connected layer with flax.linen.Dense's parameters (kernel [K, O], bias) and initializers.

    With impl="onednn" the product and both its gradients are oneDNN's matmul
    (models/onednn.py; bfloat16 there is 2-3x faster than XLA:CPU's dot, which
    has no bfloat16 kernel of its own); with "xla" or "lax", XLA's dot as
    flax.linen.Dense computes it.

    Attributes:
      features: outputs.
      impl: "onednn", "xla" or "lax" (the model's conv_impl).
      dtype: compute dtype; the parameters stay float32.
    """

    features: int
    impl: str = "onednn"
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        x = x.astype(self.dtype)
        if self.impl == "onednn":
            from models import onednn

            y = onednn.dense(x.reshape(-1, x.shape[-1]), kernel).reshape(x.shape[:-1] + (self.features,))
        else:
            y = jnp.dot(x, kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


def max_pool(x, window: tuple[int, int], strides: tuple[int, int], padding="VALID", impl: str = "onednn"):
    """flax.linen.max_pool (NHWC, padding never the maximum), through oneDNN with impl="onednn".

    Why: XLA:CPU's gradient of a max pool (select_and_scatter) is slow: 250 ms
    for ResNet-50's stem pool at batch 16 (f32, 2 cores, AVX-512), where
    oneDNN's primitives take a few ms.

    Args:
      x: [N, H, W, C].
      window: (height, width).
      strides: (height, width).
      padding: "VALID" or ((top, bottom), (left, right)).
      impl: "onednn" (float32 and bfloat16 on CPU), or "xla"/"lax" for flax's.
    """
    if impl != "onednn":
        return nn.max_pool(x, tuple(window), tuple(strides), padding=padding)
    from models import onednn

    pads = (0, 0, 0, 0) if padding == "VALID" else tuple(p for pair in padding for p in pair)
    return onednn.max_pool(x, tuple(window), tuple(strides), pads)
