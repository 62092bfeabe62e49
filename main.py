"""Trains a model: `python main.py --config=configs/alexnet_lars.py --workdir=DIR`.

Config values can be overridden on the command line (--config.batch_size=8192)
and config files take a variant argument (--config=configs/alexnet_lars.py:8192).

Multi-process CPU training runs on the JAX distributed runtime with gloo
collectives: give --coordinator_address, --num_processes and --process_id;
under Open MPI (mpirun) or SLURM (srun) with more than one task they are
detected (--distributed=detect, the default).

Each process gives gloo the local address that routes to the coordinator
(or --collectives_interface / $GLOO_SOCKET_IFNAME / --collectives_address),
and checks that every peer can reach it before anything is compiled; see
cluster.py. A process whose peer dies, or whose host is cut off, exits
non-zero with one `error:` line within --heartbeat_timeout seconds.
"""

import logging as pylogging
import os
import sys

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
flags.DEFINE_string(
    "collectives_interface",
    None,
    "Network interface for the CPU collectives (gloo), e.g. eth0 or ib0; default $GLOO_SOCKET_IFNAME, "
    "else the address that routes to the coordinator.",
)
flags.DEFINE_string("collectives_address", None, "This process's IP address for the collectives (overrides the above).")
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
    """Drops Orbax's INFO lines (several per checkpoint); its warnings stay."""

    def filter(self, record):
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def start_jax():
    """Configures JAX and, when asked or under mpirun/srun, joins the distributed job."""
    import jax

    import cluster

    if FLAGS.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", FLAGS.num_cpu_devices)
    explicit = FLAGS.coordinator_address is not None
    wanted = FLAGS.distributed == "on" or (FLAGS.distributed == "detect" and cluster.cluster_detected())
    if FLAGS.distributed != "off" and (explicit or wanted):
        collectives = cluster.start(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            FLAGS.heartbeat_timeout,
            FLAGS.collectives_address,
            FLAGS.collectives_interface,
        )
        logging.info("Collectives (gloo) on %s (%s).", collectives.address, collectives.how)
    return jax


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    # TensorFlow only reads data: keep it off any accelerator JAX uses.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    import cluster

    try:
        jax = start_jax()
    except cluster.ClusterError as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
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
        print(f"error: {e}", file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            cluster.leave_together(timeout=FLAGS.heartbeat_timeout)
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
            cluster.leave_together(timeout=FLAGS.heartbeat_timeout * 5)
        except Exception as e:  # noqa: BLE001 - any failure must end this process too
            cluster.leave_after_peer_failure(e, FLAGS.heartbeat_timeout)
    logging.info("Finished at step %d: %s", result["step"], result)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(lambda argv: sys.exit(main(argv)))
