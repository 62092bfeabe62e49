"""configs/cifar10_study.py and tools/study.py on a small subset, through main.py."""

import argparse
import csv
import json
import os
import pathlib
import subprocess
import sys

import matplotlib.image
import pytest
from absl import flags as absl_flags
from ml_collections import config_flags

import run_setup
from tools import study, study_report

REPO = pathlib.Path(__file__).resolve().parents[1]


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def study_config(flags: list[str]):
    """The config main.py builds from these flags (ml_collections' own parsing of the overrides)."""
    argv = ["main.py", *flags]
    values = absl_flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
    values(argv)
    return values.config


def test_a_cell_is_the_config_at_its_batch_with_its_optimizer_and_learning_rate():
    default = argparse.Namespace(epochs=50.0, validation=5000, steps=0)
    config = study_config(study.config_flags("sgd", 2048, 3.2, 0, default))
    assert (config.optimizer, config.nesterov, config.batch_size, config.learning_rate) == ("sgd", False, 2048, 3.2)
    # 45,000 training images (5,000 held out): 21 steps per epoch, 1,050 in 50; validation 100 times.
    steps = run_setup.resolve_steps(config, 50_000 - config.validation_images)
    assert (steps.total, steps.warmup, steps.eval, steps.trust_ratio, steps.log) == (1050, 105, 10, 10, 5)
    assert (config.num_epochs, config.seed, config.microbatch_size, config.bn_group) == (50.0, 0, 256, "64")
    assert study_config(study.config_flags("nesterov", 128, 0.1, 0, default)).nesterov
    lars = study_config(study.config_flags("lars", 128, 0.5, 0, default))
    assert (lars.optimizer, lars.trust_coefficient, lars.microbatch_size) == ("lars", 0.01, 128)
    # What differs between two cells is only what their flags name.
    a, b = (study_config(study.config_flags(m, 512, 1.0, 0, default)).to_dict() for m in ("sgd", "lars"))
    assert {k for k in a if a[k] != b[k]} == {"optimizer"}
    seeded = study_config(study.config_flags("sgd", 512, 1.0, 2, default)).to_dict()
    assert {k for k in a if a[k] != seeded[k]} == {"seed"} and seeded["seed"] == 2
    short = argparse.Namespace(epochs=8.0, validation=100, steps=6)
    smoke = study_config(study.config_flags("sgd", 512, 1.0, 0, short))
    assert (smoke.num_epochs, smoke.validation_images, smoke.num_train_steps) == (8.0, 100, 6)
    # The scaling rules, by hand: 0.1 at 128 linearly; 2 x sqrt(B/1024).
    assert study.scaled_lr("sgd", 8192) == pytest.approx(6.4)
    assert study.scaled_lr("lars", 4096) == pytest.approx(4.0)


@pytest.mark.slow
def test_study_sweeps_records_and_resumes(cifar10_small, tmp_path):
    out, page = tmp_path / "study", tmp_path / "study.md"
    page.write_text(
        "# x\n\n<!-- study:begin -->\nold table\n<!-- study:end -->\n\n"
        "<!-- critical-batch:begin -->\n<!-- critical-batch:end -->\n\nafter\n"
    )
    # Stage A: one cell (LARS, batch 64), 3 LRs, then the best LR's seed 1; Stage B: the same batch
    # at another budget (100 epochs), 3 LRs around Stage A's choice. 2,000 training images, 100 held
    # out; 6 steps per run, validation after each. Two runs at a time, each on half the cores.
    command = [
        sys.executable, "-m", "tools.study", f"--out={out}", f"--data_dir={cifar10_small}", "--methods=lars",
        "--batches=64", "--steps=6", "--validation=100", "--target=0.15", "--extend=0", "--seeds=2", f"--page={page}",
        "--stage_b_batch=64", "--stage_b_epochs=100", "--jobs=2",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the runs' own device count, as for a user
    subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    every_row = rows
    stage_b = [r for r in rows if r["epochs"] == "100.0"]
    rows = [r for r in rows if r["epochs"] == "50.0"]  # Stage A
    sweep = [r for r in rows if r["seed"] == "0"]
    assert sorted((r["method"], float(r["lr_factor"])) for r in sweep) == [("lars", f) for f in (0.5, 1.0, 2.0)]
    best = max(sweep, key=lambda r: float(r["final_validation_top1"]))
    assert [(r["lr"], r["seed"]) for r in rows if r["seed"] != "0"] == [(best["lr"], "1")]
    # Stage B, after Stage A: Stage A's choice x 1/2, 1, 2, seed 0.
    assert len(stage_b) == 3 and all(r["seed"] == "0" and r["steps"] == "6" for r in stage_b)
    assert sorted(float(r["lr"]) for r in stage_b) == pytest.approx(
        [float(best["lr"]) * f for f in (0.5, 1, 2)], rel=1e-3
    )
    for row in stage_b:
        name = f"lars_b64_lr{float(row['lr']):g}_e100"
        assert row["config"].endswith(
            " --config.num_epochs=100 --config.validation_images=100 --config.num_train_steps=6"
        )
        assert json.loads((out / "logs" / name / "config.json").read_text())["num_epochs"] == 100.0
    classes = sorted(p.name for p in (cifar10_small / "train").iterdir())
    train_files = {f"{p.parent.name}/{p.name}" for p in (cifar10_small / "train").glob("*/*.jpg")}
    splits = []
    for row in rows:
        name = f"{row['method']}_b64_lr{float(row['lr']):g}" + ("_seed1" if row["seed"] == "1" else "")
        records, workdir = read_jsonl(out / "logs" / name / "metrics.jsonl"), out / "runs" / name
        # The command is the study config with the cell's flags, and the run's config is theirs.
        rule = 2.0 * (64 / 1024) ** 0.5
        assert float(row["lr"]) == pytest.approx(rule * float(row["lr_factor"]), rel=1e-3)
        lr = f"{float(row['lr']):g}"
        seed = " --config.seed=1" if row["seed"] == "1" else ""
        assert row["config"] == (
            f"--config=configs/cifar10_study.py:64 --config.optimizer=lars --config.learning_rate={lr}{seed} "
            "--config.validation_images=100 --config.num_train_steps=6"
        )
        flags = [*row["config"].split(), f"--config.data_dir={cifar10_small}"]
        assert json.loads((workdir / "config.json").read_text()) == json.loads(study_config(flags).to_json())
        # The row is what the run's records say.
        validation = [r for r in records if r["kind"] == "eval" and r["split"] == "validation"]
        test = [r for r in records if r["kind"] == "eval" and r["split"] == "test"]
        assert [r["step"] for r in validation] == [1, 2, 3, 4, 5, 6] and all(r["eval_count"] == 100 for r in validation)
        reached = [r["step"] for r in validation if r["eval_top1"] >= 0.15]
        assert row["steps_to_target"] == (str(reached[0]) if reached else "")
        assert float(row["final_validation_top1"]) == round(validation[-1]["eval_top1"], 4)
        # The test images are read once, after the last step, and choose nothing.
        assert len(test) == 1 and test[0]["step"] == 6 and test[0]["eval_count"] == 1000
        assert records.index(test[0]) == len(records) - 1
        assert float(row["test_top1"]) == round(test[0]["eval_top1"], 4)
        # The validation split: 10 per class, disjoint from the training images, the same in every run.
        split = json.loads((workdir / "data_split.json").read_text())
        assert sorted({n.split("/")[0] for n in split["validation"]}) == classes
        assert all(sum(n.startswith(c + "/") for n in split["validation"]) == 10 for c in classes)
        assert not set(split["validation"]) & set(split["train"])
        assert set(split["validation"]) | set(split["train"]) == train_files and len(split["train"]) == 1900
        splits.append(split["validation"])
    assert all(s == splits[0] for s in splits) and len({r["validation_split"] for r in rows}) == 1

    # The chosen run per cell: the fewest steps to target, recomputed from the curves.
    text = page.read_text()
    firsts = {r["lr"]: int(r["steps_to_target"]) for r in sweep if r["steps_to_target"]}
    if firsts:
        fewest = min(firsts.values())
        assert any(f"| {fewest} ({lr})" in text for lr, s in firsts.items() if s == fewest), text
    # The budget view: the best LR's two seeds, their mean test and validation top-1 and the test range.
    seeds = [r for r in rows if r["lr"] == best["lr"]]
    tests = [100 * float(r["test_top1"]) for r in seeds]
    validation = sum(100 * float(r["final_validation_top1"]) for r in seeds) / 2
    assert (
        f"{sum(tests) / 2:.1f} ({validation:.1f}, {best['lr']}, 6; 2 seeds: {min(tests):.1f}-{max(tests):.1f})" in text
    )
    assert "Stage B: batch 64 for 100 epochs" in text
    b_best = max(stage_b, key=lambda r: float(r["final_validation_top1"]))
    b_test, b_validation = 100 * float(b_best["test_top1"]), 100 * float(b_best["final_validation_top1"])
    b_text = f"{b_test:.1f} ({b_validation:.1f}, {b_best['lr']}, 6)"
    assert "| LARS | " in text and b_text in text.split("Stage B")[1], text
    assert "old table" not in text and text.endswith("after\n")
    # The noise-scale reruns, after Stage A: the fewest-steps run and the chosen one (the same run when
    # one LR is both), again with their logs; tools.critical_batch reads them.
    with open(out / "noise_scale.csv") as f:
        noise_rows = list(csv.DictReader(f))
    reached = [r for r in sweep if r["steps_to_target"]]
    fewest = min(reached, key=lambda r: (int(r["steps_to_target"]), -float(r["final_validation_top1"])), default=None)
    wanted = {best["lr"]} | ({fewest["lr"]} if fewest else set())
    assert {r["lr"] for r in noise_rows} == wanted and all(r["seed"] == "0" for r in noise_rows)
    # Its config is the original's: 6 steps of one micro-step, fewer than a probe's 100, so no figure yet.
    rerun = out / "logs" / f"lars_b64_lr{float(noise_rows[0]['lr']):g}_noise"
    original = out / "logs" / f"lars_b64_lr{float(noise_rows[0]['lr']):g}"
    assert (rerun / "config.json").read_text() == (original / "config.json").read_text()
    report = subprocess.run([sys.executable, "-m", "tools.critical_batch", str(rerun), f"--plot={tmp_path / 'b.png'}"],
                            cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert report.returncode == 0 and "no gradient noise scale logged" in report.stdout, report.stdout + report.stderr
    assert "The gradient noise scale B_simple" in text and f"_{len(noise_rows)} noise-scale reruns" in text
    # Each run's output in its own file; main.py saw half the cores (its oneDNN threads).
    threads = len(os.sched_getaffinity(0)) // 2
    logs = [log.read_text() for log in (out / "runs").glob("*.log")]
    assert len(logs) == 7 + len(noise_rows) and all(f", {threads} OpenMP thread(s) per device." in log for log in logs)
    for image in ("steps_to_target.png", "accuracy.png", "trust_ratios.png", "noise_scale.png"):
        assert matplotlib.image.imread(out / image).std() > 0

    # Interrupted sweep: a run without a row (its checkpoints kept) and finished runs without
    # checkpoints. The next call trains nothing: the first resumes at its last step.
    with open(out / "results.csv") as f:
        lines = f.readlines()
    (out / "results.csv").write_text("".join(lines[:-1]))
    last = next(csv.DictReader(lines[:1] + lines[-1:]))
    unfinished = f"lars_b64_lr{float(last['lr']):g}" + ("_e100" if last["epochs"] == "100.0" else "")
    for checkpoints in (out / "runs").glob("*/checkpoints"):
        if checkpoints.parent.name != unfinished:
            subprocess.run(["rm", "-r", str(checkpoints)], check=True)
    stamps = {p: p.stat().st_mtime for p in (out / "runs").glob("*/metrics.jsonl")}
    done = subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    assert done.stdout.count("[study]") == 1 and len(lines) == 8  # the header and 7 runs
    assert {p: p.stat().st_mtime for p in (out / "runs").glob("*/metrics.jsonl")} == stamps
    with open(out / "results.csv") as f:
        assert [r["test_top1"] for r in csv.DictReader(f)] == [r["test_top1"] for r in every_row]


def test_sweep_goes_past_an_edge_where_either_view_wins():
    """next_factor on hand-written cells of the grid 1/2, 1, 2 (lr_factor, steps to target, final validation)."""

    def cell(*runs):
        return [{"lr_factor": f, "steps_to_target": s, "final_validation_top1": v} for f, s, v in runs]

    grid = [0.5, 1.0, 2.0]
    assert study.next_factor(cell((0.5, "", 0.6)), grid, extend=2) == 1.0  # the grid first
    assert study.next_factor(cell((0.5, "", 0.6), (1, "900", 0.72), (2, "", 0.69)), grid, extend=2) is None
    # Fewest steps inside the grid (1), but the best at the budget at its top edge (2): one more up.
    assert study.next_factor(cell((0.5, "", 0.6), (1, "900", 0.72), (2, "1000", 0.75)), grid, extend=2) == 4.0
    # No run reaches the target: the budget view alone decides; here at the bottom edge.
    assert study.next_factor(cell((0.5, "", 0.4), (1, "", 0.3), (2, "", 0.2)), grid, extend=2) == 0.25
    # Still at the edge after the extension, but `extend` runs past the grid are the limit.
    done = cell((0.25, "", 0.45), (0.5, "", 0.4), (1, "", 0.3), (2, "", 0.2))
    assert study.next_factor(done, grid, extend=2) == 0.125
    assert study.next_factor(done, grid, extend=1) is None


def test_study_rejects_unknown_method_before_writing(tmp_path):
    out = tmp_path / "study"
    command = [sys.executable, "-m", "tools.study", f"--out={out}", "--methods=sgd,adam", "--data_dir=/nonexistent"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert "unknown method(s) ['adam']" in result.stderr
    assert not out.exists()


def test_report_tabulates_the_runs_so_far_without_running(tmp_path):
    """--report on a hand-written CSV: one cell with three runs, one not run yet, and two Stage B runs at
    another budget; nothing is started."""
    out, page = tmp_path / "study", tmp_path / "study.md"
    readme = tmp_path / "README.md"
    for each in (page, readme):
        each.write_text("<!-- study:begin -->\nold\n<!-- study:end -->\n")
    runs = [("0.05", "0.5", "2450", "0.7052", "0.708"), ("0.1", "1.0", "1925", "0.735", "0.7377"),
            ("0.2", "2.0", "1925", "0.763", "0.754")]  # fmt: skip
    out.mkdir()
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=study.CSV_FIELDS)
        writer.writeheader()
        for lr, factor, steps, validation, test in runs:
            writer.writerow(dict(method="sgd", batch=128, lr=lr, lr_factor=factor, epochs=8, steps=2808,
                                 steps_to_target=steps, target=0.7, final_validation_top1=validation,
                                 test_top1=test, test_top5=0.98, final_train_loss=0.6, validation_split="x",
                                 config="c", wall_s=1))  # fmt: skip
        for lr, validation, test, top5 in [("0.8", "0.71", "0.7", "0.98"), ("0.4", "0.6549", "0.6551", "0.9449")]:
            writer.writerow(dict(method="sgd", batch=512, lr=lr, lr_factor="1.0", epochs=30, steps=1170,
                                 steps_to_target="", target=0.7, final_validation_top1=validation, test_top1=test,
                                 test_top5=top5, final_train_loss=0.6, validation_split="x", config="c",
                                 wall_s=1))  # fmt: skip
    command = [sys.executable, "-m", "tools.study", f"--out={out}", "--methods=sgd", "--batches=128,512", "--report",
               f"--page={page}", f"--page={readme}", "--data_dir=/nonexistent", "--epochs=8",
               "--stage_b_batch=512", "--stage_b_epochs=30"]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    text = page.read_text()
    assert readme.read_text() == text  # every --page gets the same tables
    # Fewest steps 1,925 is a tie of LR 0.1 and 0.2: the higher final validation top-1 (0.763) wins;
    # the budget view takes that run too, and reports its test top-1.
    assert "| 128 | 1925 (0.2) |" in text and "| 128 | 75.4 (76.3, 0.2, 2808) |" in text, text
    # The 30-epoch run is Stage B's, not this budget's: 512 is not run in either view, nor in the gaps.
    assert text.count("| 512 | not run yet |") == 3 and "| 128 | +0.0 |" in text
    stage_b = text.split("Stage B: batch 512 for 30 epochs")[1]
    assert "| momentum SGD, linear scaling | not reached in 1170 (2 LRs) | 70.0 (71.0, 0.8, 1170) |" in stage_b, text
    # Each Stage B run by learning rate, in percent to one decimal; 0.8 chosen on validation (71.0 > 65.5).
    runs = stage_b.split("Each Stage B run (seed 0):")[1]
    assert "| momentum SGD, linear scaling | 0.4 | not in 1170 | 65.5 | 65.5 | 94.5 |\n" in runs, text
    assert "| momentum SGD, linear scaling | 0.8 (chosen) | not in 1170 | 71.0 | 70.0 | 98.0 |\n" in runs, text
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "results.csv", "steps_to_target.png"]


def test_stage_b_waits_for_stage_a_and_sweeps_around_its_choice():
    """stage_a_complete and stage_b_lr on hand-written Stage A rows (grid 1/2, 1, 2; 2 seeds)."""
    args = argparse.Namespace(extend=2, seeds=2)

    def row(method, batch, factor, lr, validation, seed="0"):
        return dict(method=method, batch=str(batch), lr=lr, lr_factor=factor, seed=seed, steps="250",
                    steps_to_target="", final_validation_top1=validation, test_top1=validation)  # fmt: skip

    sgd = [row("sgd", 8192, "0.5", "0.1", "0.50"), row("sgd", 8192, "1.0", "0.2", "0.60"),
           row("sgd", 8192, "2.0", "0.4", "0.55")]  # fmt: skip
    lars = [row("lars", 8192, "0.5", "1.414", "0.60"), row("lars", 8192, "1.0", "2.828", "0.70"),
            row("lars", 8192, "2.0", "5.657", "0.65")]  # fmt: skip
    grid = [0.5, 1.0, 2.0]
    # Sweeps done, best inside; seed 1 of each best still to run: not complete.
    assert not study.stage_a_complete(sgd + lars, ["sgd", "lars"], [8192], grid, args)
    seeds = [row("sgd", 8192, "1.0", "0.2", "0.58", "1"), row("lars", 8192, "1.0", "2.828", "0.69", "1")]
    assert study.stage_a_complete(sgd + lars + seeds, ["sgd", "lars"], [8192], grid, args)
    # A cell whose best sits at an edge (LARS at 5.657) still has a run to do; a cell not run at all neither.
    edge = lars[:2] + [row("lars", 8192, "2.0", "5.657", "0.75"), row("lars", 8192, "2.0", "5.657", "0.74", "1")]
    assert not study.stage_a_complete(sgd + edge + seeds[:1], ["sgd", "lars"], [8192], grid, args)
    assert not study.stage_a_complete(sgd + lars + seeds, ["sgd", "lars"], [128, 8192], grid, args)
    # Stage B's learning rates: Stage A's choice by final validation (SGD 0.2, LARS 2.828) x the grid.
    assert [study.stage_b_lr(sgd + lars, "sgd", 8192, f) for f in grid] == [0.1, 0.2, 0.4]
    assert [study.stage_b_lr(sgd + lars, "lars", 8192, f) for f in grid] == [1.414, 2.828, 5.656]


def test_seeds_run_at_the_best_learning_rate_once_the_sweep_is_done():
    """missing_seeds and the budget table on hand-written rows: a cell whose sweep chose LR 0.2 by
    validation, with seed 1 of it done; another cell not run at all."""

    def row(lr, seed, validation, test):
        return dict(method="sgd", batch="128", lr=lr, lr_factor="1.0", seed=seed, steps="17550",
                    final_validation_top1=validation, test_top1=test)  # fmt: skip

    rows = [row("0.1", "0", "0.80", "0.79"), row("0.2", "0", "0.85", "0.84"), row("0.2", "1", "0.83", "0.80")]
    assert study.missing_seeds(rows, "sgd", 128, seeds=3) == [2]
    assert study.missing_seeds(rows, "sgd", 128, seeds=2) == []
    assert study.missing_seeds(rows, "lars", 128, seeds=3) == []  # nothing to repeat before the sweep
    # Means of 84/80 (test) and 85/83 (validation); the range of the test figures.
    assert study_report.budget_text(rows, "sgd", 128) == "82.0 (84.0, 0.2, 17550; 2 seeds: 80.0-84.0)"
    # Second-edition rows have no seed column: they are seed 0.
    old = [{k: v for k, v in r.items() if k != "seed"} for r in rows[:2]]
    assert study_report.budget_text(old, "sgd", 128) == "84.0 (85.0, 0.2, 17550)"


def test_runs_that_do_not_depend_on_each_other_are_due_together():
    """due_runs on hand-written rows and runs going (grid 1/2, 1, 2; 2 seeds; Stage B at 8,192 x 200 epochs):
    what --jobs may start at once, first to start first."""
    args = argparse.Namespace(epochs=50.0, extend=2, seeds=2, stage_b_batch=8192, stage_b_epochs=200.0)
    methods, batches, grid = ["sgd", "lars"], [128, 8192], [0.5, 1.0, 2.0]

    def row(method, batch, factor, lr, validation, seed=0, epochs=50.0):
        return dict(method=method, batch=str(batch), lr=str(lr), lr_factor=str(factor), seed=str(seed),
                    epochs=str(epochs), steps_to_target="", final_validation_top1=str(validation))  # fmt: skip

    def due(rows, going=()):
        return [(r.method, r.batch, r.lr, r.seed, r.epochs) for r in study.due_runs(rows, list(going), methods,
                                                                                   batches, grid, args)]  # fmt: skip

    # Nothing run: every cell's grid around the second edition's best (SGD 0.8 / 0.2, LARS 1.414 / 2.828).
    assert due([]) == [("sgd", 128, lr, 0, 50.0) for lr in (0.4, 0.8, 1.6)] + [
        ("lars", 128, lr, 0, 50.0) for lr in (0.707, 1.414, 2.828)
    ] + [("sgd", 8192, lr, 0, 50.0) for lr in (0.1, 0.2, 0.4)] + [
        ("lars", 8192, lr, 0, 50.0) for lr in (1.414, 2.828, 5.656)
    ]  # fmt: skip
    # SGD 128: 0.4 and 0.8 done, 1.6 going; LARS 128: 0.707 going. SGD 128 has nothing to start (whether
    # it extends depends on 1.6), LARS 128 its other two learning rates.
    sgd = [row("sgd", 128, 0.5, 0.4, 0.80), row("sgd", 128, 1.0, 0.8, 0.84)]
    going = [study.Run("sgd", 128, 1.6, 2.0, 0, 50.0), study.Run("lars", 128, 0.707, 0.5, 0, 50.0)]
    assert due(sgd, going)[:3] == [
        ("lars", 128, 1.414, 0, 50.0),
        ("lars", 128, 2.828, 0, 50.0),
        ("sgd", 8192, 0.1, 0, 50.0),
    ]
    # 1.6 finished with the best validation, at the top edge: one more factor of 2 (3.2), no seeds yet.
    edge = sgd + [row("sgd", 128, 2.0, 1.6, 0.85)]
    assert due(edge, going[1:])[0] == ("sgd", 128, 3.2, 0, 50.0)
    # 1.6 finished below 0.8: the sweep is over; seed 1 of 0.8 comes after every cell's sweep, once.
    swept, seed = sgd + [row("sgd", 128, 2.0, 1.6, 0.83)], ("sgd", 128, 0.8, 1, 50.0)
    assert due(swept, going[1:])[-1] == seed and due(swept, going[1:]).count(seed) == 1
    assert seed not in due(swept, going[1:] + [study.Run("sgd", 128, 0.8, 1.0, 1, 50.0)])
    # Stage A complete (every cell's best inside, seed 1 done): Stage B's grids around its choice at 8,192.
    stage_a = []
    for method, batch, centre in (("sgd", 128, 0.8), ("lars", 128, 1.414), ("sgd", 8192, 0.2), ("lars", 8192, 2.828)):
        stage_a += [row(method, batch, f, round(centre * f, 3), 0.8 + 0.01 * (f == 1.0)) for f in grid]
        stage_a.append(row(method, batch, 1.0, centre, 0.8, seed=1))
    assert due(stage_a) == [("sgd", 8192, lr, 0, 200.0) for lr in (0.1, 0.2, 0.4)] + [
        ("lars", 8192, lr, 0, 200.0) for lr in (1.414, 2.828, 5.656)
    ]  # fmt: skip
    assert due(stage_a[:-1]) == [("lars", 8192, 2.828, 1, 50.0)]  # one seed missing: Stage B waits
    assert due(stage_a, [study.Run("sgd", 8192, 0.2, 1.0, 0, 200.0)])[:2] == [
        ("sgd", 8192, 0.1, 0, 200.0), ("sgd", 8192, 0.4, 0, 200.0)
    ]  # fmt: skip


def test_study_rejects_more_jobs_than_cores_before_writing(tmp_path):
    out, cores = tmp_path / "study", len(os.sched_getaffinity(0))
    command = [sys.executable, "-m", "tools.study", f"--out={out}", f"--jobs={cores + 1}", "--data_dir=/nonexistent"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: --jobs={cores + 1}: between 1 and this process's {cores} cores."
    assert not out.exists()


def test_gap_table_measures_each_batch_against_the_small_batch_reference():
    """gap_table on hand-written rows: at 128 SGD (0.4, seeds 0 and 1) and LARS (1.414); at 2,048 one run
    each; 8,192 not run. LARS has the better validation at 128 (86 against 84), so it is the reference."""

    def row(method, batch, lr, validation, test, seed="0"):
        return dict(method=method, batch=str(batch), lr=lr, lr_factor="1.0", seed=seed, steps="1",
                    final_validation_top1=validation, test_top1=test)  # fmt: skip

    rows = [
        row("sgd", 128, "0.2", "0.80", "0.99"),  # not chosen (validation 80 < 85): its test does not count
        row("sgd", 128, "0.4", "0.85", "0.84"), row("sgd", 128, "0.4", "0.83", "0.82", seed="1"),
        row("lars", 128, "1.414", "0.86", "0.85"),
        row("sgd", 2048, "3.2", "0.79", "0.80"), row("lars", 2048, "5.657", "0.83", "0.835"),
    ]  # fmt: skip
    text = study_report.gap_table(rows, ["sgd", "lars"], [128, 2048, 8192])
    # Means: SGD 128 (84 + 82) / 2 = 83; against LARS 128's 85: -2.0; at 2,048 80 - 85 and 83.5 - 85.
    assert "against batch 128's 85.0 (LARS, the better validation top-1 there)" in text
    assert text.splitlines()[-3:] == [
        "| 128 | -2.0 | +0.0 | +2.0 |",
        "| 2048 | -5.0 | -1.5 | +3.5 |",
        "| 8192 | not run yet | not run yet | not run yet |",
    ]
    assert study_report.gap_table(rows[4:], ["sgd", "lars"], [128, 2048]) == ""  # nothing at 128 yet


def test_gap_table_writes_a_difference_that_rounds_to_zero_as_plus_zero():
    """At 128 LARS is the reference (validation 86) with test 85.00; SGD's test 84.96 is 0.04 points under
    it, which rounds to zero and reads +0.0 in both SGD's column and LARS - SGD, not -0.0."""
    rows = [
        dict(method="sgd", batch="128", lr="0.4", lr_factor="1.0", seed="0", steps="1",
             final_validation_top1="0.85", test_top1="0.8496"),
        dict(method="lars", batch="128", lr="1.414", lr_factor="1.0", seed="0", steps="1",
             final_validation_top1="0.86", test_top1="0.85"),
    ]  # fmt: skip
    assert study_report.gap_table(rows, ["sgd", "lars"], [128]).splitlines()[-1] == "| 128 | +0.0 | +0.0 | +0.0 |"
