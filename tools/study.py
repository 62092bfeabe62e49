"""The batch-size study: momentum SGD with linear LR scaling against LARS, on the CIFAR-10 JPEGs.

    LARGEBATCH_SHARED_DATA=../shared/data python -m tools.study --out docs/study --page docs/study.md

Trains `--model` for a fixed epoch budget at every batch size of `--batches`
with configs/cifar10_sgd.py (momentum SGD, LR 0.1 x B/128, warmup, x0.1 steps at
50% and 75% of the budget) and configs/cifar10_lars.py (LARS, LR 2 x sqrt(B/1024),
warmup, poly(2) decay), each run through main.py into OUT/runs/<method>_b<batch>.

Resumable: run the same command again. A run with a row in OUT/results.csv is
skipped (the CSV and logs are committed, so this holds across machines); an
interrupted one resumes from its last checkpoint in OUT/runs (every epoch;
checkpoints stay out of git).

Writes:
  OUT/results.csv          one row per finished run: method, batch, top-1, ...
  OUT/logs/<run>/          its metrics.jsonl, trust_ratios.jsonl (~100 records) and config.json
  OUT/accuracy.png         test top-1 against batch size, one line per method
  OUT/trust_ratios.png     LARS per-layer trust ratios over training, smallest vs largest batch
  PAGE                     the table between the study markers (--page, e.g. docs/study.md)
"""

import argparse
import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tools import cifar_data, plot_trust_ratios  # noqa: E402
from tools.markdown import replace_section  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
METHODS = {"sgd": "momentum SGD, linear LR scaling", "lars": "LARS, poly decay"}
CSV_FIELDS = ["method", "batch", "model", "epochs", "steps", "peak_lr", "top1", "top5", "final_train_loss", "wall_s"]


def run_name(method: str, batch: int) -> str:
    return f"{method}_b{batch}"


def main_command(method: str, batch: int, workdir, data_dir, args) -> list[str]:
    """The main.py command line of one cell: the configs/ file and the study's budget."""
    num_train = sum(1 for _ in pathlib.Path(data_dir, "train").glob("*/*.jpg"))
    total_steps = args.steps or int(args.epochs * num_train / batch)
    command = [
        sys.executable, "main.py",
        f"--config=configs/cifar10_{method}.py:{batch}",
        f"--workdir={workdir}",
        f"--config.data_dir={data_dir}",
        f"--config.model={args.model}",
        f"--config.num_epochs={args.epochs}",
        f"--config.warmup_epochs={args.warmup * args.epochs}",
        f"--config.eval_batch_size={args.eval_batch}",
        "--config.eval_every_epochs=1000",  # once, at the end
        "--config.checkpoint_every_epochs=1",
        "--config.log_every_steps=5",
        f"--config.trust_ratio_every_steps={max(1, total_steps // 100)}",
        # BatchNorm over ghost batches of the same size in every cell (as the paper's workers
        # each normalised their own fixed share), and at most 256 images per device per
        # micro-step: larger ones run slower per image here (cache), 426 vs 888 img/s at 4,096.
        f"--config.bn_group={args.bn_group}",
        f"--config.microbatch_size={min(args.micro, batch // args.num_cpu_devices)}",
        f"--num_cpu_devices={args.num_cpu_devices}",
    ]  # fmt: skip
    if method == "sgd":
        command.append(f"--config.lr_decay_epochs=({0.5 * args.epochs},{0.75 * args.epochs})")
    else:
        command.append(f"--config.trust_coefficient={args.trust_coefficient}")
    if args.steps:
        command.append(f"--config.num_train_steps={args.steps}")
    return command


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def run_cell(method: str, batch: int, data_dir, args) -> dict:
    """Trains one cell (or resumes it) and returns its row of results.csv."""
    workdir = pathlib.Path(args.out) / "runs" / run_name(method, batch)
    start = time.time()
    command = main_command(method, batch, workdir, data_dir, args)
    print(f"[study] {run_name(method, batch)}: {' '.join(command)}")
    subprocess.run(command, cwd=REPO, check=True)
    records = read_jsonl(workdir / "metrics.jsonl")
    last_eval = [r for r in records if r["kind"] == "eval"][-1]
    last_train = [r for r in records if r["kind"] == "train"][-1]
    config = json.loads((workdir / "config.json").read_text())
    row = {
        "method": method,
        "batch": batch,
        "model": args.model,
        "epochs": args.epochs,
        "steps": last_eval["step"],
        "peak_lr": round(config["learning_rate"], 6),
        "top1": round(last_eval["eval_top1"], 4),
        "top5": round(last_eval["eval_top5"], 4),
        "final_train_loss": round(last_train["loss"], 4),
        "wall_s": round(time.time() - start),  # of the last invocation only, when resumed
    }
    logs = pathlib.Path(args.out) / "logs" / run_name(method, batch)
    logs.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "trust_ratios.jsonl", "config.json"):
        shutil.copy(workdir / name, logs / name)
    return row


def write_csv(rows: list[dict], path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["method"], int(r["batch"]))))


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def markdown_table(rows: list[dict]) -> str:
    """Batch x method, test top-1 (%), from results.csv rows."""
    batches = sorted({int(r["batch"]) for r in rows})
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    cell = {(r["method"], int(r["batch"])): r for r in rows}
    lines = [
        "| batch | " + " | ".join(f"{METHODS[m]}: top-1 % (steps)" for m in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for batch in batches:
        values = []
        for method in methods:
            row = cell.get((method, batch))
            values.append(f"{100 * float(row['top1']):.1f} ({row['steps']})" if row else "not run yet")
        lines.append(f"| {batch} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def update_page(page, rows: list[dict], csv_path):
    """The study section of a Markdown page: the table of rows and where it comes from."""
    first = rows[0] if rows else {}
    note = f"\n\n_{first.get('model', '')}, {first.get('epochs', '')} epochs; from `{csv_path}`._" if rows else ""
    replace_section(page, "study", markdown_table(rows) + note)


def plot_accuracy(rows: list[dict], path):
    fig, ax = plt.subplots(figsize=plot_trust_ratios.FIGSIZE, dpi=plot_trust_ratios.DPI)
    for method, label in METHODS.items():
        points = sorted((int(r["batch"]), 100 * float(r["top1"])) for r in rows if r["method"] == method)
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("global batch size")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("CIFAR-10, fixed epoch budget: accuracy against batch size")
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/study", help="results, plots and run workdirs")
    parser.add_argument("--data_dir", default="", help="CIFAR-10 image folder (default: extract the shared archive)")
    parser.add_argument("--batches", default="128,256,512,1024,2048,4096,8192")
    parser.add_argument("--methods", default="sgd,lars")
    parser.add_argument("--model", default="cifar_resnet8")
    parser.add_argument("--epochs", type=float, default=6.0)
    parser.add_argument("--bn_group", type=int, default=64, help="BatchNorm ghost-batch size, every cell")
    parser.add_argument("--micro", type=int, default=256, help="largest micro-batch per device")
    parser.add_argument("--warmup", type=float, default=0.2, help="warmup as a fraction of the epochs")
    parser.add_argument(
        "--trust_coefficient",
        type=float,
        default=0.01,
        help="LARS eta (configs/cifar10_lars.py has 1e-3; 0.01 trained the small CIFAR ResNets faster here)",
    )
    parser.add_argument("--eval_batch", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=0, help="> 0: that many steps per run (smoke tests)")
    parser.add_argument("--num_cpu_devices", type=int, default=os.cpu_count())
    parser.add_argument("--page", default="", help="Markdown page whose study section gets the table")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {unknown}; choose from {list(METHODS)}.")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir or cifar_data.extract()
    csv_path = out / "results.csv"
    rows = read_csv(csv_path) if csv_path.exists() else []
    for batch in batches:
        for method in methods:
            if not any(r["method"] == method and int(r["batch"]) == batch for r in rows):
                rows.append(run_cell(method, batch, data_dir, args))
                write_csv(rows, csv_path)  # after every cell, so an interruption keeps it
    rows = read_csv(csv_path)  # what README and plots show is what the CSV holds
    plot_accuracy(rows, out / "accuracy.png")
    if "lars" in methods:
        logs = out / "logs"
        small, large = run_name("lars", min(batches)), run_name("lars", max(batches))
        plot_trust_ratio_comparison(logs / small, logs / large, out / "trust_ratios.png")
    if args.page:
        update_page(args.page, rows, csv_path)
    print(markdown_table(rows))
    return rows


if __name__ == "__main__":
    main()
