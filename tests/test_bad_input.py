"""Mistakes a new user makes, through main.py: one `error:` line, the right exit code, nothing written."""

import concurrent.futures
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR = "--config=configs/cifar10_lars.py"


def run_main(args, cwd=REPO, timeout=600, one_stream=False):
    """main.py's exit code, stdout and stderr; one_stream: stderr written into stdout, in order."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    stderr = subprocess.STDOUT if one_stream else subprocess.PIPE
    done = subprocess.run([sys.executable, "main.py", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=stderr, text=True, timeout=timeout)  # fmt: skip
    return done.returncode, done.stdout, done.stderr or ""


def snapshot(*folders) -> dict[str, str]:
    """Path -> content hash of every file under the folders (that exist)."""
    files = {}
    for folder in map(pathlib.Path, folders):
        if folder.is_file():
            files[str(folder)] = hashlib.sha256(folder.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
            if path.is_file():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def small_cifar(data_dir, **extra):
    values = dict(data_dir=data_dir, model="cifar_resnet8", batch_size=32, num_train_steps=2, eval_batch_size=100,
                  eval_every_steps=1000, checkpoint_every_steps=1, log_every_steps=1)  # fmt: skip
    values.update(extra)
    return [CIFAR] + [f"--config.{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def trained(cifar10_small, tmp_path_factory):
    """A workdir with a finished 2-step cifar_resnet8 run (checkpoints 1 and 2)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    code, _, err = run_main([*small_cifar(cifar10_small), f"--workdir={workdir}"])
    assert code == 0, err[-3000:]
    return workdir


# (case, arguments with {data} and {workdir} and {file}, exit code, words in the error line)
CONFIG_ERRORS = [
    ("key typo", ["--config=configs/demo.py", "--config.batchsize=8"], ["unknown config key 'batchsize'",
                                                                          "did you mean 'batch_size'?"]),
    ("bad value", ["--config=configs/demo.py", "--config.batch_size=many"], ["--config.batch_size=many", "int()"]),
    ("no such config file", ["--config=configs/resnet51.py"], ["cannot load the config file", "configs/resnet51.py"]),
    ("variant not taken", ["--config=configs/demo.py:512"], ["get_config() takes 0 positional arguments"]),
    ("stray argument", ["--config=configs/demo.py", "train"], ["unexpected arguments ['train']"]),
    ("workdir is a file", ["--config=configs/demo.py", "--workdir={file}"], ["is a file, not a folder"]),
    ("batch over devices", [*small_cifar("{data}", batch_size=30), "--num_cpu_devices=4"],
     ["batch_size=30 is not divisible by the 4 devices"]),
    ("unknown model", small_cifar("{data}", model="resnet51"), ["Unknown model 'resnet51'"]),
    ("unknown normalization", small_cifar("{data}", normalization="mnist"), ["Unknown normalization 'mnist'"]),
    ("class count", small_cifar("{data}", num_classes=100), ["num_classes=100 but data set 'image_folder' has 10"]),
    ("empty data folder", small_cifar("{empty}"), ["no <split>/<class>/<image> files"]),
    ("negative learning rate", ["--config=configs/demo.py", "--config.learning_rate=-1"],
     ["learning_rate=-1.0 is out of range; allowed: > 0 and finite"]),
    ("zero epochs", ["--config=configs/demo.py", "--config.num_epochs=0"], ["num_epochs=0.0 is out of range"]),
    ("warmup past the run", ["--config=configs/demo.py", "--config.warmup_epochs=100"],
     ["warmup_epochs=100.0 is longer than the run (num_epochs=30.0)"]),
    ("weight decay nan", ["--config=configs/demo.py", "--config.weight_decay=nan"],
     ["weight_decay=nan is out of range; allowed: >= 0 and finite"]),
    ("momentum above 1", ["--config=configs/demo.py", "--config.momentum=1.5"],
     ["momentum=1.5 is out of range; allowed: in [0, 1)"]),
    ("micro-batch not a number", small_cifar("{data}", microbatch_size="half"),
     ["microbatch_size='half': use a number of examples per device, 0 or 'auto'"]),
    # ResNet-8's temporaries at half a million 32x32 images in one step: ~420 GiB, more than any node.
    ("step larger than memory", ["--config=configs/cifar10_lars.py", "--config.dataset=synthetic",
                                 "--config.model=cifar_resnet8", "--config.batch_size=524288"],
     ["the train step needs", "with 524288 examples per device per micro-step", "should fit (or 'auto')"]),
    ("another model in the workdir", [*small_cifar("{data}", model="cifar_resnet20"), "--workdir={trained}"],
     ["holds checkpoints of another model", "model 'cifar_resnet8' -> 'cifar_resnet20'", "use a new --workdir"]),
    ("config file with a syntax error", ["--config={configs}/syntax.py"],
     ["config file {configs}/syntax.py, line 5: SyntaxError: '(' was never closed"]),
    ("config file with an undefined name", ["--config={configs}/name.py:64"],
     ["config file {configs}/name.py, line 5: NameError: name 'batch' is not defined"]),
    ("config file raising in get_config", ["--config={configs}/raises.py"],
     ["config file {configs}/raises.py, line 5: ValueError: pick a batch size"]),
    ("test class that training lacks", small_cifar("{extra_class}"),
     ["image_folder: test/ has class(es) ['zebra'] that train/ lacks", "{extra_class}/test/zebra"]),
]  # fmt: skip

# Config files as a user editing configs/ might leave them (line 5 is the faulty one).
BROKEN_CONFIGS = {
    "syntax.py": "from configs import default\n\n\ndef get_config():\n    config = default.get_config(\n",
    "name.py": "from configs import default\n\n\ndef get_config(arg):\n    default.get_config().batch_size = batch\n",
    "raises.py": "from configs import default\n\n\ndef get_config():\n    raise ValueError('pick a batch size')\n",
}


def folder_with_a_test_class_training_lacks(data, root):
    """Links to two classes of `data`'s images, and a test/ class ("zebra") with no training images."""
    for split in ("train", "test"):
        for label in ("cat", "dog") + (("zebra",) if split == "test" else ()):
            (root / split / label).mkdir(parents=True)
            source = data / split / ("dog" if label == "zebra" else label)
            for name in sorted(os.listdir(source))[:4]:
                os.symlink(source / name, root / split / label / name)
    return root


def case_folder(root: pathlib.Path, data: pathlib.Path) -> dict:
    """The files one case's arguments name, made under `root`: {name in CONFIG_ERRORS: path}."""
    a_file = root / "notes.txt"
    a_file.write_text("not a workdir")
    (root / "empty").mkdir()
    configs = root / "configs"
    configs.mkdir()
    for name, text in BROKEN_CONFIGS.items():
        (configs / name).write_text(text)
    extra_class = folder_with_a_test_class_training_lacks(data, root / "extra_class")
    return dict(data=data, file=a_file, empty=root / "empty", configs=configs, extra_class=extra_class)


@pytest.fixture(scope="module")
def config_error_runs(cifar10_small, trained, tmp_path_factory):
    """{case: (folder, args, words, exit code, stdout, stderr, files before, files after)} of every
    CONFIG_ERRORS case, each main.py in its own folder, as many at a time as there are cores (each
    run is mostly Python importing, one core's work)."""
    shared = [trained, cifar10_small]
    shared_before = snapshot(*shared)

    def run(case, args, words):
        folder = tmp_path_factory.mktemp(case.replace(" ", "_"))
        values = dict(case_folder(folder, cifar10_small), trained=trained)
        args = [arg.format(**values) for arg in args]
        if not any(arg.startswith("--workdir=") for arg in args):
            args.append(f"--workdir={folder / 'run'}")
        before = snapshot(folder)
        code, out, err = run_main(args)
        return folder, args, [word.format(**values) for word in words], code, out, err, before, snapshot(folder)

    with concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        runs = {case: pool.submit(run, case, args, words) for case, args, words in CONFIG_ERRORS}
        runs = {case: future.result() for case, future in runs.items()}
    assert snapshot(*shared) == shared_before  # nothing written in the trained workdir or the data
    return runs


@pytest.mark.parametrize("case", [c[0] for c in CONFIG_ERRORS])
def test_configuration_mistakes(case, config_error_runs):
    folder, args, words, code, out, err, before, after = config_error_runs[case]
    assert code == 2, (case, err[-3000:])
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: "), err[-3000:]
    assert sum(line.startswith("error: ") for line in lines) == 1, err[-3000:]
    for word in words:
        assert word in lines[-1], (word, lines[-1])
    assert "Traceback" not in err + out
    assert after == before  # nothing written in the case's folder
    assert not (folder / "run").exists()


@pytest.mark.slow
def test_corrupt_image_stops_with_its_name_and_check_images_lists_all(cifar10_small, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            (data / split / label).mkdir(parents=True)
            for i in range(8):
                os.symlink(cifar10_small / split / label / sorted(os.listdir(cifar10_small / split / label))[i],
                           data / split / label / f"{i}.jpg")  # fmt: skip
    (data / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (data / "test" / "cat" / "empty.jpg").write_bytes(b"")
    code, _, err = run_main([*small_cifar(data, batch_size=8, eval_batch_size=8), f"--workdir={tmp_path / 'run'}"])
    assert code == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: cannot decode image '") and "train/dog/broken.jpg" in last, last
    assert "python -m tools.check_images DIR" in last and "Traceback" not in err
    assert "{{" not in last and "function_node" not in last, last  # our words, not TensorFlow's node names
    done = subprocess.run([sys.executable, "-m", "tools.check_images", str(data)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1
    listed = [line.split(":")[0] for line in done.stdout.splitlines()[:-1]]
    assert listed == [str(data / "test" / "cat" / "empty.jpg"), str(data / "train" / "dog" / "broken.jpg")]
    assert done.stdout.splitlines()[-1] == f"2 undecodable image file(s) under {data}."


@pytest.mark.slow
def test_an_image_deleted_during_the_run_stops_with_its_path(cifar10_small, tmp_path):
    """A test image removed after the run listed the folder, before the evaluation reads it."""
    data = tmp_path / "data"
    shutil.copytree(cifar10_small, data, symlinks=True)
    gone = data / "test" / "cat" / sorted(os.listdir(data / "test" / "cat"))[0]
    args = small_cifar(data, num_train_steps=30, cache=False)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    process = subprocess.Popen([sys.executable, "main.py", *args, f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    output = []
    for line in process.stdout:  # training has started: the folder was listed
        output.append(line)
        if "step 1/30" in line:
            gone.unlink()
            break
    output += process.stdout.readlines()
    assert process.wait(timeout=600) == 1, "".join(output)[-3000:]
    errors = [line for line in output if line.startswith("error: ")]
    assert len(errors) == 1 and errors == output[-1:], "".join(output)[-3000:]
    assert errors[0].startswith(f"error: cannot read {gone} of data set 'image_folder' (No such file or directory)")
    assert not any("Traceback" in line for line in output)


@pytest.mark.slow
def test_non_finite_loss_before_any_checkpoint(cifar10_small, tmp_path):
    args = small_cifar(cifar10_small, optimizer="sgd", learning_rate=1e9, warmup_steps=0, lr_schedule="cosine",
                       num_train_steps=20, checkpoint_every_steps=1000, log_every_steps=10)  # fmt: skip
    code, _, err = run_main([*args, f"--workdir={tmp_path / 'run'}"])
    assert code == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss or gradient at step "), last
    assert "no checkpoint was written yet" in last and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


@pytest.mark.slow
def test_changed_batch_size_warns_once_and_resumes(cifar10_small, trained, tmp_path):
    workdir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(workdir)], check=True)
    code, _, err = run_main([*small_cifar(cifar10_small, batch_size=64, num_train_steps=3), f"--workdir={workdir}"])
    assert code == 0, err[-3000:]
    warnings = [line for line in err.splitlines() if "changed config keys" in line]
    assert len(warnings) == 1 and warnings[0].endswith("changed config keys: batch_size, num_train_steps.")
    assert "Resuming from the checkpoint of step 2." in err
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 64


@pytest.mark.slow
def test_two_classes_evaluate_top1_without_top5(cifar10_small, tmp_path):
    data = tmp_path / "data"
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            os.makedirs(data / split, exist_ok=True)
            os.symlink(cifar10_small / split / label, data / split / label)
    workdir = tmp_path / "run"
    code, _, err = run_main([*small_cifar(data, eval_batch_size=40), f"--workdir={workdir}"])
    assert code == 0, err[-3000:]
    evals = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in evals if r["kind"] == "eval"][-1]
    assert "eval_top5" not in final and final["eval_count"] == 200  # 100 cats and 100 dogs
    assert 0.0 <= final["eval_top1"] <= 1.0


@pytest.mark.slow
def test_start_up_is_quiet(tmp_path):
    """Nothing from TensorFlow, absl or JAX's backend probing before our first line."""
    # In write order: on a fresh machine TFDS prints (to stdout) that it prepares the demo's data
    # set, after our first line (to stderr).
    args = ["--config=configs/demo.py", "--config.num_train_steps=1", f"--workdir={tmp_path}"]
    code, out, err = run_main(args, one_stream=True)
    assert code == 0, out[-3000:]
    first = out.strip().splitlines()[0]
    assert "main.py" in first and "JAX 0.10.2: process 0 of 1" in first, first
    for noise in (
        "oneDNN custom operations",
        "absl::InitializeLog",
        "libtpu",
        "cpu_feature_guard",
        "Constructing tf.data",
    ):
        assert noise not in out + err


@pytest.mark.slow
@pytest.mark.parametrize("free_kib", [2048, 300])
def test_full_disk_stops_with_one_line_and_resumes_once_there_is_room(tmp_path, free_kib):
    """The demo on a 2 MiB tmpfs with `free_kib` of it free: a checkpoint does not fit (the third
    when all is free; the first, mid-write, with 300 KiB). One error line naming the file system and
    the last checkpoint, exit 1, no partial checkpoint left, nothing printed by orbax's or
    TensorStore's threads; with room, the same command resumes from that checkpoint and finishes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here to fill ({mounted.stderr.strip()})")
    try:
        (disk / "fill").write_bytes(b"\0" * (2048 - free_kib) * 1024)
        args = ["--config=configs/demo.py", f"--workdir={disk / 'run'}"]
        code, out, err = run_main(args)
        assert code == 1, err[-3000:]
        lines = err.strip().splitlines()
        assert sum(line.startswith("error: ") for line in lines) == 1 and lines[-1].startswith("error: "), err[-3000:]
        assert lines[-1].startswith(f"error: no space left on the file system of {disk} while writing "), lines[-1]
        assert "Traceback" not in out + err
        checkpoints = disk / "run" / "checkpoints"
        assert not list(checkpoints.glob("*tmp*"))  # no partial checkpoint
        saved = [int(p.name) for p in checkpoints.iterdir()]
        last = max(saved, default=None)
        assert (f"the last checkpoint is step {last}." if saved else "no checkpoint was written yet.") in lines[-1]
        (disk / "fill").unlink()
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        code, out, err = run_main(args)
        assert code == 0, err[-3000:]
        assert (f"Resuming from the checkpoint of step {last}." in err) == bool(saved)
        assert "Finished at step 150: test top-1" in err
    finally:
        subprocess.run(["umount", str(disk)], check=True)
