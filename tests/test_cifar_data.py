"""tools/cifar_data.extract on small archives built here: it leaves the image folder whole or not at all."""

import io
import random
import subprocess
import tarfile

import pytest

from tools import cifar_data

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


def test_extract_unpacks_every_image(tmp_path, monkeypatch):
    write_archive(tmp_path)
    monkeypatch.setenv("LARGEBATCH_SHARED_DATA", str(tmp_path))
    root = cifar_data.extract(tmp_path / "cache")
    assert files_under(root) == IMAGES
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == ["cifar10_jpeg"]


def test_a_broken_archive_leaves_no_image_folder(tmp_path, monkeypatch):
    archive = write_archive(tmp_path)
    # Cut the archive inside the train/ members (written after test/): tar fails after
    # unpacking test/, which on its own would make the cache look complete.
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size * 3 // 4])
    monkeypatch.setenv("LARGEBATCH_SHARED_DATA", str(tmp_path))
    with pytest.raises(subprocess.CalledProcessError):
        cifar_data.extract(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []

    write_archive(tmp_path)
    assert files_under(cifar_data.extract(tmp_path / "cache")) == IMAGES


def test_a_half_copy_unpacked_in_place_is_replaced(tmp_path, monkeypatch):
    half = tmp_path / "cache" / "cifar10_jpeg" / "train" / "cat"
    half.mkdir(parents=True)
    (half / "0.jpg").write_bytes(b"cut")
    write_archive(tmp_path)
    monkeypatch.setenv("LARGEBATCH_SHARED_DATA", str(tmp_path))
    assert files_under(cifar_data.extract(tmp_path / "cache")) == IMAGES
