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

from workdir_lock import WorkdirBusy, WorkdirLock, held_in_turn

ARCHIVE = "cifar10_jpeg.tar.gz"
# Where the study and the benchmarks keep their one extracted copy (tests use their own temporary one).
CACHE = pathlib.Path.home() / ".cache" / "largebatch"
# Prefix of the temporary folders extract() unpacks into, inside the cache.
_EXTRACTING = ".extracting-"
# File in the cache whose lock is held while a temporary folder is made and locked, or while the
# abandoned ones are looked for: a folder is never seen by the search before it is locked.
_FOLDERS_LOCK = ".extracting.lock"


def shared_archive() -> pathlib.Path:
    path = os.environ.get("LARGEBATCH_SHARED_DATA")
    if not path:
        raise RuntimeError(f"Set LARGEBATCH_SHARED_DATA to the folder holding {ARCHIVE} (.ci/run uses ../shared/data).")
    return pathlib.Path(path) / ARCHIVE


def extract(dest=CACHE) -> pathlib.Path:
    """Extracts the archive into dest once; returns the image folder (with train/ and test/).

    The archive is unpacked into a temporary folder inside dest and renamed into place, so
    dest/cifar10_jpeg exists only whole: an extraction killed midway leaves no half copy that
    later runs would take for the data set (the next call removes its temporary folder),
    and of two processes extracting at once one wins.
    """
    dest = pathlib.Path(dest)
    root = dest / "cifar10_jpeg"
    dest.mkdir(parents=True, exist_ok=True)
    remove_abandoned_extractions(dest)
    if (root / "test").is_dir():
        return root
    if root.exists():  # a half copy unpacked in place, without test/
        shutil.rmtree(root)
    with held_in_turn(dest / _FOLDERS_LOCK):  # held for a moment: extractions unpack side by side
        unpacked = tempfile.mkdtemp(dir=dest, prefix=_EXTRACTING)
        lock = WorkdirLock(unpacked)  # held while unpacking; the kernel drops it if this process dies
        lock.acquire()
    try:
        # GNU tar: 20 s here against 70 s for tarfile.extractall, which sets owner, mode and
        # times file by file (60,000 of them). It refuses members outside dest, as filter="data" does.
        subprocess.run(["tar", "-xzf", str(shared_archive()), "-C", unpacked, "--no-same-owner"], check=True)
        os.rename(pathlib.Path(unpacked) / root.name, root)
    except OSError:  # another process renamed its whole copy into place first
        if not (root / "test").is_dir():
            raise
    finally:
        shutil.rmtree(unpacked, ignore_errors=True)
        lock.release()
    return root


def remove_abandoned_extractions(dest) -> None:
    """Removes the temporary folders in dest of extractions whose process has died.

    A process killed outright (SIGKILL, a node's out-of-memory killer) cannot remove its own
    folder. Each extraction holds a WorkdirLock (flock) on its folder, which the kernel releases
    when the process dies in any way; a folder whose lock can be taken is abandoned, and one
    still locked, by a process here or on another host sharing dest, is left alone.
    """
    with held_in_turn(dest / _FOLDERS_LOCK):
        for folder in pathlib.Path(dest).glob(f"{_EXTRACTING}*"):
            lock = WorkdirLock(str(folder))
            try:
                lock.acquire()
            except WorkdirBusy:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            lock.release()


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
