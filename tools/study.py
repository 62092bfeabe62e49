"""The batch-size study: LARS against momentum SGD with linear scaling, each with its own learning rates.

    LARGEBATCH_SHARED_DATA=../shared/data python -m tools.study --jobs=2 --page docs/study.md --page README.md

Every run is one cell of configs/cifar10_study.py, run as
`python main.py --config=configs/cifar10_study.py:<batch> --config.optimizer=... --config.learning_rate=...
--workdir=OUT/runs/<run>` (`config_flags`). For each method and batch size it sweeps the peak
learning rate over the cell's centre x 1/2, 1, 2 (`--lr_factors`; the centre is
the second edition's best learning rate, CENTRES, or the method's scaling rule
for a cell it did not run); when the best of either view sits at an edge, the
sweep goes one factor of 2 further that way, up to `--extend` runs past the grid.
When every cell's sweep is done, the best learning rate of each cell (by final
validation top-1) is run again with seeds 1 to `--seeds` - 1, so that the
comparison has a spread. That is Stage A (--epochs). Stage B starts when every
Stage A cell is complete: the --stage_b_batch cells again at --stage_b_epochs
(run folders <run>_e<epochs>), each method's sweep centred on the learning rate
Stage A chose at that batch. Two views of the same runs (Shallue et al. 2018,
arXiv:1811.03600; tools/study_report.py):

  steps to target   the fewest steps, over the sweep, at which validation top-1
                    first reaches --target (evaluated 100 times per run)
  fixed budget      validation top-1 after the budget, best over the sweep, and
                    that learning rate's test top-1, mean and range over its
                    seeds (the test images are evaluated once, after the last
                    step, and choose nothing)

Once Stage A is complete, each cell's fewest-steps run and its chosen run (seed 0) run again with
the gradient noise scale in their logs (`noise_reruns_due`; rows in OUT/noise_scale.csv, logs in
OUT/logs/<run>_noise/), for the comparison of the noise scale with the critical batch
(tools/study_noise.py); --noise_reruns=0 leaves them out.

Resumable: run the same command again. A run with a row in OUT/results.csv is
skipped (the CSV and logs are committed after every run); an interrupted one
resumes from its last checkpoint in OUT/runs (every epoch; not committed).
`--report` starts no run: it writes the plots and tables of the runs so far.

--jobs N runs N at a time, each pinned to 1/N of the cores (its output in
OUT/runs/<run>.log). A cell's grid learning rates start together, and so do its
seeds; a step past an edge waits for the cell's other runs, the seeds for the
sweep, Stage B for Stage A (`due_runs`).

Writes:
  OUT/results.csv          one row per finished run
  OUT/logs/<run>/          its metrics.jsonl, trust_ratios.jsonl and config.json
  OUT/steps_to_target.png  steps to target against batch size, log-log, with perfect scaling
  OUT/accuracy.png         test top-1 at the fixed budget against batch size
  OUT/trust_ratios.png     LARS per-layer trust ratios, smallest vs largest batch
  PAGE                     the tables of both stages between the study markers (each --page)
"""

import argparse
import csv
import hashlib
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import NamedTuple

from configs import cifar10_lars, cifar10_study
from tools import cifar_data, study_noise, study_report
from tools.study_report import (
    METHODS,
    best_at_budget,
    budget_runs,
    cell_rows,
    fewest_steps,
    run_name,
    seed_of,
    stage_b_due,
    stage_rows,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/cifar10_study.py"
CSV_FIELDS = [
    "method", "batch", "lr", "lr_factor", "seed", "epochs", "steps", "steps_to_target", "target",
    "final_validation_top1", "test_top1", "test_top5", "final_train_loss", "validation_split", "config", "wall_s",
]  # fmt: skip


# The second edition's best learning rate of each cell by final validation top-1 (8 epochs,
# docs/study_v2/results.csv): where the third edition's sweeps start.
CENTRES = {
    ("sgd", 128): 0.8, ("sgd", 512): 3.2, ("sgd", 2048): 3.2, ("sgd", 8192): 0.2,
    ("lars", 128): 1.414, ("lars", 512): 2.828, ("lars", 2048): 5.657, ("lars", 8192): 2.828,
}  # fmt: skip


# Rows of the noise-scale reruns (`noise_reruns_due`), beside results.csv; their logs are OUT/logs/<run>_noise/.
NOISE_CSV = "noise_scale.csv"


BASE_BATCH = 128  # momentum SGD's learning rate 0.1 is for this batch
STUDY = cifar10_study.get_config()  # what every cell shares: the budget, the validation split


def scaled_lr(method: str, batch: int) -> float:
    """The scaling rule that centres a method's sweep in a cell the second edition did not run.

    Momentum SGD / Nesterov: 0.1 at batch 128, scaled linearly (Goyal et al.).
    LARS: configs/cifar10_lars.py's rule, 2 x sqrt(batch / 1024).
    """
    if method == "lars":
        return cifar10_lars.get_config(str(batch)).learning_rate
    return 0.1 * batch / BASE_BATCH


def swept_lr(centre: float, factor: float) -> float:
    """A sweep's learning rate: its centre times a power of 2, to 4 significant digits."""
    return float(f"{centre * factor:.4g}")


def lr_of(method: str, batch: int, factor: float) -> float:
    """A Stage A learning rate: around the cell's centre (CENTRES, or the method's scaling rule)."""
    return swept_lr(CENTRES.get((method, batch)) or scaled_lr(method, batch), factor)


def config_flags(method: str, batch: int, lr: float, seed: int, args, epochs: float | None = None) -> list[str]:
    """main.py's config flags of one run: configs/cifar10_study.py at the cell's batch, its optimizer
    and learning rate, and what the study's own flags change (not the data's folder)."""
    flags = [
        f"--config={CONFIG}:{batch}",
        f"--config.optimizer={'lars' if method == 'lars' else 'sgd'}",
        f"--config.learning_rate={lr:g}",
    ]
    if method == "nesterov":
        flags.append("--config.nesterov=true")
    if seed:
        flags.append(f"--config.seed={seed}")
    epochs = args.epochs if epochs is None else epochs
    if epochs != STUDY.num_epochs:
        flags.append(f"--config.num_epochs={epochs:g}")
    if args.validation != STUDY.validation_images:
        flags.append(f"--config.validation_images={args.validation}")
    if args.steps:
        flags.append(f"--config.num_train_steps={args.steps}")
    return flags


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def steps_to_target(records: list[dict], target: float) -> int | None:
    """The first step whose validation top-1 reaches target, or None."""
    for record in records:
        if record["kind"] == "eval" and record["split"] == "validation" and record["eval_top1"] >= target:
            return record["step"]
    return None


def split_digest(workdir) -> str:
    """A short hash of the held-out file names: the same in every row, or the cells differ in their data."""
    names = json.loads((pathlib.Path(workdir) / "data_split.json").read_text())["validation"]
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]


class Run(NamedTuple):
    """One training run of the study."""

    method: str
    batch: int
    lr: float
    factor: float  # lr over the centre of its cell's sweep
    seed: int
    epochs: float
    noise: bool = False  # a rerun that measures the gradient noise scale (`noise_reruns_due`)

    @property
    def name(self) -> str:
        return run_name(self.method, self.batch, self.lr, self.seed, self.epochs, self.noise)


def core_slots(jobs: int) -> list[set[int] | None]:
    """The cores of each of `jobs` concurrent runs: one run has the study's own (no pinning); more split the
    available cores into equal contiguous parts."""
    if jobs == 1:
        return [None]
    cores = sorted(os.sched_getaffinity(0))
    size = len(cores) // jobs
    return [set(cores[i * size : (i + 1) * size]) for i in range(jobs)]


def output_log(run: Run, args) -> pathlib.Path:
    """Where a run's output goes when runs go concurrently (--jobs > 1)."""
    return pathlib.Path(args.out) / "runs" / f"{run.name}.log"


def start_run(run: Run, args, cores: set[int] | None) -> subprocess.Popen:
    """Starts (or resumes) one run through main.py, pinned to `cores` if given. With --jobs > 1 its output
    is appended to `output_log`, since concurrent runs would interleave theirs."""
    workdir = pathlib.Path(args.out) / "runs" / run.name
    flags = config_flags(run.method, run.batch, run.lr, run.seed, args, run.epochs)
    data_dir = args.data_dir or str(cifar_data.CACHE / "cifar10_jpeg")
    command = [sys.executable, "main.py", *flags, f"--config.data_dir={data_dir}", f"--workdir={workdir}"]
    if cores is None:
        print(f"[study] {run.name}: {' '.join(command[1:])}", flush=True)
        return subprocess.Popen(command, cwd=REPO)
    log = output_log(run, args)
    print(f"[study] {run.name} on cores {sorted(cores)}, output in {log}: {' '.join(command[1:])}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as output:
        pin = lambda: os.sched_setaffinity(0, cores)  # noqa: E731
        return subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, preexec_fn=pin)


def finished_row(run: Run, args, wall_s: float) -> dict:
    """The row of results.csv of a run whose main.py exited 0, from its records; its logs are copied to
    OUT/logs/<run>/. A run a signal stopped is not over: SystemExit."""
    workdir = pathlib.Path(args.out) / "runs" / run.name
    records = read_jsonl(workdir / "metrics.jsonl")
    final = {r["split"]: r for r in records if r["kind"] == "eval"}  # the last of each split
    if "test" not in final:  # main.py exits 0 when a signal stops it: the run is not over
        raise SystemExit(f"error: run {run.name} stopped before its last step; run the study again to resume.")
    last_train = [r for r in records if r["kind"] == "train"][-1]
    row = {
        "method": run.method,
        "batch": run.batch,
        "lr": run.lr,
        "lr_factor": run.factor,
        "seed": run.seed,
        "epochs": run.epochs,
        "steps": final["test"]["step"],
        "steps_to_target": steps_to_target(records, args.target) or "",
        "target": args.target,
        "final_validation_top1": round(final["validation"]["eval_top1"], 4),
        "test_top1": round(final["test"]["eval_top1"], 4),
        "test_top5": round(final["test"]["eval_top5"], 4),
        "final_train_loss": round(last_train["loss"], 4),
        "validation_split": split_digest(workdir),
        "config": " ".join(config_flags(run.method, run.batch, run.lr, run.seed, args, run.epochs)),
        "wall_s": round(wall_s),  # of the last invocation only, when resumed
    }
    logs = pathlib.Path(args.out) / "logs" / run.name
    logs.mkdir(parents=True, exist_ok=True)
    for file in ("metrics.jsonl", "trust_ratios.jsonl", "config.json"):
        shutil.copy(workdir / file, logs / file)
    return row


def write_csv(rows: list[dict], path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        order = lambda r: (r["method"], int(r["batch"]), float(r["epochs"]), float(r["lr"]), seed_of(r))  # noqa: E731
        writer.writerows(sorted(rows, key=order))


def read_csv(path) -> list[dict]:
    if not pathlib.Path(path).exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def next_factor(rows: list[dict], factors: list[float], extend: int) -> float | None:
    """The next learning-rate factor to run in a cell: the grid first, then one step past an edge where
    either view's best run sits (at most `extend` steps past the grid in all)."""
    done = {float(r["lr_factor"]) for r in rows}
    for factor in factors:
        if factor not in done:
            return factor
    ordered = sorted(done)
    if len(ordered) - len(factors) >= extend:
        return None
    # The best of either view: a cell's fewest-steps run and its best-at-budget run can differ.
    best = {float(r["lr_factor"]) for r in (fewest_steps(rows), best_at_budget(rows)) if r is not None}
    if ordered[0] in best:
        return ordered[0] / 2
    if ordered[-1] in best:
        return ordered[-1] * 2
    return None


def stage_a_complete(rows: list[dict], methods, batches, factors, args) -> bool:
    """Whether every Stage A cell has its sweep (the best inside it, or `extend` used up) and its seeds."""
    return all(
        cell_rows(rows, m, b)
        and next_factor(cell_rows(rows, m, b), factors, args.extend) is None
        and not missing_seeds(rows, m, b, args.seeds)
        for m in methods
        for b in batches
    )


def stage_b_lr(stage_a: list[dict], method: str, batch: int, factor: float) -> float:
    """A Stage B learning rate: the one Stage A chose at this batch (by final validation) times `factor`."""
    return swept_lr(float(best_at_budget(cell_rows(stage_a, method, batch))["lr"]), factor)


def missing_seeds(rows: list[dict], method: str, batch: int, seeds: int) -> list[int]:
    """Seeds 1 .. seeds-1 not yet run at the cell's best learning rate (none before its sweep has a run)."""
    done = {seed_of(r) for r in budget_runs(rows, method, batch)}
    return [seed for seed in range(1, seeds) if done and seed not in done]


def startable_factors(rows: list[dict], going: list[Run], factors: list[float], extend: int) -> list[float]:
    """The factors of one cell's sweep that can start now, given its finished rows and its runs still going:
    the grid's missing ones all at once; one past an edge only once none is going (it depends on them all)."""
    busy = {run.factor for run in going}
    done = {float(r["lr_factor"]) for r in rows}
    missing = [f for f in factors if f not in done | busy]
    if missing or busy:
        return missing
    factor = next_factor(rows, factors, extend)
    return [] if factor is None else [factor]


def due_runs(rows: list[dict], going: list[Run], methods, batches, factors, args) -> list[Run]:
    """The runs that can start now, the first to start first: the missing learning rates of every Stage A
    cell, batch by batch; then the missing seeds of the best learning rate of each cell whose sweep is over;
    then Stage B, once Stage A is complete: the --stage_b_batch cells at --stage_b_epochs, their learning
    rates swept around Stage A's choice."""

    def cell_going(method, batch, epochs) -> list[Run]:
        return [r for r in going if (r.method, r.batch, r.epochs) == (method, batch, epochs)]

    stage_a = stage_rows(rows, args.epochs)
    sweeps, seeds = [], []
    for batch in batches:
        for method in methods:
            cell, runs = cell_rows(stage_a, method, batch), cell_going(method, batch, args.epochs)
            swept = [r for r in runs if r.seed == 0]
            new = startable_factors(cell, swept, factors, args.extend)
            sweeps += [Run(method, batch, lr_of(method, batch, f), f, 0, args.epochs) for f in new]
            if new or swept:
                continue
            best = best_at_budget(cell)
            for seed in missing_seeds(stage_a, method, batch, args.seeds):
                if seed not in {r.seed for r in runs}:
                    seeds.append(Run(method, batch, float(best["lr"]), float(best["lr_factor"]), seed, args.epochs))
    due = sweeps + seeds
    if not stage_b_due(args, batches) or not stage_a_complete(stage_a, methods, batches, factors, args):
        return due
    batch, epochs = args.stage_b_batch, args.stage_b_epochs
    for method in methods:
        cell = cell_rows(stage_rows(rows, epochs), method, batch)
        for factor in startable_factors(cell, cell_going(method, batch, epochs), factors, args.extend):
            due.append(Run(method, batch, stage_b_lr(stage_a, method, batch, factor), factor, 0, epochs))
    return due


def noise_rerun_rows(stage_a: list[dict], method: str, batch: int) -> list[dict]:
    """The runs of a cell whose noise scale the study compares with the critical batch: the one that
    reached the target in the fewest steps (the steps view that the fit of S(B) takes), then the one
    chosen on validation, if another."""
    cell = cell_rows(stage_a, method, batch)
    runs = [r for r in (fewest_steps(cell), best_at_budget(cell)) if r is not None]
    return [r for i, r in enumerate(runs) if r["lr"] not in {o["lr"] for o in runs[:i]}]


def noise_reruns_due(rows, noise_rows, going: list[Run], methods, batches, factors, args) -> list[Run]:
    """Once Stage A is complete: each cell's `noise_rerun_rows` again, seed 0, with the runs' logs now
    holding the gradient noise scale (runs that predate it have none); those not in NOISE_CSV nor going.
    Training is the same as the original's (the statistic does not change it), on this machine's CPU."""
    stage_a = stage_rows(rows, args.epochs)
    if not stage_a_complete(stage_a, methods, batches, factors, args):
        return []
    done = {(r["method"], int(r["batch"]), float(r["lr"])) for r in noise_rows}
    busy = {(r.method, r.batch, r.lr) for r in going if r.noise}
    first, then = [], []  # every cell's fewest-steps run comes before any chosen one
    for batch in batches:
        for method in methods:
            for i, row in enumerate(noise_rerun_rows(stage_a, method, batch)):
                key = (method, batch, float(row["lr"]))
                if key not in done | busy:
                    run = Run(method, batch, key[2], float(row["lr_factor"]), 0, args.epochs, noise=True)
                    (then if i else first).append(run)
    return first + then


def sweep(rows, methods, batches, factors, args, csv_path) -> list[dict]:
    """Runs what is due (`due_runs`), up to --jobs runs at a time, each on its own part of the cores, until
    nothing is due. A row is added to the CSV after each run (a noise-scale rerun's to NOISE_CSV beside it),
    so an interruption keeps it. A failed run stops the others (they checkpoint on SIGTERM and resume next time)."""
    noise_csv = pathlib.Path(csv_path).parent / NOISE_CSV
    slots = core_slots(args.jobs)
    going: dict[int, tuple[Run, subprocess.Popen, float]] = {}  # slot -> run, its process, its start
    while True:
        free = [slot for slot in range(len(slots)) if slot not in going]
        runs = [g[0] for g in going.values()]
        due = due_runs(rows, runs, methods, batches, factors, args)
        if args.noise_reruns:
            due += noise_reruns_due(rows, read_csv(noise_csv), runs, methods, batches, factors, args)
        for slot, run in zip(free, due):
            going[slot] = (run, start_run(run, args, slots[slot]), time.time())
        if not going:
            return rows
        run, process, started = going.pop(wait_for_one(going))
        try:
            if process.returncode:
                output = "above" if args.jobs == 1 else f"in {output_log(run, args)}"
                raise SystemExit(
                    f"error: run {run.name} failed (its output is {output}); run the study again to resume."
                )
            row = finished_row(run, args, time.time() - started)
        except SystemExit:
            for _, other, _ in going.values():
                other.terminate()
                other.wait()
            raise
        target = noise_csv if run.noise else csv_path
        write_csv(read_csv(target) + [row], target)
        rows = read_csv(csv_path)


def wait_for_one(going: dict[int, tuple[Run, subprocess.Popen, float]]) -> int:
    """Waits until one of the runs going has exited; returns its slot."""
    while True:
        for slot, (_, process, _) in going.items():
            if process.poll() is not None:
                return slot
        time.sleep(1)


def report(rows, methods, batches, args, out, csv_path):
    """The plots, the pages' tables and the printed tables of the runs so far (cells not run yet show so)."""
    stage_a = study_report.stage_rows(rows, args.epochs)
    chosen = [
        study_report.best_at_budget(study_report.cell_rows(stage_a, "lars", b)) for b in (min(batches), max(batches))
    ]
    logs = None
    if "lars" in methods and all(chosen):
        logs = [out / "logs" / run_name("lars", int(r["batch"]), float(r["lr"]), epochs=args.epochs) for r in chosen]
    study_report.write(rows, methods, batches, args, out, csv_path, logs)
    study_noise.write(rows, read_csv(out / NOISE_CSV), methods, batches, args, out)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/study", help="results, plots and run workdirs")
    parser.add_argument("--data_dir", default="", help="CIFAR-10 image folder (default: extract the shared archive)")
    parser.add_argument("--batches", default="128,2048,8192")
    parser.add_argument("--methods", default="sgd,lars")
    parser.add_argument("--lr_factors", default="0.5,1,2", help="the sweep, as multiples of each method's rule")
    parser.add_argument("--extend", type=int, default=5, help="extra LRs per cell past an edge that won")
    parser.add_argument("--target", type=float, default=0.70, help="validation top-1 of the steps-to-target view")
    parser.add_argument("--epochs", type=float, default=STUDY.num_epochs)
    parser.add_argument("--validation", type=int, default=STUDY.validation_images)
    parser.add_argument("--steps", type=int, default=0, help="> 0: that many steps per run (smoke tests)")
    parser.add_argument("--seeds", type=int, default=3, help="runs of each cell's best learning rate, seeds 0..N-1")
    parser.add_argument("--stage_b_batch", type=int, default=8192, help="Stage B's batch (one of --batches)")
    parser.add_argument(
        "--stage_b_epochs", type=float, default=200.0, help="Stage B's budget, run once Stage A is complete (0: none)"
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="runs at a time, each pinned to an equal part of the cores (>1)"
    )
    parser.add_argument(
        "--noise_reruns",
        type=int,
        default=1,
        help="1: once Stage A is complete, rerun each cell's fewest-steps and chosen runs with the noise scale",
    )
    parser.add_argument("--report", action="store_true", help="only the plots and tables of the runs so far")
    parser.add_argument(
        "--page", action="append", default=[], help="Markdown page whose study section gets the tables (repeatable)"
    )
    return parser.parse_args(argv)


def check_args(args) -> tuple[list[str], list[int], list[float]]:
    methods, batches = args.methods.split(","), [int(b) for b in args.batches.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; choose from {list(METHODS)}.")
    factors = [float(f) for f in args.lr_factors.split(",")]
    if any(f <= 0 or not math.log2(f).is_integer() for f in factors):
        raise SystemExit(f"error: --lr_factors={args.lr_factors}: use powers of 2 (e.g. 0.5,1,2).")
    cores = len(os.sched_getaffinity(0))
    if not 1 <= args.jobs <= cores:
        raise SystemExit(f"error: --jobs={args.jobs}: between 1 and this process's {cores} cores.")
    return methods, batches, factors


def main(argv=None):
    args = parse_args(argv)
    methods, batches, factors = check_args(args)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "results.csv"
    rows = read_csv(csv_path)
    if not args.report:
        if not args.data_dir:
            cifar_data.extract()  # where the runs' data_dir points by default
        rows = sweep(rows, methods, batches, factors, args, csv_path)
    report(rows, methods, batches, args, out, csv_path)
    return rows


if __name__ == "__main__":
    main()
