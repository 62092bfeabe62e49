"""Helpers for the tests that run several training processes (localhost or network-namespace hosts)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

import run_files
import run_setup
from configs import cifar10_lars

REPO = pathlib.Path(__file__).resolve().parents[1]


def overrides(data_dir, **extra):
    values = dict(
        data_dir=data_dir, model="cifar_resnet8", batch_size=32, num_train_steps=6, data_shards=4,
        eval_batch_size=100, log_every_steps=1, eval_every_steps=6, checkpoint_every_steps=3,
        # A moderate LR: different reduction orders round differently, and a
        # large LR amplifies that beyond 1e-5 within a few steps.
        learning_rate=0.1, warmup_steps=2,
    )  # fmt: skip
    values.update(extra)
    return values


def main_args(values, workdir):
    return ["--config=configs/cifar10_lars.py", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in values.items()
    ]


def env():
    environ = dict(os.environ)
    environ.pop("XLA_FLAGS", None)
    return environ


def run(command, timeout=600):
    done = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def run_launcher(num_processes, devices, values, workdir):
    return run(
        [sys.executable, "-m", "tools.launch", f"--num_processes={num_processes}",
         f"--devices_per_process={devices}", "--", *main_args(values, workdir)]
    )  # fmt: skip


def records(workdir, kind):
    lines = (pathlib.Path(workdir) / run_files.METRICS_FILE).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def final_params(values, workdir):
    return [
        np.asarray(x)
        for x in jax.tree.leaves(jax.device_get(run_files.restore_state(_config(values), workdir)[1].params))
    ]


def _config(values):
    config = cifar10_lars.get_config("64")
    config.update({k: str(v) if isinstance(v, pathlib.Path) else v for k, v in values.items()})
    return config


def assert_same_training(values, got_dir, want_dir):
    """Another process/device layout adds the same numbers in another order (the all-reduce,
    oneDNN's per-thread partial sums). The first loss is one forward pass: float32 rounding.
    After that, rounding is amplified by the steps; losses are held to 1e-2 of how far the
    loss moves in a step and parameters to 1e-2 of how far each tensor moved (a layout bug,
    such as a batch shard counted twice or statistics over the wrong examples, moves them by
    O(1) of that)."""
    got, want = (np.array([r["loss"] for r in records(d, "train")]) for d in (got_dir, want_dir))
    assert len(got) == len(want)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * np.max(np.abs(np.diff(want))))
    initial = jax.tree.leaves(run_setup.init_state(run_setup.prepare(_config(values))).params)
    for a, b, start in zip(final_params(values, got_dir), final_params(values, want_dir), initial):
        moved = np.max(np.abs(b - np.asarray(start)))
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * moved + 1e-7)


def single_process_reference(data_dir, workdir):
    """One process with 4 devices: the run every multi-process layout must reproduce."""
    values = overrides(data_dir)
    code, output = run([sys.executable, "main.py", *main_args(values, workdir), "--num_cpu_devices=4"])
    assert code == 0, output[-3000:]
    return values, workdir
