"""The study's critical-batch view (docs/study.md): McCandlish et al.'s S(B) = S_min (1 + B_crit / B)
fitted to each method's steps to target, and beside it the gradient noise scale B_simple that the
noise-scale reruns (tools/study.py, OUT/noise_scale.csv) measured where their validation top-1 crossed
the target. tools/study.py calls `write` with the study's runs."""

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tools import critical_batch, plot_trust_ratios  # noqa: E402
from tools.markdown import replace_section  # noqa: E402
from tools.study_report import METHODS, cell_rows, fewest_steps, fits, run_name  # noqa: E402

SECTION = "critical-batch"


def fit_table(fitted: dict) -> str:
    """A row per method: B_crit, S_min, and each batch's steps against the fit's."""
    if not fitted:
        return ""
    batches = [b for b, _ in next(iter(fitted.values()))[0]]
    lines = [
        "| method | fitted B_crit | S_min | " + " | ".join(f"{b}: steps (fit, residual)" for b in batches) + " |",
        "|---|---|---|" + "---|" * len(batches),
    ]
    for method, (points, s_min, b_crit) in fitted.items():
        cells = []
        for batch, steps in points:
            model = s_min * (1 + b_crit / batch)
            cells.append(f"{steps:,} ({model:,.0f}, {100 * (steps / model - 1):+.0f}%)")
        lines.append(f"| {METHODS[method]} | {b_crit:,.0f} | {s_min:,.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rerun_name(row: dict) -> str:
    """The folder of the noise-scale rerun a row of noise_scale.csv records."""
    return run_name(row["method"], int(row["batch"]), float(row["lr"]), int(row["seed"]), float(row["epochs"]), True)


def measured(noise_rows: list[dict], out, target: float) -> list[dict]:
    """Per noise-scale rerun: its cell, its own step to target, and B_simple (plain and as LARS sees it)
    logged nearest to that step (None where the rerun did not reach the target)."""
    results = []
    for row in noise_rows:
        records = critical_batch.read_records(pathlib.Path(out) / "logs" / rerun_name(row))
        step = critical_batch.crossing_step(records, target, "validation")
        record = critical_batch.noise_at(records, step) if step is not None else None
        results.append(
            dict(
                method=row["method"],
                batch=int(row["batch"]),
                lr=row["lr"],
                step=step,
                plain=record and record.get(critical_batch.PLAIN),
                lars=record and record.get(critical_batch.LARS),
            )
        )
    return results


def noise_table(results: list[dict], stage_a: list[dict]) -> str:
    """A row per rerun: the run it repeats, its steps to target against the recorded run's, and B_simple."""
    if not results:
        return ""
    lines = [
        "| method | batch | LR | the cell's | steps to target (recorded run) | B_simple there | as LARS sees it |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(results, key=lambda r: (r["method"], r["batch"], float(r["lr"]))):
        cell = cell_rows(stage_a, r["method"], r["batch"])
        recorded = next((c for c in cell if c["lr"] == r["lr"]), None)
        role = "fewest steps" if recorded is fewest_steps(cell) else "chosen on validation"
        steps = f"{r['step']:,}" if r["step"] is not None else "not reached"
        steps += f" ({int(recorded['steps_to_target']):,})" if recorded and recorded["steps_to_target"] else ""
        plain = f"{r['plain']:,.0f}" if r["plain"] is not None else "-"
        lars = f"{r['lars']:,.0f}" if r["lars"] is not None else "-"
        lines.append(f"| {METHODS[r['method']]} | {r['batch']} | {r['lr']} | {role} | {steps} | {plain} | {lars} |")
    return "\n".join(lines)


def plot_noise_scale(noise_rows: list[dict], out, fitted: dict, path):
    """B_simple over training in every rerun (plain solid, LARS's view dashed), against the fraction of
    the run, with each method's fitted B_crit as a horizontal line."""
    fig, ax = plt.subplots(figsize=plot_trust_ratios.FIGSIZE, dpi=plot_trust_ratios.DPI)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for row in noise_rows:
        logged = critical_batch.noise_records(critical_batch.read_records(pathlib.Path(out) / "logs" / rerun_name(row)))
        if not logged:
            continue
        fraction = np.array([r["step"] for r in logged]) / int(row["steps"])
        width = 0.6 + 0.6 * np.log2(int(row["batch"]) / 128) / 6
        label = f"{row['method']} {row['batch']} (LR {row['lr']})"
        ax.plot(fraction, [r[critical_batch.PLAIN] for r in logged], color=colors[row["method"]], lw=width, label=label)
        if critical_batch.LARS in logged[-1]:
            ax.plot(fraction, [r.get(critical_batch.LARS, np.nan) for r in logged], ls="--",
                    color=colors[row["method"]], lw=width)  # fmt: skip
    for method, (_, _, b_crit) in fitted.items():
        ax.axhline(b_crit, color=colors[method], ls=":", lw=2, label=f"{method}: fitted B_crit {b_crit:,.0f}")
    ax.set_yscale("log")
    ax.set_xlabel("fraction of training (50 epochs)")
    ax.set_ylabel("B_simple (examples)")
    ax.set_title("Gradient noise scale over training (dashed: as LARS sees it; dotted: fitted B_crit)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path)
    plt.close(fig)


def section(stage_a, noise_rows, methods, batches, out, target: float) -> str:
    """The page section: the fit, its residuals, and the reruns' noise scales."""
    fitted = fits(stage_a, methods, batches)
    text = (
        f"S(B) = S_min (1 + B_crit / B) fitted by least squares in log space to each method's fewest steps to "
        f"{100 * target:g}% validation (residual: measured over fitted):\n\n" + (fit_table(fitted) or "not fitted yet")
    )
    results = measured(noise_rows, out, target)
    text += (
        f"\n\nThe gradient noise scale B_simple (moving average over 5% of the run) where each noise-scale "
        f"rerun's validation top-1 first reached {100 * target:g}%; in parentheses the steps of the recorded run it "
        f"repeats (a rerun on another CPU rounds differently, and its training can part from the recorded one):\n\n"
        + (noise_table(results, stage_a) or "no rerun finished yet")
    )
    return text + f"\n\n_{len(noise_rows)} noise-scale reruns, from `{pathlib.Path(out) / 'noise_scale.csv'}`._"


def write(rows: list[dict], noise_rows: list[dict], methods, batches, args, out):
    """The plot (OUT/noise_scale.png, once a rerun has finished) and the critical-batch section of each
    --page that has one."""
    stage_a = [r for r in rows if float(r["epochs"]) == args.epochs]
    fitted = fits(stage_a, methods, batches)
    if noise_rows:
        plot_noise_scale(noise_rows, out, fitted, pathlib.Path(out) / "noise_scale.png")
    text = section(stage_a, noise_rows, methods, batches, out, args.target)
    for page in args.page:
        if f"<!-- {SECTION}:begin -->" in pathlib.Path(page).read_text():
            replace_section(page, SECTION, text)
    print(text)
