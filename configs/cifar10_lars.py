"""CIFAR-10 JPEGs (an image folder), CIFAR ResNet-20, LARS: the small-scale study.

    python main.py --config=configs/cifar10_lars.py:1024 \
        --config.data_dir=/path/to/cifar10_jpeg --workdir=DIR
"""

from configs import default


def get_config(batch="1024"):
    config = default.get_config()
    config.model = "cifar_resnet20"
    config.dataset = "image_folder"
    config.data_dir = ""  # the folder holding train/<class>/*.jpg and test/<class>/*.jpg
    config.normalization = "cifar10"  # an image folder would get ImageNet's statistics
    config.augment = "pad_crop_flip"
    config.cache = True
    config.batch_size = int(batch)
    config.eval_batch_size = 1000
    config.num_epochs = 30.0
    config.learning_rate = 2.0 * (config.batch_size / 1024) ** 0.5  # sqrt scaling of the peak LR
    config.warmup_epochs = 2.0
    config.weight_decay = 5e-4
    config.trust_coefficient = 1e-3
    config.log_every_steps = 10
    return config
