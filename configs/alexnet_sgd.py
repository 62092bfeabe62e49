"""AlexNet-BN with the Goyal et al. baseline: momentum SGD, LR 0.1 x batch/256, 5-epoch warmup, step decay.

python main.py --config=configs/alexnet_sgd.py:8192 --workdir=DIR
"""

from configs import default


def get_config(batch="8192"):
    config = default.get_config()
    config.model = "alexnet_bn"
    config.batch_size = int(batch)
    config.microbatch_size = "auto"  # the largest micro-batch whose step fits this node
    config.optimizer = "sgd"
    config.learning_rate = 0.02 * config.batch_size / 256  # AlexNet's single-GPU LR 0.02 at 256, scaled linearly
    config.lr_schedule = "step"
    config.warmup_epochs = 5.0
    config.lr_decay_epochs = (30.0, 60.0, 80.0)
    config.num_epochs = 100.0
    config.weight_decay = 5e-4
    return config
