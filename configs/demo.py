"""The offline demo: scikit-learn's digits, a small CIFAR ResNet, LARS; about a minute on 2 cores.

python main.py --config=configs/demo.py --workdir=/tmp/demo
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "cifar_resnet8"
    config.dataset = "demo"
    config.image_size = 8  # the digits are 8x8, one channel
    config.augment = "pad_crop_flip"
    config.random_flip = False  # a mirrored digit is not a digit
    config.cache = True
    config.batch_size = 256
    config.eval_batch_size = 300
    config.num_epochs = 30.0
    config.learning_rate = 4.0
    config.warmup_epochs = 3.0
    config.weight_decay = 5e-4
    config.trust_coefficient = 1e-2
    config.log_every_steps = 20
    config.eval_every_epochs = 10.0
    config.checkpoint_every_epochs = 10.0
    config.noise_scale_every_steps = 10  # one micro-step: a probe every 10 steps (20% of the demo's time)
    return config
