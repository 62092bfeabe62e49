"""The base config every run file derives from. Each run file changes only what differs.

Durations: `num_epochs`, `warmup_epochs`, `*_every_epochs` are converted to
steps in one place (run_setup.resolve_steps); a `*_steps` key > 0 overrides its
epoch twin, and a `*_per_run` key > 0 both.
"""

import ml_collections


def get_config():
    config = ml_collections.ConfigDict()

    # Model (models.REGISTRY). num_classes 0 = take it from the data set.
    config.model = "alexnet_bn"
    config.num_classes = 0
    config.model_kwargs = ml_collections.ConfigDict()  # e.g. width, zero_init_last_bn
    config.dtype = "float32"  # compute dtype; "bfloat16" keeps float32 params and BN statistics
    # Which examples share BatchNorm statistics: "device" (each device's slice
    # of each micro-batch, what the paper's workers did), "global" (the whole
    # micro-batch over all devices), or a number N (ghost batches of N).
    config.bn_group = "device"
    # How convolutions are computed (models.layers.conv2d; same values and
    # gradients): "onednn" (oneDNN's primitives through the XLA FFI, CPU only;
    # `make build` compiles them), "xla" (formulated for XLA:CPU's own kernels:
    # 1x1 as dots, materialized inputs and outputs) or "lax" (plain
    # lax.conv_general_dilated). Other backends than CPU use "lax".
    config.conv_impl = "onednn"

    # Data (input_pipeline.DATASETS). data_dir "" = TFDS's default.
    config.dataset = "imagenet2012"
    config.data_dir = ""
    config.image_size = 0  # 0 = the model's input size
    config.augment = "imagenet"  # "imagenet", "pad_crop_flip" or "none"
    config.random_flip = True  # horizontal flips in "pad_crop_flip" (off for digits, text, ...)
    # Per-channel mean/std: "imagenet", "cifar10", "digits" (input_pipeline.NORMALIZATIONS),
    # or "auto" (the TFDS data set's own; ImageNet's for an image folder).
    config.normalization = "auto"
    config.cache = False  # keep the encoded training and evaluation images in memory
    # Training-data shards, 0 = one per process. Each shard is read by one
    # process and gives batch_size / data_shards rows of every global batch, so
    # a fixed value makes runs on different process counts see the same batches.
    config.data_shards = 0
    # > 0: hold out that many training images (stratified by class, chosen by
    # validation_seed, not seed) as the "validation" split evaluated every
    # eval_every_*; the data set's own evaluation split is then read once, after
    # the last step. The held-out file names go to data_split.json in the workdir.
    config.validation_images = 0
    config.validation_seed = 0

    # Batch: global over all devices of all processes.
    config.batch_size = 32768
    config.eval_batch_size = 0  # 0 = batch_size (micro-stepped runs: one micro-step's global size)
    # Examples per device per micro-step; 0 = the whole per-device share at once;
    # "auto" = the largest divisor of the per-device share whose step fits in the
    # memory this process may use (main.py logs the choice). Gradients of the
    # micro-steps are averaged before one optimizer update. With bn_group "device",
    # BatchNorm normalises over each device's micro-batch. A step that does not fit
    # stops before it runs, naming a micro-batch that does.
    config.microbatch_size = ml_collections.FieldReference(0, field_type=object)  # an int or "auto"
    # How micro-steps run (microbatch.py): "scan" (one compiled micro-step in a loop:
    # memory and compile time do not grow with their number), "unroll" (straight-line
    # code; XLA:CPU's own convolutions run ~30x slower in a loop, but memory grows
    # with the micro-steps), "host" (the host feeds the micro-batches one at a time to a
    # compiled micro-step: for a global batch whose images do not fit in memory at once),
    # "auto" (unroll for conv_impl "xla"/"lax" on CPU, else scan; "host" when the compiled
    # step does not fit). Without eval_batch_size, micro-stepped runs evaluate in batches
    # of one micro-step's global size.
    config.microbatch_loop = "auto"

    # Duration.
    config.num_epochs = 100.0
    config.num_train_steps = 0  # > 0 overrides num_epochs

    # Optimizer: "lars", "sgd" (momentum, Goyal et al.) or "lamb".
    config.optimizer = "lars"
    config.learning_rate = 32.0  # peak LR at this global batch (not per 256)
    config.lr_schedule = "poly"  # "poly" (warmup + poly decay), "step" (warmup + x0.1 steps), "cosine"
    config.warmup_epochs = 10.0
    config.warmup_steps = 0
    config.end_learning_rate = 0.0
    config.lr_power = 2.0
    config.lr_decay_epochs = (30.0, 60.0, 80.0)  # "step" schedule boundaries
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 5e-4
    config.trust_coefficient = 1e-3
    config.lars_eps = 0.0
    config.lars_formula = "paper"  # "paper" or "optax" (see lars.local_lr)
    config.lars_clip = False  # LARC
    # Parameters with neither weight decay nor trust ratio: "ndim<=1" or
    # comma-separated regexes over parameter paths ("bias$,bn").
    config.exclude = "ndim<=1"
    config.label_smoothing = 0.0

    config.seed = 0

    # The gradient noise scale B_simple of McCandlish et al. (noise_scale.py), logged with the
    # train metrics: over the micro-steps of every step when there are several, else from a
    # probe (two batches' gradients at the same parameters) every noise_scale_every_steps
    # steps, which costs two gradient evaluations. Moving averages over
    # noise_scale_window_steps (0 = 5% of the run, at least 10 steps).
    config.noise_scale = True
    config.noise_scale_every_steps = 100
    config.noise_scale_window_steps = 0

    # Logging, evaluation, checkpoints.
    config.log_every_steps = 50
    config.trust_ratio_every_steps = 0  # 0 = log_every_steps
    config.eval_every_epochs = 1.0
    config.eval_every_steps = 0
    config.checkpoint_every_epochs = 1.0
    config.checkpoint_every_steps = 0
    config.keep_checkpoints = 3
    # > 0: that many training logs, trust-ratio records or evaluations per run, every
    # total steps // N (in place of log_every_steps, trust_ratio_every_steps, eval_every_*):
    # runs of different lengths logged at the same grain.
    config.logs_per_run = 0
    config.trust_ratios_per_run = 0
    config.evaluations_per_run = 0
    return config
