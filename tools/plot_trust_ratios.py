"""Plots of the per-layer LARS trust ratios a training run logged.

    python -m tools.plot_trust_ratios WORKDIR [OTHER_WORKDIR ...] --out DIR

Writes to DIR:
  trust_ratios.png   per layer, the trust ratio over steps (log scale)
  norms.png          per layer, ||w|| and ||g|| over steps
  effective_lr.png   per layer, scheduled LR x trust ratio, against the global LR
  heatmap.png        layers (network order) x steps, log10 trust ratio; excluded layers marked
  compare.png        with several workdirs: each run's trust ratio per layer at its last step

The notebook notebooks/trust_ratios.ipynb draws the same figures with these functions.
"""

import argparse
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

METRICS_FILE = "metrics.jsonl"  # run_files.METRICS_FILE; read here without importing JAX
TRUST_RATIOS_FILE = "trust_ratios.jsonl"  # run_files.TRUST_RATIOS_FILE
FIGSIZE, DPI = (10, 6), 100  # every figure is 1000 x 600 pixels


class TrustRatioLog:
    """The trust-ratio log of one run as arrays: [steps] and [layers, steps]."""

    def __init__(self, workdir):
        self.workdir = pathlib.Path(workdir)
        records = [json.loads(line) for line in (self.workdir / TRUST_RATIOS_FILE).read_text().splitlines()]
        if not records:
            raise ValueError(f"{self.workdir / TRUST_RATIOS_FILE} is empty.")
        self.layers = list(records[0]["layers"])  # network order, as train.py writes it
        self.steps = np.array([r["step"] for r in records])
        self.learning_rate = np.array([r["learning_rate"] for r in records])

        def field(name):
            return np.array([[r["layers"][layer][name] for r in records] for layer in self.layers], dtype=float)

        self.trust_ratio = field("trust_ratio")
        self.param_norm = field("param_norm")
        self.grad_norm = field("grad_norm")
        self.excluded = np.array([records[0]["layers"][layer]["excluded"] for layer in self.layers])

    @property
    def lars_layers(self) -> list[int]:
        return [i for i, excluded in enumerate(self.excluded) if not excluded]

    def at_step(self, step: int) -> dict[str, float]:
        """{layer: trust ratio} logged at `step`."""
        column = int(np.nonzero(self.steps == step)[0][0])
        return dict(zip(self.layers, self.trust_ratio[:, column]))


def load_metrics(workdir, kind: str = "train") -> list[dict]:
    lines = (pathlib.Path(workdir) / METRICS_FILE).read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _figure(title):
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    ax.set_title(title)
    return fig, ax


def _colors(n):
    return plt.cm.viridis(np.linspace(0, 1, max(n, 1)))


def plot_trust_ratios(log: TrustRatioLog):
    fig, ax = _figure(f"LARS trust ratio per layer ({log.workdir.name})")
    layers = log.lars_layers
    for color, i in zip(_colors(len(layers)), layers):
        ax.plot(log.steps, log.trust_ratio[i], color=color, lw=1, label=log.layers[i])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("trust ratio  eta ||w|| / (||g|| + beta ||w||)")
    _legend(ax, len(layers))
    return fig


def plot_norms(log: TrustRatioLog):
    fig, (left, right) = plt.subplots(1, 2, figsize=FIGSIZE, dpi=DPI)
    layers = log.lars_layers
    for color, i in zip(_colors(len(layers)), layers):
        left.plot(log.steps, log.param_norm[i], color=color, lw=1, label=log.layers[i])
        right.plot(log.steps, log.grad_norm[i], color=color, lw=1)
    for ax, name in ((left, "||w||"), (right, "||g||")):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(f"{name} per layer")
    _legend(left, len(layers))
    return fig


def plot_effective_lr(log: TrustRatioLog):
    fig, ax = _figure("Effective per-layer learning rate (scheduled LR x trust ratio)")
    layers = log.lars_layers
    for color, i in zip(_colors(len(layers)), layers):
        ax.plot(log.steps, log.learning_rate * log.trust_ratio[i], color=color, lw=1, label=log.layers[i])
    ax.plot(log.steps, log.learning_rate, color="red", lw=2, ls="--", label="global LR")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    _legend(ax, len(layers) + 1)
    return fig


def plot_heatmap(log: TrustRatioLog):
    fig, ax = _figure("log10 trust ratio, layers in network order (excluded layers hatched)")
    values = np.log10(np.maximum(log.trust_ratio, 1e-12))
    masked = np.ma.masked_where(np.repeat(log.excluded[:, None], len(log.steps), axis=1), values)
    image = ax.imshow(masked, aspect="auto", interpolation="nearest", cmap="magma")
    for row in np.nonzero(log.excluded)[0]:
        ax.axhspan(row - 0.5, row + 0.5, facecolor="lightgrey", hatch="///", edgecolor="grey", lw=0)
    ticks = np.linspace(0, len(log.steps) - 1, min(8, len(log.steps))).astype(int)
    ax.set_xticks(ticks, [str(log.steps[t]) for t in ticks])
    if len(log.layers) <= 40:
        ax.set_yticks(range(len(log.layers)), log.layers, fontsize=6)
    ax.set_xlabel("step")
    fig.colorbar(image, ax=ax)
    return fig


def plot_compare(logs: list[TrustRatioLog]):
    fig, ax = _figure("Trust ratio per layer at the last logged step")
    for color, log in zip(plt.cm.tab10.colors, logs):
        layers = log.lars_layers
        ax.plot(range(len(layers)), log.trust_ratio[layers, -1], "o-", color=color, ms=3,
                label=f"{log.workdir.name} (step {log.steps[-1]})")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel("LARS layer, network order")
    ax.set_ylabel("trust ratio")
    ax.legend(fontsize=8)
    return fig


def _legend(ax, n):
    if n <= 24:
        ax.legend(fontsize=6, ncol=2)


def write_all(workdirs, out) -> list[pathlib.Path]:
    """Writes every figure for the runs in `workdirs`; returns the PNG paths."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    logs = [TrustRatioLog(w) for w in workdirs]
    figures = {
        "trust_ratios.png": plot_trust_ratios(logs[0]),
        "norms.png": plot_norms(logs[0]),
        "effective_lr.png": plot_effective_lr(logs[0]),
        "heatmap.png": plot_heatmap(logs[0]),
    }
    if len(logs) > 1:
        figures["compare.png"] = plot_compare(logs)
    paths = []
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=DPI)
        plt.close(fig)
        paths.append(out / name)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    for path in write_all(args.workdirs, args.out):
        print(path)


if __name__ == "__main__":
    sys.exit(main())
