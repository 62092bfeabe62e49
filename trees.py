"""Parameter trees: "layer/kernel" paths and per-tensor norms, the one implementation that the
optimizer (lars.py), the steps' metrics and the logs share."""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


def _key_name(key) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path(key_path) -> str:
    """Joins a JAX key path into "Dense_0/kernel"."""
    return "/".join(_key_name(k) for k in key_path)


def flatten_with_paths(tree) -> dict[str, Any]:
    """{"path/to/leaf": leaf} in JAX's flattening order (dict keys sorted)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path(key_path): leaf for key_path, leaf in leaves}


def paths_in_insertion_order(tree: dict) -> list[str]:
    """The leaf paths of nested dicts in the order their keys were inserted (Flax's call order)."""
    return list(traverse_util.flatten_dict(tree, sep="/"))


def sq_norm(x):
    """The squared L2 norm of one tensor, summed in at least float32 (bfloat16 would lose it)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.sum(jnp.square(x))


def norm(x):
    """The L2 norm of one tensor (`sq_norm`'s square root)."""
    return jnp.sqrt(sq_norm(x))


def leaf_norms(tree):
    """The tree of each leaf's `norm`."""
    return jax.tree.map(norm, tree)


def global_norm(tree):
    """The L2 norm of all leaves together, in at least float32."""
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree))
