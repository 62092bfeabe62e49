"""CIFAR-10 JPEGs, CIFAR ResNet-20, momentum SGD with linear LR scaling and warmup (Goyal et al.).

    python main.py --config=configs/cifar10_sgd.py:1024 \
        --config.data_dir=/path/to/cifar10_jpeg --workdir=DIR
"""

from configs import cifar10_lars


def get_config(batch="1024"):
    config = cifar10_lars.get_config(batch)
    config.optimizer = "sgd"
    config.learning_rate = 0.1 * config.batch_size / 128  # He et al.'s 0.1 at 128, scaled linearly
    config.lr_schedule = "step"
    config.lr_decay_epochs = (15.0, 22.5)  # 50% and 75% of the budget
    config.warmup_epochs = 2.0
    config.weight_decay = 1e-4
    return config
