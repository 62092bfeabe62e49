"""Checkpoints of a run: where they live, restoring the newest intact one, and writing one
without leaving a partial one behind when the storage refuses (a full disk, read-only).

Orbax writes each checkpoint under a temporary name and renames it when complete; TensorStore
checks what it reads (a damaged file fails to decompress or to match its metadata), so a
checkpoint that restores is the one that was written. A run's manager removes the partial
checkpoint a killed run left; a reader's manager (notebooks, tools) only reads.
"""

import contextlib
import errno
import glob
import os
import re
import shutil
import time
import warnings

import jax
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"  # checkpoints that failed to restore, set aside
# A failed save's partial checkpoint counts as removed once it has stayed gone this long.
PARTIAL_GONE_S = 1.0
PARTIAL_REMOVAL_LIMIT_S = 60.0


class CheckpointError(RuntimeError):
    """No checkpoint restores, or the storage refused one: main.py prints it as one `error:` line."""


def manager(workdir: str, keep: int | None = None) -> ocp.CheckpointManager:
    """The orbax manager of WORKDIR/checkpoints.

    Args:
      workdir: the run's directory.
      keep: for the run that writes: keep the newest `keep` checkpoints (written synchronously)
        and remove partial ones left by a run that was killed while writing. None: read only,
        so that a notebook never touches the checkpoint a running training is writing.
    """
    if keep is None:
        options = ocp.CheckpointManagerOptions(read_only=True)
    else:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
        )
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state):
    """Restores the checkpoint of `step` into the shapes, dtypes and shardings of `abstract_state`.

    A checkpoint written before runs measured the gradient noise scale restores whole but for
    its moving averages, which start from zero (steps.TrainState.noise_scale)."""
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # orbax raises a plain ValueError for a tree that differs
        if "noise_scale" not in str(e):
            raise
    without = abstract_state.replace(noise_scale={})
    restore_args = ocp.checkpoint_utils.construct_restore_args(without)
    # A manager of its own: `manager` has taken StandardRestore's handler for this checkpoint.
    reader = ocp.CheckpointManager(manager.directory, options=ocp.CheckpointManagerOptions(read_only=True))
    state = reader.restore(step, args=ocp.args.PyTreeRestore(without, restore_args, partial_restore=True))
    reader.close()
    logging.warning("The checkpoint of step %d has no noise-scale averages: they start from zero.", step)
    zeros = jax.tree.map(lambda x: jax.numpy.zeros(x.shape, x.dtype, device=x.sharding), abstract_state.noise_scale)
    return state.replace(noise_scale=zeros)


def restore_latest(manager: ocp.CheckpointManager, workdir: str, abstract_state):
    """The newest checkpoint that restores, or None when there is none.

    A checkpoint that fails to restore (orbax and TensorStore check what they read: a damaged
    file fails to decompress or to match its metadata) is named in one warning line and moved
    by the lead process to WORKDIR/damaged_checkpoints/, never deleted; the one before is tried.

    Raises:
      CheckpointError: there were checkpoints and none restores.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for step in steps:
        try:
            state = restore(manager, step, abstract_state)
        except Exception as e:  # orbax and TensorStore raise plain Exceptions for unreadable data
            _set_aside(manager, workdir, step, e)
            continue
        logging.info("Resuming from the checkpoint of step %d.", step)
        return state
    if steps:
        raise CheckpointError(
            f"no checkpoint in {os.path.join(workdir, CHECKPOINT_DIR)} can be restored (steps "
            f"{', '.join(map(str, steps))} were moved to {os.path.join(workdir, DAMAGED_DIR)}); move a repaired one "
            "back to resume, or use a new --workdir to start over."
        )
    return None


def _set_aside(manager: ocp.CheckpointManager, workdir: str, step: int, error: Exception):
    """Moves a checkpoint that failed to restore out of the checkpoint folder (lead process only)."""
    while error.__cause__ is not None:  # TensorStore's own message is the innermost
        error = error.__cause__
    reason = " ".join(str(error).split())[:300] or type(error).__name__
    target = os.path.join(workdir, DAMAGED_DIR, str(step))
    logging.warning("The checkpoint of step %d cannot be restored (%s); moved to %s.", step, reason, target)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(workdir, CHECKPOINT_DIR, str(step)), _free_name(target))
    manager.reload()


def _free_name(path: str) -> str:
    """path, or path.1, path.2, ... if a checkpoint of that step was set aside before."""
    candidate, n = path, 0
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}.{n}"
    return candidate


def save(manager: ocp.CheckpointManager, state, workdir: str):
    """Writes the checkpoint of the state's step (once).

    Raises:
      CheckpointError: the storage refused the write (full, read-only, ...); the partial checkpoint
        is removed and the message names the last complete one.
    """
    step = int(state.step)
    if manager.latest_step() == step:
        return
    try:
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()
    except Exception as e:  # orbax and TensorStore wrap the OS error in their own
        reason = storage_error(e, workdir)
        if reason is None:
            raise
        checkpoints = os.path.join(workdir, CHECKPOINT_DIR)
        manager.close()
        if jax.process_index() == 0:
            _remove_partial(os.path.join(checkpoints, f"{step}.orbax-checkpoint-tmp*"))
        manager.reload()
        # The save stopped at its first failed write; the writes orbax had scheduled but not started
        # are freed later, often at exit, where Python would warn about each after the error line.
        warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
        raise CheckpointError(
            f"{reason} while writing checkpoint {step} to {checkpoints}; {last_checkpoint(manager.latest_step())}. "
            "Make room and run the same command to resume."
        ) from None


def _remove_partial(pattern: str):
    """Removes the folders matching `pattern` until they stay gone for PARTIAL_GONE_S.

    When one write of a save fails, the writes TensorStore had already issued finish in its own
    threads after the save raised, and its file driver recreates their folders.
    """
    deadline = time.monotonic() + PARTIAL_REMOVAL_LIMIT_S
    gone_since = time.monotonic()
    while time.monotonic() - gone_since < PARTIAL_GONE_S and time.monotonic() < deadline:
        partial = glob.glob(pattern)
        for folder in partial:
            shutil.rmtree(folder, ignore_errors=True)
        if partial:
            gone_since = time.monotonic()
        time.sleep(0.05)


def storage_error(error: BaseException, workdir: str) -> str | None:
    """'no space left on the file system of PATH' (or the OS's words) when `error`, or an error it
    wraps, is the storage refusing a write (PATH: the file's, or else the workdir's); None for
    any other error."""
    while error is not None:
        text = str(error)
        if isinstance(error, OSError) and error.errno is not None:
            code, where = error.errno, error.filename
        else:  # TensorStore: "...: Failed to write N bytes to file F: No space left on device [os_error_code='28']"
            found = re.search(r"os_error_code='(\d+)'", text)
            code, where = (int(found[1]), _quoted_path(text)) if found else (None, None)
            if code is None and "No space left on device" in text:  # TensorFlow's file writers
                code = errno.ENOSPC
        if code in (errno.ENOSPC, errno.EDQUOT):
            return f"no space left on the file system of {_mount_point(where or workdir)}"
        if code in (errno.EROFS, errno.EACCES, errno.EIO):
            return f"cannot write {where or 'to the workdir'} ({os.strerror(code)})"
        error = error.__cause__ or error.__context__
    return None


def _quoted_path(text: str) -> str | None:
    found = re.search(r'Failed writing: "([^"]+)"', text) or re.search(r'local file "([^"]+)"', text)
    return found[1] if found else None


def _mount_point(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def last_checkpoint(step: int | None) -> str:
    return f"the last checkpoint is step {step}" if step is not None else "no checkpoint was written yet"


@contextlib.contextmanager
def storage_errors(manager: ocp.CheckpointManager, workdir: str, what: str):
    """Turns the storage refusing a write of `what` into a CheckpointError that names the last checkpoint."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        reason = storage_error(e, workdir)
        if reason is None:
            raise
        raise CheckpointError(
            f"{reason} while writing {what}; {last_checkpoint(manager.latest_step())}. "
            "Make room and run the same command to resume."
        ) from None
