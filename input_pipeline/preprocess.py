"""Decoding, augmentation and normalisation of one encoded image (TensorFlow ops, stateless RNG)."""

import dataclasses

import numpy as np
import tensorflow as tf

from input_pipeline.sources import DatasetInfo

AUGMENTATIONS = ("imagenet", "pad_crop_flip", "none")


def _decode(encoded, channels):
    image = tf.io.decode_image(encoded, channels=channels, expand_animations=False)
    return tf.ensure_shape(image, [None, None, channels])


def _distorted_box(image_shape, seed):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        image_shape,
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        seed=seed,
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return begin, size


def _center_box(image_shape, image_size, crop_padding=32):
    """The central image_size/(image_size+32) of the shorter side (224/256)."""
    height, width = image_shape[0], image_shape[1]
    side = tf.cast(
        (image_size / (image_size + crop_padding)) * tf.cast(tf.minimum(height, width), tf.float32), tf.int32
    )
    return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def decode_and_crop(encoded, channels, offset_y, offset_x, height, width):
    """Decodes only the crop window where the image is a JPEG (fused in libjpeg)."""
    window = tf.stack([offset_y, offset_x, height, width])

    def jpeg():
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=channels)

    def other():
        return tf.image.crop_to_bounding_box(_decode(encoded, channels), offset_y, offset_x, height, width)

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    return tf.ensure_shape(image, [None, None, channels])


def _image_shape(encoded, channels):
    def jpeg():
        return tf.image.extract_jpeg_shape(encoded)

    def other():
        return tf.shape(_decode(encoded, channels))

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def resize(image, size):
    """Bicubic resize to size x size. The image is converted to float32 first: TensorFlow's kernel
    gives the same floats from float input as from uint8, and runs faster on it."""
    return tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bicubic")


def random_flip(image, seed):
    """A horizontal flip with probability 1/2, drawn from the example's seed."""
    return tf.image.stateless_random_flip_left_right(image, seed=tf.random.experimental.stateless_fold_in(seed, 1))


def train_window(encoded, seed, image_size: int, channels: int = 3):
    """The random-resized crop's window (offset_y, offset_x, height, width), read from the header.

    The window samples area 8%-100% and aspect ratio 3/4-4/3 (Szegedy et al.
    2015); if none fits in 10 attempts it is the center crop of evaluation.
    """
    shape = _image_shape(encoded, channels)
    begin, size = _distorted_box(shape, seed)
    whole = tf.reduce_all(tf.equal(size[:2], shape[:2]))
    center = _center_box(shape, image_size)
    return [tf.where(whole, c, r) for c, r in zip(center, (begin[0], begin[1], size[0], size[1]))]


def imagenet_train(encoded, seed, image_size: int, channels: int = 3):
    """Random-resized crop (decoding only the window), flip, resize."""
    image = decode_and_crop(encoded, channels, *train_window(encoded, seed, image_size, channels))
    return resize(random_flip(image, seed), image_size)


def imagenet_eval(encoded, image_size: int, channels: int = 3):
    """Center crop of 224/256 of the shorter side, resized to image_size."""
    shape = _image_shape(encoded, channels)
    image = decode_and_crop(encoded, channels, *_center_box(shape, image_size))
    return resize(image, image_size)


def pad_crop_flip(encoded, seed, image_size: int, channels: int, pad: int = 4, flip: bool = True):
    """CIFAR augmentation: zero-pad by 4, random image_size crop, random flip."""
    image = _decode(encoded, channels)
    image = tf.image.resize_with_crop_or_pad(image, image_size, image_size)
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, [image_size, image_size, channels], seed=seed)
    return random_flip(image, seed) if flip else image


def plain(encoded, image_size: int, channels: int):
    """Decode; resize only if the image is not already image_size square."""
    image = _decode(encoded, channels)
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))
    image = tf.cond(same, lambda: tf.cast(image, tf.float32), lambda: resize(image, image_size))
    return tf.ensure_shape(image, [image_size, image_size, channels])


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Turns encoded images into normalised float32 [size, size, channels]."""

    augment: str
    image_size: int
    info: DatasetInfo
    flip: bool = True  # random horizontal flips in "pad_crop_flip" (not for digits, say)

    def __post_init__(self):
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"Unknown augmentation {self.augment!r}; choose from {AUGMENTATIONS}.")

    def normalise(self, image):
        """(image - mean) / std per channel, as float32 [size, size, channels]."""
        shape = (self.image_size, self.image_size, self.info.channels)
        image = tf.ensure_shape(tf.cast(image, tf.float32), shape)
        # Mean and std as whole images: TensorFlow's CPU kernels subtract and divide equal shapes
        # several times faster than they broadcast a [channels] vector (same floats).
        mean = tf.constant(np.broadcast_to(np.float32(self.info.mean), shape))
        std = tf.constant(np.broadcast_to(np.float32(self.info.std), shape))
        return (image - mean) / std

    def train(self, encoded, seed):
        c, s = self.info.channels, self.image_size
        if self.augment == "imagenet":
            image = imagenet_train(encoded, seed, s, c)
        elif self.augment == "pad_crop_flip":
            image = pad_crop_flip(encoded, seed, s, c, flip=self.flip)
        else:
            image = plain(encoded, s, c)
        return self.normalise(image)

    def eval(self, encoded):
        if self.augment == "imagenet":
            image = imagenet_eval(encoded, self.image_size, self.info.channels)
        else:
            image = plain(encoded, self.image_size, self.info.channels)
        return self.normalise(image)
