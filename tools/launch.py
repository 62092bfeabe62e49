"""Starts N training processes on this machine, as a cluster would.

    python -m tools.launch --num_processes=2 --devices_per_process=2 -- \
        --config=configs/demo.py --workdir=/tmp/demo2

Each process runs `main.py ARGS --coordinator_address=127.0.0.1:PORT
--num_processes=N --process_id=i --num_cpu_devices=D`. Their output is
streamed with a "[i] " prefix. When one process exits non-zero, the others
are stopped (SIGTERM, then SIGKILL after --grace seconds) and the launcher
exits with that code. SIGINT/SIGTERM to the launcher are passed on. Each
process gets OMP_NUM_THREADS = cores / N (unless set) for its oneDNN calls.
"""

import argparse
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(process: subprocess.Popen, prefix: str, lock: threading.Lock):
    for line in process.stdout:
        with lock:
            sys.stdout.write(prefix + line)
            sys.stdout.flush()


def launch(
    num_processes: int, devices_per_process: int, main_args: list[str], port: int = 0, grace: float = 30.0
) -> int:
    """Runs the processes to the end; returns 0, or the first non-zero exit code."""
    port = port or free_port()
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the device count comes from --num_cpu_devices
    # The processes share this machine's cores: each gets its share for oneDNN's OpenMP threads
    # (models/onednn.threads_per_device) instead of all of them, which would oversubscribe.
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // num_processes)))
    processes, threads, lock = [], [], threading.Lock()
    for i in range(num_processes):
        command = [
            sys.executable,
            str(REPO / "main.py"),
            *main_args,
            f"--coordinator_address=127.0.0.1:{port}",
            f"--num_processes={num_processes}",
            f"--process_id={i}",
            f"--num_cpu_devices={devices_per_process}",
        ]
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        processes.append(process)
        thread = threading.Thread(target=_stream, args=(process, f"[{i}] ", lock), daemon=True)
        thread.start()
        threads.append(thread)

    def forward(signum, frame):
        for p in processes:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed = None
        while any(p.poll() is None for p in processes):
            failed = next((i for i, p in enumerate(processes) if p.poll() not in (None, 0)), None)
            if failed is not None:
                break
            time.sleep(0.1)
        if failed is None:
            failed = next((i for i, p in enumerate(processes) if p.returncode), None)
        if failed is not None:
            code = processes[failed].returncode
            with lock:
                print(f"[launch] process {failed} exited with code {code}; stopping the others.", flush=True)
            _stop(processes, grace)
            return code if code > 0 else 128 - code
        return 0
    finally:
        for thread in threads:
            thread.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(processes, grace: float):
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and any(p.poll() is None for p in processes):
        time.sleep(0.1)
    for p in processes:
        if p.poll() is None:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--devices_per_process", type=int, default=1)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds between SIGTERM and SIGKILL")
    parser.add_argument("main_args", nargs=argparse.REMAINDER, help="-- then main.py's arguments")
    args = parser.parse_args(argv)
    main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
    return launch(args.num_processes, args.devices_per_process, main_args, args.port, args.grace)


if __name__ == "__main__":
    sys.exit(main())
