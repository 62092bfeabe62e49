"""The batch-size study's cells (docs/study.md): CIFAR ResNet-8 on the CIFAR-10 JPEGs.

A cell is this config at its global batch, with its optimizer and peak learning rate as
overrides (tools/study.py runs each cell so, and records the flags in results.csv):

    python main.py --config=configs/cifar10_study.py:2048 --config.optimizer=lars \
        --config.learning_rate=5.657 --config.data_dir=DIR/cifar10_jpeg --workdir=OUT

  momentum SGD (Goyal et al.'s linear scaling with warmup): --config.optimizer=sgd;
  Nesterov: also --config.nesterov=true; other seeds: --config.seed=N (initialisation, data
  order and augmentation; the validation split stays the same).

What every cell shares: the model, the augmentation (pad 4, crop, flip), the BatchNorm ghost
batch (64), float32, weight decay 5e-4, momentum 0.9, eta 0.01 for LARS, the schedule (linear
warmup over 5 epochs, then poly(2) decay to 0 over 50 epochs, as in You et al.), and the
validation split (a fixed, stratified 5,000 of the 50,000 training images; every cell trains on
the other 45,000). Validation is evaluated 100 times per run (every half epoch at 128); the
10,000 test images once, after the last step.
"""

from configs import cifar10_lars, default


def get_config(batch="1024"):
    config = default.get_config()
    config.model = "cifar_resnet8"
    config.dataset = "image_folder"
    config.data_dir = ""  # the folder holding train/<class>/*.jpg and test/<class>/*.jpg
    config.normalization = "cifar10"
    config.augment = "pad_crop_flip"
    config.cache = True
    config.validation_images = 5000
    config.validation_seed = 0  # the same held-out images in every cell, whatever the run's seed

    config.batch_size = int(batch)
    config.bn_group = "64"
    # At most 256 images per micro-step: larger ones gain nothing per image here.
    config.microbatch_size = min(256, config.batch_size)
    config.eval_batch_size = 1000

    config.num_epochs = 50.0  # 1,050 steps at batch 2,048 and 250 at 8,192 (docs/study.md)
    config.optimizer = "lars"
    config.learning_rate = cifar10_lars.get_config(batch).learning_rate  # every cell sets its own
    config.lr_schedule = "poly"
    config.lr_power = 2.0
    config.warmup_epochs = 5.0
    config.weight_decay = 5e-4
    config.momentum = 0.9
    config.trust_coefficient = 0.01  # eta; 1e-3 (the ImageNet configs') trains the small CIFAR ResNets slowly

    # The same grain in runs of every length: validation (the steps-to-target view) and trust
    # ratios 100 times per run, the training loss 200 times.
    config.evaluations_per_run = 100
    config.trust_ratios_per_run = 100
    config.logs_per_run = 200
    config.checkpoint_every_epochs = 1.0
    config.keep_checkpoints = 1
    return config
