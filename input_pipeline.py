"""Input pipeline: TFDS builder -> tf.data -> preprocessing -> global jax.Arrays.

One path serves every data set:
  - "imagenet2012": TFDS's builder (manual download, see IMAGENET_STEPS);
  - "cifar10": TFDS's builder (downloads where the network allows);
  - "image_folder": TFDS's ImageFolder over `data_dir/<split>/<class>/*.jpg`;
  - "demo": scikit-learn's bundled 8x8 digits, registered as the TFDS data
    set `sklearn_digits` in `data_dir` on first use (no download anywhere).

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
import fcntl
import functools
import math
import os
import re
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

DATASETS = ("imagenet2012", "cifar10", "image_folder", "demo", "synthetic")
AUGMENTATIONS = ("imagenet", "pad_crop_flip", "none")

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CIFAR_MEAN = (0.4914 * 255, 0.4822 * 255, 0.4465 * 255)
CIFAR_STD = (0.2470 * 255, 0.2435 * 255, 0.2616 * 255)
DIGITS_MEAN, DIGITS_STD = (85.0,), (105.0,)
# Per-channel (mean, std) of 0-255 pixels, by name; "auto" picks by data set.
NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "cifar10": (CIFAR_MEAN, CIFAR_STD),
    "digits": (DIGITS_MEAN, DIGITS_STD),
}
AUTO_NORMALIZATION = {"cifar10": "cifar10", "demo": "digits"}  # every other data set: "imagenet"

IMAGENET_STEPS = """\
ImageNet (TFDS 'imagenet2012') is not prepared in data_dir={data_dir!r}.
TFDS cannot download it; prepare it once:
  1. Register at https://image-net.org/download-images and download
     ILSVRC2012_img_train.tar (138 GB) and ILSVRC2012_img_val.tar (6.3 GB).
  2. Put both tar files, unextracted, in {manual_dir}
  3. Build the TFDS data set (about 2-3 hours, ~150 GB written):
       tfds build imagenet2012 --data_dir={data_dir} --manual_dir={manual_dir}
  4. Run again with --config.data_dir={data_dir}
To check the set-up first on a tiny archive made from any image folder:
  python -m tools.make_imagenet_archive --help"""


class DataError(ValueError):
    """A data set that breaks during training (an image that does not decode)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the training loop needs to know about a data set."""

    name: str
    num_classes: int
    num_train: int
    num_eval: int
    train_split: str
    eval_split: str
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    filename_key: str | None


# --------------------------------------------------------------------------
# The offline demo data set.
# --------------------------------------------------------------------------


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels), offline.

    test = every 6th image (300), train = the other 1,497. Pixels are scaled
    from 0..16 to 0..255.
    """

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            description="scikit-learn's bundled handwritten digits (UCI optdigits test set).",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the data ships with scikit-learn.
        return {"train": self._generate_examples(test=False), "test": self._generate_examples(test=True)}

    def _generate_examples(self, test: bool):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * 255.0 / 16.0).astype(np.uint8)[..., None]
        for i, (image, label) in enumerate(zip(images, digits.target)):
            if (i % 6 == 0) == test:
                yield i, {"image": image, "label": int(label), "file_name": f"digits/{i:04d}"}


# --------------------------------------------------------------------------
# Builders and metadata.
# --------------------------------------------------------------------------


def _default_data_dir(data_dir: str | None) -> str:
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def _prepared_once(make_builder, data_dir: str) -> tfds.core.DatasetBuilder:
    """Prepares a generated data set under a file lock: processes of one job
    that start together on a fresh machine would otherwise all write it."""
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, ".largebatch_prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = make_builder()
        if not builder.is_prepared():
            tfds.disable_progress_bar()  # a few seconds of generation; the bars would be noise
            builder.download_and_prepare()
    return builder


def get_builder(dataset: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder of a data set; raises ValueError if unusable.

    Args:
      dataset: one of DATASETS.
      data_dir: the TFDS data_dir; for "image_folder", the folder that holds
        `<split>/<class>/<image>`.

    Returns:
      A builder whose splits can be read.
    """
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}; choose from {DATASETS}.")
    if dataset == "image_folder":
        if not data_dir or not tf.io.gfile.isdir(data_dir):
            raise ValueError(f"image_folder: data_dir={data_dir!r} is not a folder of <split>/<class>/<image> files.")
        builder = tfds.ImageFolder(data_dir)
        if not builder.info.splits:
            raise ValueError(f"image_folder: no <split>/<class>/<image> files under {data_dir!r}.")
        return builder
    data_dir = _default_data_dir(data_dir)
    if dataset == "demo":
        return _prepared_once(lambda: SklearnDigits(data_dir=data_dir), data_dir)
    builder = tfds.builder(dataset, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    if dataset == "imagenet2012":
        manual_dir = os.path.join(data_dir, "downloads", "manual")
        raise ValueError(IMAGENET_STEPS.format(data_dir=data_dir, manual_dir=manual_dir))
    try:
        builder.download_and_prepare()
    except Exception as e:  # No network: say what to do instead.
        raise ValueError(
            f"Could not download {dataset!r} into {data_dir!r} ({type(e).__name__}: {e}). Without network, "
            "point dataset='image_folder' and data_dir at a folder of <split>/<class>/<image> files."
        ) from e
    return builder


def _eval_split(builder) -> str:
    for name in ("validation", "test", "val"):
        if name in builder.info.splits:
            return name
    raise ValueError(f"No evaluation split (validation/test/val) in {list(builder.info.splits)}.")


def normalization(name: str, dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of NORMALIZATIONS[name]; "auto" = the data set's own (ImageNet's for image folders)."""
    if name == "auto":
        name = AUTO_NORMALIZATION.get(dataset, "imagenet")
    if name not in NORMALIZATIONS:
        raise ValueError(f"Unknown normalization {name!r}; choose from {('auto', *NORMALIZATIONS)}.")
    return NORMALIZATIONS[name]


def dataset_info(builder, dataset: str, normalize: str = "auto") -> DatasetInfo:
    """Class count, split sizes, channels and normalisation (see `normalization`) of a prepared builder."""
    eval_split = _eval_split(builder)
    if "train" not in builder.info.splits:
        raise ValueError(f"No 'train' split in {list(builder.info.splits)}.")
    features = builder.info.features
    channels = features["image"].shape[-1] or 3
    mean, std = normalization(normalize, dataset)
    filename_key = next((k for k in ("file_name", "image/filename", "id") if k in features), None)
    return DatasetInfo(
        name=dataset,
        num_classes=features["label"].num_classes,
        num_train=builder.info.splits["train"].num_examples,
        num_eval=builder.info.splits[eval_split].num_examples,
        train_split="train",
        eval_split=eval_split,
        channels=channels,
        mean=mean,
        std=std,
        filename_key=filename_key,
    )


# --------------------------------------------------------------------------
# Per-process shares.
# --------------------------------------------------------------------------


def split_share(builder, split: str, index: int, count: int) -> tuple[tf.data.Dataset, int, int]:
    """Share `index` of `count` disjoint, covering shares of a split, undecoded, in a fixed order.

    Returns:
      (records, examples in this share, examples in the largest share).
    """
    total = builder.info.splits[split].num_examples
    largest = math.ceil(total / count)
    if isinstance(builder, tfds.ImageFolder):
        # ImageFolder has no sub-split API; its file order is fixed, so a
        # strided shard is disjoint and covering.
        records = _undecoded(builder, split).shard(count, index)
        size = len(range(index, total, count))
    else:
        subsplit = tfds.split_for_jax_process(split, process_index=index, process_count=count)
        records = _undecoded(builder, subsplit)
        size = builder.info.splits[subsplit].num_examples
    return records, size, largest


def _undecoded(builder, split: str) -> tf.data.Dataset:
    return builder.as_dataset(split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()})


def positions_share(builder, split: str, positions: np.ndarray, index: int, count: int):
    """Share `index` of `count` (strided) of the records at `positions` of a split read in its fixed order.

    Returns:
      (records, examples in this share, examples in the largest share).
    """
    keep = np.zeros(builder.info.splits[split].num_examples, bool)
    keep[positions] = True
    keep = tf.constant(keep)
    records = _undecoded(builder, split).enumerate().filter(lambda i, _: tf.gather(keep, i)).map(lambda _, r: r)
    return records.shard(count, index), len(range(index, len(positions), count)), math.ceil(len(positions) / count)


# --------------------------------------------------------------------------
# The validation split: training images held out.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Holdout:
    """A fixed, stratified part of the training split held out for validation.

    Positions index the training split in its fixed order; `names` are the
    file names (or record ids) of the whole split, so a run can record which
    images it trained on and which it validated on.
    """

    validation: np.ndarray
    train: np.ndarray
    names: list[str]
    seed: int

    def record(self) -> dict:
        """The split as written beside a run (train.SPLIT_FILE): sorted names of each part."""
        return {
            "validation_seed": self.seed,
            "validation": sorted(self.names[i] for i in self.validation),
            "train": sorted(self.names[i] for i in self.train),
        }


def stratified_sample(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Sorted positions of `count` examples, each class's share proportional to its size.

    Quotas are count x class size / total, rounded down, the remainder going to
    the largest fractional parts; within a class the examples are the first of
    a permutation drawn from `seed` (not the run's seed, so every run holds out
    the same images).
    """
    classes, sizes = np.unique(labels, return_counts=True)
    exact = count * sizes / len(labels)
    quotas = np.floor(exact).astype(int)
    quotas[np.argsort(quotas - exact, kind="stable")[: count - quotas.sum()]] += 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quotas)]
    return np.sort(np.concatenate(chosen))


def holdout(builder, info: DatasetInfo, count: int, seed: int) -> Holdout:
    """Holds out `count` training images, stratified by label (one pass over labels and names)."""
    keys = ["label"] + ([info.filename_key] if info.filename_key else [])
    labels, names = [], []
    for batch in _undecoded(builder, info.train_split).map(lambda r: {k: r[k] for k in keys}).batch(4096):
        labels.append(batch["label"].numpy())
        if info.filename_key:
            # <class>/<file> for image folders (file names repeat across classes), the id otherwise.
            names.extend("/".join(n.decode().split("/")[-2:]) for n in batch[info.filename_key].numpy())
    labels = np.concatenate(labels)
    if not info.filename_key:
        names = [str(i) for i in range(len(labels))]
    validation = stratified_sample(labels, count, seed)
    return Holdout(validation, np.setdiff1d(np.arange(len(labels)), validation), names, seed)


# --------------------------------------------------------------------------
# Preprocessing.
# --------------------------------------------------------------------------


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


def _decode_and_crop(encoded, channels, offset_y, offset_x, height, width):
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


def _resize(image, size):
    return tf.image.resize(image, [size, size], method="bicubic")


def imagenet_train(encoded, seed, image_size: int, channels: int = 3):
    """Random-resized crop (fallback: center crop), flip, resize.

    The crop samples area 8%-100% and aspect ratio 3/4-4/3 (Szegedy et al.
    2015); if no window fits in 10 attempts the whole image is used, which is
    then center-cropped as in evaluation.
    """
    shape = _image_shape(encoded, channels)
    begin, size = _distorted_box(shape, seed)
    whole = tf.reduce_all(tf.equal(size[:2], shape[:2]))
    center = _center_box(shape, image_size)
    offset_y, offset_x, height, width = [
        tf.where(whole, c, r) for c, r in zip(center, (begin[0], begin[1], size[0], size[1]))
    ]
    image = _decode_and_crop(encoded, channels, offset_y, offset_x, height, width)
    image = tf.image.stateless_random_flip_left_right(image, seed=tf.random.experimental.stateless_fold_in(seed, 1))
    return _resize(image, image_size)


def imagenet_eval(encoded, image_size: int, channels: int = 3):
    """Center crop of 224/256 of the shorter side, resized to image_size."""
    shape = _image_shape(encoded, channels)
    image = _decode_and_crop(encoded, channels, *_center_box(shape, image_size))
    return _resize(image, image_size)


def pad_crop_flip(encoded, seed, image_size: int, channels: int, pad: int = 4, flip: bool = True):
    """CIFAR augmentation: zero-pad by 4, random image_size crop, random flip."""
    image = _decode(encoded, channels)
    image = tf.image.resize_with_crop_or_pad(image, image_size, image_size)
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, [image_size, image_size, channels], seed=seed)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=tf.random.experimental.stateless_fold_in(seed, 1))
    return image


def plain(encoded, image_size: int, channels: int):
    """Decode; resize only if the image is not already image_size square."""
    image = _decode(encoded, channels)
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], image_size), tf.equal(shape[1], image_size))
    image = tf.cond(same, lambda: tf.cast(image, tf.float32), lambda: _resize(image, image_size))
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

    def _normalise(self, image):
        image = tf.ensure_shape(tf.cast(image, tf.float32), [self.image_size, self.image_size, self.info.channels])
        return (image - tf.constant(self.info.mean)) / tf.constant(self.info.std)

    def train(self, encoded, seed):
        c, s = self.info.channels, self.image_size
        if self.augment == "imagenet":
            image = imagenet_train(encoded, seed, s, c)
        elif self.augment == "pad_crop_flip":
            image = pad_crop_flip(encoded, seed, s, c, flip=self.flip)
        else:
            image = plain(encoded, s, c)
        return self._normalise(image)

    def eval(self, encoded):
        if self.augment == "imagenet":
            image = imagenet_eval(encoded, self.image_size, self.info.channels)
        else:
            image = plain(encoded, self.image_size, self.info.channels)
        return self._normalise(image)


# --------------------------------------------------------------------------
# Streams.
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Corrupt images.
# --------------------------------------------------------------------------


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
    """Iterates a dataset as NumPy; a decoding failure names the bad file."""
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
        yield batch


# --------------------------------------------------------------------------
# Global arrays.
# --------------------------------------------------------------------------


def _tf_reason(error) -> str:
    """TensorFlow's error message without its internal node names ({{function_node ...}}, [[{{node ...}}]])."""
    text = re.sub(r"\[*\{\{[^}]*\}\}\]*", "", error.message.splitlines()[0])
    return " ".join(text.split()).strip(" ;:") or type(error).__name__


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
