"""tools/cifar_data.extract on small archives built here: it leaves the image folder whole or not at all."""

import io
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from tools import cifar_data
from workdir_lock import WorkdirLock

# The archive's layout: cifar10_jpeg/<split>/<class>/<name>.jpg; 3 classes x 2 images per split,
# random bytes (which gzip cannot shrink, so a cut at a fraction of the archive lands in the same
# fraction of its members).
_random = random.Random(0)
IMAGES = {
    f"cifar10_jpeg/{split}/{label}/{index}.jpg": _random.randbytes(4096)
    for split in ("test", "train")
    for label in ("cat", "dog", "ship")
    for index in range(2)
}


def write_archive(folder, members=IMAGES):
    """Writes members (path -> bytes) as cifar10_jpeg.tar.gz in folder, test/ first as in the shared one."""
    path = folder / cifar_data.ARCHIVE
    with tarfile.open(path, "w:gz") as archive:
        for name in sorted(members, key=lambda name: "/train/" in name):
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            archive.addfile(info, io.BytesIO(members[name]))
    return path


def files_under(folder) -> dict[str, bytes]:
    return {str(path.relative_to(folder.parent)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def entries(cache) -> list[str]:
    """The names in cache, less the lock file that extract() keeps there."""
    return sorted(path.name for path in cache.iterdir() if path.name != ".extracting.lock")


def test_extract_unpacks_every_image(tmp_path, monkeypatch):
    write_archive(tmp_path)
    monkeypatch.setenv("LARGEBATCH_SHARED_DATA", str(tmp_path))
    root = cifar_data.extract(tmp_path / "cache")
    assert files_under(root) == IMAGES
    assert entries(tmp_path / "cache") == ["cifar10_jpeg"]


def test_a_broken_archive_leaves_no_image_folder(tmp_path, monkeypatch):
    archive = write_archive(tmp_path)
    # Cut the archive inside the train/ members (written after test/): tar fails after
    # unpacking test/, which on its own would make the cache look complete.
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size * 3 // 4])
    monkeypatch.setenv("LARGEBATCH_SHARED_DATA", str(tmp_path))
    with pytest.raises(subprocess.CalledProcessError):
        cifar_data.extract(tmp_path / "cache")
    assert entries(tmp_path / "cache") == []

    write_archive(tmp_path)
    assert files_under(cifar_data.extract(tmp_path / "cache")) == IMAGES


def test_a_half_copy_unpacked_in_place_is_replaced(tmp_path, monkeypatch):
    half = tmp_path / "cache" / "cifar10_jpeg" / "train" / "cat"
    half.mkdir(parents=True)
    (half / "0.jpg").write_bytes(b"cut")
    write_archive(tmp_path)
    monkeypatch.setenv("LARGEBATCH_SHARED_DATA", str(tmp_path))
    assert files_under(cifar_data.extract(tmp_path / "cache")) == IMAGES


def test_an_extraction_killed_outright_is_cleared_by_the_next(tmp_path, monkeypatch):
    # 64 KiB images: gzip reads its input 32 KiB at a time, so half of this archive (~400 KiB)
    # reaches tar as whole images.
    images = {name: _random.randbytes(65536) for name in IMAGES}
    archive = write_archive(tmp_path, images).read_bytes()
    # The shared folder holds a FIFO in place of the archive, so the test decides how much of it
    # tar has read when the extracting process and its tar are killed with SIGKILL.
    shared = tmp_path / "shared"
    shared.mkdir()
    os.mkfifo(shared / cifar_data.ARCHIVE)
    cache = tmp_path / "cache"
    process = subprocess.Popen(
        [sys.executable, "-c", f"from tools import cifar_data; cifar_data.extract({str(cache)!r})"],
        cwd=pathlib.Path(__file__).parents[1],
        env={**os.environ, "LARGEBATCH_SHARED_DATA": str(shared)},
        start_new_session=True,
    )
    with open(shared / cifar_data.ARCHIVE, "wb") as pipe:
        pipe.write(archive[: len(archive) // 2])
        pipe.flush()
        deadline = time.monotonic() + 60
        while not any(path.is_file() for path in cache.glob(".extracting-*/**/*")):
            assert time.monotonic() < deadline, "tar unpacked nothing from half the archive in 60 s"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL
    [abandoned] = cache.glob(".extracting-*")
    assert json.loads((abandoned / "run.lock").read_text())["pid"] == process.pid

    (shared / cifar_data.ARCHIVE).unlink()
    write_archive(shared, images)
    monkeypatch.setenv("LARGEBATCH_SHARED_DATA", str(shared))
    assert files_under(cifar_data.extract(cache)) == images
    assert entries(cache) == ["cifar10_jpeg"]


def test_extractions_still_running_are_left_alone(tmp_path, monkeypatch):
    running = tmp_path / "cache" / ".extracting-running"
    lock = WorkdirLock(str(running))  # held by this process, as a live extraction holds its own
    lock.acquire()
    write_archive(tmp_path)
    monkeypatch.setenv("LARGEBATCH_SHARED_DATA", str(tmp_path))
    cifar_data.extract(tmp_path / "cache")
    assert entries(tmp_path / "cache") == [".extracting-running", "cifar10_jpeg"]
    lock.release()


def test_a_search_for_abandoned_folders_leaves_a_new_extraction_alone(tmp_path, monkeypatch):
    # Another process's search for abandoned folders starts the moment this extraction has made
    # its temporary folder (os.mkdir, as tempfile.mkdtemp calls it). It must not take that folder
    # for abandoned: it has to wait until the folder is locked, and then leave it alone.
    # The search runs in a thread: flock locks belong to open files, so it contends as another
    # process would.
    write_archive(tmp_path)
    monkeypatch.setenv("LARGEBATCH_SHARED_DATA", str(tmp_path))
    cache = tmp_path / "cache"
    made_folders, searches = [], []
    mkdir = os.mkdir

    def mkdir_then_search(path, *args, **kwargs):
        mkdir(path, *args, **kwargs)
        if pathlib.Path(path).name.startswith(".extracting-") and not searches:
            made_folders.append(pathlib.Path(path))
            searches.append(threading.Thread(target=cifar_data.remove_abandoned_extractions, args=(cache,)))
            searches[0].start()
            searches[0].join(timeout=2)  # long enough for a search that does not wait to end
            assert pathlib.Path(path).is_dir(), "the search removed the folder of a running extraction"

    monkeypatch.setattr(os, "mkdir", mkdir_then_search)
    root = cifar_data.extract(cache)
    searches[0].join(timeout=60)
    assert not searches[0].is_alive()
    assert files_under(root) == IMAGES
    assert not made_folders[0].exists()
    assert entries(cache) == ["cifar10_jpeg"]
