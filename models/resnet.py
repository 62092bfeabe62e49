"""ResNet-50 (v1 and v1.5) for ImageNet and the CIFAR ResNets of He et al.

References:
  He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition",
  CVPR 2016 (section 4.2 for the CIFAR networks, 6n+2 layers).
  Goyal et al., arXiv:1706.02677 (zero-initialised last BatchNorm scale).
  v1.5 (stride on the 3x3 convolution) is the variant of torchvision, NVIDIA
  and MLPerf.
"""

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models.layers import BatchNorm, Conv, Dense, max_pool, relu


def conv(features, kernel, strides=1, *, use_bias, impl, dtype, name=None):
    """A same-padded convolution with He (fan-out) initialisation."""
    return Conv(
        features,
        (kernel, kernel),
        (strides, strides),
        padding=[(kernel // 2, kernel // 2)] * 2,
        use_bias=use_bias,
        impl=impl,
        dtype=dtype,
        kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
        name=name,
    )


class _Blocks(nn.Module):
    """Fields shared by the residual blocks."""

    features: int
    strides: int = 1
    zero_init_last_bn: bool = False
    bn_group_size: int | None = None
    use_bn: bool = True
    conv_impl: str = "onednn"
    dtype: Any = jnp.float32

    def conv(self, features, kernel, strides=1, name=None):
        return conv(
            features, kernel, strides, use_bias=not self.use_bn, impl=self.conv_impl, dtype=self.dtype, name=name
        )

    def norm(self, x, train, last=False, relu=False, name=None):
        if not self.use_bn:
            return nn.relu(x) if relu else x
        scale_init = nn.initializers.zeros if last and self.zero_init_last_bn else nn.initializers.ones
        return BatchNorm(
            use_running_average=not train,
            group_size=self.bn_group_size,
            dtype=self.dtype,
            scale_init=scale_init,
            impl=self.conv_impl,
            relu=relu,
            name=name,
        )(x)

    def shortcut(self, x, out_features, train):
        if x.shape[-1] == out_features and self.strides == 1:
            return x
        x = self.conv(out_features, 1, self.strides, name="proj_conv")(x)
        return self.norm(x, train, name="proj_bn")


class BottleneckBlock(_Blocks):
    """1x1 -> 3x3 -> 1x1 (x4 features). v1.5 strides the 3x3, v1 the first 1x1."""

    stride_on_3x3: bool = True

    @nn.compact
    def __call__(self, x, train: bool):
        s1, s3 = (1, self.strides) if self.stride_on_3x3 else (self.strides, 1)
        y = self.norm(self.conv(self.features, 1, s1, name="conv1")(x), train, relu=True, name="bn1")
        y = self.norm(self.conv(self.features, 3, s3, name="conv2")(y), train, relu=True, name="bn2")
        y = self.norm(self.conv(self.features * 4, 1, name="conv3")(y), train, last=True, name="bn3")
        return relu(y + self.shortcut(x, self.features * 4, train))


class BasicBlock(_Blocks):
    """3x3 -> 3x3, the block of the CIFAR ResNets."""

    @nn.compact
    def __call__(self, x, train: bool):
        y = self.norm(self.conv(self.features, 3, self.strides, name="conv1")(x), train, relu=True, name="bn1")
        y = self.norm(self.conv(self.features, 3, name="conv2")(y), train, last=True, name="bn2")
        return relu(y + self.shortcut(x, self.features, train))


class ResNet(nn.Module):
    """A ResNet: stem, stages of residual blocks, global average pool, dense.

    Attributes:
      stage_sizes: blocks per stage.
      block: BottleneckBlock (ImageNet) or BasicBlock (CIFAR).
      num_classes: outputs.
      width: features of the first stage (doubles every stage).
      imagenet_stem: 7x7/2 conv + 3x3/2 max-pool (ImageNet) or one 3x3 conv (CIFAR).
      stride_on_3x3: v1.5 (True) or v1 (False); bottleneck blocks only.
      zero_init_last_bn: start each block as the identity (Goyal et al.).
      use_bn: False gives a normalisation-free network (biases on the convs),
        used where results must not depend on how the batch is split.
      bn_group_size: see models.layers.BatchNorm.
      conv_impl: how convolutions and the head are computed, see models.layers.conv2d
        ("onednn", "xla" or "lax"; same values and gradients).
      dtype: compute dtype (parameters and BatchNorm statistics stay float32).
    """

    stage_sizes: Sequence[int]
    block: Any = BottleneckBlock
    num_classes: int = 1000
    width: int = 64
    imagenet_stem: bool = True
    stride_on_3x3: bool = True
    zero_init_last_bn: bool = False
    use_bn: bool = True
    bn_group_size: int | None = None
    conv_impl: str = "onednn"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = True):
        common = dict(bn_group_size=self.bn_group_size, use_bn=self.use_bn, conv_impl=self.conv_impl, dtype=self.dtype)
        kernel, strides = (7, 2) if self.imagenet_stem else (3, 1)
        stem = conv(
            self.width,
            kernel,
            strides,
            use_bias=not self.use_bn,
            impl=self.conv_impl,
            dtype=self.dtype,
            name="stem_conv",
        )
        x = stem(x.astype(self.dtype))
        if self.use_bn:
            x = BatchNorm(
                use_running_average=not train,
                group_size=self.bn_group_size,
                dtype=self.dtype,
                impl=self.conv_impl,
                relu=True,
                name="stem_bn",
            )(x)
        else:
            x = nn.relu(x)
        if self.imagenet_stem:
            x = max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)), impl=self.conv_impl)
        block_kwargs = dict(common, zero_init_last_bn=self.zero_init_last_bn)
        if self.block is BottleneckBlock:
            block_kwargs["stride_on_3x3"] = self.stride_on_3x3
        for stage, num_blocks in enumerate(self.stage_sizes):
            for b in range(num_blocks):
                strides = 2 if stage > 0 and b == 0 else 1
                x = self.block(self.width * 2**stage, strides, name=f"stage{stage + 1}_block{b + 1}", **block_kwargs)(
                    x, train
                )
        x = jnp.mean(x, axis=(1, 2))
        x = Dense(self.num_classes, impl=self.conv_impl, dtype=self.dtype, name="head")(x)
        return x.astype(jnp.float32)


ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block=BottleneckBlock)
ResNet50V1 = partial(ResNet50, stride_on_3x3=False)


def cifar_resnet(depth: int = 20, width: int = 16, **kwargs) -> ResNet:
    """The 6n+2-layer CIFAR ResNet of He et al. (ResNet-20: n = 3, width 16)."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}.")
    n = (depth - 2) // 6
    return ResNet(stage_sizes=(n, n, n), block=BasicBlock, width=width, imagenet_stem=False, **kwargs)
