"""The training loop: steps, logs, periodic evaluations and checkpoints, the finiteness check, and
signals (a SIGTERM saves a checkpoint and stops); `train_and_evaluate` resumes from the workdir's latest
checkpoint. Everything it runs is validated and compiled before anything is written."""

import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import checkpoints
import compile_step
import input_pipeline
import lars
import models
import noise_scale
import optimizers
import run_files
import run_setup
import trees
from run_setup import Setup
from steps import TrainState, make_eval_step, on_mesh


class TrainingError(RuntimeError):
    """An expected failure of a run (non-finite loss): main.py prints it as one `error:` line."""


class FiniteCheck:
    """Checks the steps' in-graph finiteness flags lazily (at log steps, before
    evaluations and checkpoints), so the loop never waits on the host after a
    step just to learn that it was fine. A non-finite step has left the state
    as it was (the guard in the step), so nothing bad is ever saved."""

    def __init__(self):
        self.pending = []

    def add(self, step: int, metrics):
        self.pending.append((step, metrics["ok"], metrics["grads_finite"]))

    def check(self, last_checkpoint: int | None):
        """Raises TrainingError naming the first non-finite step since the last check."""
        pending, self.pending = self.pending, []
        oks = jax.device_get([ok for _, ok, _ in pending])
        for (step, _, grads_finite), ok in zip(pending, oks):
            if not ok:
                finite = trees.flatten_with_paths(jax.device_get(grads_finite))
                first = next((path for path, good in finite.items() if not good), "(the loss only)")
                raise TrainingError(
                    f"non-finite loss or gradient at step {step + 1} (first non-finite gradient: {first}); "
                    f"{checkpoints.last_checkpoint(last_checkpoint)}. Lower learning_rate or raise warmup_epochs."
                )


class _Lookahead:
    """An iterator that can show its next item without taking it (the noise-scale probe reads
    the next step's batch)."""

    def __init__(self, items):
        self.items, self.ahead = iter(items), []

    def __iter__(self):
        return self

    def __next__(self):
        return self.ahead.pop() if self.ahead else next(self.items)

    def peek(self):
        if not self.ahead:
            self.ahead.append(next(self.items))
        return self.ahead[0]


class _Stop:
    """Remembers a SIGTERM/SIGINT so the loop can checkpoint and leave cleanly."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def evaluate(setup: Setup, state: TrainState, eval_step, sharding, split: str) -> dict[str, float]:
    """Top-1, top-5 (with 5 classes or more), loss and count over every image of an evaluation split."""
    totals = None
    for batch in setup.data.eval_batches(split):
        out = eval_step(state, input_pipeline.to_global(batch, sharding))
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = float(totals.pop("count"))
    return {f"eval_{name}": float(total) / count for name, total in totals.items()} | {"eval_count": count}


def _log_layout(setup: Setup):
    steps, config = setup.steps, setup.config
    logging.info(
        "%d steps (%d per epoch), warmup %d, global batch %d = %d devices x %d micro-steps x %d%s",
        steps.total,
        steps.per_epoch,
        steps.warmup,
        config.batch_size,
        setup.mesh.size,
        setup.num_micro,
        setup.micro_size,
        " (micro-batches fed from the host)" if setup.fed else "",
    )


def _scalars(metrics) -> dict[str, float]:
    keys = ("loss", "accuracy", "learning_rate", "grad_norm", "param_norm", "update_norm")
    noise = noise_scale.scalars(jax.device_get(metrics["noise_scale"]), lars="trust_ratios" in metrics)
    return {k: float(metrics[k]) for k in keys} | noise


def _train_scalars(setup: Setup, metrics, done: int, step_time: float) -> dict[str, float]:
    scalars = _scalars(metrics)
    scalars.update(
        step_time=step_time,
        images_per_sec=setup.config.batch_size / step_time,
        eta_sec=step_time * (setup.steps.total - done),
        epoch=done / setup.steps.per_epoch,
    )
    return scalars


def _log_progress(done: int, total: int, scalars: dict[str, float]):
    logging.info(
        "step %d/%d  epoch %.2f  loss %.4f  acc %.3f  lr %.4g  %.1f img/s  ETA %.0f s",
        done,
        total,
        scalars["epoch"],
        scalars["loss"],
        scalars["accuracy"],
        scalars["learning_rate"],
        scalars["images_per_sec"],
        scalars["eta_sec"],
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, setup: Setup | None = None
) -> tuple[TrainState, dict[str, float]]:
    """Trains and evaluates; resumes from the latest checkpoint in workdir.

    Args:
      config: a configs/ config.
      workdir: checkpoints, metrics.jsonl, trust_ratios.jsonl, TensorBoard logs.
      setup: `prepare(config)` when the caller already made it (main.py does,
        to report errors and the model size before training).

    Returns:
      The final train state, and the last evaluation's metrics (eval_top1,
      eval_top5, eval_loss, eval_count) with its split and the step reached;
      after the last step, that of the test split when validation is held out.

    Raises:
      TrainingError: a non-finite loss or gradient (the state is not saved past it).
    """
    setup = setup or run_setup.prepare(config)
    if setup.train_step is None:
        setup = compile_step.fit_train_step(setup)  # before anything is written: a step that does not fit stops here
    steps = setup.steps
    lead = jax.process_index() == 0
    sharding = NamedSharding(setup.mesh, P("data"))

    os.makedirs(workdir, exist_ok=True)
    writer, metrics_log, trust_log = run_files.open_logs(workdir, lead)
    manager = checkpoints.manager(workdir, config.keep_checkpoints)
    state = checkpoints.restore_latest(manager, workdir, run_setup.abstract_state(setup))
    state = run_setup.init_state(setup) if state is None else state
    for log in (metrics_log, trust_log):  # each step once, after a run that died past its checkpoint
        log.drop_after(int(state.step))
    rules = lars.mask_report(state.params, optimizers.exclusion(config))
    input_shape = (1, setup.image_size, setup.image_size, setup.channels)
    mask = {path: rules[path] for path in models.param_order(setup.model, input_shape)}
    if lead:
        run_files.write_run_files(workdir, setup, mask, writer)
    logging.info("LARS exclusions: %s", {rule: sum(r == rule for r in mask.values()) for rule in set(mask.values())})
    _log_layout(setup)

    train_step = setup.train_step
    probe = setup.noise_probe
    eval_step = jax.jit(on_mesh(make_eval_step(setup.model, setup.num_classes), setup.mesh))
    dropout_key = jax.random.key(config.seed + 1)  # `step_gradient` uses the same key
    finite = FiniteCheck()

    start = int(state.step)
    micro_steps = setup.num_micro if setup.fed else 1
    batches = _Lookahead(input_pipeline.to_global(b, sharding) for b in setup.data.train_batches(start, micro_steps))
    result = {"step": start}
    last_time, last_step = time.perf_counter(), start
    previous_loss = None
    with _Stop() as stop, checkpoints.storage_errors(manager, workdir, "the run's logs"):
        for step in range(start, steps.total):
            if setup.fed:
                state, metrics = train_step(state, batches, dropout_key)
            else:
                batch = next(batches)
                if probe is not None and setup.noise.probe_due(step, steps.total):
                    # Waited for, so that at most two programs are in flight (see below).
                    averages = jax.block_until_ready(probe(state, batch, batches.peek(), dropout_key))
                    state = state.replace(noise_scale=averages)
                state, metrics = train_step(state, batch, dropout_key)
            # At most this step and the one before in flight: JAX dispatches asynchronously, and a
            # loop that ran ahead would hold a batch per queued step (StepMemory counts two).
            jax.block_until_ready(previous_loss)
            previous_loss = metrics["loss"]
            finite.add(step, metrics)
            done = step + 1
            last = done == steps.total
            if done % steps.log == 0 or last:
                finite.check(manager.latest_step())
                now = time.perf_counter()
                scalars = _train_scalars(setup, metrics, done, (now - last_time) / (done - last_step))
                last_time, last_step = now, done
                writer.write_scalars(done, scalars)
                metrics_log.write({"kind": "train", "step": done, **scalars})
                _log_progress(done, steps.total, scalars)
            # Also the step after each checkpoint, so that a notebook can recompute
            # the logged ratios from that checkpoint whatever the two periods are.
            if done % steps.trust_ratio == 0 or last or (step % steps.checkpoint == 0 and step > 0):
                record = run_files.trust_ratio_record(done, jax.device_get(metrics), mask)
                trust_log.write(record)
                writer.write_scalars(done, run_files.layer_tensorboard_scalars(record))
            if done % steps.eval == 0 or last:
                finite.check(manager.latest_step())
                for split in setup.data.final_eval_splits if last else (setup.data.periodic_eval_split,):
                    result = {"step": done, "split": split, **evaluate(setup, state, eval_step, sharding, split)}
                    writer.write_scalars(
                        done, {k.replace("eval_", f"{split}_"): v for k, v in result.items() if k != "split"}
                    )
                    metrics_log.write({"kind": "eval", **result})
                    logging.info("%s at step %d: %s", split, done, _format_eval(result))
            if done % steps.checkpoint == 0 or last or stop.signal is not None:
                finite.check(manager.latest_step())
                checkpoints.save(manager, state, workdir)
            if stop.signal is not None:
                logging.warning("Signal %d: saved the checkpoint of step %d; stopping.", stop.signal, done)
                result = {"step": done, "signal": stop.signal}
                break
        writer.flush()
    manager.close()
    return state, result


def _format_eval(result: dict[str, float]) -> str:
    return "  ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in result.items() if k.startswith("eval_top"))
