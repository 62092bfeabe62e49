"""Images/s of the ImageNet training preprocessing on ImageNet-sized JPEGs.

    LARGEBATCH_SHARED_DATA=../shared/data python -m bench.bench_input [--images 512]

Builds an image folder of JPEGs at ImageNet's typical size (500x375, quality
90, upscaled from the shared CIFAR-10 images, so decoding costs what it costs
on ImageNet) and times, in the same run:
  - ours: input_pipeline's training stream with augment="imagenet"
    (random-resized crop decoded with decode_and_crop_jpeg, flip, resize to
    224, normalise), batches of 64;
  - peer: the plain tf.data recipe, full decode -> random crop of the same
    area -> resize -> flip, same parallelism.
Prints images/s for each and the ratio ours/peer.
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
    next(batches)  # warm up
    start = time.perf_counter()
    for _ in range(num_images // batch):
        next(batches)
    return num_images // batch * batch / (time.perf_counter() - start)


def peer_stream(folder: pathlib.Path, batch: int):
    files = sorted(str(p) for p in folder.glob("train/*/*.jpg"))

    def load(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        area = tf.random.uniform([], 0.08, 1.0) * 500 * 375
        side = tf.cast(tf.minimum(tf.sqrt(area), 375.0), tf.int32)
        image = tf.image.random_crop(image, [side, side, 3])
        image = tf.image.resize(image, [224, 224], method="bicubic")
        return tf.image.random_flip_left_right(image)

    ds = tf.data.Dataset.from_tensor_slices(files).repeat().map(load, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(pathlib.Path(tmp), args.images)
        data = ip.create(
            "image_folder", str(folder), global_batch=args.batch, global_eval_batch=args.batch, image_size=224,
            augment="imagenet", seed=0, process_index=0, process_count=1, cache=True,
        )  # fmt: skip
        rates = {"ours": [], "peer": []}
        for _ in range(3):
            rates["ours"].append(time_stream(data.train_batches(0), args.images, args.batch))
            rates["peer"].append(time_stream(peer_stream(folder, args.batch), args.images, args.batch))
    ours, peer = max(rates["ours"]), max(rates["peer"])
    print(f"ImageNet train preprocessing, 500x375 JPEGs -> 224x224, {os.cpu_count()} cores, {args.images} images")
    print(f"ours (decode_and_crop_jpeg): {ours:8.1f} img/s")
    print(f"peer (full decode + crop):   {peer:8.1f} img/s")
    print(f"ratio ours/peer:             {ours / peer:8.2f}")
    print(f"(all runs: ours {np.round(rates['ours'], 1).tolist()}, peer {np.round(rates['peer'], 1).tolist()})")


if __name__ == "__main__":
    main()
