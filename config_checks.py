"""The allowed range of every numeric key of configs/default.py, checked in one place before
anything is compiled or written (train.prepare). A value outside its range is a ValueError
naming the key, its value and the range; main.py prints it as one `error:` line."""

import math

# key -> (test, the range in words). Keys configs/default.py documents; tests take the value.
RANGES = {
    "num_classes": (lambda v: v >= 0, ">= 0 (0: the data set's)"),
    "image_size": (lambda v: v >= 0, ">= 0 (0: the model's)"),
    "data_shards": (lambda v: v >= 0, ">= 0 (0: one per process)"),
    "validation_images": (lambda v: v >= 0, ">= 0"),
    "batch_size": (lambda v: v > 0, "> 0"),
    "eval_batch_size": (lambda v: v >= 0, ">= 0 (0: batch_size)"),
    "num_train_steps": (lambda v: v >= 0, ">= 0 (0: num_epochs decides)"),
    "learning_rate": (lambda v: v > 0 and math.isfinite(v), "> 0 and finite"),
    "warmup_epochs": (lambda v: v >= 0 and math.isfinite(v), ">= 0 and finite"),
    "warmup_steps": (lambda v: v >= 0, ">= 0"),
    "end_learning_rate": (lambda v: v >= 0 and math.isfinite(v), ">= 0 and finite"),
    "lr_power": (lambda v: v > 0 and math.isfinite(v), "> 0 and finite"),
    "lr_decay_epochs": (lambda v: all(e >= 0 and math.isfinite(e) for e in v), "epochs >= 0, finite"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0 and math.isfinite(v), ">= 0 and finite"),
    "trust_coefficient": (lambda v: v > 0 and math.isfinite(v), "> 0 and finite"),
    "lars_eps": (lambda v: v >= 0 and math.isfinite(v), ">= 0 and finite"),
    "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "log_every_steps": (lambda v: v > 0, "> 0"),
    "trust_ratio_every_steps": (lambda v: v >= 0, ">= 0 (0: log_every_steps)"),
    "eval_every_epochs": (lambda v: v >= 0 and math.isfinite(v), ">= 0 and finite (0: at the end only)"),
    "eval_every_steps": (lambda v: v >= 0, ">= 0"),
    "checkpoint_every_epochs": (lambda v: v >= 0 and math.isfinite(v), ">= 0 and finite (0: at the end only)"),
    "checkpoint_every_steps": (lambda v: v >= 0, ">= 0"),
    "logs_per_run": (lambda v: v >= 0, ">= 0 (0: log_every_steps)"),
    "trust_ratios_per_run": (lambda v: v >= 0, ">= 0 (0: trust_ratio_every_steps)"),
    "evaluations_per_run": (lambda v: v >= 0, ">= 0 (0: eval_every_*)"),
    "keep_checkpoints": (lambda v: v >= 1, ">= 1"),
    "noise_scale_every_steps": (lambda v: v >= 1, ">= 1"),
    "noise_scale_window_steps": (lambda v: v >= 0, ">= 0 (0: 5% of the run)"),
}


def check_ranges(config) -> None:
    """Raises ValueError naming the first key of RANGES whose value is out of its range, or a
    relation between keys that does not hold: a run of some length, the warmup within it, the
    end learning rate at most the peak."""
    for key, (within, allowed) in RANGES.items():
        value = config.get(key)
        if value is not None and not within(value):
            raise ValueError(f"{key}={value!r} is out of range; allowed: {allowed}.")
    epochs = config.num_epochs
    if config.num_train_steps == 0 and not (epochs > 0 and math.isfinite(epochs)):
        raise ValueError(f"num_epochs={epochs!r} is out of range; allowed: > 0 and finite, or num_train_steps > 0.")
    if config.num_train_steps == 0 and config.warmup_steps == 0 and config.warmup_epochs > config.num_epochs:
        raise ValueError(
            f"warmup_epochs={config.warmup_epochs!r} is longer than the run (num_epochs={config.num_epochs!r}); "
            "use a warmup within it."
        )
    if config.num_train_steps > 0 and config.warmup_steps > config.num_train_steps:
        raise ValueError(
            f"warmup_steps={config.warmup_steps!r} is longer than the run "
            f"(num_train_steps={config.num_train_steps!r}); use a warmup within it."
        )
    if config.end_learning_rate > config.learning_rate:
        raise ValueError(
            f"end_learning_rate={config.end_learning_rate!r} is above learning_rate={config.learning_rate!r}; "
            "the schedule decays to it."
        )
