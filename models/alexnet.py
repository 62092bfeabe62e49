"""AlexNet (Krizhevsky et al. 2012) and the AlexNet-BN of the LARS papers.

References:
  Krizhevsky, Sutskever, Hinton, "ImageNet Classification with Deep
  Convolutional Neural Networks", NIPS 2012 (single-tower layout: the two
  GPU towers merged, no grouped convolutions).
  You, Gitman, Ginsburg, arXiv:1708.03888 (AlexNet-BN: BatchNorm in place of
  LRN after every convolution, none on the fully connected layers).
"""

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models.layers import BatchNorm, Conv, Dense, flatten, local_response_norm, max_pool

# (features, kernel, stride, padding, max-pool after it) of the five convolutions.
IMAGENET_CONVS = (
    (96, 11, 4, "VALID", True),
    (256, 5, 1, 2, True),
    (384, 3, 1, 1, False),
    (384, 3, 1, 1, False),
    (256, 3, 1, 1, True),
)
# The narrow 32x32 variant: same five-conv, three-FC shape, pools of 2.
CIFAR_CONVS = (
    (64, 3, 1, 1, True),
    (192, 3, 1, 1, True),
    (384, 3, 1, 1, False),
    (256, 3, 1, 1, False),
    (256, 3, 1, 1, True),
)


class AlexNet(nn.Module):
    """AlexNet: five convolutions (LRN or BatchNorm after them), three dense layers.

    Attributes:
      num_classes: outputs of the last layer.
      norm: "lrn" (the original network; LRN after conv1 and conv2) or "batch"
        (AlexNet-BN: BatchNorm after every convolution, convolutions without
        bias).
      convs: the convolution table, IMAGENET_CONVS or CIFAR_CONVS.
      pool: (window, stride) of the max-pools: (3, 2) on ImageNet, (2, 2) at 32x32.
      fc_features: width of the two hidden dense layers.
      dropout_rate: dropout after each hidden dense layer.
      bn_group_size: see models.layers.BatchNorm.
      conv_impl: how convolutions and dense layers are computed, see models.layers.conv2d.
      dtype: compute dtype (parameters stay float32).
    """

    num_classes: int = 1000
    norm: str = "lrn"
    convs: Sequence[tuple] = IMAGENET_CONVS
    pool: tuple[int, int] = (3, 2)
    fc_features: int = 4096
    dropout_rate: float = 0.5
    bn_group_size: int | None = None
    conv_impl: str = "onednn"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        use_bn = self.norm == "batch"
        x = x.astype(self.dtype)
        for i, (features, kernel, stride, padding, pool) in enumerate(self.convs):
            x = Conv(
                features,
                (kernel, kernel),
                (stride, stride),
                padding=padding,
                use_bias=not use_bn,
                impl=self.conv_impl,
                dtype=self.dtype,
                name=f"conv{i + 1}",
            )(x)
            if use_bn:
                x = BatchNorm(
                    use_running_average=not train,
                    group_size=self.bn_group_size,
                    dtype=self.dtype,
                    impl=self.conv_impl,
                    relu=True,
                    name=f"bn{i + 1}",
                )(x)
            else:
                x = nn.relu(x)
                if i < 2:
                    x = local_response_norm(x)
            if pool:
                window, stride = self.pool
                x = max_pool(x, (window, window), (stride, stride), impl=self.conv_impl)
        x = flatten(x)
        for i in range(2):
            x = Dense(self.fc_features, impl=self.conv_impl, dtype=self.dtype, name=f"fc{i + 6}")(x)
            x = nn.relu(x)
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = Dense(self.num_classes, impl=self.conv_impl, dtype=self.dtype, name="fc8")(x)
        return x.astype(jnp.float32)


AlexNetBN = partial(AlexNet, norm="batch")
CifarAlexNetBN = partial(AlexNet, norm="batch", convs=CIFAR_CONVS, pool=(2, 2), fc_features=512)
