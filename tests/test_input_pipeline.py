"""input_pipeline on the shared CIFAR-10 JPEGs, a real TFDS imagenet2012 build and the demo set."""

import hashlib
import itertools
import math
import os
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import input_pipeline as ip
from configs import cifar10_lars, cifar10_sgd
from input_pipeline import sources
from tools import make_imagenet_archive

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def open_data(dataset, data_dir, *, batch=64, eval_batch=64, size=32, augment="pad_crop_flip", seed=0, p=0, n=1):
    return ip.create(
        dataset,
        data_dir,
        global_batch=batch * n,
        global_eval_batch=eval_batch * n,
        image_size=size,
        augment=augment,
        seed=seed,
        process_index=p,
        process_count=n,
    )


def file_names(records, key):
    return [r[key].decode() for r in records.as_numpy_iterator()]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_image_folder_label_of_a_known_file(cifar10_dir):
    builder = sources.get_builder("image_folder", str(cifar10_dir))
    records, count, _ = sources.split_share(builder, "train", 0, 1)
    assert count == 50_000
    assert builder.info.features["label"].names == CLASSES
    wanted = {f"train/{c}/0007.jpg": CLASSES.index(c) for c in ("cat", "truck", "airplane")}
    found = {}
    for record in records.take(50_000).as_numpy_iterator():
        name = record["image/filename"].decode()
        key = "/".join(name.split("/")[-3:])
        if key in wanted:
            found[key] = int(record["label"])
            # The record holds the file's own bytes.
            assert record["image"] == pathlib.Path(name).read_bytes()
        if len(found) == len(wanted):
            break
    assert found == wanted


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_process_shares_cover_the_split_without_duplicates(cifar10_dir, process_count):
    builder = sources.get_builder("image_folder", str(cifar10_dir))
    shares = []
    for p in range(process_count):
        records, count, largest = sources.split_share(builder, "test", p, process_count)
        names = file_names(records, "image/filename")
        assert len(names) == count <= largest == -(-10_000 // process_count)
        shares.append(names)
    union = list(itertools.chain.from_iterable(shares))
    assert len(union) == len(set(union)) == 10_000
    on_disk = {str(p) for p in cifar10_dir.glob("test/*/*.jpg")}
    assert set(union) == on_disk


def test_exact_eval_counts_every_example_once(cifar10_dir, tmp_path):
    # 10,001 test images: the 10,000 CIFAR-10 test images and one more.
    root = tmp_path / "folder"
    for c in CLASSES:
        (root / "test" / c).mkdir(parents=True)
        (root / "train" / c).mkdir(parents=True)
        for src in sorted((cifar10_dir / "test" / c).glob("*.jpg")):
            os.symlink(src, root / "test" / c / src.name)
        os.symlink(cifar10_dir / "train" / c / "0000.jpg", root / "train" / c / "0000.jpg")
    os.symlink(cifar10_dir / "train" / "cat" / "0001.jpg", root / "test" / "cat" / "extra.jpg")
    want_per_class = np.full(10, 1000)
    want_per_class[CLASSES.index("cat")] += 1
    for n in (1, 3):
        counted, per_class, steps = 0.0, np.zeros(10), set()
        for p in range(n):
            data = open_data("image_folder", str(root), eval_batch=64, p=p, n=n)
            assert data.info.num_eval == 10_001
            batches = list(data.eval_batches())
            steps.add(len(batches))
            for batch in batches:
                counted += batch["mask"].sum()
                np.add.at(per_class, batch["label"], batch["mask"])
                assert batch["image"].shape == (64, 32, 32, 3)
        assert counted == 10_001
        np.testing.assert_array_equal(per_class, want_per_class)
        assert steps == {math.ceil(math.ceil(10_001 / n) / 64)}  # every process runs the same number of steps


def test_demo_set_is_registered_offline_in_data_dir(demo_dir):
    data = open_data("demo", demo_dir, size=8)
    assert (data.info.num_train, data.info.num_eval, data.info.num_classes, data.info.channels) == (1497, 300, 10, 1)
    assert (pathlib.Path(demo_dir) / "sklearn_digits" / "1.0.0" / "dataset_info.json").exists()
    # Re-opening reuses the prepared files.
    again = tfds.builder_from_directory(os.path.join(demo_dir, "sklearn_digits", "1.0.0"))
    assert again.info.splits["train"].num_examples == 1497
    from sklearn.datasets import load_digits

    digits = load_digits()
    train = [r for r in again.as_dataset(split="train").as_numpy_iterator()]
    record = next(r for r in train if r["file_name"] == b"digits/0007")
    assert int(record["label"]) == digits.target[7]
    np.testing.assert_array_equal(record["image"][..., 0], np.round(digits.images[7] * 255 / 16).astype(np.uint8))


def stream(data, start, count):
    return [b for b in itertools.islice(data.train_batches(start), count)]


def test_micro_batches_are_the_batches_in_pieces(demo_dir):
    """Fed from the host, batch k arrives as 4 micro-batches: its rows in order, at the start of a
    run and when resuming mid-stream (batch 2 straddles the first epoch's end)."""
    data = open_data("demo", demo_dir, batch=512, size=8)
    for start in (0, 2):
        whole = stream(data, start, 2)
        pieces = list(itertools.islice(data.train_batches(start, micro_steps=4), 8))
        assert [p["image"].shape[0] for p in pieces] == [128] * 8
        for k, batch in enumerate(whole):
            for key in ("image", "label"):
                np.testing.assert_array_equal(np.concatenate([p[key] for p in pieces[4 * k : 4 * k + 4]]), batch[key])
    with pytest.raises(ValueError, match="512 rows per batch do not split into 3 micro-batches"):
        data.micro_batch_rows(3)


def test_same_seed_same_batches_and_resume_mid_stream(demo_dir):
    # Batch 512 over 1,497 examples: batches 2 and 5 straddle epoch boundaries.
    data = open_data("demo", demo_dir, batch=512, size=8)
    first = stream(data, 0, 6)
    again = stream(open_data("demo", demo_dir, batch=512, size=8), 0, 6)
    resumed = stream(data, 3, 3)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    for a, b in zip(first[3:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = stream(open_data("demo", demo_dir, batch=512, size=8, seed=1), 0, 1)[0]
    assert not np.array_equal(other["image"], first[0]["image"])
    # Each epoch is a permutation: every label count of one epoch is the split's.
    labels = np.concatenate([b["label"] for b in first])[:1497]
    assert np.bincount(labels, minlength=10).sum() == 1497
    assert first[0]["image"].shape == (512, 8, 8, 1) and first[0]["image"].dtype == np.float32


def test_different_processes_read_disjoint_examples(demo_dir):
    def digests(data, steps):
        return {hashlib.sha1(image.tobytes()).hexdigest() for b in stream(data, 0, steps) for image in b["image"]}

    # augment="none": an image's pixels identify the example.
    shares = [open_data("demo", demo_dir, batch=1, size=8, augment="none", p=p, n=2) for p in range(2)]
    seen = [digests(d, d.train_count) for d in shares]
    assert [d.train_count for d in shares] == [749, 748]
    everything = open_data("demo", demo_dir, batch=1, size=8, augment="none")
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == digests(everything, 1497)


def test_corrupt_image_is_named(tmp_path, cifar10_dir):
    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                os.symlink(cifar10_dir / split / c / f"000{i}.jpg", tmp_path / split / c / f"{i}.jpg")
    (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data = open_data("image_folder", str(tmp_path), batch=7, augment="pad_crop_flip")
    with pytest.raises(ip.DataError, match=r"cannot decode image '.*train/dog/broken.jpg'.*tools.check_images DIR"):
        next(data.train_batches(0))


def test_unknown_dataset_and_missing_imagenet(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown dataset 'imagenet'; choose from \('imagenet2012', 'cifar10'"):
        sources.get_builder("imagenet", str(tmp_path))
    with pytest.raises(ValueError) as error:
        sources.get_builder("imagenet2012", str(tmp_path))
    message = str(error.value)
    assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
    assert f"tfds build imagenet2012 --data_dir={tmp_path} --manual_dir={tmp_path}/downloads/manual" in message
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_real_imagenet2012_builder_on_a_small_archive(cifar10_dir, tmp_path):
    manual, data_dir = tmp_path / "manual", tmp_path / "data"
    counts = make_imagenet_archive.make_archives(str(cifar10_dir), str(manual), train_per_class=12)
    assert counts == {"train": 120, "validation": 10, "classes": 10}
    builder = tfds.builder("imagenet2012", data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    assert builder.info.splits["train"].num_examples == 120
    assert builder.info.splits["validation"].num_examples == 10

    synsets = make_imagenet_archive.default_synset_map(CLASSES)
    label = builder.info.features["label"]
    # Training labels: the synset in each file name is the label TFDS gave it.
    for record in builder.as_dataset(split="train").as_numpy_iterator():
        assert label.int2str(int(record["label"])) == record["file_name"].decode().split("_")[0]
    # Validation labels: TFDS's shipped labels, position by position.
    official = make_imagenet_archive.official_validation_synsets()
    by_name = {r["file_name"].decode(): r for r in builder.as_dataset(split="validation").as_numpy_iterator()}
    assert sorted(by_name) == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 11)]
    for i in range(1, 11):
        assert label.int2str(int(by_name[f"ILSVRC2012_val_{i:08d}.JPEG"]["label"])) == official[i - 1]

    data = open_data("imagenet2012", str(data_dir), batch=8, eval_batch=4, size=224, augment="imagenet")
    train = next(data.train_batches(0))
    assert train["image"].shape == (8, 224, 224, 3) and train["image"].dtype == np.float32
    assert set(train["label"]) <= {label.str2int(s) for s in synsets.values()}
    assert abs(train["image"].mean()) < 1.5 and 0.2 < train["image"].std() < 2.0
    evals = list(data.eval_batches())
    assert len(evals) == 3 and sum(b["mask"].sum() for b in evals) == 10
    eval_labels = sorted(int(x) for b in evals for x, m in zip(b["label"], b["mask"]) if m)
    assert eval_labels == sorted(label.str2int(s) for s in official[:10])
    # The eval image of class "ship" is the center crop of test/ship/0000.jpg.
    ship = label.str2int(synsets["ship"])
    image = next(x for b in evals for x, y, m in zip(b["image"], b["label"], b["mask"]) if m and y == ship)
    source = np.asarray(Image.open(cifar10_dir / "test" / "ship" / "0000.jpg").convert("RGB"), np.float32)
    side = int(32 * 224 / 256)
    offset = (32 - side + 1) // 2
    crop = source[offset : offset + side, offset : offset + side]
    reference = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize((224, 224), Image.BICUBIC), np.float32)
    reference = (reference - np.array(sources.IMAGENET_MEAN)) / np.array(sources.IMAGENET_STD)
    assert np.corrcoef(image.ravel(), reference.ravel())[0, 1] > 0.97


def test_cifar_configs_normalise_with_cifar_statistics(cifar10_dir, tmp_path):
    # The statistics of the 50,000 training JPEGs, computed here with PIL in float64.
    total, total_sq, pixels = np.zeros(3), np.zeros(3), 0
    for path in sorted((cifar10_dir / "train").glob("*/*.jpg")):
        image = np.asarray(Image.open(path).convert("RGB"), np.float64)
        total, total_sq, pixels = total + image.sum((0, 1)), total_sq + (image**2).sum((0, 1)), pixels + 1024
    mean = total / pixels
    std = np.sqrt(total_sq / pixels - mean**2)
    # The constants are those of the original binaries; JPEG re-encoding moves the
    # mean by < 1e-4 and smooths the std by ~2e-3 (of the 0-1 range). ImageNet's differ by 0.03-0.05.
    np.testing.assert_allclose(np.array(sources.CIFAR_MEAN) / 255, mean / 255, atol=1e-3)
    np.testing.assert_allclose(np.array(sources.CIFAR_STD) / 255, std / 255, atol=4e-3)
    for module in (cifar10_lars, cifar10_sgd):
        config = module.get_config()
        assert sources.normalization(config.normalization, config.dataset) == (sources.CIFAR_MEAN, sources.CIFAR_STD)
    # The pipeline applies them: a one-image folder's eval image is (pixels - mean) / std.
    source = cifar10_dir / "test" / "cat" / "0007.jpg"
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "0007.jpg").write_bytes(source.read_bytes())
    data = ip.create("image_folder", str(tmp_path), global_batch=1, global_eval_batch=1, image_size=32,
                     augment="pad_crop_flip", seed=0, normalize=config.normalization)  # fmt: skip
    got = next(data.eval_batches())["image"][0]
    pixels = np.asarray(Image.open(source).convert("RGB"), np.float64)
    # TensorFlow's fast integer IDCT and PIL's accurate one differ by up to 4 levels per
    # pixel (0.84 on average here); ImageNet's statistics would put the blue channel off by
    # 6-35 levels (about 10 on average), red and green by up to 12.
    undone = got * np.array(sources.CIFAR_STD) + np.array(sources.CIFAR_MEAN)
    assert np.max(np.abs(undone - pixels)) <= 4 + 1e-3 and np.all(np.abs(np.mean(undone - pixels, (0, 1))) < 2)


def test_stratified_sample_takes_each_class_in_proportion():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    # 7 x (0.5, 0.3, 0.2) = 3.5, 2.1, 1.4: floors 3, 2, 1 and the one left to the largest remainder.
    for count, quotas in ((10, [5, 3, 2]), (7, [4, 2, 1])):
        chosen = sources.stratified_sample(labels, count, seed=0)
        assert list(np.bincount(labels[chosen], minlength=3)) == quotas and len(set(chosen)) == count
    assert list(sources.stratified_sample(labels, 7, seed=0)) == list(sources.stratified_sample(labels, 7, seed=0))
    assert list(sources.stratified_sample(labels, 7, seed=0)) != list(sources.stratified_sample(labels, 7, seed=1))


def test_cached_evaluations_read_the_images_once(cifar10_dir, tmp_path):
    """cache=True: the second pass over an evaluation split gives the first pass's batches bit for bit
    without the image files (removed after the first pass); without the cache it needs them."""
    root = tmp_path / "folder"
    for split, per_class in (("train", 4), ("test", 30)):
        for c in CLASSES[:3]:
            (root / split / c).mkdir(parents=True)
            for src in sorted((cifar10_dir / split / c).glob("*.jpg"))[:per_class]:
                os.symlink(src, root / split / c / src.name)

    def create(cache):
        return ip.create("image_folder", str(root), global_batch=4, global_eval_batch=16, image_size=32,
                         augment="pad_crop_flip", seed=0, cache=cache)  # fmt: skip

    cached, uncached = create(True), create(False)
    first = list(cached.eval_batches())
    assert sum(b["mask"].sum() for b in first) == 90
    for link in (root / "test").glob("*/*.jpg"):
        link.unlink()
    again = list(cached.eval_batches())
    assert len(again) == len(first)
    for a, b in zip(first, again):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(a[key], b[key])
    with pytest.raises(Exception, match="No such file or directory"):
        list(uncached.eval_batches())
