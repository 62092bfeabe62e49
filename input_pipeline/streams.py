"""tf.data streams of a run: the training stream of one shard as a pure function of (seed, step),
evaluation batches padded to the same count in every process, and NumPy iteration that names
the file an undecodable image came from."""

import re
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from input_pipeline.preprocess import Preprocess
from input_pipeline.sources import DataError, DatasetInfo


def _epoch_seed(seed: int, epoch):
    return tf.cast(seed, tf.int64) * 1_000_003 + epoch


def train_dataset(
    records: tf.data.Dataset,
    num_examples: int,
    preprocess: Preprocess,
    *,
    local_batch: int,
    seed: int,
    shard_index: int,
    start_step: int = 0,
    shuffle_buffer: int = 50_000,
    cache: bool = False,
    prefetch: int = tf.data.AUTOTUNE,
) -> tf.data.Dataset:
    """The infinite training stream of one data shard, from batch `start_step` on.

    Batch k of the stream depends only on (seed, shard_index, k), so a run
    restarted at step S continues with the batch an uninterrupted run would
    have read.

    Args:
      records: the shard, undecoded, in a fixed order.
      num_examples: size of the shard.
      preprocess: decoding and augmentation.
      local_batch: examples per batch from this shard.
      seed: the run's seed.
      shard_index: mixes into the augmentation RNG.
      start_step: the first batch to produce.
      shuffle_buffer: shuffle buffer (the whole share when it is smaller).
      cache: keep the encoded share in memory after the first epoch.
      prefetch: batches prepared ahead (tf.data's AUTOTUNE by default).

    Returns:
      A tf.data.Dataset of {"image": [local_batch, s, s, c] float32, "label": int32}.
    """
    if cache:
        records = records.cache()
    records = records.map(lambda r: (r["image"], tf.cast(r["label"], tf.int32)))
    buffer = min(shuffle_buffer, num_examples)
    start_example = start_step * local_batch
    start_epoch, offset = divmod(start_example, num_examples)
    base_seed = tf.random.experimental.stateless_fold_in(tf.constant([seed, 0], tf.int64), shard_index)

    def one_epoch(epoch):
        shuffled = records.shuffle(buffer, seed=_epoch_seed(seed, epoch), reshuffle_each_iteration=False)
        return shuffled.enumerate().map(lambda i, x: (epoch * num_examples + i, x))

    stream = tf.data.Dataset.range(start_epoch, 2**62).flat_map(one_epoch).skip(offset)

    def augment(position, example):
        encoded, label = example
        example_seed = tf.random.experimental.stateless_fold_in(base_seed, position)
        return {"image": preprocess.train(encoded, example_seed), "label": label}

    stream = stream.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return stream.batch(local_batch, drop_remainder=True).prefetch(prefetch)


def eval_dataset(records: tf.data.Dataset, preprocess: Preprocess, local_batch: int) -> tf.data.Dataset:
    """This process's eval share in batches (the last one possibly partial)."""
    ds = records.map(
        lambda r: {"image": preprocess.eval(r["image"]), "label": tf.cast(r["label"], tf.int32)},
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)


def padded_eval_batches(batches: Iterator[dict], local_batch: int, num_batches: int, image_shape) -> Iterator[dict]:
    """Pads the stream to `num_batches` full batches with a 0/1 "mask".

    Every process runs the same number of eval steps (the largest share's),
    so the collectives line up; padded rows have mask 0 and count nowhere.
    """
    for _ in range(num_batches):
        batch = next(batches, None)
        n = 0 if batch is None else len(batch["label"])
        images = np.zeros((local_batch, *image_shape), np.float32)
        labels = np.zeros((local_batch,), np.int32)
        if n:
            images[:n], labels[:n] = batch["image"], batch["label"]
        mask = (np.arange(local_batch) < n).astype(np.float32)
        yield {"image": images, "label": labels, "mask": mask}


def find_corrupt_image(records: tf.data.Dataset, info: DatasetInfo) -> str | None:
    """The name of the first record whose image does not decode, or None."""
    for record in records.as_numpy_iterator():
        try:
            tf.io.decode_image(record["image"], channels=info.channels, expand_animations=False)
        except (tf.errors.InvalidArgumentError, ValueError):
            name = record.get(info.filename_key, b"<unnamed>") if info.filename_key else b"<unnamed>"
            return name.decode() if isinstance(name, bytes) else str(name)
    return None


def numpy_batches(ds: tf.data.Dataset, records: tf.data.Dataset, info: DatasetInfo) -> Iterator[dict]:
    """Iterates a dataset as NumPy; a decoding failure names the bad file, a file gone since the
    data set was listed its path (DataError)."""
    iterator = ds.as_numpy_iterator()
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as e:
            bad = find_corrupt_image(records, info)
            where = f"image {bad!r}" if bad else "an image"
            raise DataError(
                f"cannot decode {where} of data set {info.name!r} ({_tf_reason(e)}); "
                "to list every undecodable file of an image folder: python -m tools.check_images DIR"
            ) from None
        except (tf.errors.NotFoundError, tf.errors.PermissionDeniedError) as e:
            # TensorFlow's "...transformation with iterator: Iterator::...: PATH; No such file or directory".
            path, _, reason = _tf_reason(e).rsplit(": ", 1)[-1].partition("; ")
            raise DataError(
                f"cannot read {path} of data set {info.name!r} ({reason or type(e).__name__}): it was moved, deleted "
                "or made unreadable after the run listed it; put it back and run the same command to resume from "
                "the last checkpoint"
            ) from None
        yield batch


def _tf_reason(error) -> str:
    """TensorFlow's error message without its internal node names ({{function_node ...}}, [[{{node ...}}]])."""
    text = re.sub(r"\[*\{\{[^}]*\}\}\]*", "", error.message.splitlines()[0])
    return " ".join(text.split()).strip(" ;:") or type(error).__name__
