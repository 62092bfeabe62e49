"""config_checks: every numeric key of configs/default.py has its range, and every shipped config is within it."""

import importlib
import math
import pathlib

import pytest

import config_checks
import run_setup
from configs import default

REPO = pathlib.Path(__file__).resolve().parents[1]

# key -> (a value just outside its range, one at its edge inside it)
EDGES = {
    "num_classes": (-1, 0), "image_size": (-1, 0), "data_shards": (-1, 0), "validation_images": (-1, 0),
    "batch_size": (0, 1), "eval_batch_size": (-1, 0), "num_train_steps": (-1, 0),
    "learning_rate": (0.0, 1e-9), "warmup_epochs": (-0.5, 0.0), "warmup_steps": (-1, 0),
    "end_learning_rate": (-1e-9, 0.0), "lr_power": (0.0, 0.5), "lr_decay_epochs": ((30.0, -1.0), (0.0,)),
    "momentum": (1.0, 0.0), "weight_decay": (math.inf, 0.0), "trust_coefficient": (0.0, 1e-6),
    "lars_eps": (math.nan, 0.0), "label_smoothing": (1.0, 0.0), "log_every_steps": (0, 1),
    "trust_ratio_every_steps": (-1, 0), "eval_every_epochs": (math.nan, 0.0), "eval_every_steps": (-1, 0),
    "checkpoint_every_epochs": (-1.0, 0.0), "checkpoint_every_steps": (-1, 0), "keep_checkpoints": (0, 1),
    "logs_per_run": (-1, 0), "trust_ratios_per_run": (-1, 0), "evaluations_per_run": (-1, 0),
    "noise_scale_every_steps": (0, 1), "noise_scale_window_steps": (-1, 0),
}  # fmt: skip


def test_every_numeric_key_of_the_default_config_has_a_range():
    config = default.get_config()
    numeric = {key for key, value in config.items() if type(value) in (int, float) or key == "lr_decay_epochs"}
    # Any seed; num_epochs is checked with num_train_steps; microbatch_size ("auto" or a number)
    # against the per-device batch (run_setup.check_batch_arithmetic).
    numeric -= {"seed", "validation_seed", "num_epochs", "microbatch_size"}
    assert numeric == set(config_checks.RANGES) == set(EDGES)


@pytest.mark.parametrize("key", sorted(EDGES))
def test_a_value_outside_its_range_names_the_key(key):
    outside, edge = EDGES[key]
    config = default.get_config()
    config[key] = edge
    config_checks.check_ranges(config)
    config[key] = outside
    with pytest.raises(ValueError, match=rf"^{key}=.* is out of range; allowed: "):
        config_checks.check_ranges(config)


def test_relations_between_keys():
    config = default.get_config()  # 100 epochs, warmup 10, LR 32
    for changes, words in (
        (dict(num_epochs=0.0), "num_epochs=0.0 is out of range"),
        (dict(warmup_epochs=100.5), "warmup_epochs=100.5 is longer than the run (num_epochs=100.0)"),
        (dict(num_train_steps=10, warmup_steps=11), "warmup_steps=11 is longer than the run (num_train_steps=10)"),
        (dict(end_learning_rate=33.0), "end_learning_rate=33.0 is above learning_rate=32.0"),
    ):
        bad = default.get_config()
        bad.update(changes)
        with pytest.raises(ValueError, match=rf"^{words.replace('(', '[(]').replace(')', '[)]')}"):
            config_checks.check_ranges(bad)
    config.update(num_epochs=0.0, num_train_steps=5)  # a run of 5 steps needs no epochs
    config_checks.check_ranges(config)


def test_every_shipped_config_is_within_range():
    for path in sorted((REPO / "configs").glob("*.py")):
        module = importlib.import_module(f"configs.{path.stem}")
        if hasattr(module, "get_config"):
            config_checks.check_ranges(module.get_config())


def test_durations_in_steps_from_epochs_steps_and_counts_per_run():
    """run_setup.resolve_steps by hand: ImageNet's 1,281,167 images at batch 32,768 are 39 steps an
    epoch, 3,900 in 100 epochs."""
    config = default.get_config()  # 100 epochs, warmup 10, evaluations and checkpoints every epoch, logs every 50
    steps = run_setup.resolve_steps(config, 1_281_167)
    assert (steps.per_epoch, steps.total, steps.warmup, steps.eval, steps.checkpoint) == (39, 3900, 390, 39, 39)
    assert (steps.log, steps.trust_ratio) == (50, 50)
    config.update(evaluations_per_run=100, logs_per_run=200)
    steps = run_setup.resolve_steps(config, 1_281_167)
    assert (steps.eval, steps.log, steps.trust_ratio, steps.checkpoint) == (39, 19, 19, 39)  # 3,900 // 100, // 200
    config.update(trust_ratio_every_steps=7, evaluations_per_run=10_000)
    steps = run_setup.resolve_steps(config, 1_281_167)
    assert (steps.trust_ratio, steps.eval) == (7, 1)  # more evaluations than steps: every step
    config.update(num_train_steps=1000, trust_ratios_per_run=3)
    steps = run_setup.resolve_steps(config, 1_281_167)
    assert (steps.total, steps.trust_ratio, steps.log) == (1000, 333, 5)
