"""ResNet-50, the Goyal et al. 8K baseline: LR 0.1 x batch/256, 5 warmup epochs, x0.1 at 30/60/80, 90 epochs.

python main.py --config=configs/resnet50_sgd.py --workdir=DIR
"""

from configs import default


def get_config(batch="8192"):
    config = default.get_config()
    config.model = "resnet50"
    config.model_kwargs.zero_init_last_bn = True  # Goyal et al. section 5.1
    config.batch_size = int(batch)
    config.microbatch_size = "auto"  # the largest micro-batch whose step fits this node
    config.optimizer = "sgd"
    config.learning_rate = 0.1 * config.batch_size / 256
    config.lr_schedule = "step"
    config.warmup_epochs = 5.0
    config.lr_decay_epochs = (30.0, 60.0, 80.0)
    config.num_epochs = 90.0
    config.weight_decay = 1e-4
    return config
