"""Input pipeline: TFDS builder -> tf.data -> preprocessing -> global jax.Arrays, behind `create`.

One path serves every data set (sources.py: builders, shares, the validation hold-out;
preprocess.py: decoding and augmentation; streams.py: the tf.data streams).

Each process reads a disjoint share of each split (the shares cover it). The
training stream is a pure function of (seed, step): epoch e is shuffled with a
seed derived from (seed, e), and every example's augmentation draws from a
stateless RNG keyed by (seed, process, position in the stream). A run resumed
at step S therefore sees exactly the batches an uninterrupted run would.

Evaluation is exact: the last partial batch is padded and masked, every
process runs the same number of batches, and each example counts once.

Corrupt images: the pipeline stops with an error naming the first file that
does not decode (found by rescanning the share once an error occurs). Nothing
is skipped silently.
"""

import dataclasses
import functools
import math
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf

from input_pipeline.preprocess import AUGMENTATIONS, Preprocess
from input_pipeline.sources import (
    DATASETS,
    NORMALIZATIONS,
    DataError,
    DatasetInfo,
    Holdout,
    dataset_info,
    get_builder,
    holdout,
    normalization,
    positions_share,
    split_share,
)
from input_pipeline.streams import eval_dataset, numpy_batches, padded_eval_batches, train_dataset

__all__ = ["AUGMENTATIONS", "DATASETS", "NORMALIZATIONS", "Data", "DataError", "SyntheticData", "create", "to_global"]


def to_global(batch: dict, sharding: jax.sharding.Sharding) -> dict:
    """Assembles each process's rows into global arrays sharded over "data"."""
    return {key: jax.make_array_from_process_local_data(sharding, np.asarray(value)) for key, value in batch.items()}


@dataclasses.dataclass(frozen=True)
class Shard:
    """One data shard of the training split: its index, records and size."""

    index: int
    records: tf.data.Dataset
    count: int


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """This process's share of one evaluation split."""

    records: tf.data.Dataset
    count: int
    largest_share: int


@dataclasses.dataclass
class Data:
    """The data of one run in one process, as the training loop uses it.

    The training split is cut into `num_shards` disjoint shards (by default
    one per process); each process reads the shards
    [p * S/P, (p+1) * S/P), each shard contributes batch/S rows to every
    global batch. The global batch therefore depends on the shard count, not
    on how many processes or devices read it.
    """

    info: DatasetInfo
    preprocess: Preprocess
    train_shards: list[Shard]
    shard_batch: int
    eval_sets: dict[str, EvalSet]  # "validation" (held out) and/or the data set's evaluation split
    local_eval_batch: int
    seed: int
    cache: bool
    holdout: Holdout | None = None

    @property
    def periodic_eval_split(self) -> str:
        """The split evaluated during training: the held-out validation images if any."""
        return "validation" if self.holdout else self.info.eval_split

    @property
    def final_eval_splits(self) -> tuple[str, ...]:
        """The splits evaluated after the last step: also the test split when validation is held out,
        so the test images are read once, at the end, and choose nothing."""
        return ("validation", self.info.eval_split) if self.holdout else (self.info.eval_split,)

    @property
    def train_count(self) -> int:
        return sum(shard.count for shard in self.train_shards)

    @property
    def local_batch(self) -> int:
        return self.shard_batch * len(self.train_shards)

    def train_batches(self, start_step: int, micro_steps: int = 1) -> Iterator[dict]:
        """This process's rows of every global batch from `start_step` on; with `micro_steps` > 1,
        each batch as that many micro-batches, one after the other (each shard's consecutive
        examples: the same examples, in the same order, as the whole batch)."""
        shard_rows = self.micro_batch_rows(micro_steps) // len(self.train_shards)
        streams = [
            train_dataset(
                shard.records,
                shard.count,
                self.preprocess,
                local_batch=shard_rows,
                seed=self.seed,
                shard_index=shard.index,
                start_step=start_step * micro_steps,
                cache=self.cache,
                # Micro-batches fed from the host are those of a batch larger than memory: one ahead.
                prefetch=1 if micro_steps > 1 else tf.data.AUTOTUNE,
            )
            for shard in self.train_shards
        ]
        ds = streams[0]
        if len(streams) > 1:
            ds = tf.data.Dataset.zip(tuple(streams)).map(
                lambda *batches: {k: tf.concat([b[k] for b in batches], 0) for k in batches[0]}
            )
        records = functools.reduce(lambda a, b: a.concatenate(b), [s.records for s in self.train_shards])
        return numpy_batches(ds, records, self.info)

    def micro_batch_rows(self, micro_steps: int) -> int:
        """This process's rows per micro-batch, or ValueError when a shard's rows do not split."""
        _micro_rows(self.shard_batch, micro_steps, "data shard")
        return self.local_batch // micro_steps

    def num_eval_batches(self, split: str | None = None) -> int:
        eval_set = self.eval_sets[split or self.periodic_eval_split]
        return math.ceil(eval_set.largest_share / self.local_eval_batch)

    def eval_batches(self, split: str | None = None) -> Iterator[dict]:
        """Padded batches of an evaluation split (default: the periodic one), the same count in every process."""
        split = split or self.periodic_eval_split
        records = self.eval_sets[split].records
        ds = eval_dataset(records, self.preprocess, self.local_eval_batch)
        shape = (self.preprocess.image_size, self.preprocess.image_size, self.info.channels)
        return padded_eval_batches(
            numpy_batches(ds, records, self.info), self.local_eval_batch, self.num_eval_batches(split), shape
        )


def _micro_rows(rows: int, micro_steps: int, holder: str) -> int:
    if rows % micro_steps:
        raise ValueError(
            f"a {holder}'s {rows} rows per batch do not split into {micro_steps} micro-batches fed from the host; "
            "use a microbatch_size that does, or data_shards=0."
        )
    return rows // micro_steps


@dataclasses.dataclass
class SyntheticData:
    """Random images and labels of the model's size, no I/O: measures a node's training rate
    through the real loop before a data set is there (dataset="synthetic").

    ImageNet-sized (1,281,167 training images, so epoch-valued configs give
    ImageNet's step counts); the images are standard normal (as if normalised),
    two local batches cycled so the host does no work per step; evaluation is
    one batch of the same kind.
    """

    info: DatasetInfo
    local_batch: int
    local_eval_batch: int
    image_size: int
    seed: int
    # As Data's: one evaluation set, the same during and after training; nothing held out.
    periodic_eval_split = "validation"
    final_eval_splits = ("validation",)
    holdout = None

    @property
    def train_count(self) -> int:
        return self.info.num_train

    def num_eval_batches(self, split: str | None = None) -> int:
        return 1

    def micro_batch_rows(self, micro_steps: int) -> int:
        """This process's rows per micro-batch, or ValueError when they do not split."""
        return _micro_rows(self.local_batch, micro_steps, "process")

    def _batch(self, rows: int, index: int) -> dict:
        rng = np.random.default_rng([self.seed, jax.process_index(), index])
        shape = (rows, self.image_size, self.image_size, self.info.channels)
        return {
            "image": rng.standard_normal(shape, np.float32),
            "label": rng.integers(0, self.info.num_classes, rows).astype(np.int32),
        }

    def train_batches(self, start_step: int, micro_steps: int = 1) -> Iterator[dict]:
        rows = self.micro_batch_rows(micro_steps)
        pool = [self._batch(rows, i) for i in range(2)]
        step = start_step * micro_steps
        while True:
            yield pool[step % 2]
            step += 1

    def eval_batches(self, split: str | None = None) -> Iterator[dict]:
        batch = self._batch(self.local_eval_batch, 2)  # not one of the two training batches
        yield {**batch, "mask": np.ones(self.local_eval_batch, np.float32)}


def synthetic(global_batch: int, global_eval_batch: int, image_size: int, num_classes: int, seed: int) -> SyntheticData:
    """The synthetic data set of `create`, for this process."""
    count = jax.process_count()
    info = DatasetInfo(
        name="synthetic",
        num_classes=num_classes or 1000,
        num_train=1_281_167,
        num_eval=global_eval_batch,
        train_split="train",
        eval_split="validation",
        channels=3,
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
        filename_key=None,
    )
    return SyntheticData(info, global_batch // count, global_eval_batch // count, image_size, seed)


def create(
    dataset: str,
    data_dir: str | None,
    *,
    global_batch: int,
    global_eval_batch: int,
    image_size: int,
    augment: str,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    num_shards: int = 0,
    cache: bool = False,
    normalize: str = "auto",
    flip: bool = True,
    num_classes: int = 0,
    validation_images: int = 0,
    validation_seed: int = 0,
) -> Data | SyntheticData:
    """Opens a data set for this process.

    Args:
      dataset, data_dir: see get_builder.
      global_batch, global_eval_batch: examples per step over all processes.
      image_size: model input side.
      augment: "imagenet", "pad_crop_flip" or "none".
      seed: shuffling and augmentation seed.
      process_index, process_count: default to JAX's.
      num_shards: training-data shards (0: one per process); a multiple of
        the process count. Fix it to make runs on different numbers of
        processes see the same global batches.
      cache: keep the encoded training and evaluation images in memory.
      normalize: a NORMALIZATIONS name or "auto" (see `normalization`).
      flip: random horizontal flips in the "pad_crop_flip" augmentation.
      num_classes: the synthetic data set's class count (0: 1000); others have their own.
      validation_images: > 0: hold out that many training images, stratified
        by class (see `holdout`), as the "validation" split evaluated during
        training; the data set's own evaluation split is then read only after
        the last step.
      validation_seed: which images are held out (not the run's seed).

    Returns:
      A Data whose iterators yield this process's NumPy rows.
    """
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    num_shards = num_shards or process_count
    if num_shards % process_count:
        raise ValueError(f"data_shards={num_shards} is not a multiple of the number of processes ({process_count}).")
    for name, batch, parts in (
        ("batch_size", global_batch, num_shards),
        ("eval_batch_size", global_eval_batch, process_count),
    ):
        if batch % parts:
            raise ValueError(f"{name}={batch} is not divisible by {parts} (data shards or processes).")
    if validation_images < 0 or (validation_images and dataset == "synthetic"):
        raise ValueError(f"validation_images={validation_images}: hold out >= 0 images of a real data set.")
    if dataset == "synthetic":
        return synthetic(global_batch, global_eval_batch, image_size, num_classes, seed)
    normalization(normalize, dataset)  # a bad name fails before the data set is opened
    builder = get_builder(dataset, data_dir)
    info = dataset_info(builder, dataset, normalize)
    held = None
    eval_sets = {info.eval_split: EvalSet(*split_share(builder, info.eval_split, process_index, process_count))}
    if validation_images:
        if validation_images >= info.num_train:
            raise ValueError(f"validation_images={validation_images} leaves no training images of {info.num_train}.")
        held = holdout(builder, info, validation_images, validation_seed)
        info = dataclasses.replace(info, num_train=len(held.train))
        validation = positions_share(builder, info.train_split, held.validation, process_index, process_count)
        eval_sets["validation"] = EvalSet(*validation)
    per_process = num_shards // process_count
    shards = []
    for index in range(process_index * per_process, (process_index + 1) * per_process):
        if held:
            records, count, _ = positions_share(builder, info.train_split, held.train, index, num_shards)
        else:
            records, count, _ = split_share(builder, info.train_split, index, num_shards)
        shards.append(Shard(index, records, count))
    if cache:  # every evaluation after the first reads the encoded images from memory, not from files
        eval_sets = {name: dataclasses.replace(s, records=s.records.cache()) for name, s in eval_sets.items()}
    return Data(
        info=info,
        preprocess=Preprocess(augment, image_size, info, flip),
        train_shards=shards,
        shard_batch=global_batch // num_shards,
        eval_sets=eval_sets,
        local_eval_batch=global_eval_batch // process_count,
        seed=seed,
        cache=cache,
        holdout=held,
    )
