"""tools/study.py on a tiny budget: two batch sizes, both methods, three steps each, through main.py."""

import csv
import json
import pathlib
import subprocess
import sys

import matplotlib.image
import pytest

pytestmark = pytest.mark.slow  # minutes of subprocesses; `pytest -m "not slow"` skips them

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_study_runs_records_and_reports(cifar10_small, tmp_path):
    out = tmp_path / "study"
    page = tmp_path / "study.md"
    page.write_text("# x\n\n<!-- study:begin -->\nold table\n<!-- study:end -->\n\nafter\n")
    command = [
        sys.executable, "-m", "tools.study", f"--out={out}", f"--data_dir={cifar10_small}", "--batches=32,64",
        "--steps=3", "--epochs=1", "--num_cpu_devices=2", "--bn_group=16", f"--page={page}",
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)

    with open(out / "results.csv") as f:
        rows = {(r["method"], int(r["batch"])): r for r in csv.DictReader(f)}
    assert set(rows) == {("sgd", 32), ("sgd", 64), ("lars", 32), ("lars", 64)}
    for (method, batch), row in rows.items():
        assert int(row["steps"]) == 3
        assert 0.0 <= float(row["top1"]) <= float(row["top5"]) <= 1.0
        # The configs' LR rules, by hand: 0.1 x B/128 (SGD), 2 x sqrt(B/1024) (LARS).
        expected_lr = 0.1 * batch / 128 if method == "sgd" else 2.0 * (batch / 1024) ** 0.5
        assert abs(float(row["peak_lr"]) - expected_lr) < 1e-6
        # Each run went through main.py into its own workdir, evaluated on all 1,000 test images.
        evals = [json.loads(line) for line in (out / "logs" / f"{method}_b{batch}" / "metrics.jsonl").open()]
        last_eval = [r for r in evals if r["kind"] == "eval"][-1]
        assert last_eval["eval_count"] == 1000 and round(last_eval["eval_top1"], 4) == float(row["top1"])

    text = page.read_text()
    assert "old table" not in text and text.endswith("after\n")
    sgd_64 = rows[("sgd", 64)]
    assert f"| 64 | {100 * float(sgd_64['top1']):.1f} (3) |" in text
    for name in ("accuracy.png", "trust_ratios.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[:2] == (600, 1000) and image.std() > 0

    # Resumable: a second call finds every run in results.csv, even with the checkpoints gone, and trains nothing.
    for checkpoints in (out / "runs").glob("*/checkpoints"):
        subprocess.run(["rm", "-r", str(checkpoints)], check=True)
    stamps = {p: p.stat().st_mtime for p in (out / "runs").glob("*/metrics.jsonl")}
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    assert {p: p.stat().st_mtime for p in (out / "runs").glob("*/metrics.jsonl")} == stamps


def test_study_rejects_unknown_method_before_writing(tmp_path):
    out = tmp_path / "study"
    command = [sys.executable, "-m", "tools.study", f"--out={out}", "--methods=sgd,adam", "--data_dir=/nonexistent"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert "unknown method(s) ['adam']" in result.stderr
    assert not out.exists()
