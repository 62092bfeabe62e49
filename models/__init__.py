"""Model registry: `models.create(name, num_classes, dtype=...)`.

Every model is a Flax linen module over NHWC images, called as
`model.apply(variables, images, train=...)`, with float32 parameters and a
configurable compute dtype.
"""

from functools import partial
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

import trees
from models.alexnet import AlexNet, AlexNetBN, CifarAlexNetBN
from models.layers import BatchNorm, count_params
from models.resnet import ResNet, ResNet50, ResNet50V1, cifar_resnet


class ModelSpec(NamedTuple):
    factory: Any
    image_size: int  # the input the model was designed for (height = width)
    description: str


REGISTRY = {
    "alexnet": ModelSpec(AlexNet, 227, "AlexNet, single tower, LRN (Krizhevsky et al. 2012)"),
    "alexnet_bn": ModelSpec(AlexNetBN, 227, "AlexNet-BN of the LARS papers (BN after every conv)"),
    "resnet50": ModelSpec(ResNet50, 224, "ResNet-50 v1.5 (stride on the 3x3 conv)"),
    "resnet50_v1": ModelSpec(ResNet50V1, 224, "ResNet-50 v1 (stride on the first 1x1 conv)"),
    "cifar_resnet20": ModelSpec(partial(cifar_resnet, 20), 32, "CIFAR ResNet-20 (He et al. 2016)"),
    "cifar_resnet8": ModelSpec(partial(cifar_resnet, 8), 32, "CIFAR ResNet-8, the smallest 6n+2 ResNet"),
    "cifar_alexnet_bn": ModelSpec(CifarAlexNetBN, 32, "narrow AlexNet-BN for 32x32 images"),
}


def create(name: str, num_classes: int, dtype: Any = jnp.float32, **kwargs) -> nn.Module:
    """Builds a registered model.

    Args:
      name: one of REGISTRY.
      num_classes: outputs of the classifier.
      dtype: compute dtype (jnp.float32 or jnp.bfloat16); parameters and
        BatchNorm statistics stay float32.
      **kwargs: model attributes, e.g. bn_group_size, width, zero_init_last_bn.

    Returns:
      The flax module.
    """
    if name not in REGISTRY:
        raise ValueError(f"Unknown model {name!r}; choose from {sorted(REGISTRY)}.")
    return REGISTRY[name].factory(num_classes=num_classes, dtype=dtype, **kwargs)


def image_size(name: str) -> int:
    if name not in REGISTRY:
        raise ValueError(f"Unknown model {name!r}; choose from {sorted(REGISTRY)}.")
    return REGISTRY[name].image_size


def init_variables(model: nn.Module, input_shape, seed: int = 0) -> dict:
    """The model's initial variables ("params", and "batch_stats" with BatchNorm) from `seed`,
    traced on zeros of `input_shape` in inference mode (dropout draws nothing)."""
    rngs = {"params": jax.random.key(seed), "dropout": jax.random.key(0)}
    return model.init(rngs, jnp.zeros(input_shape, jnp.float32), train=False)


def init_shapes(model: nn.Module, input_shape) -> Any:
    """The model's variables as ShapeDtypeStructs (nothing is allocated)."""
    return jax.eval_shape(lambda: init_variables(model, input_shape))


def param_order(model: nn.Module, input_shape) -> list[str]:
    """Parameter paths ("stem_conv/kernel", ...) in the order the network uses them.

    JAX sorts dict keys when it flattens a tree; Flax builds the variables in
    call order, which is read here while tracing (nothing is computed).
    """
    order = []

    def init():
        order.extend(trees.paths_in_insertion_order(init_variables(model, input_shape)["params"]))

    jax.eval_shape(init)
    return order


def flops_per_image(model: nn.Module, input_shape, train: bool = False) -> float:
    """Forward FLOPs per image from XLA's cost analysis of the compiled model.

    Args:
      model: the module.
      input_shape: (batch, height, width, channels).
      train: cost of the training-mode forward pass (BatchNorm batch stats).

    Returns:
      FLOPs per image (one multiply-add counts as two FLOPs).
    """
    if hasattr(model, "conv_impl"):
        model = model.clone(conv_impl="lax")  # XLA's cost analysis counts no FLOPs in custom calls
    variables = init_shapes(model, input_shape)

    def forward(variables, images):
        return model.apply(
            variables,
            images,
            train=train,
            mutable=["batch_stats"] if train else False,
            rngs={"dropout": jax.random.key(0)},
        )

    images = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    cost = jax.jit(forward).lower(variables, images).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"]) / input_shape[0]


def summary(name: str, model: nn.Module, channels: int = 3, size: int | None = None) -> dict[str, float]:
    """Parameter count and forward GFLOPs per image, for logging at start."""
    size = size or image_size(name)
    shape = (1, size, size, channels)
    params = init_shapes(model, shape)["params"]
    return {"params": count_params(params), "gflops_per_image": flops_per_image(model, shape) / 1e9}


__all__ = [
    "AlexNet",
    "AlexNetBN",
    "BatchNorm",
    "CifarAlexNetBN",
    "REGISTRY",
    "ResNet",
    "ResNet50",
    "ResNet50V1",
    "cifar_resnet",
    "count_params",
    "create",
    "flops_per_image",
    "image_size",
    "init_shapes",
    "init_variables",
    "param_order",
    "summary",
]
