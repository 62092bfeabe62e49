"""The ImageNet preprocessing's pixels against a float64 NumPy reference: the window decoded from
the JPEG, its flip, TensorFlow's bicubic resize (Keys' kernel, a = -0.5, half-pixel centres) and
the normalisation."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from input_pipeline import preprocess as pp
from input_pipeline.sources import IMAGENET_MEAN, IMAGENET_STD, DatasetInfo

SIZE = 224
INFO = DatasetInfo("image_folder", 10, 100, 10, "train", "test", 3, IMAGENET_MEAN, IMAGENET_STD, None)


@pytest.fixture(scope="module")
def jpeg():
    """A 500x375 JPEG (ImageNet's typical size) with detail at every scale."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:375, 0:500]
    pixels = np.stack([128 + 100 * np.sin(x / 17 + y / 29), 128 + 90 * np.cos(x / 11 - y / 7), (x * y) % 256], -1)
    pixels = np.clip(pixels + rng.normal(0, 20, pixels.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def keys_cubic(d):
    """Keys' cubic convolution kernel with a = -0.5 at distance d."""
    d = np.abs(d)
    return np.where(d <= 1, (1.5 * d - 2.5) * d * d + 1, np.where(d < 2, ((-0.5 * d + 2.5) * d - 4) * d + 2, 0.0))


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float64 weights of TensorFlow's bicubic resize along one axis: half-pixel
    centres, the fractional position rounded to 1/1024 (the kernel's table), taps outside the
    image dropped and the rest renormalised (resize_bicubic_op.cc)."""
    scale = np.float32(in_size) / np.float32(out_size)
    matrix = np.zeros((out_size, in_size))
    for out in range(out_size):
        position = (np.float32(out) + np.float32(0.5)) * scale - np.float32(0.5)  # float32, as the kernel
        base = int(np.floor(position))
        delta = np.rint((position - base) * 1024) / 1024
        for tap, distance in zip(range(base - 1, base + 3), (1 + delta, delta, 1 - delta, 2 - delta)):
            if 0 <= tap < in_size:
                matrix[out, tap] += keys_cubic(distance)
        matrix[out] /= matrix[out].sum()
    return matrix


def reference(window_pixels: np.ndarray, flip: bool) -> np.ndarray:
    """Flip, resize to 224 and normalise a decoded window, in float64."""
    image = window_pixels.astype(np.float64)[:, ::-1] if flip else window_pixels.astype(np.float64)
    rows, cols = resize_matrix(image.shape[0], SIZE), resize_matrix(image.shape[1], SIZE)
    resized = np.einsum("ojc,pj->opc", np.einsum("oi,ijc->ojc", rows, image), cols)
    return (resized - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


# float32 error of a resized value (16 taps of |weight| sum <= 1.25 on 0-255 pixels, a few roundings
# each) and of the normalisation, in normalised units: 255 * 1.25 * 2**-20 / 57 ~ 5e-6; 2e-5 bounds it.
TOLERANCE = 2e-5


def check_window(jpeg: bytes, window) -> np.ndarray:
    """The window decoded by decode_and_crop, checked against the whole image decoded: equal but in
    its first and last column, where libjpeg upsamples the chroma from the window's own edge."""
    pixels = pp.decode_and_crop(tf.constant(jpeg), 3, *[tf.constant(v) for v in window]).numpy()
    y, x, h, w = window
    whole = tf.io.decode_jpeg(jpeg, channels=3).numpy()[y : y + h, x : x + w]
    assert pixels.shape == (h, w, 3)
    np.testing.assert_array_equal(pixels[:, 1:-1], whole[:, 1:-1])
    return pixels


def test_eval_is_the_normalised_bicubic_resize_of_the_centre_crop(jpeg):
    side = int(224 / 256 * 375)  # 224/256 of the shorter side, centred: a hand count
    window = ((375 - side + 1) // 2, (500 - side + 1) // 2, side, side)
    assert window == (24, 86, 328, 328)
    pixels = check_window(jpeg, window)
    ours = pp.Preprocess("imagenet", SIZE, INFO).eval(tf.constant(jpeg)).numpy()
    assert ours.dtype == np.float32 and ours.shape == (SIZE, SIZE, 3)
    np.testing.assert_allclose(ours, reference(pixels, flip=False), rtol=0, atol=TOLERANCE)


def test_train_is_the_normalised_bicubic_resize_of_the_flipped_window(jpeg):
    preprocess, flips, areas = pp.Preprocess("imagenet", SIZE, INFO), [], []
    for i in range(8):
        seed = tf.constant([i, 3], tf.int64)
        window = [int(v) for v in pp.train_window(tf.constant(jpeg), seed, SIZE)]
        y, x, h, w = window
        assert 0 <= y and 0 <= x and y + h <= 375 and x + w <= 500
        areas.append(h * w / (375 * 500))
        pixels = check_window(jpeg, window)
        ours = preprocess.train(tf.constant(jpeg), seed).numpy()
        errors = [np.abs(ours - reference(pixels, flip)).max() for flip in (False, True)]
        flips.append(bool(np.argmin(errors)))
        assert min(errors) < TOLERANCE and max(errors) > 0.1, errors
    # Random-resized crops: 8%-100% of the area, both flips among 8 draws.
    assert all(0.08 <= a <= 1 for a in areas) and len(set(areas)) == 8
    assert 0 < sum(flips) < 8
