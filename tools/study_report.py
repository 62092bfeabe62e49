"""The batch-size study's views of its runs (docs/study.md): which run each cell chose, the tables
on the pages, and the plots. tools/study.py runs the study and calls `write`."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from configs import cifar10_study  # noqa: E402
from tools import critical_batch, plot_trust_ratios  # noqa: E402
from tools.markdown import replace_section  # noqa: E402

STUDY_EPOCHS = cifar10_study.get_config().num_epochs  # Stage A's budget

METHODS = {
    "sgd": "momentum SGD, linear scaling",
    "lars": "LARS",
    "nesterov": "Nesterov momentum, linear scaling",
}


def run_name(method: str, batch: int, lr: float, seed: int = 0, epochs: float = STUDY_EPOCHS, noise: bool = False):
    """A run's folder: e.g. lars_b8192_lr2.828, with _seed1 for other seeds, _e200 for Stage B and
    _noise for a noise-scale rerun."""
    name = f"{method}_b{batch}_lr{lr:g}" + (f"_seed{seed}" if seed else "")
    return name + (f"_e{epochs:g}" if epochs != STUDY_EPOCHS else "") + ("_noise" if noise else "")


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


def fits(stage_a: list[dict], methods, batches) -> dict[str, tuple[list[tuple[int, int]], float, float]]:
    """{method: ([(batch, fewest steps to target)], S_min, B_crit)} for the methods with every batch
    reaching the target (at least two batches)."""
    out = {}
    for method in methods:
        points = [(b, fewest_steps(cell_rows(stage_a, method, b))) for b in batches]
        points = [(b, int(r["steps_to_target"])) for b, r in points if r is not None]
        if len(points) == len(batches) >= 2:
            out[method] = (points, *critical_batch.fit_steps(*zip(*points)))
    return out


def stage_rows(rows: list[dict], epochs: float) -> list[dict]:
    """The runs of one stage: those of its budget in epochs."""
    return [r for r in rows if float(r["epochs"]) == epochs]


def stage_b_due(args, batches) -> bool:
    """Whether this study has a Stage B: its batch among Stage A's, at another budget."""
    return args.stage_b_epochs > 0 and args.stage_b_batch in batches and args.stage_b_epochs != args.epochs


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


def mean_percent(runs: list[dict], column: str) -> float:
    """The mean of a top-1 column over runs (its seeds), in percent."""
    return float(np.mean([100 * float(r[column]) for r in runs]))


def budget_text(rows: list[dict], method: str, batch: int) -> str:
    """Test top-1 % (validation %, LR, steps) of the chosen learning rate; over several seeds the means,
    and the test range."""
    runs = budget_runs(rows, method, batch)
    if not runs:
        return ""
    test = [100 * float(r["test_top1"]) for r in runs]
    validation = mean_percent(runs, "final_validation_top1")
    text = f"{mean_percent(runs, 'test_top1'):.1f} ({validation:.1f}, {runs[0]['lr']}, {runs[0]['steps']}"
    return text + (f"; {len(runs)} seeds: {min(test):.1f}-{max(test):.1f})" if len(runs) > 1 else ")")


def steps_table(rows: list[dict], methods, batches) -> str:
    return batch_by_method_table(rows, methods, batches, "steps (LR)", steps_text)


def budget_table(rows: list[dict], methods, batches) -> str:
    heading = "test top-1 % (validation %, LR, steps; seeds: test range)"
    return batch_by_method_table(rows, methods, batches, heading, budget_text)


def signed_points(points: float) -> str:
    """A difference in points to one decimal, signed; one that rounds to zero reads +0.0, not -0.0."""
    return f"{round(points, 1) + 0.0:+.1f}"


def gap_table(rows: list[dict], methods, batches) -> str:
    """The claim in points of test top-1, from the means over the seeds of each cell's chosen learning
    rate: each method against the smallest batch's reference (the method there with the better mean
    validation top-1) and, with both methods, LARS minus momentum SGD at each batch. Empty before the
    smallest batch has a run."""
    small = min(batches)
    chosen = {m: runs for m in methods if (runs := budget_runs(rows, m, small))}
    if not chosen:
        return ""
    reference = max(chosen, key=lambda m: mean_percent(chosen[m], "final_validation_top1"))
    base = mean_percent(chosen[reference], "test_top1")
    both = "sgd" in methods and "lars" in methods
    lines = [
        f"The same means in points of test top-1, against batch {small}'s {base:.1f} ({METHODS[reference]}, the "
        f"better validation top-1 there){', and LARS against momentum SGD' if both else ''}:",
        "",
        "| batch | " + " | ".join(METHODS[m] for m in methods) + (" | LARS - SGD |" if both else " |"),
        "|---|" + "---|" * (len(methods) + both),
    ]
    for batch in batches:
        means = {m: mean_percent(runs, "test_top1") for m in methods if (runs := budget_runs(rows, m, batch))}
        cells = [signed_points(means[m] - base) if m in means else "not run yet" for m in methods]
        if both:
            cells.append(
                signed_points(means["lars"] - means["sgd"]) if {"sgd", "lars"} <= means.keys() else "not run yet"
            )
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def stage_b_table(rows: list[dict], methods, args) -> str:
    """Stage B's two views, one row per method."""
    runs, batch = stage_rows(rows, args.stage_b_epochs), args.stage_b_batch
    lines = [
        f"| method | steps to {100 * args.target:g}% (LR) | test top-1 % (validation %, LR, steps) |",
        "|---|---|---|",
    ]
    for method in methods:
        views = [steps_text(runs, method, batch), budget_text(runs, method, batch)]
        lines.append(f"| {METHODS[method]} | " + " | ".join(v or "not run yet" for v in views) + " |")
    return "\n".join(lines)


def stage_b_runs_table(rows: list[dict], methods, args) -> str:
    """Every Stage B run, a row each by method and learning rate; the one each method chose on validation
    is marked. Empty before Stage B's first run."""
    runs, batch = stage_rows(rows, args.stage_b_epochs), args.stage_b_batch
    lines = []
    for method in methods:
        sweep = cell_rows(runs, method, batch)
        chosen = best_at_budget(sweep)
        for run in sweep:
            lr = run["lr"] + (" (chosen)" if run is chosen else "")
            steps = run["steps_to_target"] or f"not in {run['steps']}"
            percents = [f"{100 * float(run[c]):.1f}" for c in ("final_validation_top1", "test_top1", "test_top5")]
            lines.append(f"| {METHODS[method]} | {lr} | {steps} | " + " | ".join(percents) + " |")
    if not lines:
        return ""
    heading = (
        f"| method | LR | steps to {100 * args.target:g}% | final validation top-1 % | test top-1 % | test top-5 % |"
    )
    return "\n".join([heading, "|---|---|---|---|---|---|", *lines])


def update_pages(pages, rows: list[dict], methods, batches, args, csv_path):
    """The study section of each Markdown page: the tables of both stages and where they come from."""
    stage_a = stage_rows(rows, args.epochs)
    text = (
        f"Steps to {100 * args.target:g}% validation top-1 (fewest over the learning-rate sweep; LR of that run):\n\n"
        + steps_table(stage_a, methods, batches)
        + f"\n\nTest top-1 after {budget(args)} (the learning rate with the best final validation top-1; "
        "over its seeds, the means):\n\n" + budget_table(stage_a, methods, batches)
    )
    if gaps := gap_table(stage_a, methods, batches):
        text += "\n\n" + gaps
    if stage_b_due(args, batches):
        text += (
            f"\n\nStage B: batch {args.stage_b_batch} for {args.stage_b_epochs:g} epochs, each method's learning "
            "rate swept around Stage A's choice at that batch (run once Stage A is complete; one seed each):\n\n"
            + stage_b_table(rows, methods, args)
        )
        if runs_table := stage_b_runs_table(rows, methods, args):
            text += "\n\nEach Stage B run (seed 0):\n\n" + runs_table
    text += f"\n\n_{len(rows)} runs, from `{csv_path}`._"
    for page in pages:
        replace_section(page, "study", text)


def budget(args) -> str:
    return f"{args.steps} steps" if args.steps else f"{args.epochs:g} epochs"


def plot_steps_to_target(rows, methods, batches, target, path):
    """Fewest steps to target against batch size, with perfect scaling (dotted) and, where every batch
    reached it, the fit of S(B) = S_min (1 + B_crit / B) (dashed)."""
    fig, ax = plt.subplots(figsize=plot_trust_ratios.FIGSIZE, dpi=plot_trust_ratios.DPI)
    fitted = fits(rows, methods, batches)
    for method in methods:
        points = [(b, fewest_steps(cell_rows(rows, method, b))) for b in batches]
        points = [(b, int(r["steps_to_target"])) for b, r in points if r]
        if points:
            ax.plot(*zip(*points), marker="o", label=METHODS[method])
            color = ax.lines[-1].get_color()
            b0, s0 = points[0]
            ax.plot(batches, [s0 * b0 / b for b in batches], ls=":", color=color, lw=1)
        if method in fitted:
            _, s_min, b_crit = fitted[method]
            grid = np.geomspace(min(batches), max(batches), 50)
            ax.plot(grid, s_min * (1 + b_crit / grid), ls="--", color=color, lw=1,
                    label=f"{METHODS[method]}: fit, B_crit {b_crit:,.0f}")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("global batch size")
    ax.set_ylabel(f"steps to {100 * target:g}% validation top-1")
    ax.set_title("CIFAR-10: steps to target (dotted: perfect scaling; dashed: S_min (1 + B_crit / B))")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path)
    plt.close(fig)


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


def write(rows: list[dict], methods, batches, args, out, csv_path, trust_ratio_logs=None):
    """The plots (trust ratios: of the two LARS workdirs' logs given, smallest and largest batch), the
    pages' tables, and the tables printed."""
    stage_a = stage_rows(rows, args.epochs)
    plot_steps_to_target(stage_a, methods, batches, args.target, out / "steps_to_target.png")
    plot_accuracy(stage_a, methods, batches, budget(args), out / "accuracy.png")
    if trust_ratio_logs:
        plot_trust_ratio_comparison(*trust_ratio_logs, out / "trust_ratios.png")
    update_pages(args.page, rows, methods, batches, args, csv_path)
    print(steps_table(stage_a, methods, batches))
    print(budget_table(stage_a, methods, batches))
    print(gap_table(stage_a, methods, batches))
    if stage_b_due(args, batches):
        print(stage_b_table(rows, methods, args))
