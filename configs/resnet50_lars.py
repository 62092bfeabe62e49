"""ResNet-50 v1.5, 90 epochs, batch 32K, LARS (MLPerf-style hyperparameters).

    python main.py --config=configs/resnet50_lars.py --workdir=DIR
    python main.py --config=configs/resnet50_lars.py:16384 --workdir=DIR

Per batch size (MLPerf v0.7 JAX submission): base LR 10 below 16K, 25 for
16K-32K, 29 at 32K with 18 warmup epochs, momentum 0.929 and wd 1e-4 there;
poly(2) decay to 1e-4, label smoothing 0.1, BN and biases excluded.
"""

from configs import default


def get_config(batch="32768"):
    config = default.get_config()
    config.model = "resnet50"
    config.batch_size = int(batch)
    config.microbatch_size = "auto"  # the largest micro-batch whose step fits this node
    config.num_epochs = 90.0
    config.label_smoothing = 0.1
    config.end_learning_rate = 1e-4
    config.weight_decay = 2e-4
    config.momentum = 0.9
    config.warmup_epochs = 5.0
    if config.batch_size < 16384:
        config.learning_rate = 10.0
    elif config.batch_size < 32768:
        config.learning_rate = 25.0
    else:
        config.learning_rate, config.warmup_epochs = 29.0, 18.0
        config.momentum, config.weight_decay = 0.929, 1e-4
    return config
