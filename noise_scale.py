"""The gradient noise scale of McCandlish et al.: how large a batch the run can use.

With G the true gradient, Sigma the covariance of the per-example gradient and G_B a batch's
mean gradient, E|G_B|^2 = |G|^2 + tr(Sigma) / B. Mean squared norms at two batch sizes b < B,
taken at the same parameters, give unbiased estimates of |G|^2 and tr(Sigma) (`estimates`); their
moving averages give the simple noise scale B_simple = tr(Sigma) / |G|^2, which the paper finds
close to the critical batch B_crit (steps S and examples E to a target trade as
(S / S_min - 1)(E / E_min - 1) = 1, with B_crit = E_min / S_min).

Where a run gets its two batch sizes (the step computes the norms, this module the rest):
  several micro-steps  each micro-step's gradient is the mean over b = B / num_micro examples
                       (rows of every device, BatchNorm grouped as in training) and their mean
                       is the step's gradient over B: every step, for one squared norm per
                       tensor per micro-step.
  one micro-step       a probe every `every` steps takes the gradients of the step's batch and of
                       the next one at the same parameters (two micro-steps of the training
                       step's own micro-step): b = B, 2B. It costs two gradient evaluations.
Gradients of consecutive steps are not used: the parameters move between them, and the change
of G biases both estimates (docs/noise_scale.md gives the measured bias).

The examples here are BatchNorm's groups: with bn_group "device" or "global" a sub-batch is
never smaller than the group that shares statistics, so Sigma is the covariance of a group's
mean gradient times the group size, not that of single images (docs/noise_scale.md).

As LARS sees it: LARS steps along P g with P = r_l I on layer l (r_l the layer's trust ratio,
1 for excluded tensors), so the same estimates with each layer weighted by r_l^2 give the noise
scale of the direction it steps in (`update`'s trust_ratios).

References:
  McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training",
  arXiv:1812.06162, 2018 (section 2.2, Appendix A).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp

import trees

# The fraction of a run's steps that its moving averages span, when the config leaves it open.
AUTO_WINDOW_FRACTION = 0.05
MIN_WINDOW_STEPS = 10


@dataclasses.dataclass(frozen=True)
class Settings:
    """How a run measures the noise scale.

    Attributes:
      enabled: config.noise_scale.
      probe_every: steps between probes (runs of one micro-step); 0 when micro-steps measure.
      decay: the moving averages' decay per measurement.
    """

    enabled: bool
    probe_every: int
    decay: float

    @property
    def probes(self) -> bool:
        return self.enabled and self.probe_every > 0

    def probes_within(self, total: int) -> bool:
        """Whether a run of `total` steps probes at all (its first probe comes before the last step)."""
        return self.probes and self.probe_every < total

    def probe_due(self, step: int, total: int) -> bool:
        """Whether the step of index `step` (from 0) is probed: every `probe_every`-th, not the last."""
        return self.probes and (step + 1) % self.probe_every == 0 and step + 1 < total


def settings(config, total_steps: int, num_micro: int) -> Settings:
    """The Settings of a config (noise_scale, noise_scale_every_steps, noise_scale_window_steps)."""
    window = config.get("noise_scale_window_steps", 0) or max(
        MIN_WINDOW_STEPS, round(AUTO_WINDOW_FRACTION * total_steps)
    )
    every = 0 if num_micro > 1 else config.get("noise_scale_every_steps", 100)
    per_step = 1.0 - 1.0 / window
    return Settings(
        enabled=bool(config.get("noise_scale", True)),
        probe_every=every,
        decay=per_step ** max(every, 1),
    )


def init(params) -> dict:
    """The moving averages, zero: per tensor, |G|^2 and tr(Sigma); overall, the same as LARS sees
    them; `weight` is the averages' total weight (they are divided by it when read)."""
    zeros = jax.tree.map(lambda _: jnp.zeros([], jnp.float32), params)
    scalar = jnp.zeros([], jnp.float32)
    return {"grad_sq": zeros, "trace": zeros, "grad_sq_lars": scalar, "trace_lars": scalar, "weight": scalar}


def sq_norms(tree):
    """Each tensor's squared L2 norm, summed in at least float32."""
    return jax.tree.map(trees.sq_norm, tree)


def estimates(small_sq, big_sq, small_batch: float, big_batch: float):
    """Unbiased |G|^2 and tr(Sigma) from mean squared gradient norms at two batch sizes.

    Args:
      small_sq: E|G_b|^2, the mean of the squared norms of gradients over `small_batch` examples
        (any array or pytree; tensor by tensor).
      big_sq: |G_B|^2 over `big_batch` examples, at the same parameters.
      small_batch, big_batch: b < B.

    Returns:
      (|G|^2, tr(Sigma)), each shaped like the inputs. Each is unbiased and noisy; |G|^2 can
      be negative.

    References:
      McCandlish et al., arXiv:1812.06162, Appendix A.1.
    """
    b, B = float(small_batch), float(big_batch)
    grad_sq = jax.tree.map(lambda small, big: (B * big - b * small) / (B - b), small_sq, big_sq)
    trace = jax.tree.map(lambda small, big: (small - big) / (1.0 / b - 1.0 / B), small_sq, big_sq)
    return grad_sq, trace


def update(state: dict, grad_sq, trace, trust_ratios, decay: float) -> dict:
    """The moving averages after one measurement.

    Args:
      state: from `init` or an earlier update.
      grad_sq, trace: per-tensor estimates (`estimates`).
      trust_ratios: LARS's per-tensor ratios of this step (None for other optimizers).
      decay: Settings.decay.
    """

    def ema(old, new):
        return decay * old + (1.0 - decay) * new

    if trust_ratios is None:
        lars_grad_sq = lars_trace = jnp.zeros([], jnp.float32)
    else:
        weights = jax.tree.map(jnp.square, trust_ratios)
        lars_grad_sq = _weighted_sum(weights, grad_sq)
        lars_trace = _weighted_sum(weights, trace)
    return {
        "grad_sq": jax.tree.map(ema, state["grad_sq"], grad_sq),
        "trace": jax.tree.map(ema, state["trace"], trace),
        "grad_sq_lars": ema(state["grad_sq_lars"], lars_grad_sq),
        "trace_lars": ema(state["trace_lars"], lars_trace),
        "weight": ema(state["weight"], 1.0),
    }


def _weighted_sum(weights, values):
    return sum(jax.tree.leaves(jax.tree.map(jnp.multiply, weights, values)))


def scalars(state: dict, lars: bool) -> dict[str, float]:
    """The logged figures of fetched moving averages (NumPy): `grad_noise_scale` (B_simple),
    `grad_sq_true` (|G|^2), `grad_cov_trace` (tr(Sigma)), and with `lars` the same with the
    suffix `_lars`. Empty before the first measurement; B_simple only while |G|^2 > 0."""
    weight = float(state["weight"])
    if weight <= 0:
        return {}
    totals = {
        "": (sum(map(float, jax.tree.leaves(state["grad_sq"]))), sum(map(float, jax.tree.leaves(state["trace"])))),
    }
    if lars:
        totals["_lars"] = (float(state["grad_sq_lars"]), float(state["trace_lars"]))
    out = {}
    for suffix, (grad_sq, trace) in totals.items():
        out |= _figures(grad_sq / weight, trace / weight, suffix)
    return out


def layer_scalars(state: dict) -> dict[str, dict[str, float]]:
    """Per tensor ({"path": figures}, as in `scalars` without suffixes); empty before the first measurement."""
    weight = float(state["weight"])
    if weight <= 0:
        return {}
    grad_sq, trace = trees.flatten_with_paths(state["grad_sq"]), trees.flatten_with_paths(state["trace"])
    return {path: _figures(float(grad_sq[path]) / weight, float(trace[path]) / weight) for path in grad_sq}


def _figures(grad_sq: float, trace: float, suffix: str = "") -> dict[str, float]:
    out = {f"grad_sq_true{suffix}": grad_sq, f"grad_cov_trace{suffix}": trace}
    if grad_sq > 0 and math.isfinite(trace):
        out[f"grad_noise_scale{suffix}"] = trace / grad_sq
    return out
