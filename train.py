"""The large-batch training loop: jit over a Mesh of all devices of all processes.

Parameters are replicated, the global batch is sharded over the mesh axis
"data", the train state is donated. A global batch larger than memory is
split into micro-steps (microbatch.py) whose gradients are averaged before
one optimizer update. Everything the loop needs is validated before anything is
written, the step's memory included (compiled, not yet run).
"""

import dataclasses
import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import checkpoints
import config_checks
import host_memory
import input_pipeline
import lars
import microbatch
import models
import optimizers
from configs import default
from models import layers, onednn

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
METRICS_FILE = "metrics.jsonl"
TRUST_RATIOS_FILE = "trust_ratios.jsonl"
MASK_FILE = "lars_mask.json"
CONFIG_FILE = "config.json"
SPLIT_FILE = "data_split.json"  # with validation_images: which training images were held out
LAYOUT_FILE = "layout.json"  # processes and devices of the run (gradients depend on them with per-device BN)


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any


# --------------------------------------------------------------------------
# Config checks and step arithmetic, done before anything is compiled or written.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Steps:
    """Every duration of the run, in optimizer steps."""

    per_epoch: int
    total: int
    warmup: int
    decay_boundaries: tuple[int, ...]
    log: int
    trust_ratio: int
    eval: int
    checkpoint: int


def resolve_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> Steps:
    """Converts the config's epochs into steps (the one place that does)."""
    per_epoch = max(num_train_examples // config.batch_size, 1)

    def steps(name: str) -> int:
        explicit = config.get(f"{name}_steps", 0)
        return int(explicit) if explicit > 0 else max(int(round(config[f"{name}_epochs"] * per_epoch)), 0)

    total = (
        config.num_train_steps if config.num_train_steps > 0 else max(int(math.ceil(config.num_epochs * per_epoch)), 1)
    )
    interval = lambda n: n if n > 0 else total  # noqa: E731
    return Steps(
        per_epoch=per_epoch,
        total=total,
        warmup=min(steps("warmup"), total),
        decay_boundaries=tuple(int(round(e * per_epoch)) for e in config.lr_decay_epochs),
        log=max(config.log_every_steps, 1),
        trust_ratio=max(config.trust_ratio_every_steps or config.log_every_steps, 1),
        eval=interval(steps("eval_every")),
        checkpoint=interval(steps("checkpoint_every")),
    )


def bn_group_size(config, per_device_micro: int) -> int | None:
    """BatchNorm group: the per-device micro-batch, None (global) or a ghost size."""
    if config.bn_group == "device":
        return per_device_micro
    if config.bn_group == "global":
        return None
    try:
        size = int(config.bn_group)
    except ValueError:
        raise ValueError(f"bn_group={config.bn_group!r}: use 'device', 'global' or a ghost-batch size.") from None
    if size <= 0 or per_device_micro % size:
        raise ValueError(f"bn_group={size} must divide the per-device micro-batch of {per_device_micro}.")
    return size


def check_batch_arithmetic(config, num_devices: int, num_processes: int) -> tuple[int, int]:
    """Returns (per-device batch, micro-steps per update) or raises ValueError.

    With microbatch_size="auto" the micro-steps are 1 until `fit_train_step` picks them."""
    batch, micro = config.batch_size, config.microbatch_size
    if batch <= 0 or batch % num_devices:
        raise ValueError(
            f"batch_size={batch} is not divisible by the {num_devices} devices "
            f"({num_processes} process(es)); use a multiple of {num_devices}."
        )
    per_device = batch // num_devices
    if micro == microbatch.AUTO:
        micro = 0
    elif not isinstance(micro, int) or isinstance(micro, bool):
        raise ValueError(f"microbatch_size={micro!r}: use a number of examples per device, 0 or 'auto'.")
    if micro < 0 or (micro and per_device % micro):
        raise ValueError(
            f"microbatch_size={micro} does not divide the per-device batch of {per_device} "
            f"(batch_size={batch} over {num_devices} devices)."
        )
    eval_batch = config.eval_batch_size or batch
    if eval_batch % num_devices:
        raise ValueError(f"eval_batch_size={eval_batch} is not divisible by the {num_devices} devices.")
    return per_device, per_device // micro if micro else 1


def check_config(config) -> None:
    """Names that must be among the known choices, numbers within their ranges (config_checks)."""
    config_checks.check_ranges(config)
    choices = {
        "optimizer": optimizers.OPTIMIZERS,
        "lr_schedule": optimizers.SCHEDULES,
        "lars_formula": lars.FORMULAS,
        "dtype": tuple(DTYPES),
        "dataset": input_pipeline.DATASETS,
        "conv_impl": layers.CONV_IMPLS,
        "augment": input_pipeline.AUGMENTATIONS,
        "microbatch_loop": microbatch.LOOPS,
    }
    for key, allowed in choices.items():
        if config.get(key, allowed[0]) not in allowed:
            raise ValueError(f"Unknown {key} {config[key]!r}; choose from {allowed}.")
    if config.model not in models.REGISTRY:
        raise ValueError(f"Unknown model {config.model!r}; choose from {sorted(models.REGISTRY)}.")


# --------------------------------------------------------------------------
# Model, optimizer, state.
# --------------------------------------------------------------------------


def create_model(config, num_classes: int, group_size: int | None):
    kwargs = dict(config.model_kwargs)
    kwargs.setdefault("bn_group_size", group_size)
    # Workdirs from before conv_impl ran XLA's formulation ("fast_conv").
    kwargs.setdefault("conv_impl", conv_impl(config))
    return models.create(config.model, num_classes, dtype=DTYPES[config.dtype], **kwargs)


def conv_impl(config) -> str:
    """The config's convolution implementation on this backend; raises ValueError if
    oneDNN is asked for and its extension is not built."""
    impl = layers.conv_impl_for_backend(config.get("conv_impl", "xla"), jax.default_backend())
    if impl == "onednn":
        try:
            onednn.library()
        except onednn.NotBuilt as e:
            raise ValueError(f"conv_impl='onednn': {e} Or choose --config.conv_impl=xla.") from None
        if config.dtype == "bfloat16" and not onednn.bfloat16_supported():
            raise ValueError(
                f"dtype='bfloat16' with conv_impl='onednn' needs oneDNN's bfloat16 convolutions (AVX512-BF16 or "
                f"AMX); this CPU has {onednn.isa()}. Use --config.conv_impl=xla or float32."
            )
    return impl


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def _global_norm(tree):
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))


def _leaf_norms(tree):
    return jax.tree.map(lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)))), tree)


# --------------------------------------------------------------------------
# The jitted steps.
# --------------------------------------------------------------------------


def make_micro_step(model, config, num_classes: int):
    """Returns micro_step(params, key, carry, ((images, labels), index)) -> (carry, None).

    The carry is (gradient sum, BatchNorm statistics, loss sum, correct count); `key` is the
    step's dropout key, folded with the micro-step's index.
    """

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

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_step(params, key, carry, inputs):
        grads_sum, batch_stats, loss_sum, correct = carry
        (images, labels), index = inputs
        (loss, (batch_stats, logits)), grads = grad_fn(
            params, batch_stats, images, labels, jax.random.fold_in(key, index)
        )
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        correct = correct + jnp.sum(jnp.argmax(logits, -1) == labels)
        return (grads_sum, batch_stats, loss_sum + loss, correct), None

    return micro_step


def _initial_carry(state: TrainState):
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    return zeros, state.batch_stats, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32)


def _mean(carry, num_micro: int):
    """(mean gradient, BatchNorm statistics, mean loss, correct count) of the summed carry."""
    grads, batch_stats, loss, correct = carry
    return jax.tree.map(lambda g: g / num_micro, grads), batch_stats, loss / num_micro, correct


def make_grad_fn(model, config, num_classes: int, mesh: Mesh, num_micro: int):
    """Returns accumulate_grads(state, batch, key) -> (grads, batch_stats, loss, correct).

    The gradient of the mean loss over the global batch, accumulated over
    `num_micro` micro-steps (each taking its rows from every device's share);
    BatchNorm statistics are updated micro-step by micro-step.
    """
    micro_step = make_micro_step(model, config, num_classes)
    loop = microbatch.loop_kind(config.microbatch_loop, conv_impl(config), jax.default_backend())

    def accumulate_grads(state: TrainState, batch, key):
        key = jax.random.fold_in(key, state.step)
        init = _initial_carry(state)
        micro = microbatch.split((batch["image"], batch["label"]), mesh, num_micro)
        body = functools.partial(micro_step, state.params, key)
        return _mean(microbatch.accumulate(body, init, micro, num_micro, loop), num_micro)

    return accumulate_grads


def make_apply_gradients(optimizer, schedule, batch_size: int):
    """Returns apply_gradients(state, grads, batch_stats, loss, correct) -> (state, metrics):
    the optimizer update of a global batch of `batch_size` whose mean gradient is `grads`."""

    def apply_gradients(state: TrainState, grads, batch_stats, loss, correct):
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        # The per-layer norms (the same sums LARS takes; XLA computes them once) also make the
        # finiteness check and the global norms: a layer's norm is non-finite when an element is
        # inf or NaN (or when its square passes float32's range, ~1.8e19, which stops the step too),
        # and param_norm, like layer_param_norms, is that of the parameters the step started from.
        grad_norms, param_norms = _leaf_norms(grads), _leaf_norms(state.params)
        grads_finite = jax.tree.map(jnp.isfinite, grad_norms)
        ok = jnp.isfinite(loss) & jnp.all(jnp.stack(jax.tree.leaves(grads_finite)))
        new_state = TrainState(state.step + 1, params, batch_stats, opt_state)
        # A non-finite step leaves the state as it was; the host then stops.
        new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
        metrics = {
            "loss": loss,
            "accuracy": correct / batch_size,
            "learning_rate": schedule(state.step),
            "grad_norm": optax.tree.norm(grad_norms),
            "param_norm": optax.tree.norm(param_norms),
            "update_norm": _global_norm(updates),
            "ok": ok,
            "grads_finite": grads_finite,
            "layer_param_norms": param_norms,
            "layer_grad_norms": grad_norms,
        }
        ratios = lars.get_trust_ratios(opt_state)
        if ratios is not None:
            metrics["trust_ratios"] = ratios
        return new_state, metrics

    return apply_gradients


def make_train_step(model, optimizer, schedule, config, num_classes: int, mesh: Mesh, num_micro: int):
    """Returns train_step(state, batch, dropout_key) -> (state, metrics)."""
    accumulate_grads = make_grad_fn(model, config, num_classes, mesh, num_micro)
    apply_gradients = make_apply_gradients(optimizer, schedule, config.batch_size)

    def train_step(state: TrainState, batch, key):
        return apply_gradients(state, *accumulate_grads(state, batch, key))

    return train_step


@dataclasses.dataclass(frozen=True)
class FedStep:
    """A training step whose micro-batches the host feeds one at a time (microbatch_loop "host"):
    a global batch larger than memory. Gradients, BatchNorm statistics and the dropout keys are
    those of the compiled step's micro-steps; only the batch is never whole in memory.

    Attributes are compiled programs: start(state) -> carry; micro(state, carry, micro_batch,
    key, index) -> carry (donates the carry); finish(state, carry) -> (state, metrics) (donates both).
    """

    start: Any
    micro: Any
    finish: Any
    num_micro: int

    def __call__(self, state: TrainState, micro_batches: Iterator[dict], key) -> tuple[TrainState, dict]:
        carry = self.start(state)
        for index in range(self.num_micro):
            carry = self.micro(state, carry, next(micro_batches), key, np.int32(index))
        return self.finish(state, carry)


def make_fed_step_fns(model, optimizer, schedule, config, num_classes: int, num_micro: int):
    """The three functions of a `FedStep`, to be jitted: (start, micro, finish)."""
    micro_step = make_micro_step(model, config, num_classes)
    apply_gradients = make_apply_gradients(optimizer, schedule, config.batch_size)

    def micro(state: TrainState, carry, batch, key, index):
        key = jax.random.fold_in(key, state.step)
        return micro_step(state.params, key, carry, ((batch["image"], batch["label"]), index))[0]

    def finish(state: TrainState, carry):
        return apply_gradients(state, *_mean(carry, num_micro))

    return _initial_carry, micro, finish


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


# --------------------------------------------------------------------------
# Logs.
# --------------------------------------------------------------------------


class JsonlWriter:
    """Appends one JSON object per line (process 0 only; others write nothing)."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def drop_after(self, step: int):
        """Removes the records of steps after `step` (and a last line left half-written): a run
        resumed from that step's checkpoint writes them again. The file is replaced whole (a new
        file, then a rename)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = [line for line in lines if _record_step(line) <= step]
        if len(kept) < len(lines):
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)


def _record_step(line: str) -> float:
    """The step of one JSONL record; infinite for a line a killed run left half-written."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _scalars(metrics) -> dict[str, float]:
    keys = ("loss", "accuracy", "learning_rate", "grad_norm", "param_norm", "update_norm")
    return {k: float(metrics[k]) for k in keys}


def _by_path(tree) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/")


def trust_ratio_record(step: int, metrics, mask: dict[str, str]) -> dict:
    """One line of the trust-ratio log: per layer, in the order of `mask` (network order)."""
    param_norms = _by_path(metrics["layer_param_norms"])
    grad_norms = _by_path(metrics["layer_grad_norms"])
    ratios = _by_path(metrics["trust_ratios"]) if "trust_ratios" in metrics else {}
    layers = {
        path: {
            "trust_ratio": float(ratios.get(path, 1.0)),
            "param_norm": float(param_norms[path]),
            "grad_norm": float(grad_norms[path]),
            "excluded": mask[path] != lars.LARS_RULE,
        }
        for path in mask
    }
    return {"step": step, "learning_rate": float(metrics["learning_rate"]), "layers": layers}


class TrainingError(RuntimeError):
    """An expected failure of a run (non-finite loss): main.py prints it as one `error:` line."""


class FiniteCheck:
    """Checks the steps' in-graph finiteness flags lazily (at log steps, before
    evaluations and checkpoints), so the loop never waits on the host after a
    step just to learn that it was fine. A non-finite step has left the state
    as it was (the guard in the step), so nothing bad is ever saved."""

    def __init__(self):
        self.pending = []

    def add(self, step: int, metrics):
        self.pending.append((step, metrics["ok"], metrics["grads_finite"]))

    def check(self, last_checkpoint: int | None):
        """Raises TrainingError naming the first non-finite step since the last check."""
        pending, self.pending = self.pending, []
        oks = jax.device_get([ok for _, ok, _ in pending])
        for (step, _, grads_finite), ok in zip(pending, oks):
            if not ok:
                finite = _by_path(jax.device_get(grads_finite))
                first = next((path for path, good in finite.items() if not good), "(the loss only)")
                raise TrainingError(
                    f"non-finite loss or gradient at step {step + 1} (first non-finite gradient: {first}); "
                    f"{checkpoints.last_checkpoint(last_checkpoint)}. Lower learning_rate or raise warmup_epochs."
                )


# --------------------------------------------------------------------------
# The loop.
# --------------------------------------------------------------------------


class _Stop:
    """Remembers a SIGTERM/SIGINT so the loop can checkpoint and leave cleanly."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class Setup:
    """Everything validated before compile; built by `prepare`."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    data: input_pipeline.Data | None
    steps: Steps
    num_classes: int
    image_size: int
    channels: int
    model: Any
    schedule: Callable
    optimizer: optax.GradientTransformation
    num_micro: int
    # The compiled train step, from `fit_train_step` (which also checks its memory): a jitted
    # (state, batch, key) -> (state, metrics), or a FedStep taking an iterator of micro-batches.
    train_step: Any = None

    @property
    def fed(self) -> bool:
        """Whether the host feeds the step micro-batch by micro-batch."""
        return isinstance(self.train_step, FedStep)

    @property
    def micro_size(self) -> int:
        """Examples per device per micro-step."""
        return self.config.batch_size // self.mesh.size // self.num_micro


def prepare(config: ml_collections.ConfigDict) -> Setup:
    """Checks the config against the devices and data; raises ValueError, writes nothing to the workdir."""
    check_config(config)
    layout = device_layout(config)  # batch/device errors before the data set is opened (the demo writes itself)
    image_size = model_image_size(config)
    data = input_pipeline.create(
        config.dataset,
        config.data_dir or None,
        global_batch=config.batch_size,
        global_eval_batch=config.eval_batch_size or config.batch_size,
        image_size=image_size,
        augment=config.augment,
        seed=config.seed,
        num_shards=config.data_shards,
        cache=config.cache,
        normalize=config.normalization,
        flip=config.random_flip,
        num_classes=config.num_classes,
        validation_images=config.validation_images,
        validation_seed=config.validation_seed,
    )
    num_classes = config.num_classes or data.info.num_classes
    if num_classes != data.info.num_classes:
        raise ValueError(f"num_classes={num_classes} but data set {config.dataset!r} has {data.info.num_classes}.")
    return _setup(config, layout, num_classes, data.info.num_train, data.info.channels, image_size, data)


def prepare_model(config: ml_collections.ConfigDict, num_classes: int, num_train: int, channels: int = 3) -> Setup:
    """The Setup of `prepare` without a data set, for benchmarks that feed their own batches:
    a data set of `num_train` images with `channels`."""
    check_config(config)
    return _setup(config, device_layout(config), num_classes, num_train, channels, model_image_size(config), None)


def model_image_size(config) -> int:
    return config.image_size or models.image_size(config.model)


def device_layout(config) -> tuple[list, int, int | None]:
    """(devices in mesh order, micro-steps per update, BatchNorm group size) or ValueError."""
    # Process by process, so that each process's rows of the global batch land on its own devices.
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    per_device, num_micro = check_batch_arithmetic(config, len(devices), jax.process_count())
    return devices, num_micro, bn_group_size(config, per_device // num_micro)


def _setup(config, layout, num_classes: int, num_train: int, channels: int, image_size: int, data) -> Setup:
    devices, num_micro, group = layout
    steps = resolve_steps(config, num_train)
    schedule = optimizers.create_schedule(config, steps.total, steps.warmup, steps.decay_boundaries)
    return Setup(
        config=config,
        mesh=Mesh(np.asarray(devices), ("data",)),
        data=data,
        steps=steps,
        num_classes=num_classes,
        image_size=image_size,
        channels=channels,
        model=create_model(config, num_classes, group),
        schedule=schedule,
        optimizer=optimizers.create_optimizer(config, schedule),
        num_micro=num_micro,
    )


def on_mesh(fn: Callable, mesh: Mesh) -> Callable:
    """fn traced with `mesh` as the abstract mesh, so that layers which run per
    device (the oneDNN convolutions) can shard_map over its "data" axis."""

    @functools.wraps(fn)
    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return traced


def jit_train_step(setup: Setup):
    """The jitted train step of the training loop: (state, batch, key) -> (state, metrics); donates the state."""
    step = make_train_step(
        setup.model, setup.optimizer, setup.schedule, setup.config, setup.num_classes, setup.mesh, setup.num_micro
    )
    return jax.jit(on_mesh(step, setup.mesh), donate_argnums=0)


def fit_train_step(setup: Setup, available: int | None = None) -> Setup:
    """Compiles the train step for the run's shapes and checks that it fits in this process's memory.

    With microbatch_size="auto", picks the largest micro-batch (a divisor of the per-device
    share, whole ghost batches) whose step fits, and logs it. With microbatch_loop="auto", a
    global batch that does not fit in one compiled step is fed from the host micro-batch by
    micro-batch (`FedStep`), and evaluation then takes micro-batch-sized batches unless
    eval_batch_size says otherwise.

    Args:
      setup: from `prepare`.
      available: bytes the step may use; default: what this process may still allocate
        (host_memory.available_bytes), the least over all processes.

    Returns:
      `setup` with `train_step` compiled (and, for "auto", its model and micro-steps).
    Raises:
      ValueError: the step does not fit; the message gives its memory and a microbatch_size that fits.
    """
    config = setup.config
    if available is None:
        available = host_memory.available_bytes()
        if jax.process_count() > 1:  # every process compiles the same step
            # In MiB: JAX gathers 32-bit integers unless x64 is on, and bytes pass 2**31.
            mib = multihost_utils.process_allgather(np.int32(available // 2**20))
            available = int(np.min(mib)) * 2**20
    auto = config.microbatch_size == microbatch.AUTO
    feeds = {microbatch.AUTO: (False, True), microbatch.FED: (True,)}.get(config.microbatch_loop, (False,))
    for fed in feeds:
        fitted, memory = _compiled(setup, _micro_sizes(setup)[0] if auto else setup.micro_size, fed)
        while auto and memory.total > available:
            smaller = _smaller_that_fit(fitted, memory, available)
            if not smaller:
                break
            fitted, memory = _compiled(setup, smaller[0], fed)
        if memory.total <= available:
            break
    else:
        raise ValueError(_too_big(fitted, memory, available))
    if auto or fed != feeds[0]:
        logging.info(
            "microbatch_size=%s: %d examples per device per micro-step (%d micro-steps%s); the step needs %s of %s.",
            config.microbatch_size,
            fitted.micro_size,
            fitted.num_micro,
            ", fed from the host: the global batch does not fit in memory at once" if fed else "",
            microbatch.gb(memory.total),
            microbatch.gb(available),
        )
    if fitted.fed and fitted.data is not None:
        fitted.data.micro_batch_rows(fitted.num_micro)  # the pipeline can cut its batches
    return _with_eval_batch(fitted)


def _with_eval_batch(setup: Setup) -> Setup:
    """Without an eval_batch_size, a micro-stepped run evaluates in batches of one micro-step's
    global size: a forward pass over the whole global batch may not fit where its step does."""
    if setup.config.eval_batch_size or setup.num_micro == 1 or setup.data is None:
        return setup
    rows = setup.config.batch_size // setup.num_micro // jax.process_count()
    return dataclasses.replace(setup, data=dataclasses.replace(setup.data, local_eval_batch=rows))


def _compiled(setup: Setup, micro: int, fed: bool) -> tuple[Setup, "microbatch.StepMemory"]:
    """`setup` with `micro` examples per device per micro-step, its train step compiled (fed from
    the host or not), and its memory."""
    per_device = setup.config.batch_size // setup.mesh.size
    model = create_model(setup.config, setup.num_classes, bn_group_size(setup.config, micro))
    setup = dataclasses.replace(setup, model=model, num_micro=per_device // micro)
    rows = setup.config.batch_size // setup.num_micro if fed else setup.config.batch_size
    batch = _abstract_batch(setup, rows)
    local_devices = len(setup.mesh.local_devices)
    batch_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in batch.values()) // jax.process_count()
    state, key = abstract_state(setup), jax.random.key(0)
    if not fed:
        compiled = jit_train_step(setup).lower(state, batch, key).compile()
        return dataclasses.replace(setup, train_step=compiled), microbatch.StepMemory.of(
            compiled, local_devices, batch_bytes
        )
    start, micro_fn, finish = make_fed_step_fns(
        setup.model, setup.optimizer, setup.schedule, setup.config, setup.num_classes, setup.num_micro
    )
    start = jax.jit(start).lower(state).compile()
    replicated = NamedSharding(setup.mesh, P())
    carry = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), jax.eval_shape(_initial_carry, state)
    )
    micro_fn = jax.jit(on_mesh(micro_fn, setup.mesh), donate_argnums=1)
    micro_fn = micro_fn.lower(state, carry, batch, key, jax.ShapeDtypeStruct([], jnp.int32)).compile()
    finish = jax.jit(on_mesh(finish, setup.mesh), donate_argnums=(0, 1)).lower(state, carry).compile()
    memory = max(
        (microbatch.StepMemory.of(c, local_devices, batch_bytes, fed=True) for c in (micro_fn, finish)),
        key=lambda m: m.total,
    )
    return dataclasses.replace(setup, train_step=FedStep(start, micro_fn, finish, setup.num_micro)), memory


def _abstract_batch(setup: Setup, rows: int) -> dict:
    """The shapes of a global training batch of `rows` examples, sharded over "data"."""
    sharding = NamedSharding(setup.mesh, P("data"))
    image_shape = (rows, setup.image_size, setup.image_size, setup.channels)
    return {
        "image": jax.ShapeDtypeStruct(image_shape, jnp.float32, sharding=sharding),
        "label": jax.ShapeDtypeStruct(image_shape[:1], jnp.int32, sharding=sharding),
    }


def _micro_sizes(setup: Setup) -> list[int]:
    """The micro-batch sizes the run could take, largest first (whole ghost batches with a ghost bn_group)."""
    per_device = setup.config.batch_size // setup.mesh.size
    ghost = None if setup.config.bn_group in ("device", "global") else bn_group_size(setup.config, per_device)
    return microbatch.candidates(per_device, ghost)


def _smaller_that_fit(setup: Setup, memory: "microbatch.StepMemory", available: int) -> list[int]:
    """Smaller micro-batch sizes whose step should fit (`StepMemory.estimate`)."""
    micro = setup.micro_size
    return [n for n in _micro_sizes(setup) if n < micro and memory.estimate(n / micro) <= available]


def _too_big(setup: Setup, memory: "microbatch.StepMemory", available: int) -> str:
    fitting = _smaller_that_fit(setup, memory, available)
    hint = (
        f"microbatch_size={fitting[0]} should fit (or 'auto')"
        if fitting
        else "no micro-batch fits (the train state and the batch alone do not): use a smaller batch_size or more "
        "processes"
    )
    fed = ", fed from the host" if memory.fed else ""
    return (
        f"the train step needs {memory.describe()} with {setup.micro_size} examples per device per micro-step{fed}, "
        f"but this process may use {microbatch.gb(available)}; {hint}."
    )


def abstract_state(setup: Setup) -> TrainState:
    """The shapes, dtypes and shardings of `init_state(setup)`, computed without allocating it."""
    sharding = NamedSharding(setup.mesh, P())
    shapes = jax.eval_shape(_init_fn(setup))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def init_state(setup: Setup) -> TrainState:
    """Initial state, created replicated on the mesh inside jit."""
    return jax.jit(_init_fn(setup), out_shardings=NamedSharding(setup.mesh, P()))()


def _init_fn(setup: Setup) -> Callable[[], TrainState]:
    shape = (1, setup.image_size, setup.image_size, setup.channels)

    def init():
        variables = setup.model.init(
            {"params": jax.random.key(setup.config.seed), "dropout": jax.random.key(0)},
            jnp.zeros(shape, jnp.float32),
            train=False,
        )
        params = variables["params"]
        return TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=setup.optimizer.init(params),
        )

    return init


def restore_state(config: ml_collections.ConfigDict, workdir, step: int | None = None) -> tuple[Setup, TrainState]:
    """The setup of a config and a checkpoint in workdir (the latest by default), for notebooks and tools."""
    setup = prepare(config)
    manager = checkpoints.manager(workdir, config.keep_checkpoints)
    steps = manager.all_steps()
    if not steps or (step is not None and step not in steps):
        folder = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
        raise ValueError(f"No checkpoint {step or ''} in {folder} (have {steps}).")
    state = checkpoints.restore(manager, max(steps) if step is None else step, abstract_state(setup))
    manager.close()
    return setup, state


# Keys whose change makes a workdir's checkpoints unusable: parameter or optimizer-state
# shapes, or which images are trained on (a new validation split would mix the two).
BLOCKING_KEYS = ("model", "model_kwargs", "num_classes", "dataset", "image_size", "optimizer")
BLOCKING_KEYS += ("validation_images", "validation_seed")


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Compares `config` with the config.json of a run with checkpoints in workdir.

    Returns:
      The keys that differ but only change the run (batch size, LR, steps, ...):
      the run resumes with the new values.
    Raises:
      ValueError: naming the keys that change parameter or optimizer shapes.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    folder = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
    if not os.path.isfile(path) or not any(p.isdigit() for p in _listdir(folder)):
        return []
    with open(path) as f:
        old = traverse_util.flatten_dict(json.load(f), sep=".")
    # A key added to configs/default.py since that run started had its default value there.
    old = traverse_util.flatten_dict(json.loads(default.get_config().to_json()), sep=".") | old
    new = traverse_util.flatten_dict(json.loads(config.to_json()), sep=".")
    differ = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    blocking = [key for key in differ if key.split(".")[0] in BLOCKING_KEYS]
    if blocking:
        changes = ", ".join(f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in blocking)
        raise ValueError(
            f"--workdir={workdir} holds checkpoints of another model or data set ({changes}); "
            "use a new --workdir, or the old values to resume."
        )
    return differ


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def load_config(workdir) -> ml_collections.ConfigDict:
    """The config a run in workdir was started with (written there by train_and_evaluate)."""
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
        return ml_collections.ConfigDict(json.load(f))


def step_gradient(setup: Setup, state: TrainState, batch: dict):
    """The gradient the training step computes for `batch` at `state` (same micro-steps, same dropout key).

    Args:
      setup: from `prepare` or `restore_state`.
      state: the train state.
      batch: one global batch, NumPy rows of this process ({"image", "label"}).

    Returns:
      The gradient pytree (mean over the global batch).
    """
    fn = make_grad_fn(setup.model, setup.config, setup.num_classes, setup.mesh, setup.num_micro)
    sharding = NamedSharding(setup.mesh, P("data"))
    key = jax.random.key(setup.config.seed + 1)
    return jax.jit(on_mesh(fn, setup.mesh))(state, input_pipeline.to_global(batch, sharding), key)[0]


def evaluate(setup: Setup, state: TrainState, eval_step, sharding, split: str) -> dict[str, float]:
    """Top-1, top-5 (with 5 classes or more), loss and count over every image of an evaluation split."""
    totals = None
    for batch in setup.data.eval_batches(split):
        out = eval_step(state, input_pipeline.to_global(batch, sharding))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = float(totals.pop("count"))
    return {f"eval_{name}": float(total) / count for name, total in totals.items()} | {"eval_count": count}


def _open_logs(workdir: str, lead: bool):
    """(TensorBoard writer, metrics.jsonl, trust_ratios.jsonl); process 0 writes, the others get no-op writers.

    The console gets one progress line per log step from the loop, so the
    TensorBoard writer does not log to it as well."""
    writer = (
        metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir)) if lead else metric_writers.MultiWriter([])
    )
    metrics_log = JsonlWriter(os.path.join(workdir, METRICS_FILE), lead)
    trust_log = JsonlWriter(os.path.join(workdir, TRUST_RATIOS_FILE), lead)
    return writer, metrics_log, trust_log


def _write_run_files(workdir: str, setup: Setup, mask: dict[str, str], writer):
    config = setup.config
    with open(os.path.join(workdir, MASK_FILE), "w") as f:
        json.dump(mask, f, indent=1)
    with open(os.path.join(workdir, LAYOUT_FILE), "w") as f:
        json.dump({"processes": jax.process_count(), "devices": setup.mesh.size}, f)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json(indent=1))
    if setup.data is not None and setup.data.holdout is not None:
        with open(os.path.join(workdir, SPLIT_FILE), "w") as f:
            json.dump(setup.data.holdout.record(), f)
    writer.write_hparams({k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))})


def _log_layout(setup: Setup):
    steps, config = setup.steps, setup.config
    logging.info(
        "%d steps (%d per epoch), warmup %d, global batch %d = %d devices x %d micro-steps x %d%s",
        steps.total,
        steps.per_epoch,
        steps.warmup,
        config.batch_size,
        setup.mesh.size,
        setup.num_micro,
        setup.micro_size,
        " (micro-batches fed from the host)" if setup.fed else "",
    )


def _train_scalars(setup: Setup, metrics, done: int, step_time: float) -> dict[str, float]:
    scalars = _scalars(metrics)
    scalars.update(
        step_time=step_time,
        images_per_sec=setup.config.batch_size / step_time,
        eta_sec=step_time * (setup.steps.total - done),
        epoch=done / setup.steps.per_epoch,
    )
    return scalars


def _log_progress(done: int, total: int, scalars: dict[str, float]):
    logging.info(
        "step %d/%d  epoch %.2f  loss %.4f  acc %.3f  lr %.4g  %.1f img/s  ETA %.0f s",
        done,
        total,
        scalars["epoch"],
        scalars["loss"],
        scalars["accuracy"],
        scalars["learning_rate"],
        scalars["images_per_sec"],
        scalars["eta_sec"],
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, setup: Setup | None = None
) -> tuple[TrainState, dict[str, float]]:
    """Trains and evaluates; resumes from the latest checkpoint in workdir.

    Args:
      config: a configs/ config.
      workdir: checkpoints, metrics.jsonl, trust_ratios.jsonl, TensorBoard logs.
      setup: `prepare(config)` when the caller already made it (main.py does,
        to report errors and the model size before training).

    Returns:
      The final train state, and the last evaluation's metrics (eval_top1,
      eval_top5, eval_loss, eval_count) with its split and the step reached;
      after the last step, that of the test split when validation is held out.

    Raises:
      TrainingError: a non-finite loss or gradient (the state is not saved past it).
    """
    setup = setup or prepare(config)
    if setup.train_step is None:
        setup = fit_train_step(setup)  # before anything is written: a step that does not fit stops here
    steps = setup.steps
    lead = jax.process_index() == 0
    sharding = NamedSharding(setup.mesh, P("data"))

    os.makedirs(workdir, exist_ok=True)
    writer, metrics_log, trust_log = _open_logs(workdir, lead)
    manager = checkpoints.manager(workdir, config.keep_checkpoints)
    state = checkpoints.restore_latest(manager, workdir, abstract_state(setup))
    state = init_state(setup) if state is None else state
    for log in (metrics_log, trust_log):  # each step once, after a run that died past its checkpoint
        log.drop_after(int(state.step))
    rules = lars.mask_report(state.params, optimizers.exclusion(config))
    input_shape = (1, setup.image_size, setup.image_size, setup.channels)
    mask = {path: rules[path] for path in models.param_order(setup.model, input_shape)}
    if lead:
        _write_run_files(workdir, setup, mask, writer)
    logging.info("LARS exclusions: %s", {rule: sum(r == rule for r in mask.values()) for rule in set(mask.values())})
    _log_layout(setup)

    train_step = setup.train_step
    eval_step = jax.jit(on_mesh(make_eval_step(setup.model, setup.num_classes), setup.mesh))
    dropout_key = jax.random.key(config.seed + 1)  # `step_gradient` uses the same key
    finite = FiniteCheck()

    start = int(state.step)
    micro_steps = setup.num_micro if setup.fed else 1
    batches = (input_pipeline.to_global(b, sharding) for b in setup.data.train_batches(start, micro_steps))
    result = {"step": start}
    last_time, last_step = time.perf_counter(), start
    with _Stop() as stop, checkpoints.storage_errors(manager, workdir, "the run's logs"):
        for step in range(start, steps.total):
            if setup.fed:
                state, metrics = train_step(state, batches, dropout_key)
            else:
                state, metrics = train_step(state, next(batches), dropout_key)
            finite.add(step, metrics)
            done = step + 1
            last = done == steps.total
            if done % steps.log == 0 or last:
                finite.check(manager.latest_step())
                now = time.perf_counter()
                scalars = _train_scalars(setup, metrics, done, (now - last_time) / (done - last_step))
                last_time, last_step = now, done
                writer.write_scalars(done, scalars)
                metrics_log.write({"kind": "train", "step": done, **scalars})
                _log_progress(done, steps.total, scalars)
            # Also the step after each checkpoint, so that a notebook can recompute
            # the logged ratios from that checkpoint whatever the two periods are.
            if done % steps.trust_ratio == 0 or last or (step % steps.checkpoint == 0 and step > 0):
                trust_log.write(trust_ratio_record(done, jax.device_get(metrics), mask))
            if done % steps.eval == 0 or last:
                finite.check(manager.latest_step())
                for split in setup.data.final_eval_splits if last else (setup.data.periodic_eval_split,):
                    result = {"step": done, "split": split, **evaluate(setup, state, eval_step, sharding, split)}
                    writer.write_scalars(
                        done, {k.replace("eval_", f"{split}_"): v for k, v in result.items() if k != "split"}
                    )
                    metrics_log.write({"kind": "eval", **result})
                    logging.info("%s at step %d: %s", split, done, _format_eval(result))
            if done % steps.checkpoint == 0 or last or stop.signal is not None:
                finite.check(manager.latest_step())
                checkpoints.save(manager, state, workdir)
            if stop.signal is not None:
                logging.warning("Signal %d: saved the checkpoint of step %d; stopping.", stop.signal, done)
                result = {"step": done, "signal": stop.signal}
                break
        writer.flush()
    manager.close()
    return state, result


def _format_eval(result: dict[str, float]) -> str:
    return "  ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in result.items() if k.startswith("eval_top"))
