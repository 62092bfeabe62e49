"""Time to train on N CPU nodes: measured compute per node plus a ring all-reduce per step.

    python -m tools.scaling_model --out docs/scaling --page docs/scaling.md
    python -m tools.scaling_model --measure ...   # re-time our steps here first (bench.bench_step)
    python -m tools.scaling_model --allreduce=docs/scaling/allreduce.json ...   # also with measured terms

Model, per synchronous data-parallel step at global batch B on N nodes:

    compute   = (B / N) / r_node                       images per node / node rate
    allreduce = 2 (N-1) alpha + 2 (N-1)/N * 4P / beta  ring all-reduce of P float32 gradients
    time      = epochs * images / B * (compute + allreduce)   (no overlap: an upper bound)

r_node, the per-node training rate, is calibrated from our step measured on this
machine scaled by peak FLOP/s (the node reaches the same fraction of its peak as
our step reaches here), and, where the paper's coverage gives a single-node
figure, from that (ResNet-50 on Skylake: 90 epochs in 32 min on 1,600 processors
at ~73% scaling efficiency). alpha and beta default to Omni-Path (100 Gb/s, the
Stampede2 interconnect) with 2 us latency. `--allreduce` adds a second
prediction with alpha and beta fitted by bench/bench_allreduce.py (gloo over
veth pairs between network namespaces on this machine, 2 hosts: one core per
process), side by side with the assumed ones. veth is not Omni-Path: its
alpha includes JAX's dispatch and TCP on a shared kernel, its beta is a
memory copy by the same cores.

References:
  You, Zhang, Hsieh, Demmel, Keutzer, arXiv:1709.05011 (11 min AlexNet on 1,024
  Skylake CPUs; 20 min ResNet-50 on 2,048 Xeon Phi 7250).
  Patarasuk and Yuan, "Bandwidth optimal all-reduce algorithms", 2009 (ring cost).
"""

import argparse
import csv
import json
import pathlib

import matplotlib

from tools.markdown import replace_section

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

IMAGENET_TRAIN = 1_281_167
# Peak float32 FLOP/s: cores x clock x FLOP/cycle (two AVX-512 FMA units: 2 x 16 lanes x 2).
NODE_PEAK = {
    "skylake": 48 * 2.1e9 * 64,  # 2x Xeon Platinum 8160: 48 cores, 2.1 GHz
    "knl": 68 * 1.4e9 * 64,  # Xeon Phi 7250: 68 cores, 1.4 GHz
}
# (network, parameters, epochs, global batch, node type, nodes, published minutes)
PAPER = [
    ("alexnet_bn", 62_379_720, 100, 32768, "skylake", 1024, 11.0),
    ("resnet50", 25_557_032, 90, 32768, "knl", 2048, 20.0),
    ("resnet50", 25_557_032, 90, 32768, "skylake", 1600, 32.0),  # from the coverage; batch assumed 32K
]
# Our train step (bench/RESULTS.md, "Training step on a 2-core Intel CPU with AMX (2026-12-02)":
# the oneDNN float32 step, ResNet-50 at batch 16, AlexNet-BN at 64, best of 3), images/s, and that
# machine's float32 matmul peak in the same run, FLOP/s.
MEASURED = {"alexnet_bn": 49.76, "resnet50": 9.35}
HERE_PEAK = 362e9
# ResNet-50 on Skylake from the paper's coverage: 90 epochs, 32 min, 1,600 processors, ~73% efficiency.
PUBLISHED_SKYLAKE_RESNET50 = 90 * IMAGENET_TRAIN / (32 * 60) / 1600 / 0.73


def allreduce_seconds(num_nodes: int, num_params: int, latency: float, bandwidth: float) -> float:
    """Ring all-reduce of num_params float32 values: 2(N-1) latency-bound hops, 2(N-1)/N of the bytes each way."""
    if num_nodes == 1:
        return 0.0
    return 2 * (num_nodes - 1) * latency + 2 * (num_nodes - 1) / num_nodes * 4 * num_params / bandwidth


def train_minutes(
    num_nodes: int, node_rate: float, num_params: int, epochs: float, batch: int, latency: float, bandwidth: float
) -> float:
    steps = epochs * IMAGENET_TRAIN / batch
    step = batch / num_nodes / node_rate + allreduce_seconds(num_nodes, num_params, latency, bandwidth)
    return steps * step / 60


def node_rate(network: str, node: str, measured: dict, here_peak: float) -> float:
    """Images/s of one node: our measured rate scaled by the ratio of peak FLOP/s."""
    return measured[network] * NODE_PEAK[node] / here_peak


def measured_terms(path, num_hosts: int = 2) -> tuple[float, float]:
    """(alpha s, beta bytes/s) of the ring fitted by bench/bench_allreduce.py for `num_hosts` hosts."""
    fitted = json.loads(pathlib.Path(path).read_text())["hosts"][str(num_hosts)]["fit"]
    return fitted["alpha_s"], fitted["beta_bytes_per_s"]


def predictions(
    measured: dict, here_peak: float, latency: float, bandwidth: float, terms: tuple[float, float] | None = None
) -> list[dict]:
    """One row per (PAPER entry, calibration); with `terms` (alpha, beta) also the all-reduce and
    minutes under those measured terms."""
    rows = []
    for network, params, epochs, batch, node, nodes, published in PAPER:
        rates = {"FLOP-scaled from this machine": node_rate(network, node, measured, here_peak)}
        if (network, node) == ("resnet50", "skylake"):
            # Circular for the 1,600-node row it comes from; shows what the all-reduce adds to it.
            rates["published single-node rate"] = PUBLISHED_SKYLAKE_RESNET50
        for calibration, rate in rates.items():
            minutes = train_minutes(nodes, rate, params, epochs, batch, latency, bandwidth)
            comm = allreduce_seconds(nodes, params, latency, bandwidth)
            row = {
                "network": network,
                "epochs": epochs,
                "batch": batch,
                "node": node,
                "nodes": nodes,
                "calibration": calibration,
                "node_img_s": round(rate, 1),
                "allreduce_ms": round(1e3 * comm, 1),
                "compute_ms": round(1e3 * batch / nodes / rate, 1),
                "predicted_min": round(minutes, 1),
                "paper_min": published,
            }
            if terms:
                row["allreduce_measured_ms"] = round(1e3 * allreduce_seconds(nodes, params, *terms), 1)
                row["predicted_measured_min"] = round(train_minutes(nodes, rate, params, epochs, batch, *terms), 1)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    measured = "allreduce_measured_ms" in rows[0]
    extra = " all-reduce, measured terms | predicted, measured terms |" if measured else ""
    lines = [
        "| network, epochs, batch | nodes | per-node rate (calibration) | compute + all-reduce per step "
        "(assumed terms) | predicted | paper |" + extra,
        "|---|---|---|---|---|---|" + ("---|---|" if measured else ""),
    ]
    for r in rows:
        line = (
            f"| {r['network']}, {r['epochs']}, {r['batch']} | {r['nodes']} {r['node']} "
            f"| {r['node_img_s']} img/s ({r['calibration']}) | {r['compute_ms']} + {r['allreduce_ms']} ms "
            f"| {r['predicted_min']} min | {r['paper_min']} min |"
        )
        if measured:
            line += f" {r['allreduce_measured_ms']} ms | {r['predicted_measured_min']} min |"
        lines.append(line)
    return "\n".join(lines)


def plot(measured: dict, here_peak: float, latency: float, bandwidth: float, path):
    fig, ax = plt.subplots(figsize=(10, 6), dpi=100)
    nodes = [2**k for k in range(0, 13)]
    for network, params, epochs, batch, node, paper_nodes, published in PAPER:
        rate = node_rate(network, node, measured, here_peak)
        minutes = [train_minutes(n, rate, params, epochs, batch, latency, bandwidth) for n in nodes]
        (line,) = ax.plot(nodes, minutes, marker=".", label=f"{network}, {epochs} epochs, {node} (model)")
        ax.plot([paper_nodes], [published], marker="*", ms=14, color=line.get_color(), ls="none",
                label=f"{network}: paper, {paper_nodes} nodes")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("nodes")
    ax.set_ylabel("minutes to train (batch 32K)")
    ax.set_title("Scaling model: compute per node + ring all-reduce per step")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.savefig(path)
    plt.close(fig)


def measure() -> tuple[dict, float]:
    """Our train step's images/s here (bench.bench_step, each network's larger batch) and the matmul peak."""
    from bench import bench_step, machine

    rates = {}
    for name in MEASURED:
        batch = bench_step.model(name).batches[-1]
        rates[name] = batch / bench_step.measure(bench_step.Cell("ours", name, batch, steps=3))
    return rates, machine.matmul_peak()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/scaling")
    parser.add_argument("--latency_us", type=float, default=2.0)
    parser.add_argument("--bandwidth_gbps", type=float, default=100.0)
    parser.add_argument("--measure", action="store_true", help="time our steps here instead of the recorded rates")
    parser.add_argument("--allreduce", default="", help="bench_allreduce.py's JSON: add predictions with its terms")
    parser.add_argument("--page", default="", help="Markdown page whose scaling section gets the table")
    args = parser.parse_args(argv)
    measured, here_peak = measure() if args.measure else (MEASURED, HERE_PEAK)
    latency, bandwidth = args.latency_us * 1e-6, args.bandwidth_gbps * 1e9 / 8
    terms = measured_terms(args.allreduce) if args.allreduce else None
    rows = predictions(measured, here_peak, latency, bandwidth, terms)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "scaling.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(measured, here_peak, latency, bandwidth, out / "scaling.png")
    table = markdown(rows)
    if args.page:
        replace_section(args.page, "scaling", table)
    print(f"measured here: {measured} img/s, peak {here_peak / 1e9:.0f} GFLOP/s")
    print(table)


if __name__ == "__main__":
    main()
