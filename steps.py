"""The jitted training and evaluation steps: loss, gradients over micro-steps, the optimizer update
with its finiteness guard and metrics, and the host-fed step for batches larger than memory.

Parameters are replicated, the global batch is sharded over the mesh axis "data", the train
state is donated. Nothing here reads a config file or touches the workdir.
"""

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import lars
import microbatch
import noise_scale
import trees


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    noise_scale: Any  # noise_scale.init's moving averages (left at zero when the run does not measure)


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def make_loss_fn(model, config, num_classes: int):
    """Returns loss_fn(params, batch_stats, images, labels, key) -> (mean loss, (batch_stats, logits)):
    the training loss of a micro-batch (dropout from `key`, BatchNorm statistics updated)."""

    def loss_fn(params, batch_stats, images, labels, key):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": key},
        )
        loss = jnp.mean(cross_entropy(logits, labels, num_classes, config.label_smoothing))
        return loss, (updates["batch_stats"], logits)

    return loss_fn


def make_micro_step(loss_fn):
    """Returns micro_step(params, key, carry, ((images, labels), index)) -> (carry, None).

    The carry is (gradient sum, BatchNorm statistics, loss sum, correct count, sum of each
    micro-step gradient's squared norm per tensor, or None where the noise scale does not take
    them); `key` is the step's dropout key, folded with the micro-step's index.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_step(params, key, carry, inputs):
        grads_sum, batch_stats, loss_sum, correct, sq_sum = carry
        (images, labels), index = inputs
        (loss, (batch_stats, logits)), grads = grad_fn(
            params, batch_stats, images, labels, jax.random.fold_in(key, index)
        )
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        correct = correct + jnp.sum(jnp.argmax(logits, -1) == labels)
        if sq_sum is not None:
            sq_sum = jax.tree.map(jnp.add, sq_sum, noise_scale.sq_norms(grads))
        return (grads_sum, batch_stats, loss_sum + loss, correct, sq_sum), None

    return micro_step


def initial_carry(state: TrainState, measure: bool = False):
    """The carry before the first micro-step; `measure`: with the squared norms' sums."""
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    sq_sum = jax.tree.map(lambda _: jnp.zeros([], jnp.float32), state.params) if measure else None
    return zeros, state.batch_stats, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32), sq_sum


def _mean(carry, num_micro: int):
    """(mean gradient, BatchNorm statistics, mean loss, correct count, mean squared micro-step
    gradient norms or None) of the summed carry."""
    grads, batch_stats, loss, correct, sq_sum = carry
    mean = lambda tree: jax.tree.map(lambda g: g / num_micro, tree)  # noqa: E731
    return mean(grads), batch_stats, loss / num_micro, correct, None if sq_sum is None else mean(sq_sum)


def make_grad_fn(loss_fn, mesh: Mesh, num_micro: int, loop: str, measure: bool = False):
    """Returns accumulate_grads(state, batch, key) -> (grads, batch_stats, loss, correct, micro_sq).

    The gradient of the mean loss over the global batch, accumulated over
    `num_micro` micro-steps (each taking its rows from every device's share) that
    run in a `loop` ("scan" or "unroll", microbatch.accumulate); BatchNorm
    statistics are updated micro-step by micro-step. With `measure`, micro_sq is the
    mean over micro-steps of their gradients' squared norms per tensor (else None).
    """
    micro_step = make_micro_step(loss_fn)

    def accumulate_grads(state: TrainState, batch, key):
        key = jax.random.fold_in(key, state.step)
        init = initial_carry(state, measure)
        micro = microbatch.split((batch["image"], batch["label"]), mesh, num_micro)
        body = functools.partial(micro_step, state.params, key)
        return _mean(microbatch.accumulate(body, init, micro, num_micro, loop), num_micro)

    return accumulate_grads


def make_apply_gradients(optimizer, schedule, batch_size: int, num_micro: int = 1, noise=None):
    """Returns apply_gradients(state, grads, batch_stats, loss, correct, micro_sq) -> (state, metrics):
    the optimizer update of a global batch of `batch_size` whose mean gradient is `grads`; with
    micro_sq (the mean squared norms of `num_micro` micro-step gradients per tensor), also the
    noise scale's averages (`noise`: noise_scale.Settings)."""

    def apply_gradients(state: TrainState, grads, batch_stats, loss, correct, micro_sq=None):
        # The per-layer norms: LARS's trust ratios take them (other optimizers ignore them), and
        # they make the finiteness check and the global norms: a layer's norm is non-finite when an
        # element is inf or NaN (or when its square passes float32's range, ~1.8e19, which stops
        # the step too); param_norm, like layer_param_norms, is that of the parameters the step
        # started from.
        grad_norms, param_norms = trees.leaf_norms(grads), trees.leaf_norms(state.params)
        updates, opt_state = optimizer.update(
            grads, state.opt_state, state.params, grad_norms=grad_norms, param_norms=param_norms
        )
        params = optax.apply_updates(state.params, updates)
        grads_finite = jax.tree.map(jnp.isfinite, grad_norms)
        ok = jnp.isfinite(loss) & jnp.all(jnp.stack(jax.tree.leaves(grads_finite)))
        ratios = lars.get_trust_ratios(opt_state)
        noise_state = state.noise_scale
        if micro_sq is not None:
            big_sq = jax.tree.map(jnp.square, grad_norms)
            estimates = noise_scale.estimates(micro_sq, big_sq, batch_size / num_micro, batch_size)
            noise_state = noise_scale.update(noise_state, *estimates, ratios, noise.decay)
        new_state = TrainState(state.step + 1, params, batch_stats, opt_state, noise_state)
        # A non-finite step leaves the state as it was; the host then stops.
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        metrics = {
            "loss": loss,
            "accuracy": correct / batch_size,
            "learning_rate": schedule(state.step),
            "grad_norm": optax.tree.norm(grad_norms),
            "param_norm": optax.tree.norm(param_norms),
            "update_norm": trees.global_norm(updates),
            "ok": ok,
            "grads_finite": grads_finite,
            "layer_param_norms": param_norms,
            "layer_grad_norms": grad_norms,
            "noise_scale": new_state.noise_scale,
        }
        if ratios is not None:
            metrics["trust_ratios"] = ratios
        return new_state, metrics

    return apply_gradients


def make_train_step(loss_fn, optimizer, schedule, batch_size: int, mesh: Mesh, num_micro: int, loop: str, noise):
    """Returns train_step(state, batch, dropout_key) -> (state, metrics) (micro-steps as in
    `make_grad_fn`; the noise scale measured over the micro-steps when there are several and
    `noise` (noise_scale.Settings) is enabled)."""
    measure = noise.enabled and num_micro > 1
    accumulate_grads = make_grad_fn(loss_fn, mesh, num_micro, loop, measure)
    apply_gradients = make_apply_gradients(optimizer, schedule, batch_size, num_micro, noise)

    def train_step(state: TrainState, batch, key):
        return apply_gradients(state, *accumulate_grads(state, batch, key))

    return train_step


def make_noise_probe(loss_fn, optimizer, batch_size: int, noise):
    """Returns probe(state, batch, next_batch, dropout_key) -> noise-scale averages: the runs of one
    micro-step measure the noise scale from the gradients of two global batches of `batch_size`
    at the state's parameters (the training step's micro-step on each, the first with the
    dropout key the step gives it), and LARS's trust ratios from the first, as the step computes them."""
    micro_step = make_micro_step(loss_fn)

    def probe(state: TrainState, batch, next_batch, key):
        key = jax.random.fold_in(key, state.step)
        carry = initial_carry(state, measure=True)
        carry = micro_step(state.params, key, carry, ((batch["image"], batch["label"]), 0))[0]
        first = carry[0]
        carry = micro_step(state.params, key, carry, ((next_batch["image"], next_batch["label"]), 1))[0]
        grads, _, _, _, micro_sq = _mean(carry, 2)
        big_sq = noise_scale.sq_norms(grads)
        estimates = noise_scale.estimates(micro_sq, big_sq, batch_size, 2 * batch_size)
        _, opt_state = optimizer.update(
            first, state.opt_state, state.params,
            grad_norms=trees.leaf_norms(first), param_norms=trees.leaf_norms(state.params),
        )  # fmt: skip
        return noise_scale.update(state.noise_scale, *estimates, lars.get_trust_ratios(opt_state), noise.decay)

    return probe


@dataclasses.dataclass(frozen=True)
class FedStep:
    """A training step whose micro-batches the host feeds one at a time (microbatch_loop "host"):
    a global batch larger than memory. Gradients, BatchNorm statistics and the dropout keys are
    those of the compiled step's micro-steps; only the batch is never whole in memory.

    Attributes are compiled programs: start(state) -> carry; micro(state, carry, micro_batch,
    key, index) -> carry (donates the carry); finish(state, carry) -> (state, metrics) (donates the state).
    """

    start: Any
    micro: Any
    finish: Any
    num_micro: int

    def __call__(self, state: TrainState, micro_batches: Iterator[dict], key) -> tuple[TrainState, dict]:
        carry = self.start(state)
        for index in range(self.num_micro):
            carry = self.micro(state, carry, next(micro_batches), key, np.int32(index))
            # JAX dispatches asynchronously: without a wait the loop would copy every micro-batch
            # of the step to the device at once. One micro-step at a time, the next micro-batch
            # read while it runs (the pipeline prefetches it).
            jax.block_until_ready(carry)
        return self.finish(state, carry)


def make_fed_step_fns(loss_fn, optimizer, schedule, batch_size: int, num_micro: int, noise):
    """The three functions of a `FedStep`, to be jitted: (start, micro, finish); the noise scale
    measured over the micro-steps as in `make_train_step`."""
    micro_step = make_micro_step(loss_fn)
    apply_gradients = make_apply_gradients(optimizer, schedule, batch_size, num_micro, noise)
    measure = noise.enabled and num_micro > 1

    def start(state: TrainState):
        return initial_carry(state, measure)

    def micro(state: TrainState, carry, batch, key, index):
        key = jax.random.fold_in(key, state.step)
        return micro_step(state.params, key, carry, ((batch["image"], batch["label"]), index))[0]

    def finish(state: TrainState, carry):
        return apply_gradients(state, *_mean(carry, num_micro))

    return start, micro, finish


def make_eval_step(model, num_classes: int):
    """Returns eval_step(state, batch) -> summed top-1, top-5 (with 5 classes or more), loss, count."""

    def eval_step(state: TrainState, batch):
        logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
        mask, labels = batch["mask"], batch["label"]
        sums = {
            "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            "loss": jnp.sum(cross_entropy(logits, labels, num_classes) * mask),
            "count": jnp.sum(mask),
        }
        if num_classes >= 5:  # top-5 of fewer classes is always right
            top5 = jax.lax.top_k(logits, 5)[1]
            sums["top5"] = jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask)
        return sums

    return eval_step


def on_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """fn traced with `mesh` as the abstract mesh, so that layers which run per
    device (the oneDNN convolutions) can shard_map over its "data" axis."""

    @functools.wraps(fn)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced
