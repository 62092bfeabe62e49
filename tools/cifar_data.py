"""The shared CIFAR-10 JPEGs as image folders: extraction and per-class subsets.

The archive (cifar10_jpeg.tar.gz: train/<class>/*.jpg, test/<class>/*.jpg) lies
in the folder named by $LARGEBATCH_SHARED_DATA; it is read-only there, so it is
extracted elsewhere (about 20 s).
"""

import os
import pathlib
import shutil
import subprocess
import tempfile

ARCHIVE = "cifar10_jpeg.tar.gz"
# Where the study and the benchmarks keep their one extracted copy (tests use their own temporary one).
CACHE = pathlib.Path.home() / ".cache" / "largebatch"


def shared_archive() -> pathlib.Path:
    path = os.environ.get("LARGEBATCH_SHARED_DATA")
    if not path:
        raise RuntimeError(f"Set LARGEBATCH_SHARED_DATA to the folder holding {ARCHIVE} (.ci/run uses ../shared/data).")
    return pathlib.Path(path) / ARCHIVE


def extract(dest=CACHE) -> pathlib.Path:
    """Extracts the archive into dest once; returns the image folder (with train/ and test/).

    The archive is unpacked into a temporary folder inside dest and renamed into place, so
    dest/cifar10_jpeg exists only whole: an extraction killed midway leaves no half copy that
    later runs would take for the data set, and of two processes extracting at once one wins.
    """
    dest = pathlib.Path(dest)
    root = dest / "cifar10_jpeg"
    if (root / "test").is_dir():
        return root
    dest.mkdir(parents=True, exist_ok=True)
    if root.exists():  # a half copy unpacked in place, without test/
        shutil.rmtree(root)
    with tempfile.TemporaryDirectory(dir=dest, prefix=".extracting-") as unpacked:
        # GNU tar: 20 s here against 70 s for tarfile.extractall, which sets owner, mode and
        # times file by file (60,000 of them). It refuses members outside dest, as filter="data" does.
        subprocess.run(["tar", "-xzf", str(shared_archive()), "-C", unpacked, "--no-same-owner"], check=True)
        try:
            os.rename(pathlib.Path(unpacked) / root.name, root)
        except OSError:  # another process renamed its whole copy into place first
            if not (root / "test").is_dir():
                raise
    return root


def subset(source, dest, per_class: dict[str, int]) -> pathlib.Path:
    """Links the first n images of every class of each split (per_class: split -> n) into dest."""
    source, dest = pathlib.Path(source), pathlib.Path(dest)
    for split, count in per_class.items():
        for folder in sorted((source / split).iterdir()):
            (dest / split / folder.name).mkdir(parents=True, exist_ok=True)
            for image in sorted(folder.iterdir())[:count]:
                link = dest / split / folder.name / image.name
                if not link.exists():
                    os.symlink(image.resolve(), link)
    return dest
