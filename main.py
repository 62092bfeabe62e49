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

Every mistake in the command line or config ends in one `error:` line and exit
code 2 before anything is written or compiled; an expected failure during
training (an undecodable image, a non-finite loss) in one `error:` line and
exit code 1. --verbose adds the traceback.
"""

import logging as pylogging
import os
import re
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

import config_checks
import host_memory
import workdir_lock

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
flags.DEFINE_bool("verbose", False, "Also print libraries' INFO lines and the traceback of an error.")
flags.mark_flags_as_required(["config", "workdir"])

REPO = os.path.dirname(os.path.abspath(__file__))
EXIT_CONFIG, EXIT_RUNTIME = 2, 1


class _OwnInfoOnly(pylogging.Filter):
    """Console: INFO lines from this repository's code; libraries' warnings and errors only."""

    def filter(self, record):
        ours = record.pathname.startswith(REPO + os.sep) and "site-packages" not in record.pathname
        # orbax logs a failed background write (a full disk) from its threads with a traceback, and
        # asyncio its failed tasks again at exit; the save raises it in the training loop, whose
        # error line names it.
        orbax_thread = f"{os.sep}orbax{os.sep}" in record.pathname and record.pathname.endswith(f"{os.sep}future.py")
        unretrieved = record.name == "asyncio" and "exception was never retrieved" in record.getMessage()
        return (record.levelno >= pylogging.WARNING and not (orbax_thread or unretrieved)) or ours


def _quiet_environment():
    """What TensorFlow and absl read at import: set before either is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF's C++ INFO and oneDNN banners
    # TensorFlow (only the input pipeline here) turns on its own oneDNN graph rewrites on CPUs with
    # AVX512-VNNI, AVX512-BF16 or AMX, and says so through absl before its log level applies. Off:
    # the start-up stays quiet, and the pipeline's few TF ops run the same kernels on every CPU.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def _drop_reported_checkpoint_errors(unraisable):
    """sys.unraisablehook for what orbax leaves behind after a failure that the run reports itself:
    after a checkpoint write fails (a full disk), TensorStore's pending writes still complete and
    call back into orbax's event loop, which has closed ('Event loop is closed'); after a read of a
    damaged checkpoint fails, orbax's other reads of it end in coroutines whose exceptions nobody
    awaits (reported when they are collected, as many as the checkpoint has arrays). The run's
    warning or error line names the failure; other unraisable errors pass."""
    closed = isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine's
    orbax_read = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
    if not (closed or orbax_read):
        sys.__unraisablehook__(unraisable)


def _config_error_message(error: Exception) -> str:
    """One line for a failure to load the config file or an override."""
    text = " ".join(str(error).replace("\\n", " ").replace("\\'", "'").split())
    typo = re.search(r"'(\w+)'.*Did you mean \"(\w+)\"", text)
    if typo:
        return f"unknown config key {typo.group(1)!r}; did you mean {typo.group(2)!r}? (configs/default.py lists them)"
    missing = re.fullmatch(r"\W*'?(\w+)'?\W*", text)
    if isinstance(error, (AttributeError, KeyError)) and missing:
        return f"unknown config key {missing.group(1)!r} (configs/default.py lists them)"
    if "Failed loading config file" in text or "No such file" in text:
        return f"cannot load the config file: {text.split('Attempted')[-1].strip()}"
    if isinstance(error, TypeError) and "get_config()" in text:
        return f"{text}: this config file takes no variant after ':'"
    return text


def _config_file_error(error: BaseException, argv: list[str]) -> str | None:
    """'config file F, line N: Error: what' when `error` (or an error it wraps) was raised by the code of
    the --config file itself (a syntax error, a NameError, an exception in get_config); else None."""
    value = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if value is None:
        return None
    path = value if os.path.isfile(value) else value.rsplit(":", 1)[0]  # FILE or FILE:variant
    path = os.path.abspath(path)
    while error is not None:
        if isinstance(error, SyntaxError) and error.filename and os.path.abspath(error.filename) == path:
            return f"config file {path}, line {error.lineno}: {type(error).__name__}: {error.msg}"
        frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) == path]
        if frames:
            return f"config file {path}, line {frames[-1].lineno}: {type(error).__name__}: {error}"
        error = error.__cause__ or error.__context__
    return None


def _flag_error_message(error: Exception) -> str | None:
    """One line for a flag or config override that absl or ml_collections refused; None for other errors."""
    if isinstance(error, flags.Error):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        # A config file that raised while loading: the flag and the exception, not its traceback.
        return f"{lines[0]} {lines[-1]}" if "Traceback (most recent call last):" in lines else lines[0]
    if isinstance(error, (AttributeError, KeyError, OSError, TypeError, ValueError)):  # from loading the config
        return _config_error_message(error)
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with one `error:` line (exit 2) instead of a traceback."""
    try:
        remaining = FLAGS(argv)
        FLAGS.config.keys()  # config_flags reports a file that failed to load on first use
        return remaining
    except Exception as e:  # a config file may raise anything while it loads
        message = _config_file_error(e, argv) or _flag_error_message(e)
        if message is None:
            raise
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def check_workdir(workdir: str):
    """A workdir that exists must be a writable folder; a new one needs a writable parent."""
    if os.path.exists(workdir):
        if not os.path.isdir(workdir):
            raise ValueError(f"--workdir={workdir} is a file, not a folder.")
        if not os.access(workdir, os.W_OK | os.X_OK):
            raise ValueError(f"--workdir={workdir} is not writable.")
        return
    parent = os.path.dirname(os.path.abspath(workdir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--workdir={workdir} cannot be created: {parent} is not a writable folder.")


def log_kernels(config, impl: str):
    """One start-up line: which kernels run the layers, on which ISA and how many threads."""
    if impl != "onednn":
        logging.info("Convolutions: XLA's own kernels (conv_impl=%s), %s.", impl, config.dtype)
        return
    from models import onednn

    logging.info(
        "Convolutions, dense layers, max pooling and BatchNorm: oneDNN %s on %s, %s, %d OpenMP thread(s) per device.",
        onednn.version(),
        onednn.isa(),
        config.dtype,
        onednn.threads_per_device(),
    )


def fail(message: str, code: int) -> int:
    """Prints the traceback (--verbose only) and one `error:` line; returns the exit code."""
    if FLAGS.verbose:
        traceback.print_exc()
    hint = "" if FLAGS.verbose else " (--verbose shows the traceback)" if code == EXIT_RUNTIME else ""
    print(f"error: {message}{hint}", file=sys.stderr, flush=True)
    return code


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
        print(f"error: unexpected arguments {argv[1:]} (flags are --name=value)", file=sys.stderr)
        return EXIT_CONFIG
    if not FLAGS.verbose:
        logging.get_absl_handler().addFilter(_OwnInfoOnly())
        sys.unraisablehook = _drop_reported_checkpoint_errors
    try:
        check_workdir(FLAGS.workdir)
        config_checks.check_ranges(FLAGS.config)  # again in run_setup; here before the slow imports
    except ValueError as e:
        return fail(str(e), EXIT_CONFIG)
    # TensorFlow only reads data: keep it off any accelerator JAX uses.
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    import cluster

    try:
        jax = start_jax()
    except cluster.ClusterError as e:
        code = fail(str(e), EXIT_RUNTIME)
        # Every process met the same error (check_reachable shares the results): leave
        # together, so that none aborts in jax's shutdown because the coordinator went first.
        cluster.leave_together(timeout=FLAGS.heartbeat_timeout)
        return code
    if jax.process_index() > 0:
        logging.set_verbosity(logging.WARNING)  # process 0 speaks for all
    code = train_in(jax, FLAGS.config, FLAGS.workdir)
    if jax.process_count() > 1:
        cluster.leave_together(timeout=FLAGS.heartbeat_timeout * (5 if code == 0 else 1))
    return code


def train_in(jax, config, workdir: str) -> int:
    """Checks, prepares and trains; returns the exit code."""
    import checkpoints
    import cluster
    import compile_step
    import input_pipeline
    import models
    import run_files
    import run_setup
    import train

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
        changed = run_files.check_resume(config, workdir)
        setup = run_setup.prepare(config)
    except ValueError as e:
        return fail(str(e), EXIT_CONFIG)
    if changed:
        logging.warning("Resuming %s with changed config keys: %s.", workdir, ", ".join(changed))
    summary = models.summary(config.model, setup.model, channels=setup.channels, size=setup.image_size)
    logging.info(
        "Model %s: %s parameters, %.3f GFLOPs per image forward (%.3f per training step and image, x3)",
        config.model,
        f"{summary['params']:,}",
        summary["gflops_per_image"],
        3 * summary["gflops_per_image"],
    )
    log_kernels(config, run_setup.conv_impl(config))
    try:
        setup = compile_step.fit_train_step(setup)  # compiled; a step that does not fit in memory stops here
    except ValueError as e:
        return fail(str(e), EXIT_CONFIG)
    try:
        lock = hold_workdir(jax, workdir)  # the first write: nothing before it touched the workdir
    except workdir_lock.WorkdirBusy as e:
        return fail(str(e), EXIT_CONFIG)
    try:
        _, result = train.train_and_evaluate(config, workdir, setup)
    except (train.TrainingError, checkpoints.CheckpointError, input_pipeline.DataError) as e:
        return fail(str(e), EXIT_RUNTIME)
    except Exception as e:
        refused = checkpoints.storage_error(
            e, workdir
        )  # a write outside the loop's own checks (run files, TensorBoard)
        if refused is not None:
            return fail(f"{refused} while writing to --workdir={workdir}; resume with the same command", EXIT_RUNTIME)
        if jax.process_count() > 1:  # most likely a lost peer: name it, and never hang
            cluster.leave_after_peer_failure(e, FLAGS.heartbeat_timeout)
        raise
    finally:
        lock.release()
    log_outcome(result, workdir)
    return 0


def hold_workdir(jax, workdir: str) -> workdir_lock.WorkdirLock:
    """The workdir's lock, taken by the lead process; every process learns whether it got it.

    Raises:
      workdir_lock.WorkdirBusy: another run holds it (in every process).
    """
    lock = workdir_lock.WorkdirLock(workdir)
    message = ""
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except workdir_lock.WorkdirBusy as e:
            message = str(e)
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        busy = bool(multihost_utils.broadcast_one_to_all(np.int32(bool(message))))
        message = message or (
            f"--workdir={workdir} is in use by another run (the lead process says so)" if busy else ""
        )
    if message:
        raise workdir_lock.WorkdirBusy(message)
    return lock


def log_outcome(result: dict, workdir: str):
    """The last console line: what the run did, in words."""
    if result.get("signal"):
        logging.warning(
            "Stopped by signal %d at step %d (its checkpoint is saved); the same command with --workdir=%s resumes it.",
            result["signal"],
            result["step"],
            workdir,
        )
        return
    if "split" not in result:  # resumed at its last step: nothing was trained or evaluated
        logging.info("Finished at step %d: the run in --workdir=%s was already complete.", result["step"], workdir)
        return
    top5 = f", top-5 {result['eval_top5']:.4f}" if "eval_top5" in result else ""
    logging.info(
        "Finished at step %d: %s top-1 %.4f%s, loss %.4f over %d images.",
        result["step"],
        result["split"],
        result["eval_top1"],
        top5,
        result["eval_loss"],
        result["eval_count"],
    )


if __name__ == "__main__":
    host_memory.keep_freed_memory()  # first: before any library starts a thread
    _quiet_environment()
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
