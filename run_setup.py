"""A run's setup, validated before anything is compiled or written: the config's choices and
ranges, the step counts, the device mesh and micro-steps, the model, optimizer and data (`prepare`),
and the initial train state."""

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import config_checks
import input_pipeline
import lars
import microbatch
import models
import noise_scale
import optimizers
import steps
from models import layers, onednn
from steps import TrainState

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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

    def per_run(name: str, period: int) -> int:
        count = config.get(f"{name}_per_run", 0)
        return max(total // count, 1) if count > 0 else period

    log = per_run("logs", max(config.log_every_steps, 1))
    return Steps(
        per_epoch=per_epoch,
        total=total,
        warmup=min(steps("warmup"), total),
        decay_boundaries=tuple(int(round(e * per_epoch)) for e in config.lr_decay_epochs),
        log=log,
        trust_ratio=per_run("trust_ratios", max(config.trust_ratio_every_steps or log, 1)),
        eval=per_run("evaluations", interval(steps("eval_every"))),
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


def create_model(config, num_classes: int, group_size: int | None):
    kwargs = dict(config.model_kwargs)
    kwargs.setdefault("bn_group_size", group_size)
    kwargs.setdefault("conv_impl", conv_impl(config))  # model_kwargs may name its own
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


def loop_kind(config) -> str:
    """How the compiled step runs its micro-steps: "scan" or "unroll" (microbatch.loop_kind)."""
    return microbatch.loop_kind(config.microbatch_loop, conv_impl(config), jax.default_backend())


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
    # The compiled noise-scale probe of a run of one micro-step whose probes come (`noise.probes`),
    # compiled and counted in the step's memory by `fit_train_step`; None otherwise.
    noise_probe: Any = None

    @property
    def fed(self) -> bool:
        """Whether the host feeds the step micro-batch by micro-batch."""
        return isinstance(self.train_step, steps.FedStep)

    @property
    def noise(self) -> noise_scale.Settings:
        """How the run measures the gradient noise scale."""
        return noise_scale.settings(self.config, self.steps.total, self.num_micro)

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
        variables = models.init_variables(setup.model, shape, setup.config.seed)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=setup.optimizer.init(params),
            noise_scale=noise_scale.init(params),
        )

    return init
