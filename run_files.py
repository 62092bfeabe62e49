"""A run's workdir: the files a run writes beside its checkpoints (config.json, metrics.jsonl,
trust_ratios.jsonl, the LARS mask, the device layout, the validation split), whether a config may
resume the run there, and reading a run back (`load_config`, `restore_state`)."""

import json
import math
import os

import jax
import ml_collections
from clu import metric_writers
from flax import traverse_util

import checkpoints
import lars
import noise_scale
import run_setup
import trees
from configs import default
from run_setup import Setup
from steps import TrainState

METRICS_FILE = "metrics.jsonl"


TRUST_RATIOS_FILE = "trust_ratios.jsonl"


MASK_FILE = "lars_mask.json"


CONFIG_FILE = "config.json"


SPLIT_FILE = "data_split.json"  # with validation_images: which training images were held out


LAYOUT_FILE = "layout.json"  # processes and devices of the run (gradients depend on them with per-device BN)


class JsonlWriter:
    """Appends one JSON object per line (process 0 only; others write nothing)."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def drop_after(self, step: int):
        """Removes the records of steps after `step` (and a last line left half-written): a run
        resumed from that step's checkpoint writes them again. The file is replaced whole (a new
        file, then a rename)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = [line for line in lines if _record_step(line) <= step]
        if len(kept) < len(lines):
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)


def _record_step(line: str) -> float:
    """The step of one JSONL record; infinite for a line a killed run left half-written."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def trust_ratio_record(step: int, metrics, mask: dict[str, str]) -> dict:
    """One line of the trust-ratio log: per layer, in the order of `mask` (network order)."""
    param_norms = trees.flatten_with_paths(metrics["layer_param_norms"])
    grad_norms = trees.flatten_with_paths(metrics["layer_grad_norms"])
    ratios = trees.flatten_with_paths(metrics["trust_ratios"]) if "trust_ratios" in metrics else {}
    noise = noise_scale.layer_scalars(metrics["noise_scale"])
    layers = {
        path: {
            "trust_ratio": float(ratios.get(path, 1.0)),
            "param_norm": float(param_norms[path]),
            "grad_norm": float(grad_norms[path]),
            "excluded": mask[path] != lars.LARS_RULE,
            **noise.get(path, {}),
        }
        for path in mask
    }
    return {"step": step, "learning_rate": float(metrics["learning_rate"]), "layers": layers}


# The per-layer figures of a trust-ratio record that TensorBoard shows, as "<figure>/<parameter path>".
LAYER_SCALARS = ("trust_ratio", "param_norm", "grad_norm", "grad_noise_scale")


def layer_tensorboard_scalars(record: dict) -> dict[str, float]:
    """A trust-ratio record's per-layer figures as TensorBoard scalars, grouped by figure:
    {"trust_ratio/<parameter path>": ..., "param_norm/...", "grad_norm/...", "grad_noise_scale/..."}."""
    return {
        f"{name}/{path}": layer[name]
        for name in LAYER_SCALARS
        for path, layer in record["layers"].items()
        if name in layer
    }


def open_logs(workdir: str, lead: bool):
    """(TensorBoard writer, metrics.jsonl, trust_ratios.jsonl); process 0 writes, the others get no-op writers.

    The console gets one progress line per log step from the loop, so the
    TensorBoard writer does not log to it as well."""
    writer = (
        metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir)) if lead else metric_writers.MultiWriter([])
    )
    metrics_log = JsonlWriter(os.path.join(workdir, METRICS_FILE), lead)
    trust_log = JsonlWriter(os.path.join(workdir, TRUST_RATIOS_FILE), lead)
    return writer, metrics_log, trust_log


def write_run_files(workdir: str, setup: Setup, mask: dict[str, str], writer):
    config = setup.config
    with open(os.path.join(workdir, MASK_FILE), "w") as f:
        json.dump(mask, f, indent=1)
    with open(os.path.join(workdir, LAYOUT_FILE), "w") as f:
        json.dump({"processes": jax.process_count(), "devices": setup.mesh.size}, f)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json(indent=1))
    if setup.data is not None and setup.data.holdout is not None:
        with open(os.path.join(workdir, SPLIT_FILE), "w") as f:
            json.dump(setup.data.holdout.record(), f)
    writer.write_hparams({k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))})


# Keys whose change makes a workdir's checkpoints unusable: parameter or optimizer-state
# shapes, or which images are trained on (a new validation split would mix the two).
BLOCKING_KEYS = ("model", "model_kwargs", "num_classes", "dataset", "image_size", "optimizer")


BLOCKING_KEYS += ("validation_images", "validation_seed")


def check_resume(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
    """Compares `config` with the config.json of a run with checkpoints in workdir.

    Returns:
      The keys that differ but only change the run (batch size, LR, steps, ...):
      the run resumes with the new values.
    Raises:
      ValueError: naming the keys that change parameter or optimizer shapes.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    folder = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
    if not os.path.isfile(path) or not any(p.isdigit() for p in _listdir(folder)):
        return []
    with open(path) as f:
        old = traverse_util.flatten_dict(json.load(f), sep=".")
    # A key added to configs/default.py since that run started had its default value there.
    old = traverse_util.flatten_dict(json.loads(default.get_config().to_json()), sep=".") | old
    new = traverse_util.flatten_dict(json.loads(config.to_json()), sep=".")
    differ = sorted(key for key in old.keys() | new.keys() if old.get(key) != new.get(key))
    blocking = [key for key in differ if key.split(".")[0] in BLOCKING_KEYS]
    if blocking:
        changes = ", ".join(f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in blocking)
        raise ValueError(
            f"--workdir={workdir} holds checkpoints of another model or data set ({changes}); "
            "use a new --workdir, or the old values to resume."
        )
    return differ


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def load_config(workdir) -> ml_collections.ConfigDict:
    """The config a run in workdir was started with (written there by train_and_evaluate)."""
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
        return ml_collections.ConfigDict(json.load(f))


def restore_state(config: ml_collections.ConfigDict, workdir, step: int | None = None) -> tuple[Setup, TrainState]:
    """The setup of a config and a checkpoint in workdir (the latest by default), for notebooks and tools."""
    setup = run_setup.prepare(config)
    manager = checkpoints.manager(workdir)
    steps = manager.all_steps()
    if not steps or (step is not None and step not in steps):
        folder = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
        raise ValueError(f"No checkpoint {step or ''} in {folder} (have {steps}).")
    state = checkpoints.restore(manager, max(steps) if step is None else step, run_setup.abstract_state(setup))
    manager.close()
    return setup, state
