"""Step time of 2 processes x 1 device against 1 process x 2 devices, same global batch.

    LARGEBATCH_SHARED_DATA=../shared/data python -m bench.bench_multiprocess [--steps 30]

Trains the CIFAR ResNet-20 on the shared CIFAR-10 JPEGs (2,000-image subset)
with configs/cifar10_lars.py, global batch 256, both ways, through main.py
(one process) and tools/launch.py (two processes on localhost, gloo
all-reduce). Reports the median step time over the logged steps after the
first 5 (compile excluded) and the ratio.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from tools import cifar_data

REPO = pathlib.Path(__file__).resolve().parents[1]


def step_times(workdir: pathlib.Path, skip: int = 5) -> list[float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time"] for r in records if r["kind"] == "train" and r["step"] > skip]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        data = cifar_data.subset(cifar_data.extract(), tmp / "cifar", {"train": 200, "test": 100})
        config = [
            "--config=configs/cifar10_lars.py:256",
            f"--config.data_dir={data}",
            f"--config.num_train_steps={args.steps}",
            "--config.log_every_steps=1",
            "--config.eval_every_steps=100000",
            "--config.checkpoint_every_steps=100000",
            "--config.data_shards=2",
        ]  # fmt: skip
        runs = {
            "1 process x 2 devices": [sys.executable, "main.py", f"--workdir={tmp / 'one'}", *config,
                                      "--num_cpu_devices=2"],
            "2 processes x 1 device": [sys.executable, "-m", "tools.launch", "--num_processes=2",
                                       "--devices_per_process=1", "--", f"--workdir={tmp / 'two'}", *config],
        }  # fmt: skip
        medians = {}
        for name, command in runs.items():
            subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
            workdir = tmp / ("one" if name.startswith("1") else "two")
            medians[name] = statistics.median(step_times(workdir))
    print(f"CIFAR ResNet-20, global batch 256, {os.cpu_count()} cores, median of steps 6..{args.steps}")
    for name, seconds in medians.items():
        print(f"{name:24s} {seconds * 1e3:8.1f} ms/step  {256 / seconds:7.1f} img/s")
    ratio = medians["2 processes x 1 device"] / medians["1 process x 2 devices"]
    print(f"ratio 2x1 / 1x2 step time: {ratio:.2f}")


if __name__ == "__main__":
    main()
