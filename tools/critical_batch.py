"""How large a batch can this model use? The gradient noise scale a run logged, and what it implies.

    python -m tools.critical_batch WORKDIR [WORKDIR ...] [--accuracy 0.7 | --step N] [--batch B ...]

For each workdir: B_simple (and, in LARS runs, as LARS sees it) at the logged steps; at the step
asked for (the first evaluation reaching --accuracy on the periodic split, or --step; default the
last log step); and, taking B_crit = B_simple there (McCandlish et al. find the two close), the
tradeoff of steps against examples at each batch: S / S_min = 1 + B_crit / B and
E / E_min = 1 + B / B_crit. A batch of B_crit costs twice the fewest steps and twice the fewest
images; far below it, more images per step buy proportionally fewer steps; far above it they buy
almost none. The plot (--plot) shows B_simple over training for every workdir.

Reads metrics.jsonl only (no JAX), so it runs beside a training run, on any machine.
"""

import argparse
import json
import math
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import optimize  # noqa: E402

from tools import plot_trust_ratios  # noqa: E402

METRICS_FILE = plot_trust_ratios.METRICS_FILE
CONFIG_FILE = "config.json"  # run_files.CONFIG_FILE
PLAIN, LARS = "grad_noise_scale", "grad_noise_scale_lars"


def read_records(workdir) -> list[dict]:
    """The records of a workdir's metrics.jsonl (a line a killed run left half-written is skipped)."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{workdir} has no {METRICS_FILE}: not a training run's workdir.")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def noise_records(records: list[dict]) -> list[dict]:
    """The train records that hold B_simple."""
    return [r for r in records if r["kind"] == "train" and PLAIN in r]


def crossing_step(records: list[dict], accuracy: float, split: str | None = None) -> int | None:
    """The first evaluated step whose top-1 on `split` (default: the first split evaluated) reaches `accuracy`."""
    evals = [r for r in records if r["kind"] == "eval"]
    split = split or (evals[0]["split"] if evals else None)
    return next((r["step"] for r in evals if r["split"] == split and r["eval_top1"] >= accuracy), None)


def noise_at(records: list[dict], step: int) -> dict | None:
    """The train record holding B_simple logged nearest to `step` (the moving average there)."""
    logged = noise_records(records)
    return min(logged, key=lambda r: abs(r["step"] - step), default=None)


def tradeoff(batch, critical_batch: float):
    """Steps relative to S_min and examples relative to E_min at `batch`, from
    (S / S_min - 1)(E / E_min - 1) = 1 with B_crit = E_min / S_min = `critical_batch`.

    Returns:
      (S / S_min, E / E_min) = (1 + B_crit / B, 1 + B / B_crit).

    References:
      McCandlish et al., "An Empirical Model of Large-Batch Training", arXiv:1812.06162, equation 2.11.
    """
    batch = np.asarray(batch, np.float64)
    return 1.0 + critical_batch / batch, 1.0 + batch / critical_batch


def fit_steps(batches, steps) -> tuple[float, float]:
    """Least-squares fit of S(B) = S_min (1 + B_crit / B) to steps to a target, in log space (each
    point's relative error counts the same).

    Args:
      batches: the batch sizes B (at least two).
      steps: the steps S each took to the target.

    Returns:
      (S_min, B_crit).

    References:
      McCandlish et al., arXiv:1812.06162, equation 2.11 and section 4.
    """
    batches, steps = np.asarray(batches, np.float64), np.asarray(steps, np.float64)

    def log_steps(b, log_s_min, log_b_crit):
        return log_s_min + np.log1p(np.exp(log_b_crit) / b)

    start = (np.log(steps.min()), np.log(np.median(batches)))
    (log_s_min, log_b_crit), _ = optimize.curve_fit(log_steps, batches, np.log(steps), p0=start)
    return float(np.exp(log_s_min)), float(np.exp(log_b_crit))


def default_batches(run_batch: int, critical: float) -> list[int]:
    """Powers of 2 around the run's batch and B_crit, and the run's batch."""
    low = min(run_batch, critical) / 8
    high = max(run_batch, critical) * 8
    powers = [2**k for k in range(max(0, math.floor(math.log2(low))), math.ceil(math.log2(high)) + 1)]
    return sorted(set(powers[:: max(1, len(powers) // 8)] + [run_batch]))


def describe(workdir, args) -> list[str]:
    """The report of one workdir, as lines."""
    records = read_records(workdir)
    logged = noise_records(records)
    config = json.loads((pathlib.Path(workdir) / CONFIG_FILE).read_text())
    name = f"{workdir} ({config['optimizer']}, batch {config['batch_size']})"
    if not logged:
        return [f"{name}: no gradient noise scale logged (a run from before it, or with noise_scale off)."]
    lines = [
        f"{name}:",
        "   step   train loss   B_simple" + ("   B_simple as LARS sees it" if LARS in logged[-1] else ""),
    ]
    for record in logged[:: max(1, len(logged) // args.rows)]:
        lars = f"   {record[LARS]:>12,.0f}" if LARS in record else ""
        lines.append(f"  {record['step']:>5}   {record['loss']:>10.4f}   {record[PLAIN]:>8,.0f}{lars}")
    if args.accuracy is not None:
        step = crossing_step(records, args.accuracy)
        if step is None:
            return lines + [f"  top-1 never reached {args.accuracy:g} in the evaluations logged."]
        where = f"step {step}, where top-1 first reached {args.accuracy:g}"
    else:
        step = args.step if args.step is not None else logged[-1]["step"]
        where = f"step {step}"
    record = noise_at(records, step)
    critical = record[PLAIN]
    lars = f" ({record[LARS]:,.0f} as LARS sees it)" if LARS in record else ""
    lines.append(f"  At {where} (logged at step {record['step']}): B_simple = {critical:,.0f}{lars}.")
    lines.append(f"  Taking B_crit = {critical:,.0f}: steps and images to the same loss, relative to their minima:")
    lines.append("    batch   steps / S_min   images / E_min")
    batches = args.batch or default_batches(config["batch_size"], critical)
    for batch, (steps, examples) in zip(batches, zip(*tradeoff(batches, critical))):
        lines.append(f"  {batch:>7}   {steps:>13.2f}   {examples:>14.2f}")
    return lines


def plot(workdirs, path):
    """`plot_noise_scale` into a PNG file."""
    fig, ax = plt.subplots(figsize=plot_trust_ratios.FIGSIZE, dpi=plot_trust_ratios.DPI)
    plot_noise_scale(workdirs, ax)
    fig.savefig(path)
    plt.close(fig)


def plot_noise_scale(workdirs, ax) -> int:
    """B_simple over training steps for every workdir on `ax` (log scale), LARS's view dashed.

    Returns:
      How many of the workdirs logged it.
    """
    drawn = 0
    for workdir in workdirs:
        logged = noise_records(read_records(workdir))
        if not logged:
            continue
        drawn += 1
        steps = [r["step"] for r in logged]
        (line,) = ax.plot(steps, [r[PLAIN] for r in logged], label=f"{pathlib.Path(workdir).name}: B_simple")
        if LARS in logged[-1]:
            lars = [r.get(LARS, np.nan) for r in logged]
            ax.plot(
                steps, lars, ls="--", color=line.get_color(), label=f"{pathlib.Path(workdir).name}: as LARS sees it"
            )
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("gradient noise scale B_simple (examples)")
    ax.set_title("B_simple = tr(Sigma) / |G|^2 over training (McCandlish et al.): about the critical batch")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    return drawn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="training runs' workdirs")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--accuracy", type=float, help="at the first evaluation reaching this top-1 (e.g. 0.7)")
    where.add_argument("--step", type=int, help="at this step (default: the last logged)")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes of the tradeoff table (repeatable)")
    parser.add_argument("--rows", type=int, default=20, help="about this many logged steps printed per run")
    parser.add_argument("--plot", default="critical_batch.png", help="the plot of B_simple over training")
    args = parser.parse_args(argv)
    try:
        for workdir in args.workdirs:
            print("\n".join(describe(workdir, args)))
        plot(args.workdirs, args.plot)
    except (ValueError, KeyError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
