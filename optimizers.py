"""The optimizers and learning-rate schedules a config can name, and the one place that builds them.

lars.py holds LARS itself (Algorithm 1 of You, Gitman & Ginsburg); this file
adds its baselines, momentum SGD (Goyal et al.) and LAMB, which reuse LARS's
exclusion masks and trust-ratio core, and the schedules (all durations in
steps: train.resolve_steps converts epochs in one place).

    schedule = optimizers.create_schedule(config, total_steps, warmup_steps, decay_boundaries)
    optimizer = optimizers.create_optimizer(config, schedule)

References:
  You et al., "Large Batch Optimization for Deep Learning: Training BERT in
  76 minutes", arXiv:1904.00962, 2019 (LAMB).
  Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
  arXiv:1706.02677, 2017.
"""

from collections.abc import Sequence

import optax

import lars

OPTIMIZERS = ("lars", "sgd", "lamb")
SCHEDULES = ("poly", "step", "cosine")


# --------------------------------------------------------------------------
# The baselines.
# --------------------------------------------------------------------------


def lamb(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    exclude: lars.Exclude = lars.NDIM_RULE,
) -> optax.GradientTransformation:
    """LAMB: Adam moments, decoupled weight decay, and the layer-wise trust ratio.

    u = adam(g) + beta * w;  w = w - lr_t * (||w|| / ||u||) * u.

    The trust ratio is the same `scale_by_lars` core with eta = 1 and the
    "optax" formula applied to the Adam update.

    Args:
      learning_rate: float or optax schedule.
      b1, b2, eps: Adam's moment decay rates and denominator guard.
      weight_decay: decoupled weight decay (LARS tensors only).
      exclude: as in `lars`.

    Returns:
      An optax.GradientTransformation.

    References:
      You et al., arXiv:1904.00962, Algorithm 2.
    """
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        lars.scale_by_lars(
            trust_coefficient=1.0,
            weight_decay=weight_decay,
            formula="optax",
            mask=lars.lars_mask(exclude),
        ),
        optax.scale_by_learning_rate(learning_rate),
    )


def momentum_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    exclude: lars.Exclude = lars.NDIM_RULE,
) -> optax.GradientTransformation:
    """Momentum SGD with L2 weight decay on kernels: the Goyal et al. baseline.

    v = m * v + lr_t * (g + beta * w);  w = w - v.

    References:
      Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1
      Hour", arXiv:1706.02677, 2017.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=lars.lars_mask(exclude)),
        optax.scale_by_learning_rate(learning_rate),
        optax.trace(decay=momentum, nesterov=nesterov),
    )


# --------------------------------------------------------------------------
# Schedules (all durations in steps; configs convert epochs in one place).
# --------------------------------------------------------------------------


def warmup_poly_schedule(
    base_lr: float,
    total_steps: int,
    warmup_steps: int = 0,
    end_lr: float = 0.0,
    power: float = 2.0,
) -> optax.Schedule:
    """Linear warmup from 0 to base_lr, then polynomial decay to end_lr.

    lr(t) = base_lr * t / W                                       for t < W
    lr(t) = end + (base_lr - end) * (1 - (t - W) / (T - W))^power  for t >= W

    References:
      You, Zhang, Hsieh, Demmel, Keutzer, arXiv:1709.05011 (poly power 2).
    """
    decay = optax.polynomial_schedule(
        init_value=base_lr,
        end_value=end_lr,
        power=power,
        transition_steps=max(total_steps - warmup_steps, 1),
    )
    if warmup_steps <= 0:
        return decay
    warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def goyal_schedule(
    base_lr: float,
    warmup_steps: int,
    boundaries: Sequence[int],
    decay_factor: float = 0.1,
) -> optax.Schedule:
    """Linear warmup then step decay (x decay_factor at each boundary step).

    With base_lr = 0.1 * batch / 256 this is the linear-scaling rule of Goyal
    et al., the large-batch baseline LARS is compared against.

    References:
      Goyal et al., arXiv:1706.02677, sections 2.1-2.2.
    """
    steps = optax.piecewise_constant_schedule(
        base_lr, {int(b) - warmup_steps: decay_factor for b in boundaries if b > warmup_steps}
    )
    if warmup_steps <= 0:
        return steps
    warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
    return optax.join_schedules([warmup, steps], [warmup_steps])


def warmup_cosine_schedule(
    base_lr: float, total_steps: int, warmup_steps: int = 0, end_lr: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 to base_lr, then cosine decay to end_lr at total_steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=base_lr,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=end_lr,
    )


# --------------------------------------------------------------------------
# From a config.
# --------------------------------------------------------------------------


def create_schedule(config, total_steps: int, warmup_steps: int, decay_boundaries: Sequence[int]) -> optax.Schedule:
    """The config's `lr_schedule` over the run's step counts (train.Steps)."""
    if config.lr_schedule == "poly":
        return warmup_poly_schedule(
            config.learning_rate, total_steps, warmup_steps, config.end_learning_rate, config.lr_power
        )
    if config.lr_schedule == "step":
        return goyal_schedule(config.learning_rate, warmup_steps, decay_boundaries)
    if config.lr_schedule == "cosine":
        return warmup_cosine_schedule(config.learning_rate, total_steps, warmup_steps, config.end_learning_rate)
    raise ValueError(f"Unknown lr_schedule {config.lr_schedule!r}; choose from {SCHEDULES}.")


def exclusion(config) -> lars.Exclude:
    """config.exclude ("ndim<=1", comma-separated regexes, or "") as lars.mask_report takes it."""
    return [rule.strip() for rule in config.exclude.split(",") if rule.strip()] or None


def create_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The config's `optimizer` ("lars", "sgd" or "lamb") at `schedule`."""
    common = dict(weight_decay=config.weight_decay, exclude=exclusion(config))
    if config.optimizer == "lars":
        return lars.lars(
            schedule,
            momentum=config.momentum,
            nesterov=config.nesterov,
            trust_coefficient=config.trust_coefficient,
            eps=config.lars_eps,
            formula=config.lars_formula,
            clip=config.lars_clip,
            **common,
        )
    if config.optimizer == "sgd":
        return momentum_sgd(schedule, momentum=config.momentum, nesterov=config.nesterov, **common)
    if config.optimizer == "lamb":
        return lamb(schedule, **common)
    raise ValueError(f"Unknown optimizer {config.optimizer!r}; choose from {OPTIMIZERS}.")
