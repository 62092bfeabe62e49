"""Layers shared by the models: grouped BatchNorm and local response normalization."""

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
    """

    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    group_size: int | None = None
    dtype: Any = jnp.float32
    scale_init: Any = nn.initializers.ones

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None):
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        scale = self.param("scale", self.scale_init, (features,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)

        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
            y = (x.astype(jnp.float32) - mean) * lax.rsqrt(var + self.epsilon)
        else:
            batch = x.shape[0]
            group = batch if self.group_size is None else self.group_size
            if batch % group:
                raise ValueError(f"BatchNorm group size {group} does not divide the batch of {batch}.")
            grouped = x.astype(jnp.float32).reshape((batch // group, group) + x.shape[1:])
            axes = tuple(range(1, grouped.ndim - 1))
            mean = jnp.mean(grouped, axis=axes, keepdims=True)
            var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
            y = ((grouped - mean) * lax.rsqrt(var + self.epsilon)).reshape(x.shape)
            if not self.is_initializing():
                reduce_axes = (0,) + axes
                group_mean = jnp.mean(mean, axis=reduce_axes)
                # Population (biased) variance, as flax.linen.BatchNorm keeps it.
                group_var = jnp.mean(var, axis=reduce_axes)
                ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * group_mean
                ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * group_var
        return (y * scale + bias).astype(self.dtype)


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
