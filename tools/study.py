"""The batch-size study: LARS against momentum SGD with linear scaling, each with its own learning rates.

    LARGEBATCH_SHARED_DATA=../shared/data python -m tools.study --page docs/study.md --page README.md

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

Resumable: run the same command again. A run with a row in OUT/results.csv is
skipped (the CSV and logs are committed after every run); an interrupted one
resumes from its last checkpoint in OUT/runs (every epoch; not committed).
`--report` starts no run: it writes the plots and tables of the runs so far.

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
import pathlib
import shutil
import subprocess
import sys
import time

from configs import cifar10_lars, cifar10_study
from tools import cifar_data, study_report
from tools.study_report import (
    METHODS,
    best_at_budget,
    budget_runs,
    cell_rows,
    fewest_steps,
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


def run_name(method: str, batch: int, lr: float, seed: int = 0, epochs: float = STUDY.num_epochs) -> str:
    """The run's folder: e.g. lars_b8192_lr2.828, with _seed1 for other seeds and _e200 for Stage B."""
    name = f"{method}_b{batch}_lr{lr:g}" + (f"_seed{seed}" if seed else "")
    return name + (f"_e{epochs:g}" if epochs != STUDY.num_epochs else "")


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


def run_cell(method: str, batch: int, lr: float, factor: float, args, seed: int = 0, epochs=None) -> dict:
    """Trains one run (or resumes it) through main.py and returns its row of results.csv.

    Args:
      method, batch, lr, seed: the run.
      factor: `lr` over the centre of its cell's sweep.
      args: the study's flags.
      epochs: its budget (default: Stage A's, --epochs).
    """
    epochs = args.epochs if epochs is None else epochs
    name = run_name(method, batch, lr, seed, epochs)
    workdir = pathlib.Path(args.out) / "runs" / name
    flags = config_flags(method, batch, lr, seed, args, epochs)
    data_dir = args.data_dir or str(cifar_data.CACHE / "cifar10_jpeg")
    command = [sys.executable, "main.py", *flags, f"--config.data_dir={data_dir}", f"--workdir={workdir}"]
    print(f"[study] {name}: {' '.join(command[1:])}", flush=True)
    start = time.time()
    if subprocess.run(command, cwd=REPO).returncode:
        raise SystemExit(f"error: run {name} failed (its output is above); run the study again to resume.")
    records = read_jsonl(workdir / "metrics.jsonl")
    final = {r["split"]: r for r in records if r["kind"] == "eval"}  # the last of each split
    if "test" not in final:  # main.py exits 0 when a signal stops it: the run is not over
        raise SystemExit(f"error: run {name} stopped before its last step; run the study again to resume.")
    last_train = [r for r in records if r["kind"] == "train"][-1]
    row = {
        "method": method,
        "batch": batch,
        "lr": lr,
        "lr_factor": factor,
        "seed": seed,
        "epochs": epochs,
        "steps": final["test"]["step"],
        "steps_to_target": steps_to_target(records, args.target) or "",
        "target": args.target,
        "final_validation_top1": round(final["validation"]["eval_top1"], 4),
        "test_top1": round(final["test"]["eval_top1"], 4),
        "test_top5": round(final["test"]["eval_top5"], 4),
        "final_train_loss": round(last_train["loss"], 4),
        "validation_split": split_digest(workdir),
        "config": " ".join(flags),
        "wall_s": round(time.time() - start),  # of the last invocation only, when resumed
    }
    logs = pathlib.Path(args.out) / "logs" / name
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


def sweep(rows, methods, batches, factors, args, csv_path) -> list[dict]:
    """Stage A: every cell's missing learning rates, then the missing seeds of every cell's best one.
    Stage B, once Stage A is complete: the --stage_b_batch cells at --stage_b_epochs, their learning
    rates swept around Stage A's choice. A row is added to the CSV after each run."""

    def record(row):
        write_csv(read_csv(csv_path) + [row], csv_path)  # after every run, so an interruption keeps it
        return read_csv(csv_path)

    stage_a = lambda: stage_rows(rows, args.epochs)  # noqa: E731
    for batch in batches:
        for method in methods:
            while (factor := next_factor(cell_rows(stage_a(), method, batch), factors, args.extend)) is not None:
                rows = record(run_cell(method, batch, lr_of(method, batch, factor), factor, args))
    for batch in batches:
        for method in methods:
            for seed in missing_seeds(stage_a(), method, batch, args.seeds):
                best = best_at_budget(cell_rows(stage_a(), method, batch))
                rows = record(run_cell(method, batch, float(best["lr"]), float(best["lr_factor"]), args, seed))
    if not stage_b_due(args, batches) or not stage_a_complete(stage_a(), methods, batches, factors, args):
        return rows
    batch, epochs = args.stage_b_batch, args.stage_b_epochs
    for method in methods:
        while (
            factor := next_factor(cell_rows(stage_rows(rows, epochs), method, batch), factors, args.extend)
        ) is not None:
            lr = stage_b_lr(stage_a(), method, batch, factor)
            rows = record(run_cell(method, batch, lr, factor, args, epochs=epochs))
    return rows


def missing_seeds(rows: list[dict], method: str, batch: int, seeds: int) -> list[int]:
    """Seeds 1 .. seeds-1 not yet run at the cell's best learning rate (none before its sweep has a run)."""
    done = {seed_of(r) for r in budget_runs(rows, method, batch)}
    return [seed for seed in range(1, seeds) if done and seed not in done]


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
