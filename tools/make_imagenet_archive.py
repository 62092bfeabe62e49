"""Writes ILSVRC2012-format archives from an image folder, for TFDS's imagenet2012 builder.

    python -m tools.make_imagenet_archive --image_folder=ROOT --out=MANUAL_DIR \
        [--synset_map=FILE] [--train_per_class=N]
    tfds build imagenet2012 --manual_dir=MANUAL_DIR --data_dir=DATA_DIR

ROOT holds <split>/<class>/<image>: the training images come from ROOT/train,
the validation images from ROOT/val, ROOT/validation or ROOT/test.

Outputs in MANUAL_DIR, as ImageNet ships them:
  ILSVRC2012_img_train.tar  one <synset>.tar per class, holding <synset>_<i>.JPEG
  ILSVRC2012_img_val.tar    ILSVRC2012_val_00000001.JPEG, ...

TFDS labels validation images by pairing the sorted file names with its shipped
validation_labels.txt, line by line. The validation archive therefore holds the
official positions 1..n, each filled with an image of the class whose synset
that line names; it stops at the first position whose synset has no class (or
whose class has no images left). With a map of few classes, the validation
split is short: the default map (the first distinct synsets of the official
order) gives one image per class before the first unmapped synset.

--synset_map is a text file of "<class> <synset>" lines; without it, the sorted
class names are paired with the first distinct synsets of the official
validation order.
"""

import argparse
import io
import os
import pathlib
import sys
import tarfile

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def official_validation_synsets() -> list[str]:
    """The 50,000 validation synsets in file-name order, as TFDS ships them."""
    import tensorflow_datasets as tfds

    path = tfds.core.tfds_path("datasets/imagenet2012/validation_labels.txt")
    return path.read_text().split()


def default_synset_map(classes: list[str]) -> dict[str, str]:
    """Pairs sorted class names with the first distinct synsets of the official val order."""
    distinct = list(dict.fromkeys(official_validation_synsets()))
    return dict(zip(sorted(classes), distinct))


def read_synset_map(path: str) -> dict[str, str]:
    mapping = {}
    for line in pathlib.Path(path).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, synset = line.split()
            mapping[name] = synset
    return mapping


def _images(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _jpeg_bytes(path: pathlib.Path) -> bytes:
    data = path.read_bytes()
    if data[:3] == b"\xff\xd8\xff":
        return data
    import tensorflow as tf  # Re-encode PNGs: ImageNet's archives hold JPEGs.

    return tf.io.encode_jpeg(tf.io.decode_image(data, channels=3, expand_animations=False), quality=95).numpy()


def _add(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_train_tar(train_dir: pathlib.Path, synsets: dict[str, str], out: pathlib.Path, per_class: int | None) -> int:
    count = 0
    with tarfile.open(out, "w") as outer:
        for name, synset in sorted(synsets.items(), key=lambda kv: kv[1]):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as inner:
                for i, path in enumerate(_images(train_dir / name)[:per_class]):
                    _add(inner, f"{synset}_{i}.JPEG", _jpeg_bytes(path))
                    count += 1
            _add(outer, f"{synset}.tar", buffer.getvalue())
    return count


def write_val_tar(val_dir: pathlib.Path, synsets: dict[str, str], out: pathlib.Path, limit: int | None) -> int:
    by_synset = {synset: iter(_images(val_dir / name)) for name, synset in synsets.items()}
    count = 0
    with tarfile.open(out, "w") as tar:
        for position, synset in enumerate(official_validation_synsets()[:limit], start=1):
            path = next(by_synset[synset], None) if synset in by_synset else None
            if path is None:
                break
            _add(tar, f"ILSVRC2012_val_{position:08d}.JPEG", _jpeg_bytes(path))
            count += 1
    return count


def make_archives(
    image_folder: str,
    out_dir: str,
    synset_map: dict[str, str] | None = None,
    train_per_class: int | None = None,
    max_val: int | None = None,
) -> dict[str, int]:
    """Writes both archives; returns {"train": images, "validation": images}."""
    root = pathlib.Path(image_folder)
    train_dir = root / "train"
    val_dir = next((root / s for s in ("val", "validation", "test") if (root / s).is_dir()), None)
    if not train_dir.is_dir() or val_dir is None:
        raise ValueError(f"{root} needs a train/ and a val/ (or validation/, test/) folder of <class>/<image> files.")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    synsets = synset_map or default_synset_map(classes)
    missing = [c for c in synsets if not (train_dir / c).is_dir()]
    if missing:
        raise ValueError(f"Classes {missing} of the synset map have no folder under {train_dir}.")
    os.makedirs(out_dir, exist_ok=True)
    out = pathlib.Path(out_dir)
    return {
        "train": write_train_tar(train_dir, synsets, out / "ILSVRC2012_img_train.tar", train_per_class),
        "validation": write_val_tar(val_dir, synsets, out / "ILSVRC2012_img_val.tar", max_val),
        "classes": len(synsets),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_folder", required=True)
    parser.add_argument("--out", required=True, help="the manual_dir to write the two tar files into")
    parser.add_argument("--synset_map", help='file of "<class> <synset>" lines')
    parser.add_argument("--train_per_class", type=int, default=None)
    parser.add_argument("--max_val", type=int, default=None)
    args = parser.parse_args(argv)
    mapping = read_synset_map(args.synset_map) if args.synset_map else None
    counts = make_archives(args.image_folder, args.out, mapping, args.train_per_class, args.max_val)
    print(
        f"Wrote {counts['train']} training and {counts['validation']} validation images of "
        f"{counts['classes']} classes to {args.out}."
    )
    print(f"Next: tfds build imagenet2012 --manual_dir={args.out} --data_dir=<DATA_DIR>")


if __name__ == "__main__":
    sys.exit(main())
