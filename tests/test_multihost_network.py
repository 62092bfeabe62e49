"""Training across separate hosts: processes in network namespaces with their own addresses.

Each host (tools/netns.py) has its own network stack: its loopback is its
own, and its host name still resolves to 127.0.0.1 as on this machine, which
is what broke gloo before cluster.py chose the address.
"""

import pathlib
import re
import subprocess
import sys
import time

import pytest
from multiprocess import REPO, assert_same_training, env, main_args, overrides, records

from tools import netns

pytestmark = pytest.mark.slow  # minutes of subprocesses; `pytest -m "not slow"` skips them

PORT = 23456


@pytest.fixture
def hosts(request):
    reason = netns.available()
    assert reason is None, f"{reason} (make test runs as root and installs iproute2)"
    with netns.Hosts(request.param) as made:
        yield made


def start(hosts, values, workdir, devices=1, extra=(), host_extra=None, host_env=None):
    """main.py on every host, process i on host i (with host_extra[i] arguments
    and host_env[i] environment variables); returns the Popen objects."""
    coordinator = f"--coordinator_address={hosts[0].address}:{PORT}"
    processes = []
    for i, host in enumerate(hosts):
        argv = [sys.executable, "main.py", *main_args(values, workdir), coordinator,
                f"--num_processes={len(hosts)}", f"--process_id={i}", f"--num_cpu_devices={devices}",
                *extra, *(host_extra or {}).get(i, ())]  # fmt: skip
        environ = {**env(), **(host_env or {}).get(i, {})}
        processes.append(
            host.popen(argv, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    return processes


def finish(processes, timeout=600):
    """[(exit code, stdout + stderr, last stderr line)] of every process."""
    results = []
    for p in processes:
        out, err = p.communicate(timeout=timeout)
        lines = err.strip().splitlines()
        results.append((p.returncode, out + err, lines[-1] if lines else ""))
    return results


@pytest.mark.parametrize("hosts", [2], indirect=True)
def test_two_hosts_train_like_one_process_and_resume_across_hosts(hosts, single_process_run, tmp_path):
    values, reference = single_process_run
    workdir = tmp_path / "run"
    # Steps 1-3 on two hosts with the default address choice, then 4-6 after a
    # restart that names the interface (flag on host 0, $GLOO_SOCKET_IFNAME on host 1).
    first = finish(start(hosts, {**values, "num_train_steps": 3}, workdir, devices=2))
    for i, (code, output, _) in enumerate(first):
        assert code == 0, output[-3000:]
        assert (
            f"Collectives (gloo) on {hosts[i].address} (routes to the coordinator {hosts[0].address}:{PORT})" in output
        )
    assert "process 0 of 2, 2 local / 4 global devices" in first[0][1]
    restart = start(
        hosts, values, workdir, devices=2,
        host_extra={0: ["--collectives_interface=eth0"]}, host_env={1: {"GLOO_SOCKET_IFNAME": "eth0"}},
    )  # fmt: skip
    results = finish(restart)
    for code, output, _ in results:
        assert code == 0, output[-3000:]
    assert "Resuming from the checkpoint of step 3." in results[0][1]
    assert f"Collectives (gloo) on {hosts[0].address} (interface eth0 (--collectives_interface))" in results[0][1]
    assert f"Collectives (gloo) on {hosts[1].address} (interface eth0 ($GLOO_SOCKET_IFNAME))" in results[1][1]
    assert [r["step"] for r in records(workdir, "train")] == [1, 2, 3, 4, 5, 6]
    assert_same_training(values, workdir, reference)
    # Top-1 over 1,000 images: an image whose two best logits are within rounding may flip.
    assert abs(records(workdir, "eval")[-1]["eval_top1"] - records(reference, "eval")[0]["eval_top1"]) <= 2e-3


@pytest.mark.parametrize("hosts", [2], indirect=True)
def test_unreachable_collectives_address_ends_every_process_with_one_error_line(hosts, cifar10_small, tmp_path):
    # What JAX alone does on these hosts: gloo on the address the host name
    # resolves to, 127.0.0.1, which the other host cannot reach.
    values = overrides(cifar10_small)
    started = time.time()
    results = finish(start(hosts, values, tmp_path / "run", extra=["--collectives_address=127.0.0.1"]), timeout=120)
    assert time.time() - started < 60
    for i, (code, output, last) in enumerate(results):
        assert code == 1, output[-3000:]  # not SIGABRT (-6)
        assert last.startswith("error: "), output[-3000:]
        peer = 1 - i
        assert re.search(rf"process {i} cannot reach process {peer} at 127\.0\.0\.1:\d+ \(\[Errno 111\]", last), last
        assert "--collectives_interface" in last
        assert "Traceback" not in output
    assert not (tmp_path / "run").exists()  # stopped before anything was written


@pytest.mark.parametrize("hosts", [3], indirect=True)
def test_host_whose_link_goes_down_ends_the_others_naming_it(hosts, cifar10_small, tmp_path):
    heartbeat = 10
    values = overrides(cifar10_small, batch_size=48, num_train_steps=2000, data_shards=3, eval_batch_size=99,
                       checkpoint_every_steps=4, eval_every_steps=10_000)  # fmt: skip
    workdir = tmp_path / "run"
    processes = start(hosts, values, workdir, extra=[f"--heartbeat_timeout={heartbeat}"])
    deadline = time.time() + 300
    while not (workdir / "checkpoints" / "8").is_dir():
        if time.time() > deadline or any(p.poll() is not None for p in processes):
            for p in processes:
                p.kill()
            pytest.fail("\n".join(output[-2000:] for _, output, _ in finish(processes)))
        time.sleep(0.05)
    hosts[2].link_down()
    cut_at = time.time()
    results = finish(processes, timeout=120)
    ended = time.time() - cut_at
    for i, (code, output, last) in enumerate(results):
        assert code == 1, output[-3000:]  # not SIGABRT (-6)
        assert "Fatal Python error" not in output
        if i < 2:
            assert re.match(rf"error: process {i} of 3 stops: lost process\(es\) 2\b", last), last
        else:
            assert re.match(r"error: process 2 of 3 stops: lost the coordinator, process 0\b", last), last
    # Measured: 10.1-10.7 s with a 10 s heartbeat timeout (the runtime declares
    # the silent host dead at the timeout; process 0 waits 2 s before it goes).
    assert ended < heartbeat + 5, ended
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] >= 8
    assert pathlib.Path(workdir / "checkpoints" / str(saved[-1])).is_dir()
