"""Trains a model: `python main.py --config=configs/alexnet_lars.py --workdir=DIR`.

Config values can be overridden on the command line (--config.batch_size=8192)
and config files take a variant argument (--config=configs/alexnet_lars.py:8192).

Multi-process CPU training runs on the JAX distributed runtime with gloo
collectives: give --coordinator_address, --num_processes and --process_id;
under Open MPI (mpirun) or SLURM (srun) with more than one task they are
detected (--distributed=detect, the default).

A process whose peer dies exits non-zero with a message instead of hanging:
the collective that fails raises at once, or, where a peer stops answering,
the runtime declares it dead after --heartbeat_timeout seconds.
"""

import logging as pylogging
import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and logs go here; an existing run there is resumed.")
config_flags.DEFINE_config_file("config", None, "A configs/ file, optionally with :variant.", lock_config=True)
flags.DEFINE_enum(
    "distributed",
    "detect",
    ["detect", "on", "off"],
    "detect: start jax.distributed under mpirun/srun with several tasks; "
    "on: always (cluster auto-detection); off: never.",
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (starts jax.distributed).")
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.DEFINE_integer("num_cpu_devices", None, "XLA CPU devices in this process (default: 1).")
flags.DEFINE_integer("heartbeat_timeout", 60, "Seconds after which the runtime declares a silent peer process dead.")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
    """Drops Orbax's INFO lines (several per checkpoint); its warnings stay."""

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def cluster_detected(environ=os.environ) -> bool:
    """True under Open MPI's mpirun or SLURM's srun with more than one task."""
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return True
    return "SLURM_STEP_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1


def start_jax():
    """Configures and, when asked, starts the JAX distributed runtime."""
    import jax

    if FLAGS.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.num_cpu_devices)
    explicit = FLAGS.coordinator_address is not None
    wanted = FLAGS.distributed == "on" or (FLAGS.distributed == "detect" and cluster_detected())
    if FLAGS.distributed != "off" and (explicit or wanted):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        kwargs = dict(
            heartbeat_timeout_seconds=FLAGS.heartbeat_timeout,
            initialization_timeout=FLAGS.heartbeat_timeout * 5,
        )
        if explicit:
            kwargs.update(
                coordinator_address=FLAGS.coordinator_address,
                num_processes=FLAGS.num_processes,
                process_id=FLAGS.process_id,
            )
        jax.distributed.initialize(**kwargs)
    return jax


def leave_after_peer_failure(jax, error: Exception):
    """Exits non-zero at once, naming the lost processes, without the shutdown
    barrier (which would wait for the dead peer's heartbeat timeout)."""
    message = f"process {jax.process_index()} of {jax.process_count()} stops: {type(error).__name__}: {error}"
    print(f"error: {message}", file=sys.stderr, flush=True)
    lost = lost_processes(jax, timeout=FLAGS.heartbeat_timeout)
    if lost:
        print(f"error: lost process(es): {', '.join(map(str, lost))}.", file=sys.stderr)
    print("Restart all processes with the same --workdir to resume from the last checkpoint.", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)


def lost_processes(jax, timeout: float) -> list[int]:
    """Asks the coordination service which processes are gone (waits at most `timeout` s).

    A dead process is noticed when its connection drops or, at the latest,
    after the heartbeat timeout. If the service itself is unreachable, process
    0 (which hosts it) is the one lost.
    """
    from jax._src import distributed  # the client is not exposed publicly

    client = distributed.global_state.client
    ids = list(range(jax.process_count()))
    deadline = time.time() + timeout
    while client is not None and time.time() < deadline:
        try:
            live = client.get_live_nodes(ids)
        except Exception:  # noqa: BLE001 - the coordinator is unreachable
            return [0]
        lost = sorted(set(ids) - set(live))
        if lost:
            return lost
        time.sleep(0.25)
    return []


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    # TensorFlow only reads data: keep it off any accelerator JAX uses.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    jax = start_jax()
    if jax.process_index() > 0:
        logging.set_verbosity(logging.WARNING)  # process 0 speaks for all

    import models
    import train

    config = FLAGS.config
    logging.info(
        "JAX %s: process %d of %d, %d local / %d global devices (%s)",
        jax.__version__,
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )
    try:
        setup = train.prepare(config)
    except ValueError as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 2
    channels = setup.data.info.channels
    summary = models.summary(config.model, setup.model, channels=channels, size=setup.image_size)
    logging.info(
        "Model %s: %s parameters, %.3f GFLOPs per image forward (%.3f per training step and image, x3)",
        config.model,
        f"{summary['params']:,}",
        summary["gflops_per_image"],
        3 * summary["gflops_per_image"],
    )
    if jax.process_count() == 1:
        _, result = train.train_and_evaluate(config, FLAGS.workdir, setup)
    else:
        try:
            _, result = train.train_and_evaluate(config, FLAGS.workdir, setup)
        except Exception as e:  # noqa: BLE001 - any failure must end this process too
            leave_after_peer_failure(jax, e)
    logging.info("Finished at step %d: %s", result["step"], result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(lambda argv: sys.exit(main(argv)))
