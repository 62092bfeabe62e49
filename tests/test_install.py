"""`pip install .` (and `pip install -e .`) into a fresh virtualenv outside the repository compiles
the oneDNN extension into that environment (pyproject.toml, CMakeLists.txt), and a oneDNN
convolution and a training step run there from a folder that holds nothing of the project."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# Runs in the new environment, from a folder that holds nothing of the project.
CHECK = r"""
import json

import jax
import jax.numpy as jnp
import numpy as np

import compile_step
import run_setup
from configs import demo
from models import onednn

rng = np.random.default_rng(0)
x, kernel = rng.standard_normal((2, 7, 7, 3)), rng.standard_normal((3, 3, 3, 4))
weights = rng.standard_normal((2, 7, 7, 4))


def conv64(x, kernel):
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.stack([padded[:, i : i + 7, j : j + 7] for i in range(3) for j in range(3)], axis=3)
    return np.einsum("nhwpc,pco->nhwo", patches, kernel.reshape(9, 3, 4)), patches


def loss(kernel):
    return jnp.sum(onednn.conv2d(jnp.asarray(x, jnp.float32), kernel, (1, 1), (1, 1, 1, 1)) * weights)


y, grad = jax.value_and_grad(loss)(jnp.asarray(kernel, jnp.float32))
want, patches = conv64(x, kernel)
grad64 = np.einsum("nhwpc,nhwo->pco", patches, weights).reshape(3, 3, 3, 4)
# Rounding bounds: a float32 sum of n products errs by at most n * 2^-24 of the sum of their magnitudes.
bound_y = 27 * 2**-24 * np.sum(np.abs(conv64(np.abs(x), np.abs(kernel))[0] * weights)) + 1e-5
bound_g = 98 * 2**-24 * np.einsum("nhwpc,nhwo->pco", np.abs(patches), np.abs(weights)).reshape(3, 3, 3, 4)

config = demo.get_config()
config.batch_size = 8
setup = run_setup.prepare_model(config, 10, num_train=64, channels=1)
state, step = run_setup.init_state(setup), compile_step.jit_train_step(setup)
batch = {"image": rng.standard_normal((8, 8, 8, 1)).astype(np.float32), "label": np.arange(8, dtype=np.int32)}
state, metrics = step(state, batch, jax.random.key(0))
print(json.dumps({
    "module": onednn.__file__,
    "library": str(onednn.installed_file("largebatch", onednn.LIBRARY)),
    "isa": onednn.isa(),
    "y_error": abs(float(y) - float(np.sum(want * weights))), "y_bound": float(bound_y),
    "grad_excess": float(np.max(np.abs(np.asarray(grad, np.float64) - grad64) - bound_g)),
    "loss": float(metrics["loss"]), "ok": bool(metrics["ok"]), "step": int(state.step),
}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_pip_install_into_a_fresh_virtualenv_runs_a_onednn_step(tmp_path, editable):
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    python = str(env / "bin" / "python")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    command = [python, "-m", "pip", "install", "-q", *(["-e"] if editable else []), str(REPO)]
    installed = subprocess.run(command, env=clean, capture_output=True, text=True, timeout=1800)
    assert installed.returncode == 0, installed.stderr[-3000:]

    (tmp_path / "elsewhere").mkdir()
    done = subprocess.run(
        [python, "-c", CHECK], cwd=tmp_path / "elsewhere", env=clean, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    site_packages = env / "lib" / "python3.11" / "site-packages"
    # The modules: copies in the environment, or the repository's own files (editable); the
    # compiled library is in the environment either way.
    assert pathlib.Path(result["module"]).is_relative_to(REPO if editable else site_packages), result
    assert pathlib.Path(result["library"]).is_relative_to(site_packages / "models"), result
    assert result["y_error"] <= result["y_bound"] and result["grad_excess"] <= 0, result
    assert result["ok"] and result["step"] == 1 and 0 < result["loss"] < 10, result
