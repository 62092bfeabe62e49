"""The study's training throughput: one run on all cores against --jobs runs at once, each on its share.

    LARGEBATCH_SHARED_DATA=../shared/data python -m bench.bench_study_jobs [--jobs 2] [--batches 128,2048]

Trains configs/cifar10_study.py's cells (momentum SGD, the full CIFAR-10 JPEGs) through main.py for a few
hundred steps, first one run alone with every core, then `--jobs` identical runs at once, each pinned
to its part of the cores as `tools.study --jobs` pins them (`core_slots`). Reports images per second in
the steady state (the median logged step time after the first logs, batch / step time), summed over the
concurrent runs, and their ratio to the single run.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from bench.machine import cpu_description
from tools import cifar_data, study

REPO = pathlib.Path(__file__).resolve().parents[1]


def start(batch: int, images: int, workdir: pathlib.Path, cores) -> subprocess.Popen:
    """One run of the study's SGD cell at `batch` for about `images` training images, pinned to `cores`."""
    budget = argparse.Namespace(epochs=study.STUDY.num_epochs, validation=study.STUDY.validation_images,
                                steps=max(images // batch, 40))  # fmt: skip
    command = [
        sys.executable, "main.py", *study.config_flags("sgd", batch, 0.1, 0, budget),
        "--config.evaluations_per_run=1", "--config.logs_per_run=20", "--config.checkpoint_every_epochs=1000",
        f"--config.data_dir={cifar_data.extract()}", f"--workdir={workdir}",
    ]  # fmt: skip
    pin = None if cores is None else (lambda: os.sched_setaffinity(0, cores))
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin)


def images_per_second(workdir: pathlib.Path, batch: int) -> float:
    """batch / the median step time of the logged steps after the first five logs (compile excluded)."""
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in records if r["kind"] == "train"][5:]
    return batch / statistics.median(times)


def measure(batch: int, images: int, slots: list, tmp: pathlib.Path) -> float:
    """Images per second of len(slots) runs at once, summed."""
    workdirs = [tmp / f"b{batch}_{len(slots)}_{i}" for i in range(len(slots))]
    runs = [start(batch, images, w, cores) for w, cores in zip(workdirs, slots)]
    if any(run.wait() for run in runs):
        raise SystemExit(f"error: a run at batch {batch} failed")
    return sum(images_per_second(w, batch) for w in workdirs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--batches", default="128,2048")
    parser.add_argument("--images", type=int, default=128_000, help="training images per run")
    args = parser.parse_args()
    print(cpu_description())
    print(f"CIFAR ResNet-8, study config, float32, momentum SGD; {args.images:,} images per run")
    print(
        f"batch | 1 run, all cores (img/s) | {args.jobs} runs, 1/{args.jobs} of the cores each (img/s, summed) | ratio"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for batch in (int(b) for b in args.batches.split(",")):
            alone = measure(batch, args.images, [None], pathlib.Path(tmp))
            together = measure(batch, args.images, study.core_slots(args.jobs), pathlib.Path(tmp))
            print(f"{batch} | {alone:.0f} | {together:.0f} | {together / alone:.2f}x", flush=True)


if __name__ == "__main__":
    main()
