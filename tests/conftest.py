"""Test set-up shared by every test module.

Four simulated CPU devices, so that sharding is exercised in-process. XLA reads
the flag when its CPU client starts, so it is set before jax is imported, as is
JAX's switch for quick compilation.
"""

import os
import pathlib
import subprocess
import sys

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# XLA's optimisation passes keep a program's meaning and only speed it up; the suite compiles
# hundreds of small programs it runs a few times each, so it skips most of them (here and in
# every subprocess, which inherits the variable): a 4-step ResNet-8 main.py run took 48 s and
# 27 s without them, tests/test_layers.py with tests/test_models.py 324 s and 231 s. Runs that
# must agree (resume, device counts, processes) are compiled the same way on both sides. The
# tests marked `optimized` run again with JAX_DISABLE_MOST_OPTIMIZATIONS=0 (make test's second
# pass), so that XLA's fusion and layout passes around the oneDNN custom calls are tested too.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from tools import cifar_data  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One JAX compilation cache shared by the session's subprocesses (main.py runs, launchers,
    hosts): they compile the same initialisers and steps again and again (a ResNet-8 `init` alone
    takes ~20 s on 2 cores; a 4-step main.py run took 70 s cold and 32 s from the cache). This
    process has read its JAX configuration already and compiles as before."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
        yield


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory) -> pathlib.Path:
    """The shared CIFAR-10 JPEGs, extracted once per session: <dir>/{train,test}/<class>/*.jpg."""
    return cifar_data.extract(tmp_path_factory.mktemp("cifar10"))


@pytest.fixture(scope="session")
def cifar10_small(cifar10_dir, tmp_path_factory) -> pathlib.Path:
    """2,000 training and 1,000 test images of the shared set (links), for tests of mechanics."""
    return cifar_data.subset(cifar10_dir, tmp_path_factory.mktemp("cifar10_small"), {"train": 200, "test": 100})


@pytest.fixture(scope="session")
def single_process_run(cifar10_small, tmp_path_factory):
    """(config overrides, workdir) of the 1-process, 4-device run that multi-process layouts must reproduce."""
    from multiprocess import single_process_reference

    return single_process_reference(cifar10_small, tmp_path_factory.mktemp("p1x4") / "run")


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """(workdir, exit code, output) of the README's `make demo` command on a clean clone, fresh TFDS dir."""
    readme = (REPO / "README.md").read_text()
    assert readme.index("make demo") < readme.index("make test") < 2000
    makefile = (REPO / "Makefile").read_text().split("\ndemo:")[1]
    command = next(line for line in makefile.splitlines() if "main.py" in line)
    demo_args = command.split("main.py", 1)[1].split()
    assert demo_args[0] == "--config=configs/demo.py" and demo_args[1].startswith("--workdir=")
    root = tmp_path_factory.mktemp("demo")
    subprocess.run(["git", "clone", "-q", str(REPO), str(root / "clone")], check=True)
    # The README's command first makes .venv and installs the project into it (compiling the oneDNN
    # extension): that virtualenv, made by the same Makefile rule, is shared rather than remade.
    (root / "clone" / ".venv").symlink_to(REPO / ".venv")
    env = dict(os.environ, TFDS_DATA_DIR=str(root / "tfds"))
    env.pop("XLA_FLAGS", None)
    workdir = root / "workdir"
    done = subprocess.run([sys.executable, "main.py", demo_args[0], f"--workdir={workdir}"], cwd=root / "clone",
                          env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
    return workdir, done.returncode, done.stdout + done.stderr
