"""The trust-ratio notebook, executed headless, and the command-line plots."""

import json
import pathlib
import subprocess
import sys

import nbclient
import nbformat
import numpy as np
import pytest
from PIL import Image

import train
from configs import cifar10_lars

pytestmark = pytest.mark.slow  # minutes of subprocesses; `pytest -m "not slow"` skips them

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(cifar10_small, tmp_path_factory):
    """Two short LARS runs on real images (batch 32 and 64), trust ratios logged every step."""
    workdirs = []
    for batch in (32, 64):
        config = cifar10_lars.get_config(str(batch))
        config.update(
            data_dir=str(cifar10_small), model="cifar_resnet8", num_train_steps=4, log_every_steps=1,
            trust_ratio_every_steps=1, checkpoint_every_steps=2, eval_every_steps=4, eval_batch_size=100,
            noise_scale_every_steps=1,
        )  # fmt: skip
        workdir = tmp_path_factory.mktemp(f"batch{batch}")
        train.train_and_evaluate(config, str(workdir))
        workdirs.append(workdir)
    return workdirs


def execute_notebook(workdir, compare=()) -> tuple[dict, list]:
    """Runs the notebook on `workdir`; returns its live check ({"step", "diff"}) and its images."""
    notebook = nbformat.read(REPO / "notebooks" / "trust_ratios.ipynb", as_version=4)
    assert not any(cell.get("outputs") for cell in notebook.cells), "commit the notebook without outputs"
    index = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
    setting = f"WORKDIR = {str(workdir)!r}\nCOMPARE_WORKDIRS = {[str(w) for w in compare]!r}"
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(setting))
    notebook.cells.append(
        nbformat.v4.new_code_cell("import json; print(json.dumps({'step': step, 'diff': max_relative_difference}))")
    )
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO / "notebooks")}})  # fmt: skip
    client.execute()
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    return json.loads(notebook.cells[-1].outputs[0]["text"]), images


def test_notebook_runs_and_live_ratios_match_the_log(runs):
    result, images = execute_notebook(runs[0], compare=[runs[1]])
    # Checkpoint 2 and the record of step 3: the same gradient, recomputed.
    assert result["step"] == 2
    assert result["diff"] < 1e-4
    assert len(images) >= 7  # curves, the noise scale, 4 plots, the overlay


def test_notebook_runs_on_the_demo_workdir(demo_run):
    """make demo's workdir with its default settings: trust ratios every 20 steps, checkpoints every 50."""
    workdir, code, output = demo_run
    assert code == 0, output[-3000:]
    result, images = execute_notebook(workdir)
    # The trainer logs the step after each checkpoint (50, 100; 150 is the last step).
    assert result["step"] == 100
    assert result["diff"] < 1e-4
    assert len(images) >= 5


def test_command_line_plots(runs, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "tools.plot_trust_ratios", *map(str, runs), "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    names = {"trust_ratios.png", "norms.png", "effective_lr.png", "heatmap.png", "compare.png"}
    assert {p.name for p in tmp_path.iterdir()} == names
    for name in names:
        image = np.asarray(Image.open(tmp_path / name).convert("L"), dtype=float)
        assert image.shape == (600, 1000)
        assert image.std() > 10  # something is drawn
