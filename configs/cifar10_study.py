"""The batch-size study's cells (docs/study.md): CIFAR ResNet-8 on the CIFAR-10 JPEGs.

Every cell is one command with nothing but a variant:

    python main.py --config=configs/cifar10_study.py:method=lars,batch=2048,lr=5.6 --workdir=DIR

Variant keys (comma-separated key=value):
  method      "sgd" (momentum, the paper's baseline: Goyal et al.'s linear LR
              scaling with warmup), "lars" (Algorithm 1) or "nesterov"
  batch       global batch size
  lr          peak learning rate (see `scaled_lr` for each method's scaling rule)
  seed        initialisation, data order and augmentation (default 0; the validation
              split stays the same)
  warmup      warmup epochs (default WARMUP_EPOCHS)
  epochs      the budget (default EPOCHS)
  validation  training images held out for validation (default 5,000)
  steps       > 0: stop after that many steps (smoke tests)
  data_dir    the image folder (default: where tools/study.py extracts the shared archive)

What every cell shares: the model, the augmentation (pad 4, crop, flip), the
BatchNorm ghost batch (64), float32, weight decay 5e-4, momentum 0.9, the
schedule (linear warmup over 5 epochs, then poly(2) decay to 0 over the budget,
as in You et al.), and the validation split (a fixed, stratified 5,000 of the
50,000 training images; every cell trains on the other 45,000). Validation is
evaluated 100 times per run (every half epoch at 128); the 10,000 test images
once, after the last step.
"""

import math

from configs import default
from tools import cifar_data

METHODS = ("sgd", "lars", "nesterov")
EPOCHS = 50.0  # 1,050 steps at batch 2,048 and 250 at 8,192 (docs/study.md)
WARMUP_EPOCHS = 5.0
VALIDATION_IMAGES = 5000
TRAIN_IMAGES = 50_000 - VALIDATION_IMAGES
BASE_BATCH = 128
LARS_TRUST_COEFFICIENT = 0.01  # eta; 1e-3 (the ImageNet configs') trains the small CIFAR ResNets slowly
KEYS = ("method", "batch", "lr", "seed", "warmup", "epochs", "validation", "steps", "data_dir")
EVALUATIONS = 100  # validation evaluations per run: the grain of the steps-to-target view


def scaled_lr(method: str, batch: int) -> float:
    """The scaling rule that centres each method's learning-rate sweep.

    Momentum SGD / Nesterov: 0.1 at batch 128, scaled linearly (Goyal et al.).
    LARS: 2 x sqrt(batch / 1024), the rule of configs/cifar10_lars.py.
    """
    if method == "lars":
        return 2.0 * (batch / 1024) ** 0.5
    return 0.1 * batch / BASE_BATCH


def parse_variant(variant: str) -> dict[str, str]:
    """{'method': 'lars', ...} from 'method=lars,...'; ValueError names an unknown or missing key."""
    pairs = dict(item.split("=", 1) if "=" in item else (item, "") for item in variant.split(",") if item)
    unknown = sorted(set(pairs) - set(KEYS))
    if unknown:
        raise ValueError(f"cifar10_study: unknown variant key(s) {unknown}; use {', '.join(KEYS)}.")
    missing = [k for k in ("method", "batch", "lr") if not pairs.get(k)]
    if missing:
        raise ValueError(f"cifar10_study: the variant needs {', '.join(missing)} (e.g. method=lars,batch=1024,lr=2.0).")
    if pairs["method"] not in METHODS:
        raise ValueError(f"cifar10_study: method={pairs['method']!r}; choose from {METHODS}.")
    return pairs


def variant_string(**values) -> str:
    """The variant of `get_config` for these values, keys in KEYS order (what tools/study.py runs)."""
    return ",".join(f"{key}={values[key]}" for key in KEYS if key in values)


def get_config(variant="method=lars,batch=1024,lr=2.0"):
    cell = parse_variant(variant)
    config = default.get_config()
    config.model = "cifar_resnet8"
    config.dataset = "image_folder"
    config.data_dir = cell.get("data_dir") or str(cifar_data.CACHE / "cifar10_jpeg")
    config.normalization = "cifar10"
    config.augment = "pad_crop_flip"
    config.cache = True
    config.validation_images = int(cell.get("validation", VALIDATION_IMAGES))
    config.validation_seed = 0  # the same held-out images in every cell, whatever the run's seed

    config.batch_size = int(cell["batch"])
    config.bn_group = "64"
    # At most 256 images per micro-step: larger ones gain nothing per image here.
    config.microbatch_size = min(256, config.batch_size)
    config.eval_batch_size = 1000

    config.num_epochs = float(cell.get("epochs", EPOCHS))
    config.num_train_steps = int(cell.get("steps", 0))
    config.optimizer = "lars" if cell["method"] == "lars" else "sgd"
    config.nesterov = cell["method"] == "nesterov"
    config.learning_rate = float(cell["lr"])
    config.lr_schedule = "poly"
    config.lr_power = 2.0
    config.warmup_epochs = float(cell.get("warmup", WARMUP_EPOCHS))
    config.weight_decay = 5e-4
    config.momentum = 0.9
    config.trust_coefficient = LARS_TRUST_COEFFICIENT
    config.seed = int(cell.get("seed", 0))

    # Validation EVALUATIONS times per run (steps to target); train.resolve_steps's step count.
    steps = config.num_train_steps or math.ceil(config.num_epochs * (TRAIN_IMAGES // config.batch_size))
    config.eval_every_steps = max(1, steps // EVALUATIONS)
    config.checkpoint_every_epochs = 1.0
    config.keep_checkpoints = 1
    config.log_every_steps = max(1, steps // 200)
    config.trust_ratio_every_steps = max(1, steps // 100)
    return config
