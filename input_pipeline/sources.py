"""Data sets as TFDS builders, their metadata and normalisation, per-process shares of a split,
and the validation images held out of the training split.

  - "imagenet2012": TFDS's builder (manual download, see IMAGENET_STEPS);
  - "cifar10": TFDS's builder (downloads where the network allows);
  - "image_folder": TFDS's ImageFolder over `data_dir/<split>/<class>/*.jpg`;
  - "demo": scikit-learn's bundled 8x8 digits, registered as the TFDS data
    set `sklearn_digits` in `data_dir` on first use (no download anywhere).
"""

import dataclasses
import math
import os

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import workdir_lock

DATASETS = ("imagenet2012", "cifar10", "image_folder", "demo", "synthetic")

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
    with workdir_lock.held_in_turn(os.path.join(data_dir, ".largebatch_prepare.lock")):
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
        _check_classes(data_dir, list(builder.info.splits))
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


def _class_folders(data_dir: str, split: str) -> set[str]:
    """The class folders of an image folder's split that hold at least one file."""
    root = os.path.join(data_dir, split)
    return {
        name
        for name in tf.io.gfile.listdir(root)
        if tf.io.gfile.isdir(os.path.join(root, name)) and tf.io.gfile.listdir(os.path.join(root, name))
    }


def _check_classes(data_dir: str, splits: list[str]):
    """Raises ValueError naming a class of an evaluation split that the training split lacks: training
    would never see it, and every one of its images would count as an error."""
    if "train" not in splits:
        return
    trained = _class_folders(data_dir, "train")
    for split in sorted(set(splits) - {"train"}):
        unseen = sorted(_class_folders(data_dir, split) - trained)
        if unseen:
            folders = ", ".join(os.path.join(data_dir.rstrip("/"), split, name) for name in unseen)
            raise ValueError(
                f"image_folder: {split}/ has class(es) {unseen} that train/ lacks ({folders}); training never sees "
                f"them and every one of their images would count as an error. Add their training images or remove "
                "the folder(s)."
            )


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
