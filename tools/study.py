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
comparison has a spread. Two views of the same runs (Shallue et al. 2018,
arXiv:1811.03600):

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
  PAGE                     the two tables between the study markers (each --page)
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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from configs import cifar10_lars, cifar10_study  # noqa: E402
from tools import cifar_data, plot_trust_ratios  # noqa: E402
from tools.markdown import replace_section  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/cifar10_study.py"
METHODS = {
    "sgd": "momentum SGD, linear scaling",
    "lars": "LARS",
    "nesterov": "Nesterov momentum, linear scaling",
}
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


def lr_of(method: str, batch: int, factor: float) -> float:
    """The sweep's learning rate: the cell's centre times a power of 2, to 4 significant digits."""
    centre = CENTRES.get((method, batch)) or scaled_lr(method, batch)
    return float(f"{centre * factor:.4g}")


def run_name(method: str, batch: int, lr: float, seed: int = 0) -> str:
    return f"{method}_b{batch}_lr{lr:g}" + (f"_seed{seed}" if seed else "")


def config_flags(method: str, batch: int, lr: float, seed: int, args) -> list[str]:
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
    if args.epochs != STUDY.num_epochs:
        flags.append(f"--config.num_epochs={args.epochs:g}")
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


def run_cell(method: str, batch: int, factor: float, args, seed: int = 0) -> dict:
    """Trains one run (or resumes it) through main.py and returns its row of results.csv."""
    lr = lr_of(method, batch, factor)
    name = run_name(method, batch, lr, seed)
    workdir = pathlib.Path(args.out) / "runs" / name
    flags = config_flags(method, batch, lr, seed, args)
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
        "epochs": args.epochs,
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
        writer.writerows(sorted(rows, key=lambda r: (r["method"], int(r["batch"]), float(r["lr"]), seed_of(r))))


def read_csv(path) -> list[dict]:
    if not pathlib.Path(path).exists():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def seed_of(row: dict) -> int:
    return int(row.get("seed") or 0)  # rows of the second edition have no seed column: seed 0


def cell_rows(rows: list[dict], method: str, batch: int) -> list[dict]:
    """The sweep of one cell: its seed-0 runs, by learning rate."""
    runs = (r for r in rows if r["method"] == method and int(r["batch"]) == batch and seed_of(r) == 0)
    return sorted(runs, key=lambda r: float(r["lr"]))


def seed_rows(rows: list[dict], method: str, batch: int, lr: float) -> list[dict]:
    """Every seed's run of one cell at one learning rate, by seed."""
    runs = (r for r in rows if r["method"] == method and int(r["batch"]) == batch and float(r["lr"]) == lr)
    return sorted(runs, key=seed_of)


def fewest_steps(rows: list[dict]) -> dict | None:
    """The run of a cell that reached the target in the fewest steps (ties: the higher final validation top-1)."""
    reached = [r for r in rows if r["steps_to_target"] not in ("", None)]
    return min(reached, key=lambda r: (int(r["steps_to_target"]), -float(r["final_validation_top1"])), default=None)


def best_at_budget(rows: list[dict]) -> dict | None:
    """The run of a cell with the best final validation top-1 (the test set chooses nothing)."""
    return max(rows, key=lambda r: float(r["final_validation_top1"]), default=None)


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


def batch_by_method_table(rows: list[dict], methods, batches, heading: str, cell_text) -> str:
    """A Markdown table, a row per batch and a column per method; cell_text(rows, method, batch) -> text."""
    lines = ["| batch | " + " | ".join(f"{METHODS[m]}: {heading}" for m in methods) + " |"]
    lines.append("|---|" + "---|" * len(methods))
    for batch in batches:
        values = [cell_text(rows, m, batch) or "not run yet" for m in methods]
        lines.append(f"| {batch} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def steps_text(rows: list[dict], method: str, batch: int) -> str:
    cell = cell_rows(rows, method, batch)
    best = fewest_steps(cell)
    if not cell:
        return ""
    if best is None:
        return f"not reached in {cell[0]['steps']} ({len(cell)} LRs)"
    return f"{best['steps_to_target']} ({best['lr']})"


def budget_runs(rows: list[dict], method: str, batch: int) -> list[dict]:
    """The runs of a cell's chosen learning rate (best final validation top-1 of its sweep), one per seed."""
    best = best_at_budget(cell_rows(rows, method, batch))
    return [] if best is None else seed_rows(rows, method, batch, float(best["lr"]))


def budget_text(rows: list[dict], method: str, batch: int) -> str:
    """Test top-1 % (validation %, LR, steps) of the chosen learning rate; over several seeds the means,
    and the test range."""
    runs = budget_runs(rows, method, batch)
    if not runs:
        return ""
    test = [100 * float(r["test_top1"]) for r in runs]
    validation = np.mean([100 * float(r["final_validation_top1"]) for r in runs])
    text = f"{np.mean(test):.1f} ({validation:.1f}, {runs[0]['lr']}, {runs[0]['steps']}"
    return text + (f"; {len(runs)} seeds: {min(test):.1f}-{max(test):.1f})" if len(runs) > 1 else ")")


def steps_table(rows: list[dict], methods, batches) -> str:
    return batch_by_method_table(rows, methods, batches, "steps (LR)", steps_text)


def budget_table(rows: list[dict], methods, batches) -> str:
    heading = "test top-1 % (validation %, LR, steps; seeds: test range)"
    return batch_by_method_table(rows, methods, batches, heading, budget_text)


def update_pages(pages, rows: list[dict], methods, batches, args, csv_path):
    """The study section of each Markdown page: both tables and where they come from."""
    target = f"{100 * args.target:g}%"
    text = (
        f"Steps to {target} validation top-1 (fewest over the learning-rate sweep; LR of that run):\n\n"
        + steps_table(rows, methods, batches)
        + f"\n\nTest top-1 after {budget(args)} (the learning rate with the best final validation top-1; "
        "over its seeds, the means):\n\n"
        + budget_table(rows, methods, batches)
        + f"\n\n_{len(rows)} runs, from `{csv_path}`._"
    )
    for page in pages:
        replace_section(page, "study", text)


def plot_steps_to_target(rows, methods, batches, target, path):
    fig, ax = plt.subplots(figsize=plot_trust_ratios.FIGSIZE, dpi=plot_trust_ratios.DPI)
    for method in methods:
        points = [(b, fewest_steps(cell_rows(rows, method, b))) for b in batches]
        points = [(b, int(r["steps_to_target"])) for b, r in points if r]
        if points:
            ax.plot(*zip(*points), marker="o", label=METHODS[method])
            b0, s0 = points[0]
            ax.plot(batches, [s0 * b0 / b for b in batches], ls=":", color=ax.lines[-1].get_color(), lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch size")
    ax.set_ylabel(f"steps to {100 * target:g}% validation top-1")
    ax.set_title("CIFAR-10: steps to target (dotted: perfect scaling from the smallest batch)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path)
    plt.close(fig)


def budget(args) -> str:
    return f"{args.steps} steps" if args.steps else f"{args.epochs:g} epochs"


def plot_accuracy(rows, methods, batches, budget_label, path):
    fig, ax = plt.subplots(figsize=plot_trust_ratios.FIGSIZE, dpi=plot_trust_ratios.DPI)
    for method in methods:
        tests = [(b, [100 * float(r["test_top1"]) for r in budget_runs(rows, method, b)]) for b in batches]
        tests = [(b, t) for b, t in tests if t]
        if tests:
            means = [np.mean(t) for _, t in tests]
            spread = [[m - min(t) for (_, t), m in zip(tests, means)], [max(t) - m for (_, t), m in zip(tests, means)]]
            ax.errorbar([b for b, _ in tests], means, yerr=spread, marker="o", capsize=3, label=METHODS[method])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"CIFAR-10, {budget_label}: test top-1 at the LR best by validation (bars: seeds' range)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path)
    plt.close(fig)


def plot_trust_ratio_comparison(small_workdir, large_workdir, path):
    """Per-layer LARS trust ratio over training progress (fraction of the run), two batch sizes side by side."""
    logs = [plot_trust_ratios.TrustRatioLog(w) for w in (small_workdir, large_workdir)]
    fig, axes = plt.subplots(1, 2, figsize=plot_trust_ratios.FIGSIZE, dpi=plot_trust_ratios.DPI, sharey=True)
    for ax, log in zip(axes, logs):
        layers = log.lars_layers
        for color, i in zip(plt.cm.viridis(np.linspace(0, 1, len(layers))), layers):
            ax.plot(log.steps / log.steps[-1], log.trust_ratio[i], color=color, lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("fraction of training")
        ax.set_title(f"{log.workdir.name}: {int(log.steps[-1])} steps")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("trust ratio (LARS layers, network order: dark to light)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sweep(rows, methods, batches, factors, args, csv_path) -> list[dict]:
    """Runs every cell's missing learning rates, then the missing seeds of every cell's best one;
    a row is added to the CSV after each run."""

    def record(row):
        write_csv(rows + [row], csv_path)  # after every run, so an interruption keeps it
        return read_csv(csv_path)

    for batch in batches:
        for method in methods:
            while (factor := next_factor(cell_rows(rows, method, batch), factors, args.extend)) is not None:
                rows = record(run_cell(method, batch, factor, args))
    for batch in batches:
        for method in methods:
            for seed in missing_seeds(rows, method, batch, args.seeds):
                best = best_at_budget(cell_rows(rows, method, batch))
                rows = record(run_cell(method, batch, float(best["lr_factor"]), args, seed))
    return rows


def missing_seeds(rows: list[dict], method: str, batch: int, seeds: int) -> list[int]:
    """Seeds 1 .. seeds-1 not yet run at the cell's best learning rate (none before its sweep has a run)."""
    done = {seed_of(r) for r in budget_runs(rows, method, batch)}
    return [seed for seed in range(1, seeds) if done and seed not in done]


def report(rows, methods, batches, args, out, csv_path):
    """The plots, the page's tables and the printed tables from the runs so far (cells not run yet show so)."""
    plot_steps_to_target(rows, methods, batches, args.target, out / "steps_to_target.png")
    plot_accuracy(rows, methods, batches, budget(args), out / "accuracy.png")
    small, large = (best_at_budget(cell_rows(rows, "lars", b)) for b in (min(batches), max(batches)))
    if "lars" in methods and small and large:
        names = [run_name("lars", int(r["batch"]), float(r["lr"])) for r in (small, large)]
        plot_trust_ratio_comparison(out / "logs" / names[0], out / "logs" / names[1], out / "trust_ratios.png")
    update_pages(args.page, rows, methods, batches, args, csv_path)
    print(steps_table(rows, methods, batches))
    print(budget_table(rows, methods, batches))


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
