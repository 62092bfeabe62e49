"""Test set-up shared by every test module.

Four simulated CPU devices, so that sharding is exercised in-process. XLA reads
the flag when its CPU client starts, so it is set before jax is imported.
"""

import os
import pathlib
import sys
import tarfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _shared_data_dir() -> pathlib.Path:
    path = os.environ.get("LARGEBATCH_SHARED_DATA")
    if not path:
        raise RuntimeError(
            "Set LARGEBATCH_SHARED_DATA to the folder holding cifar10_jpeg.tar.gz (.ci/run sets it to ../shared/data)."
        )
    return pathlib.Path(path)


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> pathlib.Path:
    """The shared CIFAR-10 JPEGs, extracted once per session: <dir>/{train,test}/<class>/*.jpg."""
    archive = _shared_data_dir() / "cifar10_jpeg.tar.gz"
    out = tmp_path_factory.mktemp("cifar10")
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    return out / "cifar10_jpeg"


@pytest.fixture(scope="session")
def cifar10_small(cifar10_dir, tmp_path_factory) -> pathlib.Path:
    """2,000 training and 1,000 test images of the shared set (links), for tests of mechanics."""
    root = tmp_path_factory.mktemp("cifar10_small")
    for split, per_class in (("train", 200), ("test", 100)):
        for folder in sorted((cifar10_dir / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:per_class]:
                os.symlink(image, root / split / folder.name / image.name)
    return root
