"""The gradient all-reduce across hosts: gloo over network-namespace hosts, fitted to a ring.

    sudo python -m bench.bench_allreduce [--hosts 2 4] [--out docs/scaling/allreduce.json]

For each host count N, starts one process per host (tools/netns.py: own
network stack and address on a bridge of veth pairs, one XLA CPU device each,
gloo on the address cluster.py picks, as in training) and times the jitted
psum of a float32 vector over all processes, the collective of the training
step's gradient reduction, for a sweep of message sizes and for the gradient
sizes of CIFAR ResNet-20, ResNet-50 and AlexNet-BN. Median of several calls
after a warm-up; the result is checked against the hand sum.

Fits t = a + b * bytes per N (least squares relative to t) and reads it as a
ring all-reduce, t = 2(N-1) alpha + 2(N-1)/N * bytes / beta: alpha =
a / 2(N-1), beta = 2(N-1) / (N b). If the ring model holds, alpha and beta
come out alike for every N. Writes the measurements and the fit as JSON for
`python -m tools.scaling_model --allreduce=...`.

veth pairs on one machine are not a cluster fabric: every byte is copied by
the same two cores that run the processes, so beta here is a memory-copy
figure, and latency includes JAX's dispatch of the jitted call.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import numpy as np

from bench.machine import cpu_description

REPO = pathlib.Path(__file__).resolve().parents[1]
GRADIENTS = {"cifar_resnet20": 272_474, "resnet50": 25_557_032, "alexnet_bn": 62_379_720}
SWEEP = [4**k for k in range(3, 14)]  # 64 .. 67M float32 values (256 B .. 256 MiB)
PORT = 23457


def worker(coordinator: str, num_processes: int, process_id: int, repeats: int):
    """One process: times the psum of each size; process 0 prints the timings as JSON."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    import cluster

    jax.config.update("jax_num_cpu_devices", 1)
    cluster.start(coordinator, num_processes, process_id, heartbeat_timeout=60)
    mesh = Mesh(np.asarray(jax.devices()), ("hosts",))
    allreduce = jax.jit(
        jax.shard_map(lambda x: jax.lax.psum(x, "hosts"), mesh=mesh, in_specs=P("hosts"), out_specs=P())
    )
    sizes = sorted(set(SWEEP) | set(GRADIENTS.values()))
    seconds = {}
    for size in sizes:
        local = np.full((1, size), process_id + 1, np.float32)
        x = jax.make_array_from_process_local_data(jax.sharding.NamedSharding(mesh, P("hosts")), local)
        out = allreduce(x).block_until_ready()  # compile and warm up
        expected = num_processes * (num_processes + 1) / 2
        assert float(jnp.max(jnp.abs(out - expected))) == 0.0, "wrong all-reduce sum"
        times = []
        calls = repeats if size < 2**22 else max(3, repeats // 4)
        for _ in range(calls):
            start = time.perf_counter()
            allreduce(x).block_until_ready()
            times.append(time.perf_counter() - start)
        seconds[size] = statistics.median(times)
        del x, out
    cluster.leave_together(timeout=60)
    if process_id == 0:
        print(json.dumps({"seconds": seconds}), flush=True)


def measure(num_hosts: int, repeats: int) -> dict[int, float]:
    """Median seconds per all-reduce, by float32 count, over `num_hosts` namespace hosts."""
    from tools import netns

    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    with netns.Hosts(num_hosts) as hosts:
        coordinator = f"{hosts[0].address}:{PORT}"
        processes = [
            host.popen(
                [
                    sys.executable,
                    "-m",
                    "bench.bench_allreduce",
                    "--worker",
                    coordinator,
                    str(num_hosts),
                    str(i),
                    "--repeats",
                    str(repeats),
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for i, host in enumerate(hosts)
        ]
        outputs = [p.communicate(timeout=1800) for p in processes]
    for p, (_, err) in zip(processes, outputs):
        if p.returncode:
            raise RuntimeError(f"all-reduce worker failed ({p.returncode}):\n{err[-3000:]}")
    result = json.loads(outputs[0][0].strip().splitlines()[-1])["seconds"]
    return {int(k): v for k, v in result.items()}


def fit(seconds: dict[int, float], num_hosts: int) -> dict[str, float]:
    """t = a + b * bytes, least squares on the relative error; the ring's alpha and beta from it."""
    sizes = np.array(sorted(seconds), dtype=np.float64)
    nbytes, t = 4 * sizes, np.array([seconds[int(s)] for s in sizes])
    design = np.stack([np.ones_like(nbytes), nbytes], axis=1) / t[:, None]
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    hops = 2 * (num_hosts - 1)
    return {
        "a_s": a,
        "b_s_per_byte": b,
        "alpha_s": a / hops,
        "beta_bytes_per_s": hops / num_hosts / b,
        "max_rel_error": float(np.max(np.abs((a + b * nbytes) / t - 1))),
    }


def ring_seconds(num_hosts: int, num_values: int, alpha: float, beta: float) -> float:
    return 2 * (num_hosts - 1) * alpha + 2 * (num_hosts - 1) / num_hosts * 4 * num_values / beta


def report(results: dict[int, dict]) -> str:
    """Markdown: the gradient sizes measured and predicted by the ring fitted on the other host count."""
    lines = ["| gradient | floats | " + " | ".join(f"{n} hosts: measured (ring from other N)" for n in results) + " |"]
    lines.append("|---|---|" + "---|" * len(results))
    for name, size in GRADIENTS.items():
        cells = []
        for n, r in results.items():
            other = next((results[m]["fit"] for m in results if m != n), r["fit"])
            predicted = ring_seconds(n, size, other["alpha_s"], other["beta_bytes_per_s"])
            cells.append(f"{1e3 * r['seconds'][size]:.2f} ms ({1e3 * predicted:.2f} ms)")
        lines.append(f"| {name} | {size:,} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "| hosts | a (latency) | b -> bandwidth of the whole all-reduce | ring alpha | ring beta | worst fit error |"
    )
    lines.append("|---|---|---|---|---|---|")
    for n, r in results.items():
        f = r["fit"]
        lines.append(
            f"| {n} | {1e6 * f['a_s']:.0f} us | {1 / f['b_s_per_byte'] / 1e9:.2f} GB/s | {1e6 * f['alpha_s']:.0f} us "
            f"| {f['beta_bytes_per_s'] / 1e9:.2f} GB/s | {100 * f['max_rel_error']:.0f}% |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="docs/scaling/allreduce.json")
    parser.add_argument("--worker", nargs=3, metavar=("COORDINATOR", "N", "ID"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker[0], int(args.worker[1]), int(args.worker[2]), args.repeats)
    print(cpu_description())
    results = {}
    for n in args.hosts:
        seconds = measure(n, args.repeats)
        results[n] = {"seconds": seconds, "fit": fit({s: seconds[s] for s in SWEEP}, n)}
        for size in sorted(seconds):
            print(f"{n} hosts  {4 * size:>11,} B  {1e3 * seconds[size]:9.3f} ms", flush=True)
    table = report(results)
    print(table)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_description(), "date": time.strftime("%Y-%m-%d"), "hosts": results},
                              indent=1))  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
