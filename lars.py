"""LARS as an Optax gradient-transformation chain: Algorithm 1, line by line.

LARS (Layer-wise Adaptive Rate Scaling) gives every parameter tensor its own
learning rate, proportional to ||w|| / ||g||, so that no layer takes a step
that is large relative to its weights. It is what let You et al. scale the
ImageNet batch to 32K.

Algorithm 1 of You, Gitman & Ginsburg (2017), per tensor w at step t, reads:

    g     = dL/dw
    lr_t  = schedule(t)
    local = eta * ||w|| / (||g|| + beta * ||w||)
    v     = m * v + lr_t * local * (g + beta * w)
    w     = w - v

`lars()` below is that algorithm as the chain
`scale_by_lars` (local * (g + beta*w)) -> `scale_by_learning_rate` (lr_t) ->
`optax.trace` (momentum), which keeps the LR inside the momentum buffer, as
the paper does. The other optimizers a config can name (momentum SGD, LAMB)
and the schedules live in optimizers.py.

References:
  You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks",
  arXiv:1708.03888, 2017.
  You, Zhang, Hsieh, Demmel, Keutzer, "ImageNet Training in Minutes",
  arXiv:1709.05011, 2017.
"""

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import trees

FORMULAS = ("paper", "optax")
# The default exclusion rule: biases and BatchNorm scales/offsets.
NDIM_RULE = "ndim<=1"
LARS_RULE = "lars"

Exclude = str | Sequence[str] | Callable[[str, Any], bool] | None


# --------------------------------------------------------------------------
# Parameter paths and exclusion masks.
# --------------------------------------------------------------------------


def _exclusion_rules(exclude: Exclude) -> list[tuple[str, Callable[[str, Any], bool]]]:
    """Turns `exclude` into named predicates (path, param) -> excluded."""
    if exclude is None:
        return []
    if exclude == NDIM_RULE:
        return [(NDIM_RULE, lambda path, p: jnp.ndim(p) <= 1)]
    if callable(exclude):
        return [(getattr(exclude, "__name__", "callable"), exclude)]
    if isinstance(exclude, str):
        exclude = [exclude]
    rules = []
    for pattern in exclude:
        if pattern == NDIM_RULE:
            rules += _exclusion_rules(NDIM_RULE)
        else:
            regex = re.compile(pattern)
            rules.append((pattern, lambda path, p, r=regex: r.search(path) is not None))
    return rules


def mask_report(params, exclude: Exclude = NDIM_RULE) -> dict[str, str]:
    """Says which rule decides each parameter's treatment.

    Args:
      params: the parameter pytree.
      exclude: "ndim<=1" (default), a list of regexes searched in the parameter
        path (e.g. ["bias$", "BatchNorm"], "ndim<=1" may be one of them), a
        predicate (path, param) -> bool, or None (exclude nothing).

    Returns:
      {"path/to/param": rule}, where rule is the first exclusion rule that
      matched, or "lars" for parameters that get the trust ratio and weight
      decay. Every parameter appears exactly once.

    Raises:
      ValueError: if a regex matches no parameter (most likely a typo).
    """
    rules = _exclusion_rules(exclude)
    report, used = {}, set()
    for path, param in trees.flatten_with_paths(params).items():
        report[path] = LARS_RULE
        for name, predicate in rules:
            if predicate(path, param):
                report[path] = name
                used.add(name)
                break
    unused = [name for name, _ in rules if name not in used and name != NDIM_RULE]
    if unused and not callable(exclude):
        raise ValueError(
            f"Exclusion patterns {unused} match no parameter. Parameter paths: "
            f"{list(report)[:8]}{' ...' if len(report) > 8 else ''}"
        )
    return report


def lars_mask(exclude: Exclude = NDIM_RULE) -> Callable[[Any], Any]:
    """Returns params -> pytree of bools, True where LARS applies."""

    def mask_fn(params):
        report = mask_report(params, exclude)
        flags = [report[path] == LARS_RULE for path in trees.flatten_with_paths(params)]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), flags)

    return mask_fn


def _resolve_mask(mask, params):
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    if callable(mask):
        return mask(params)
    if isinstance(mask, bool):
        return jax.tree.map(lambda _: mask, params)
    return mask


# --------------------------------------------------------------------------
# The trust ratio.
# --------------------------------------------------------------------------


def local_lr(
    param_norm,
    grad_norm,
    update_norm,
    *,
    trust_coefficient: float,
    weight_decay: float,
    eps: float,
    formula: str,
):
    """The LARS local learning rate of one tensor (Algorithm 1, line `local`).

    Args:
      param_norm: ||w||.
      grad_norm: ||g||.
      update_norm: ||g + weight_decay * w|| (used by formula "optax").
      trust_coefficient: eta.
      weight_decay: beta.
      eps: added to the denominator (the paper has none).
      formula: "paper": eta*||w|| / (||g|| + beta*||w|| + eps);
        "optax": eta*||w|| / (||g + beta*w|| + eps).

    Returns:
      The ratio, 1.0 where ||w|| == 0 or ||g|| == 0 (a freshly zeroed layer or
      one the loss does not touch), so it is never NaN or Inf.
    """
    if formula == "paper":
        denominator = grad_norm + weight_decay * param_norm + eps
    elif formula == "optax":
        denominator = update_norm + eps
    else:
        raise ValueError(f"Unknown LARS formula {formula!r}; choose from {FORMULAS}.")
    undefined = (param_norm == 0) | (grad_norm == 0) | (denominator == 0)
    ratio = trust_coefficient * param_norm / jnp.where(undefined, 1.0, denominator)
    return jnp.where(undefined, 1.0, ratio)


class ScaleByLarsState(NamedTuple):
    """State of `scale_by_lars`.

    Attributes:
      count: number of updates so far (indexes the LR schedule for LARC).
      trust_ratios: the last per-tensor local LRs, shaped like the params with
        scalar leaves (1.0 for excluded tensors).
    """

    count: jax.Array
    trust_ratios: Any


def scale_by_lars(
    trust_coefficient: float = 1e-3,
    weight_decay: float = 0.0,
    eps: float = 0.0,
    formula: str = "paper",
    clip: bool = False,
    mask: Any = None,
    learning_rate: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformation:
    """Scales each tensor's gradient g into local * (g + weight_decay * w).

    Args:
      trust_coefficient: eta in Algorithm 1 (1e-3 in the paper).
      weight_decay: beta, added to the gradient of LARS tensors only.
      eps: added to the trust-ratio denominator.
      formula: "paper" or "optax", see `local_lr`.
      clip: LARC clipping, local = min(local / lr_t, 1), so that the effective
        per-layer rate lr_t * local never exceeds the global lr_t. Needs
        `learning_rate`.
      mask: pytree of bools (True = apply LARS) or a function params -> such a
        pytree; None applies LARS everywhere. Excluded tensors pass through
        unchanged (no weight decay, no trust ratio).
      learning_rate: float or schedule, used only when clip=True.

    Returns:
      An optax.GradientTransformationExtraArgs whose state keeps the last trust ratios; its
      update takes the per-tensor norms of the gradient and the params (`grad_norms`,
      `param_norms`, as trees.leaf_norms gives them) where the caller has them already.

    References:
      You, Gitman, Ginsburg, arXiv:1708.03888, Algorithm 1.
      LARC clipping: NVIDIA apex `apex.parallel.LARC` ("clip" mode).
    """
    if formula not in FORMULAS:
        raise ValueError(f"Unknown LARS formula {formula!r}; choose from {FORMULAS}.")
    if clip and learning_rate is None:
        raise ValueError("scale_by_lars(clip=True) needs the learning_rate.")

    def init_fn(params):
        ones = jax.tree.map(lambda _: jnp.ones([], jnp.float32), params)
        return ScaleByLarsState(count=jnp.zeros([], jnp.int32), trust_ratios=ones)

    def update_fn(updates, state, params, *, grad_norms=None, param_norms=None, **unused_extra_args):
        # grad_norms, param_norms: trees.leaf_norms of `updates` and `params`, when the caller
        # has them (the training step logs them); computed here otherwise.
        if params is None:
            raise ValueError("scale_by_lars needs the params: call update(g, state, params).")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        grad_norms = trees.leaf_norms(updates) if grad_norms is None else grad_norms
        param_norms = trees.leaf_norms(params) if param_norms is None else param_norms

        def one_tensor(g, w, g_norm, w_norm, apply):
            if not apply:
                return g, jnp.ones([], jnp.float32)
            decayed = g + weight_decay * w
            ratio = local_lr(
                w_norm,
                g_norm,
                trees.norm(decayed),
                trust_coefficient=trust_coefficient,
                weight_decay=weight_decay,
                eps=eps,
                formula=formula,
            )
            if clip:
                ratio = jnp.minimum(ratio / lr, 1.0)
            return (ratio * decayed).astype(g.dtype), ratio

        apply_mask = _resolve_mask(mask, params)
        pairs = jax.tree.map(one_tensor, updates, params, grad_norms, param_norms, apply_mask)
        treedef = jax.tree.structure(updates)
        flat = treedef.flatten_up_to(pairs)
        new_updates = treedef.unflatten([u for u, _ in flat])
        ratios = treedef.unflatten([r for _, r in flat])
        count = optax.safe_increment(state.count)
        return new_updates, ScaleByLarsState(count=count, trust_ratios=ratios)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------
# The optimizer.
# --------------------------------------------------------------------------


def lars(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    trust_coefficient: float = 1e-3,
    eps: float = 0.0,
    formula: str = "paper",
    clip: bool = False,
    exclude: Exclude = NDIM_RULE,
) -> optax.GradientTransformation:
    """LARS with momentum, as in Algorithm 1 of You, Gitman & Ginsburg.

    v = m * v + lr_t * local * (g + beta * w);  w = w - v.

    Args:
      learning_rate: float or optax schedule (lr_t).
      momentum: m.
      nesterov: use Nesterov momentum (update = m * v_new + lr_t * local * ...).
      weight_decay: beta (LARS tensors only).
      trust_coefficient: eta.
      eps: trust-ratio denominator guard.
      formula: "paper" (default) or "optax", see `local_lr`.
      clip: LARC clipping, see `scale_by_lars`.
      exclude: tensors that get plain momentum SGD at lr_t, with neither weight
        decay nor trust ratio; see `mask_report`. Default: all tensors with
        ndim <= 1 (biases, BatchNorm parameters), as in MLPerf's reference.

    Returns:
      An optax.GradientTransformation.

    References:
      You, Gitman, Ginsburg, arXiv:1708.03888, Algorithm 1.
    """
    return optax.chain(
        scale_by_lars(
            trust_coefficient=trust_coefficient,
            weight_decay=weight_decay,
            eps=eps,
            formula=formula,
            clip=clip,
            mask=lars_mask(exclude),
            learning_rate=learning_rate,
        ),
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum, nesterov=nesterov),
    )


def get_trust_ratios(opt_state):
    """The per-tensor trust ratios kept in an optimizer state (None for SGD)."""
    return optax.tree_utils.tree_get(opt_state, "trust_ratios")


def trust_ratios(
    params,
    grads,
    weight_decay: float = 0.0,
    trust_coefficient: float = 1e-3,
    eps: float = 0.0,
    formula: str = "paper",
) -> dict[str, dict[str, float]]:
    """Per-tensor LARS diagnostics, for notebooks.

    Args:
      params, grads: pytrees of the same structure.
      weight_decay, trust_coefficient, eps, formula: as in `scale_by_lars`.

    Returns:
      {"path/to/param": {"trust_ratio": ..., "param_norm": ..., "grad_norm": ...}}
      as Python floats, computed for every tensor (exclusions are not applied).
    """
    flat_params = trees.flatten_with_paths(params)
    flat_grads = trees.flatten_with_paths(grads)
    out = {}
    for path, w in flat_params.items():
        g = flat_grads[path]
        w_norm, g_norm = trees.norm(jnp.asarray(w)), trees.norm(jnp.asarray(g))
        ratio = local_lr(
            w_norm,
            g_norm,
            trees.norm(jnp.asarray(g) + weight_decay * jnp.asarray(w)),
            trust_coefficient=trust_coefficient,
            weight_decay=weight_decay,
            eps=eps,
            formula=formula,
        )
        out[path] = {
            "trust_ratio": float(ratio),
            "param_norm": float(w_norm),
            "grad_norm": float(g_norm),
        }
    return out
