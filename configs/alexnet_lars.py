"""AlexNet-BN, 100 epochs, LARS, poly(2) decay: the paper's AlexNet runs.

    python main.py --config=configs/alexnet_lars.py --workdir=DIR          # 32K
    python main.py --config=configs/alexnet_lars.py:8192 --workdir=DIR     # 8K

Base LR and warmup per batch size from the LARS authors' nvcaffe alexnet_bn
solvers (momentum 0.9, wd 5e-4, eta 1e-3); 512 and 4K follow the same
pattern (see You, Gitman, Ginsburg 2017, table 3).
"""

from configs import default

# global batch: (base LR, warmup epochs)
VARIANTS = {
    512: (2.0, 0.0),
    4096: (8.0, 2.0),
    8192: (10.0, 3.8),
    16384: (24.0, 5.0),
    32768: (32.0, 10.0),
}


def get_config(batch="32768"):
    config = default.get_config()
    config.model = "alexnet_bn"
    config.batch_size = int(batch)
    config.microbatch_size = "auto"  # the largest micro-batch whose step fits this node
    if config.batch_size not in VARIANTS:
        raise ValueError(f"alexnet_lars has variants {sorted(VARIANTS)}, not {batch}.")
    config.learning_rate, config.warmup_epochs = VARIANTS[config.batch_size]
    config.num_epochs = 100.0
    config.weight_decay = 5e-4
    return config
