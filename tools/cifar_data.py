"""The shared CIFAR-10 JPEGs as image folders: extraction and per-class subsets.

The archive (cifar10_jpeg.tar.gz: train/<class>/*.jpg, test/<class>/*.jpg) lies
in the folder named by $LARGEBATCH_SHARED_DATA; it is read-only there, so it is
extracted elsewhere (about 20 s).
"""

import os
import pathlib
import shutil
import socket
import subprocess
import tempfile

ARCHIVE = "cifar10_jpeg.tar.gz"
# Where the study and the benchmarks keep their one extracted copy (tests use their own temporary one).
CACHE = pathlib.Path.home() / ".cache" / "largebatch"
# Prefix of the temporary folders extract() unpacks into, inside the cache: .extracting-<host>-<pid>-<random>.
_EXTRACTING = ".extracting-"


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
    remove_abandoned_extractions(dest)
    if (root / "test").is_dir():
        return root
    dest.mkdir(parents=True, exist_ok=True)
    if root.exists():  # a half copy unpacked in place, without test/
        shutil.rmtree(root)
    prefix = f"{_EXTRACTING}{socket.gethostname()}-{os.getpid()}-"
    with tempfile.TemporaryDirectory(dir=dest, prefix=prefix) as unpacked:
        # GNU tar: 20 s here against 70 s for tarfile.extractall, which sets owner, mode and
        # times file by file (60,000 of them). It refuses members outside dest, as filter="data" does.
        subprocess.run(["tar", "-xzf", str(shared_archive()), "-C", unpacked, "--no-same-owner"], check=True)
        try:
            os.rename(pathlib.Path(unpacked) / root.name, root)
        except OSError:  # another process renamed its whole copy into place first
            if not (root / "test").is_dir():
                raise
    return root


def remove_abandoned_extractions(dest) -> None:
    """Removes the temporary folders in dest of extractions whose process has died.

    A process killed outright (SIGKILL, a node's out-of-memory killer) cannot remove its own
    folder. Each is named after its host and process id; only folders of this host whose
    process is gone are removed, so an extraction still running here or on another host
    sharing dest is left alone.
    """
    host = socket.gethostname()
    for folder in pathlib.Path(dest).glob(f"{_EXTRACTING}*"):
        owner, _, pid = folder.name[len(_EXTRACTING) :].rpartition("-")[0].rpartition("-")
        if owner == host and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


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
