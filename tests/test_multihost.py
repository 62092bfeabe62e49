"""Several processes on localhost through the JAX distributed runtime (gloo collectives)."""

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
from multiprocess import REPO, assert_same_training, env, main_args, overrides, records, run, run_launcher

import run_files
from tools import launch

pytestmark = pytest.mark.slow  # minutes of subprocesses; `pytest -m "not slow"` skips them


# tools.launch's layout here: 2 processes x 2 devices, as mpirun below and the separate hosts of
# tests/test_multihost_network.py. (4 processes x 1 device, run until 2026-11-28, trained identically
# too; four JAX processes on CI's 2 cores cost ~60 s more, and 3 processes train in the network tests.)
@pytest.mark.parametrize("num_processes,devices", [(2, 2)])
def test_process_topologies_train_identically(single_process_run, tmp_path, num_processes, devices):
    values, reference = single_process_run
    code, output = run_launcher(num_processes, devices, values, tmp_path / "run")
    assert code == 0, output[-3000:]
    assert f"process 0 of {num_processes}, {devices} local / 4 global devices" in output
    # Only process 0 logs: the progress line appears once per logged step.
    assert output.count("step 6/6") == 1
    assert [r["step"] for r in records(tmp_path / "run", "train")] == [1, 2, 3, 4, 5, 6]
    assert_same_training(values, tmp_path / "run", reference)
    # Top-1 over 1,000 images: an image whose two best logits are within rounding may flip.
    got_eval, want_eval = records(tmp_path / "run", "eval")[0], records(reference, "eval")[0]
    assert got_eval["eval_count"] == 1000 and abs(got_eval["eval_top1"] - want_eval["eval_top1"]) <= 2e-3


def test_mpirun_auto_detection_trains_identically(single_process_run, tmp_path):
    assert shutil.which("mpirun"), "needs Open MPI's mpirun: apt-get install openmpi-bin (make test does)"
    values, reference = single_process_run
    code, output = run(
        ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", sys.executable, "main.py",
         *main_args(values, tmp_path / "run"), "--num_cpu_devices=2"]
    )  # fmt: skip
    assert code == 0, output[-3000:]
    assert "process 0 of 2, 2 local / 4 global devices" in output
    assert_same_training(values, tmp_path / "run", reference)


def test_killed_process_ends_the_other_and_restart_resumes(cifar10_small, tmp_path):
    heartbeat = 10
    values = overrides(cifar10_small, num_train_steps=2000, checkpoint_every_steps=4, eval_every_steps=10_000)
    port = launch.free_port()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "main.py",
                *main_args(values, tmp_path / "run"),
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                "--num_cpu_devices=2",
                f"--heartbeat_timeout={heartbeat}",
            ],
            cwd=REPO,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    deadline = time.time() + 300
    while not (tmp_path / "run" / "checkpoints" / "8").is_dir():
        assert time.time() < deadline and all(p.poll() is None for p in processes)
        time.sleep(0.05)
    processes[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    output, _ = processes[0].communicate(timeout=120)
    elapsed = time.time() - killed_at
    processes[1].wait()
    assert processes[0].returncode == 1, output[-3000:]
    # Measured: 8-9 s with a 10 s heartbeat timeout: the runtime notices the
    # dead peer by its missing heartbeats (a failed all-reduce raises at once,
    # and naming the lost process waits for the same notice).
    assert elapsed < heartbeat + 5, elapsed
    # One `error:` line last, naming the lost process, whether the failure
    # surfaced in a collective or in cluster.watch_peers.
    last = output.strip().splitlines()[-1]
    assert re.match(r"error: process 0 of 2 stops: lost process\(es\) 1\b", last), output[-3000:]
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert 8 <= saved[-1] < 2000

    values["num_train_steps"] = saved[-1] + 4
    code, output = run_launcher(2, 2, values, tmp_path / "run")
    assert code == 0, output[-3000:]
    assert f"Resuming from the checkpoint of step {saved[-1]}." in output
    assert records(tmp_path / "run", "train")[-1]["step"] == saved[-1] + 4


def test_launcher_stops_everyone_when_one_process_fails(cifar10_small, tmp_path):
    values = overrides(cifar10_small, num_train_steps=2000, checkpoint_every_steps=10_000, eval_every_steps=10_000)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "tools.launch", "--num_processes=2", "--grace=5", "--",
         *main_args(values, tmp_path / "run")],
        cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (tmp_path / "run" / run_files.METRICS_FILE).exists():
        assert time.time() < deadline and launcher.poll() is None
        time.sleep(0.05)
    children = [int(pid) for pid in subprocess.check_output(["pgrep", "-P", str(launcher.pid)], text=True).split()]
    assert len(children) == 2
    os.kill(children[1], signal.SIGKILL)
    output, _ = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert "[launch] process 1 exited with code -9; stopping the others." in output
    for pid in children:
        assert not pathlib.Path(f"/proc/{pid}").exists() or "zombie" in pathlib.Path(f"/proc/{pid}/status").read_text()
