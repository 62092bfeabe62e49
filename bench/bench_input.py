"""Images/s of the ImageNet preprocessing on ImageNet-sized JPEGs against the plain tf.data recipe,
and where the training stream's time goes.

    LARGEBATCH_SHARED_DATA=../shared/data python -m bench.bench_input [--images 512]

Builds an image folder of JPEGs at ImageNet's typical size (500x375, quality
90, upscaled from the shared CIFAR-10 images, so decoding costs what it costs
on ImageNet) and measures, in the same run, on every core (tf.data AUTOTUNE):
  - train, ours: input_pipeline's training stream with augment="imagenet"
    (random-resized crop decoded with decode_and_crop_jpeg, flip, bicubic
    resize to 224, normalisation; shuffled, resumable, per-example RNG);
  - train, plain: the recipe as commonly written, on the same files with the
    same augmentation: full decode_jpeg, sample_distorted_bounding_box crop,
    flip, bicubic resize, normalisation by [1, 1, 3] mean and std; and the
    same without normalisation (less work than ours);
  - eval, ours and plain: center crop of 224/256 of the shorter side, resize,
    normalisation (ours decodes only the crop).
Then the per-image cost of our training stream on one thread, stage by stage
(each row adds one stage to the one above). Batches of 64, float32 224x224.
"""

import argparse
import io
import os
import pathlib
import tarfile
import tempfile
import time

import numpy as np
import tensorflow as tf
from PIL import Image

import input_pipeline as ip
from bench.machine import cpu_description
from input_pipeline import preprocess as pp
from input_pipeline.sources import IMAGENET_MEAN, IMAGENET_STD

SIZE = 224


def make_folder(root: pathlib.Path, num_images: int) -> pathlib.Path:
    archive = pathlib.Path(os.environ["LARGEBATCH_SHARED_DATA"]) / "cifar10_jpeg.tar.gz"
    written = 0
    with tarfile.open(archive) as tar:
        for member in tar:
            if not member.name.endswith(".jpg") or "/train/" not in member.name or written >= num_images:
                continue
            label = member.name.split("/")[-2]
            image = (
                Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB").resize((500, 375), Image.BICUBIC)
            )
            for split in ("train", "test") if written < 10 else ("train",):
                (root / split / label).mkdir(parents=True, exist_ok=True)
                image.save(root / split / label / f"{written:05d}.jpg", quality=90)
            written += 1
    return root


def time_stream(batches, num_images: int, batch: int) -> float:
    """Images/s over num_images after one batch of warm-up."""
    next(batches)
    start = time.perf_counter()
    for _ in range(num_images // batch):
        next(batches)
    return num_images // batch * batch / (time.perf_counter() - start)


def plain_normalise(image):
    """Normalisation as the common recipes write it (e.g. flax's ImageNet example)."""
    return (image - tf.constant(IMAGENET_MEAN, shape=[1, 1, 3])) / tf.constant(IMAGENET_STD, shape=[1, 1, 3])


def plain_train_image(path, normalise: bool):
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    begin, size, _ = tf.image.sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
        min_object_covered=0.1,
        aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    image = tf.image.random_flip_left_right(tf.slice(image, begin, size))
    image = tf.image.resize(image, [SIZE, SIZE], method="bicubic")
    return plain_normalise(image) if normalise else image


def plain_eval_image(path):
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    shape = tf.shape(image)
    side = tf.cast(SIZE / (SIZE + 32) * tf.cast(tf.minimum(shape[0], shape[1]), tf.float32), tf.int32)
    image = tf.image.crop_to_bounding_box(image, (shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2, side, side)
    return plain_normalise(tf.image.resize(image, [SIZE, SIZE], method="bicubic"))


def plain_stream(folder: pathlib.Path, batch: int, load, shuffle: bool):
    files = sorted(str(p) for p in folder.glob("train/*/*.jpg"))
    ds = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        ds = ds.shuffle(len(files))
    ds = ds.repeat().map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


class Stage:
    """A stand-in for Preprocess.train that runs a prefix of the training preprocessing."""

    def __init__(self, fn):
        self.train = fn


def _image_from(*values):
    """A [224, 224, 3] float32 image that depends on `values`, so that no stage is optimised away."""
    return tf.fill([SIZE, SIZE, 3], tf.add_n([tf.cast(tf.reduce_sum(v), tf.float32) for v in values]))


def stages(preprocess: pp.Preprocess) -> dict:
    """Cumulative prefixes of the training preprocessing, each a train(encoded, seed) function."""

    def window(e, s):
        return pp.train_window(e, s, SIZE)

    def crop(e, s):
        return pp.decode_and_crop(e, 3, *window(e, s))

    def flipped(e, s):
        return pp.random_flip(crop(e, s), s)

    return {
        "stream: read, shuffle, per-example seed, batch": lambda e, s: _image_from(tf.strings.length(e), s),
        "+ crop window (JPEG header, sampled box)": lambda e, s: _image_from(*window(e, s)),
        "+ decode of the window": lambda e, s: _image_from(crop(e, s)[0, 0, 0]),
        "+ flip": lambda e, s: _image_from(flipped(e, s)[0, 0, 0]),
        "+ bicubic resize to 224": lambda e, s: pp.resize(flipped(e, s), SIZE),
        "+ normalisation (= the whole stream)": preprocess.train,
    }


def one_thread(ds: tf.data.Dataset) -> tf.data.Dataset:
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    return ds.with_options(options)


def stream_rates(folder: pathlib.Path, data: ip.Data, n: int, b: int, rounds: int) -> dict:
    """Images/s of each stream on every core, per round."""
    records = data.train_shards[0].records

    def plain_train(normalise):
        return lambda: plain_stream(folder, b, lambda p: plain_train_image(p, normalise), shuffle=True)

    streams = {
        "train, ours": lambda: data.train_batches(0),
        "train, plain": plain_train(True),
        "train, plain without normalisation": plain_train(False),
        "eval, ours": lambda: ip.streams.eval_dataset(records.repeat(), data.preprocess, b).as_numpy_iterator(),
        "eval, plain": lambda: plain_stream(folder, b, plain_eval_image, shuffle=False),
    }
    rates = {name: [] for name in streams}
    for _ in range(rounds):  # interleaved, so that a slow spell of the machine hits every stream
        for name, make in streams.items():
            rates[name].append(time_stream(make(), n, b))
    return rates


def stage_costs(data: ip.Data, n: int, b: int, rounds: int) -> dict:
    """ms per image on one thread of each prefix of the training stream, best of `rounds`."""
    shard, costs = data.train_shards[0], {}
    for name, stage in stages(data.preprocess).items():
        ds = ip.streams.train_dataset(shard.records, shard.count, Stage(stage), local_batch=b, seed=0, shard_index=0)
        costs[name] = min(1e3 / time_stream(one_thread(ds).as_numpy_iterator(), n, b) for _ in range(rounds))
    return costs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n, b = args.images, args.batch
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(pathlib.Path(tmp), n)
        data = ip.create(
            "image_folder", str(folder), global_batch=b, global_eval_batch=b, image_size=SIZE,
            augment="imagenet", seed=0, process_index=0, process_count=1,
        )  # fmt: skip
        rates = stream_rates(folder, data, n, b, args.rounds)
        costs = stage_costs(data, n, b, args.rounds)
    best = {name: max(r) for name, r in rates.items()}
    print(f"ImageNet preprocessing, 500x375 JPEGs -> {SIZE}x{SIZE} float32, {n} images, batches of {b}")
    print(cpu_description())
    print(f"\n{'stream (all cores)':40s} {'img/s':>8s}  all rounds")
    for name, rate in best.items():
        print(f"{name:40s} {rate:8.1f}  {np.round(rates[name], 1).tolist()}")
    for ours, peer in [("train, ours", "train, plain"), ("train, ours", "train, plain without normalisation"),
                       ("eval, ours", "eval, plain")]:  # fmt: skip
        print(f"ratio {ours} / {peer}: {best[ours] / best[peer]:.2f}")
    print(f"\n{'training stream, one thread':48s} {'ms/image':>8s} {'stage':>7s}")
    previous = 0.0
    for name, cost in costs.items():
        print(f"{name:48s} {cost:8.3f} {cost - previous:7.3f}")
        previous = cost


if __name__ == "__main__":
    main()
