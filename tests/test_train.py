"""train.py and main.py end to end: real data, subprocesses, signals, resume, errors."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import compile_step
import run_files
import run_setup
import train
from configs import cifar10_lars, demo

REPO = pathlib.Path(__file__).resolve().parents[1]


def cifar_config(cifar10_dir, **overrides):
    config = cifar10_lars.get_config("64")
    config.data_dir = str(cifar10_dir)
    overrides = {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in overrides.items()}
    config.model = "cifar_resnet8"
    config.eval_batch_size = 500
    config.log_every_steps = 1
    config.update(overrides)
    return config


def flags(config_file: str, overrides: dict) -> list[str]:
    return [f"--config={config_file}"] + [f"--config.{k}={v}" for k, v in overrides.items()]


def run_main(args, workdir, *, devices=None, wait=True, env=None, cwd=REPO):
    """Runs main.py in a fresh process (its own device count, nothing shared)."""
    env = dict(os.environ if env is None else env)
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "main.py", f"--workdir={workdir}", *args]
    if devices:
        command.append(f"--num_cpu_devices={devices}")
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return process
    output, _ = process.communicate(timeout=900)
    return process.returncode, output


def metrics(workdir, kind="train"):
    path = pathlib.Path(workdir) / run_files.METRICS_FILE
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def leaves(state):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


# CIFAR ResNet-8 with LARS, 150 steps at batch 128 (0.38 epochs) on the 50,000 real images.
JPEG_RUN = dict(
    model="cifar_resnet8", batch_size=128, eval_batch_size=1000, num_train_steps=150, learning_rate=3.0,
    warmup_steps=15, trust_coefficient=0.01, log_every_steps=25, trust_ratio_every_steps=50,
)  # fmt: skip
# These runs are long enough that XLA's optimisations pay for their compile time (conftest.py turns
# them off for the rest), and their spread below was measured with them.
OPTIMIZED = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="0")


@pytest.fixture(scope="module")
def onednn_jpeg_run(cifar10_dir, tmp_path_factory):
    """(workdir, output) of JPEG_RUN with the default oneDNN kernels, evaluated and saved at 75 and 150."""
    run = tmp_path_factory.mktemp("onednn") / "run"
    overrides = dict(JPEG_RUN, data_dir=cifar10_dir, eval_every_steps=75, checkpoint_every_steps=75)
    code, output = run_main(flags("configs/cifar10_lars.py", overrides), run, env=OPTIMIZED)
    assert code == 0, output[-3000:]
    return run, output


@pytest.mark.slow
def test_end_to_end_on_cifar10_jpegs(onednn_jpeg_run):
    """150 steps on the real images: accuracy far above chance, all logs written."""
    run, output = onednn_jpeg_run
    assert "Convolutions, dense layers, max pooling and BatchNorm: oneDNN 3.2" in output
    evals = metrics(run, "eval")
    assert [e["step"] for e in evals] == [75, 150]
    assert all(e["eval_count"] == 10_000 for e in evals)
    # Chance is 0.10. Measured after 150 steps, seeds 0/1/2: top-1 0.385 / 0.394 / 0.376.
    assert evals[-1]["eval_top1"] > 0.30, evals
    assert evals[-1]["eval_top5"] > 0.75
    trains = metrics(run)
    assert [t["step"] for t in trains] == [25, 50, 75, 100, 125, 150]
    assert trains[-1]["loss"] < trains[0]["loss"]
    assert all(t["images_per_sec"] > 0 and t["eta_sec"] >= 0 for t in trains)
    trust = [json.loads(line) for line in (run / run_files.TRUST_RATIOS_FILE).read_text().splitlines()]
    # Every 50 steps, the last, and the step after each checkpoint (75), for the notebook's live check.
    assert [t["step"] for t in trust] == [50, 76, 100, 150]
    layers = trust[-1]["layers"]
    assert list(layers)[0] == "stem_conv/kernel" and list(layers)[-1] == "head/bias"  # network order
    assert layers["head/bias"]["excluded"] and layers["head/bias"]["trust_ratio"] == 1.0
    kernel = layers["stage2_block1/conv1/kernel"]
    # The logged ratio is eta * ||w|| / (||g|| + beta ||w||), with the logged norms of the step.
    # (The norms are those before the update; weight decay 5e-4, eta 0.01.)
    want = 0.01 * kernel["param_norm"] / (kernel["grad_norm"] + 5e-4 * kernel["param_norm"])
    np.testing.assert_allclose(kernel["trust_ratio"], want, rtol=1e-4)
    assert "Model cifar_resnet8: 78,042 parameters" in output
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["150", "75"]
    assert any(p.name.startswith("events.out.tfevents") for p in (run).iterdir())


@pytest.mark.slow
def test_onednn_trains_to_the_accuracy_of_xla_kernels(onednn_jpeg_run, cifar10_dir, tmp_path):
    """The same run (same seed, data order and augmentation) with XLA's own kernels reaches the same
    test top-1. The two differ by rounding, which training amplifies: measured after 150 steps,
    seeds 0/1/2, oneDNN 0.3847 / 0.3938 / 0.3758 and XLA 0.3820 / 0.3886 / 0.3792, same-seed gaps
    <= 0.0052, seed-to-seed sd 0.005-0.009. 0.03 is ~4 sd of that spread; a wrong gradient, BatchNorm
    or layout in either path leaves the run near chance (0.10) or far behind."""
    onednn_run, _ = onednn_jpeg_run
    overrides = dict(JPEG_RUN, data_dir=cifar10_dir, eval_every_steps=150, checkpoint_every_steps=150, conv_impl="xla")
    code, output = run_main(flags("configs/cifar10_lars.py", overrides), tmp_path / "xla", env=OPTIMIZED)
    assert code == 0, output[-3000:]
    assert "Convolutions: XLA" in output
    (xla,), onednn = metrics(tmp_path / "xla", "eval"), metrics(onednn_run, "eval")[-1]
    assert xla["step"] == onednn["step"] == 150 and xla["eval_count"] == onednn["eval_count"] == 10_000
    assert abs(xla["eval_top1"] - onednn["eval_top1"]) <= 0.03, (xla, onednn)


@pytest.mark.slow
def test_one_device_equals_four_devices_with_global_batch_norm(cifar10_small, tmp_path):
    # XLA's kernels in both: statistics over 4 devices are XLA's, over 1 device they would be
    # oneDNN's, and two implementations' rounding, amplified by 5 steps, is not what this tests.
    overrides = dict(
        data_dir=cifar10_small, model="cifar_resnet8", batch_size=32, num_train_steps=5, bn_group="global",
        log_every_steps=1, eval_every_steps=5, checkpoint_every_steps=5, eval_batch_size=100, conv_impl="xla",
    )  # fmt: skip
    for devices in (1, 4):
        code, output = run_main(flags("configs/cifar10_lars.py", overrides), tmp_path / f"d{devices}", devices=devices)
        assert code == 0, output[-3000:]
        assert f"{devices} local / {devices} global devices" in output
    one, four = metrics(tmp_path / "d1"), metrics(tmp_path / "d4")
    losses_one, losses_four = np.array([m["loss"] for m in one]), np.array([m["loss"] for m in four])
    # The first loss is one forward pass (float32 rounding); later ones follow parameters that
    # differ by rounding amplified over the steps, held like the parameters below to 1e-2 of
    # how far the loss moves in a step. Statistics per device would move it by O(1) of that.
    np.testing.assert_allclose(losses_one[0], losses_four[0], rtol=1e-5)
    np.testing.assert_allclose(losses_one, losses_four, rtol=0, atol=1e-2 * np.max(np.abs(np.diff(losses_one))))
    # Top-1 over 1,000 test images: an image whose two best logits are within rounding may flip.
    np.testing.assert_allclose(
        metrics(tmp_path / "d1", "eval")[0]["eval_top1"], metrics(tmp_path / "d4", "eval")[0]["eval_top1"], atol=2e-3
    )
    config = cifar_config(cifar10_small, **overrides)
    one_params, four_params = [leaves(run_files.restore_state(config, tmp_path / f"d{d}")[1]) for d in (1, 4)]
    initial = leaves(run_setup.init_state(run_setup.prepare(config)))
    for a, b, start in zip(one_params, four_params, initial):
        # Same arithmetic summed in another order: float32 rounding, amplified by
        # 5 steps. Measured, as the worst tensor's difference over the distance it
        # moved: 2e-3 compiled with XLA's optimisations, 1.5e-2 and 3.3e-2 without
        # (two subsets, in BN biases); statistics per device instead: 0.82.
        moved = np.max(np.abs(a - start))
        np.testing.assert_allclose(a, b, rtol=0, atol=0.1 * moved + 1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("loop", ["scan", "unroll", "host"])
def test_gradient_accumulation_equals_one_big_step(cifar10_small, tmp_path, loop):
    """Batch 32 on 4 devices as 4 micro-steps of 2 per device equals one step of 8 per device,
    whether the micro-steps run in the compiled step or the host feeds them one by one."""
    common = dict(
        model="cifar_resnet8", batch_size=32, num_train_steps=3, eval_every_steps=1000, checkpoint_every_steps=1000,
        model_kwargs={"use_bn": False}, warmup_steps=0, learning_rate=0.5, microbatch_loop=loop,
    )  # fmt: skip
    results = []
    for micro in (0, 2):
        config = cifar_config(cifar10_small, **common, microbatch_size=micro)
        state, _ = train.train_and_evaluate(config, str(tmp_path / f"micro{micro}"))
        results.append((leaves(state), metrics(tmp_path / f"micro{micro}")))
    (big, big_log), (acc, acc_log) = results
    assert "4 micro-steps" not in json.dumps(big_log)
    np.testing.assert_allclose([m["loss"] for m in big_log], [m["loss"] for m in acc_log], rtol=1e-5)
    moved = 0
    for a, b in zip(big, acc):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        moved += not np.allclose(a, 0)
    assert moved > 0


def _wait_for(predicate, process, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended early: {process.stdout.read()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(cifar10_small, tmp_path):
    # The noise scale's probe every 3 steps: its moving averages resume with the rest of the state.
    overrides = dict(
        data_dir=cifar10_small, model="cifar_resnet8", batch_size=64, num_train_steps=16, checkpoint_every_steps=4,
        eval_every_steps=1000, log_every_steps=1, noise_scale_every_steps=3,
    )  # fmt: skip
    args = flags("configs/cifar10_lars.py", overrides)
    code, output = run_main(args, tmp_path / "straight")
    assert code == 0, output[-3000:]

    process = run_main(args, tmp_path / "killed", wait=False)
    checkpoints = tmp_path / "killed" / "checkpoints"
    _wait_for(lambda: (checkpoints / "4").is_dir(), process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 16, saved  # killed mid-run
    # What a kill while writing the checkpoint of step 13 (a signal's) leaves: orbax's temporary name.
    partial = checkpoints / "13.orbax-checkpoint-tmp" / "default.orbax-checkpoint-tmp"
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "_METADATA").write_text("{")
    code, output = run_main(args, tmp_path / "killed")
    assert code == 0, output[-3000:]
    assert not list(checkpoints.glob("*tmp*"))  # the resumed run removed the partial checkpoint
    assert f"Resuming from the checkpoint of step {saved[-1]}" in output
    # The logs hold each step once: what the killed run wrote past its checkpoint was dropped on resume.
    for kind in ("train", "eval"):
        assert [r["step"] for r in metrics(tmp_path / "killed", kind)] == [
            r["step"] for r in metrics(tmp_path / "straight", kind)
        ]
    trust = lambda run: [json.loads(line)["step"] for line in (tmp_path / run / run_files.TRUST_RATIOS_FILE).open()]  # noqa: E731
    assert trust("killed") == trust("straight")
    noise = lambda run: [(r["step"], r.get("grad_noise_scale")) for r in metrics(tmp_path / run)]  # noqa: E731
    assert noise("killed") == noise("straight") and noise("straight")[-1][1] is not None

    config = cifar_config(cifar10_small, **overrides)
    straight = leaves(run_files.restore_state(config, tmp_path / "straight")[1])
    resumed = leaves(run_files.restore_state(config, tmp_path / "killed")[1])
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_zero(cifar10_small, tmp_path):
    overrides = dict(data_dir=cifar10_small, model="cifar_resnet8", batch_size=64, num_train_steps=100_000,
                     checkpoint_every_steps=100_000, eval_every_steps=100_000, log_every_steps=1)  # fmt: skip
    process = run_main(flags("configs/cifar10_lars.py", overrides), tmp_path / "run", wait=False)
    _wait_for(lambda: (tmp_path / "run" / run_files.METRICS_FILE).exists(), process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output[-3000:]
    saved = [int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 1 <= saved[0] < 100_000
    assert f"saved the checkpoint of step {saved[0]}; stopping" in output
    last = output.strip().splitlines()[-1]
    assert f"Stopped by signal 15 at step {saved[0]} (its checkpoint is saved)" in last, last
    assert f"--workdir={tmp_path / 'run'} resumes it" in last and "Finished" not in output


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_stops_and_a_killed_one_does_not_block(cifar10_small, tmp_path):
    overrides = dict(data_dir=cifar10_small, model="cifar_resnet8", batch_size=64, num_train_steps=100_000,
                     checkpoint_every_steps=2, eval_every_steps=100_000, log_every_steps=1)  # fmt: skip
    workdir = tmp_path / "run"
    first = run_main(flags("configs/cifar10_lars.py", overrides), workdir, wait=False)
    _wait_for(lambda: (workdir / "checkpoints" / "2").is_dir(), first)
    code, output = run_main(flags("configs/cifar10_lars.py", overrides), workdir)
    assert code == 2, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"--workdir={workdir} is in use by another run" in errors[0], output[-3000:]
    assert f"PID {first.pid}," in errors[0], errors[0]
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    # The first run's log was not cut short by the second: every step from 1, once.
    steps = [r["step"] for r in metrics(workdir)]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 2
    # A killed run leaves no lock behind: the restart resumes.
    code, output = run_main(flags("configs/cifar10_lars.py", overrides | dict(num_train_steps=steps[-1] + 2)), workdir)
    assert code == 0, output[-3000:]
    assert "Resuming from the checkpoint of step" in output


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(batch_size=30), r"batch_size=30 is not divisible by the 4 devices \(1 process\(es\)\)"),
        (dict(batch_size=32, microbatch_size=3), r"microbatch_size=3 does not divide the per-device batch of 8"),
        (dict(model="resnet51"), r"Unknown model 'resnet51'; choose from \['alexnet', 'alexnet_bn'"),
        (dict(optimizer="adam"), r"Unknown optimizer 'adam'; choose from \('lars', 'sgd', 'lamb'\)"),
        (dict(dataset="mnist"), r"Unknown dataset 'mnist'; choose from \('imagenet2012', 'cifar10'"),
        (dict(bn_group="7"), r"bn_group=7 must divide the per-device micro-batch of 16"),
        (dict(dataset="imagenet2012", data_dir="{tmp}/tfds"), r"tfds build imagenet2012 --data_dir=.*/tfds"),
    ],
)
def test_bad_config_fails_before_anything_is_written(cifar10_small, tmp_path, overrides, message):
    overrides = {k: v.format(tmp=tmp_path) if isinstance(v, str) else v for k, v in overrides.items()}
    config = cifar_config(cifar10_small, **overrides)
    workdir = tmp_path / "workdir"
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, str(workdir))
    assert not workdir.exists()
    assert not (tmp_path / "tfds").exists() or not any((tmp_path / "tfds").iterdir())


def test_command_line_errors_write_nothing(cifar10_small, tmp_path):
    code, output = run_main(["--config=configs/demo.py", "--config.batch_sise=64"], tmp_path / "typo")
    assert code != 0 and "batch_sise" in output
    code, output = run_main(
        ["--config=configs/cifar10_lars.py", f"--config.data_dir={cifar10_small}", "--config.batch_size=100"],
        tmp_path / "batch",
        devices=8,
    )
    assert code == 2 and "error: batch_size=100 is not divisible by the 8 devices" in output
    assert not (tmp_path / "typo").exists() and not (tmp_path / "batch").exists()


def test_a_non_finite_step_returns_the_state_it_was_given():
    """The in-graph guard, in one jitted step of the demo model on 4 devices: a NaN pixel makes the
    stem's kernel gradient NaN, the step is flagged and hands back its input state bit for bit; the
    next, finite step moves it. The logged global parameter norm is that of the parameters the
    step started from, against a float64 sum over every leaf."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    config = demo.get_config()
    config.batch_size, config.warmup_epochs = 8, 0.0  # a learning rate above 0 from the first step
    setup = run_setup.prepare_model(config, 10, num_train=64, channels=1)
    step, state = compile_step.jit_train_step(setup), run_setup.init_state(setup)
    before = jax.device_get(state)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((8, 8, 8, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 8).astype(np.int32)
    put = lambda x: jax.device_put(x, NamedSharding(setup.mesh, P("data")))  # noqa: E731
    poisoned = images.copy()
    poisoned[5, 3, 4, 0] = np.nan

    state, metrics = step(state, {"image": put(poisoned), "label": put(labels)}, jax.random.key(0))
    # The stem's kernel gradient sums the NaN pixel times its output gradient; deeper layers may see
    # the NaN or not (a ReLU can return 0 for it), so only the stem is certain.
    assert not bool(metrics["ok"]) and not bool(metrics["grads_finite"]["stem_conv"]["kernel"])
    after = jax.device_get(state)
    for kept, given in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(np.asarray(kept), np.asarray(given))

    state, metrics = step(state, {"image": put(images), "label": put(labels)}, jax.random.key(0))
    assert bool(metrics["ok"]) and all(map(bool, jax.tree.leaves(metrics["grads_finite"])))
    assert int(state.step) == 1 and not np.array_equal(leaves(state)[-1], leaves(before)[-1])
    want = np.sqrt(sum(np.sum(np.square(x, dtype=np.float64)) for x in leaves(before)))
    # Each leaf's squares are summed in float32: relative error <= depth * 2^-24 for a summation tree
    # of that depth; XLA's vectorized reductions stay far below 100 levels, so 100 * 6e-8 < 1e-5.
    assert abs(float(metrics["param_norm"]) - want) <= 1e-5 * want


@pytest.mark.slow
def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(cifar10_small, tmp_path):
    config = cifar_config(
        cifar10_small, optimizer="sgd", learning_rate=1e6, warmup_steps=0, lr_schedule="cosine", batch_size=32,
        num_train_steps=50, checkpoint_every_steps=1, eval_every_steps=1000, keep_checkpoints=2,
    )  # fmt: skip
    with pytest.raises(train.TrainingError, match=r"non-finite loss or gradient at step (\d+) \(first non-finite") as e:
        train.train_and_evaluate(config, str(tmp_path / "run"))
    step = int(e.value.args[0].split("at step ")[1].split(" ")[0])
    # Checked lazily, but before every checkpoint: the last one is the step before.
    assert f"the last checkpoint is step {step - 1}." in str(e.value)
    _, state = run_files.restore_state(config, tmp_path / "run")
    assert int(state.step) == step - 1
    assert all(np.isfinite(x).all() for x in leaves(state))


@pytest.mark.slow
def test_readme_demo_command_on_a_clean_clone(demo_run):
    """The README's first command (make demo), minus the virtualenv set-up, on a clean clone."""
    workdir, code, output = demo_run
    assert code == 0, output[-3000:]
    final = metrics(workdir, "eval")[-1]
    # Measured: 0.957 top-1 on the 300 held-out digits after 150 steps.
    assert final["step"] == demo.get_config().num_epochs * 5 and final["eval_top1"] > 0.9


def _damage(checkpoint: pathlib.Path):
    """Zeroes the second quarter of the checkpoint's largest data file, as a bad disk or a cut copy leaves it."""
    data = max((p for p in checkpoint.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.seek(size // 4)
        f.write(b"\0" * (size // 4))


@pytest.mark.slow
def test_a_damaged_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(cifar10_small, tmp_path):
    overrides = dict(data_dir=cifar10_small, model="cifar_resnet8", batch_size=64, num_train_steps=4,
                     checkpoint_every_steps=2, eval_every_steps=1000, log_every_steps=1)  # fmt: skip
    args = flags("configs/cifar10_lars.py", overrides)
    workdir = tmp_path / "run"
    code, output = run_main(args, workdir)
    assert code == 0, output[-3000:]
    config = cifar_config(cifar10_small, **overrides)
    intact = leaves(run_files.restore_state(config, workdir, 4)[1])
    subprocess.run(["cp", "-r", str(workdir), str(tmp_path / "copy")], check=True)
    _damage(workdir / "checkpoints" / "4")

    code, output = run_main(args, workdir)
    assert code == 0, output[-3000:]
    warning = [line for line in output.splitlines() if "The checkpoint of step 4 cannot be restored" in line]
    assert len(warning) == 1 and f"moved to {workdir / 'damaged_checkpoints' / '4'}" in warning[0], output[-3000:]
    assert "Resuming from the checkpoint of step 2." in output
    # orbax's other reads of the damaged checkpoint fail too, in coroutines nobody awaits; Python reports
    # them as they are collected (1 to 100 tracebacks in 2 of 4 tries here): the console keeps
    # the one warning line, every time.
    for attempt in range(3):
        again = tmp_path / f"again{attempt}"
        subprocess.run(["cp", "-r", str(tmp_path / "copy"), str(again)], check=True)
        _damage(again / "checkpoints" / "4")
        code, more = run_main(args, again)
        output += more
        assert code == 0 and "Resuming from the checkpoint of step 2." in more, more[-3000:]
        assert [line for line in more.splitlines() if line.startswith("W")] == [
            line for line in more.splitlines() if "The checkpoint of step 4 cannot be restored" in line
        ], more[-3000:]
    assert "Traceback" not in output and "Exception ignored" not in output
    assert (workdir / "damaged_checkpoints" / "4").is_dir()  # set aside, not deleted
    # Steps 3 and 4 again from the intact step 2: the same state as the first time, bit for bit.
    for a, b in zip(leaves(run_files.restore_state(config, workdir, 4)[1]), intact):
        np.testing.assert_array_equal(a, b)
    assert [r["step"] for r in metrics(workdir)] == [1, 2, 3, 4]

    # None intact: one error line, exit 1, both set aside.
    workdir = tmp_path / "copy"
    for step in ("2", "4"):
        _damage(workdir / "checkpoints" / step)
    code, output = run_main(args, workdir)
    assert code == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no checkpoint in" in errors[0] and "steps 4, 2 were moved to" in errors[0], errors
    assert sorted(p.name for p in (workdir / "damaged_checkpoints").iterdir()) == ["2", "4"]
