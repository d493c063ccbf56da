"""Run folders and bad input, second pass: every refusal one sentence, every advice one that works.

Most runs here are in-process (`main(argv)` as the command line would call it): starting a
script costs ~6 s of imports on a small machine, while a refusal in-process takes milliseconds.
In-process, "no traceback" means that main() ends in SystemExit and nothing else: any other
exception is what the command line would have shown as a traceback, and fails the test.
Only the tests that need other processes (a live run, two runs at once) start the scripts.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cifar_norms
import efficientnet
import inceptionnet
import lenet
import mnist_8k
import mnist_ablation
import resnet
import utils
import vgg
from conftest import ROOT, interrupt_after, offline_env, read_metrics, write_mnist

VARIANTS = ("base", "batchnorm", "dropout", "skip")


# --- helpers -----------------------------------------------------------------------------------


def fake(*extra: str, limit: int = 64, epochs: int = 1) -> list[str]:
    return ["--dataset", "fake", "--limit", str(limit), "--epochs", str(epochs), *extra]


def call(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) as the command line runs it: (exit status, stdout, stderr).

    Only SystemExit is caught: any other exception would be a traceback for the user."""
    capsys.readouterr()
    try:
        main([str(part) for part in argv])
        code = 0
    except SystemExit as stop:
        code = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def quick_plots(monkeypatch) -> None:
    """Skip the plots of a run whose plots no check looks at (they take most of a tiny run's time)."""
    for name in ("save_standard_plots", "plot_feature_maps", "plot_comparison"):
        monkeypatch.setattr(utils, name, lambda *args, **kwargs: None, raising=False)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != ".lock"}


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".lock"))
    return target


def option(argv: list[str], name: str, value: str) -> list[str]:
    """argv with option `name` set to `value` (replaced where present, else added)."""
    argv = list(argv)
    if name in argv:
        argv[argv.index(name) + 1] = value
        return argv
    return [*argv, name, value]


def without(argv: list[str], flag: str) -> list[str]:
    return [part for part in argv if part != flag]


def advice(message: str, argv: list[str], elsewhere: Path) -> list[tuple[str, list[str]]]:
    """Each thing the message tells the user to do, as the command line that does it."""
    found = []
    overwrite = ["--overwrite"] if "--overwrite" in message and "--overwrite" not in argv else []
    if overwrite:
        found.append(("add --overwrite", [*without(argv, "--resume"), *overwrite]))
    if re.search(r"(without|leave out|leaving out|drop|omit|remove)\b[^.]*--resume", message) and "--resume" in argv:
        # "start a new run without --resume" and "--overwrite" in one message may be one advice: both then.
        found.append(("leave out --resume", [*without(argv, "--resume"), *overwrite]))
    if re.search(r"\b(another|other|a new|a different|different)\s+(run folder|folder|--out-dir)", message):
        found.append(("another --out-dir", option(without(argv, "--resume"), "--out-dir", str(elsewhere))))
    if re.search(r"\b(add|with|use)\s+--resume", message) and "--resume" not in argv:
        found.append(("add --resume", [*argv, "--resume"]))
    unique = []
    for what, command in found:
        if all(command != other for _, other in unique):
            unique.append((what, command))
    return unique


def draw_digit(size: int, mode: str = "L", paper: int = 255, ink: int = 0):
    """A PIL image of a thick '7': a bar and a slanted stroke, ink on plain paper."""
    from PIL import Image, ImageDraw

    image = Image.new("L" if mode == "L" else "I", (size, size), paper)
    draw = ImageDraw.Draw(image)
    s = size / 100
    draw.line([(25 * s, 20 * s), (75 * s, 20 * s), (45 * s, 85 * s)], fill=ink, width=max(1, round(10 * s)))
    return image


def digit_png(path: Path, size: int = 120) -> Path:
    draw_digit(size).save(path)
    return path


def prediction_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.search(r"\d %|\d%", line)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One PyTorch thread: these tiny runs are no faster on two, and far slower on a machine shared with
    another job (two-thread OpenMP barriers on two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def one_thread_env() -> dict[str, str]:
    """offline_env() for a script started in the background, with one PyTorch thread (see one_thread)."""
    return {**offline_env(), "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Every relative path (runs/, data/) lands in the test's own folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    """A finished lenet run on fake data (--limit 256, 1 epoch) and everything it printed."""
    folder = tmp_path_factory.mktemp("trained") / "run"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed), \
            contextlib.redirect_stderr(printed):
        quick_plots(patch)
        lenet.main(fake("--out-dir", str(folder), limit=256))
    return folder, printed.getvalue()


# --- 1. --overwrite deletes only what a run wrote -----------------------------------------------


def test_overwrite_refuses_a_folder_of_the_users_own_files(tmp_path, capsys, monkeypatch):
    project = tmp_path / "proj"
    (project / "src").mkdir(parents=True)
    (project / "metrics.json").write_text(json.dumps({"mine": 1}))
    (project / "src" / "train.py").write_text("print('my own training script')\n")
    (project / "README.txt").write_text("my project\n")
    before = files_of(project)
    quick_plots(monkeypatch)
    code, _, err = call(lenet.main, fake("--out-dir", "proj", "--overwrite"), capsys)
    assert code != 0, "--overwrite replaced a folder that holds no run of ours"
    assert files_of(project) == before, "the user's own files must all still be there"


def test_overwrite_of_a_run_keeps_the_files_the_user_added(tmp_path, trained, capsys, monkeypatch):
    run = copy_run(trained[0], tmp_path / "run")
    (run / "notes.txt").write_text("lr 0.05 looked good\n")
    quick_plots(monkeypatch)
    code, _, err = call(lenet.main, fake("--out-dir", run, "--overwrite", "--seed", "7"), capsys)
    assert code == 0, err
    assert (run / "notes.txt").read_text() == "lr 0.05 looked good\n", "--overwrite deleted the user's notes"
    assert read_metrics(run)["args"]["seed"] == 7, "the new run's metrics.json is not there"


# --- 2. a refused or diverged run leaves a folder the next run can use ------------------------------


def test_a_run_refused_before_training_writes_nothing(tmp_path, capsys):
    code, _, err = call(mnist_8k.main, fake("--out-dir", "r", limit=1), capsys)
    assert code == 2, err
    folder = tmp_path / "r"
    assert not (folder / "summary.txt").exists() and not (folder / "receptive_field.md").exists()
    assert not folder.exists() or [path.name for path in folder.iterdir() if path.name != ".lock"] == []


def test_the_folder_of_a_refused_run_takes_the_next_run(tmp_path, capsys, monkeypatch):
    code, _, err = call(mnist_8k.main, fake("--out-dir", "r", limit=1), capsys)
    assert code == 2, err
    quick_plots(monkeypatch)
    code, _, err = call(mnist_8k.main, fake("--out-dir", "r", limit=4), capsys)
    assert code == 0, err
    assert len(read_metrics(tmp_path / "r")["epochs"]) == 1


def test_a_run_that_diverged_in_epoch_1_can_start_again_as_its_message_says(tmp_path, capsys, monkeypatch):
    argv = fake("--lr", "1e6", "--out-dir", "run", limit=256)
    code, _, err = call(lenet.main, argv, capsys)
    assert code == 1 and ("diverged" in err or "NaN" in err), err
    assert "Traceback" not in err
    # "Start again with a lower --lr": the same command with a sane --lr, and whatever else it names.
    again = option(argv, "--lr", "0.05") + (["--overwrite"] if "--overwrite" in err else [])
    quick_plots(monkeypatch)
    code, _, err = call(lenet.main, again, capsys)
    assert code == 0, f"following {again} after the divergence failed: {err}"
    metrics = read_metrics(tmp_path / "run")
    assert not metrics.get("diverged") and metrics["args"]["lr"] == 0.05


# --- 3. every advice works when followed ---------------------------------------------------------


@pytest.mark.parametrize("diverging", [
    pytest.param(fake("--lr", "1e6", limit=256), id="in-epoch-1"),
    pytest.param(fake("--lr", "1e6", epochs=3), id="in-epoch-2"),
])
def test_every_advice_on_resuming_a_diverged_run_works(tmp_path, capsys, monkeypatch, diverging):
    code, _, err = call(lenet.main, [*diverging, "--out-dir", tmp_path / "diverged"], capsys)
    assert code == 1 and "diverged" in err, err
    quick_plots(monkeypatch)
    resume = [*option(diverging, "--lr", "0.05"), "--out-dir", str(tmp_path / "run"), "--resume"]
    copy_run(tmp_path / "diverged", tmp_path / "run")
    code, _, err = call(lenet.main, resume, capsys)
    assert "Traceback" not in err
    if code == 0:
        return  # resumed with the lower --lr: nothing to follow
    followed = advice(err, resume, tmp_path / "elsewhere")
    assert followed, f"the refusal gives no advice to follow: {err}"
    for number, (what, argv) in enumerate(followed):
        folder = copy_run(tmp_path / "diverged", tmp_path / f"follow{number}")
        argv = [str(folder) if part == str(tmp_path / "run") else part for part in argv]
        argv = [str(tmp_path / f"elsewhere{number}") if part == str(tmp_path / "elsewhere") else part for part in argv]
        code, _, followed_err = call(lenet.main, argv, capsys)
        assert code == 0, f"the advice '{what}' of {err!r} failed: {followed_err}"


def test_find_lr_on_a_trained_run_keeps_it_and_every_advice_works(tmp_path, trained, capsys):
    kept = ("checkpoint.pt", "metrics.json")
    original = {name: (trained[0] / name).read_bytes() for name in kept}

    def check(folder: Path, argv: list[str], code: int, out: str, err: str, what: str) -> None:
        assert code == 0, f"{what}: {err}"
        for name in kept:
            assert (folder / name).is_file(), f"{what}: the trained run's {name} is gone"
            assert (folder / name).read_bytes() == original[name], f"{what}: the trained run's {name} changed"
        named = [Path(path.rstrip(".,;:)")) for path in re.findall(r"[^\s'\"(]*lr_finder\.png", out + err)]
        assert any((tmp_path / path).is_file() for path in named), f"{what}: no lr_finder.png where it said: {out}"

    argv = fake("--find-lr", "--batch-size", "16", "--out-dir", tmp_path / "run")
    argv = [str(part) for part in argv]
    copy_run(trained[0], tmp_path / "run")
    code, out, err = call(lenet.main, argv, capsys)
    assert "Traceback" not in err
    if code == 0:
        check(tmp_path / "run", argv, code, out, err, "--find-lr")
        return
    followed = advice(err, argv, tmp_path / "elsewhere")
    assert followed, f"the refusal gives no advice to follow: {err}"
    for number, (what, followed_argv) in enumerate(followed):
        folder = copy_run(trained[0], tmp_path / f"follow{number}")
        followed_argv = [str(folder) if part == str(tmp_path / "run") else part for part in followed_argv]
        followed_argv = [str(tmp_path / f"elsewhere{number}") if part == str(tmp_path / "elsewhere") else part
                         for part in followed_argv]
        code, out, followed_err = call(lenet.main, followed_argv, capsys)
        check(folder, followed_argv, code, out, followed_err, f"the advice '{what}' of {err!r}")


# --- 4. a folder in use, and runs started at the same moment -------------------------------------


@pytest.fixture(scope="class")
def live_run(tmp_path_factory):
    """A lenet run training in the background into its --out-dir (stopped when the class is done)."""
    parent = tmp_path_factory.mktemp("live")
    folder = parent / "X"
    argv = fake("--out-dir", str(folder), epochs=3000)
    with open(parent / "live.log", "w") as log:
        process = subprocess.Popen([sys.executable, str(ROOT / "lenet.py"), *argv], cwd=parent, env=one_thread_env(),
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not ((folder / ".lock").exists() and (folder / "checkpoint.pt").exists()):
            assert process.poll() is None, (parent / "live.log").read_text()
            assert time.monotonic() < deadline, "the run in the background did not start"
            time.sleep(0.2)
        yield process, argv, folder
    finally:
        process.kill()
        process.wait()


class TestAFolderInUse:
    @pytest.fixture(autouse=True)
    def never_train(self, monkeypatch):
        """If a run got into the live run's folder it must not train there for minutes: fail at once."""
        def fit(*args, **kwargs):
            raise AssertionError("a second run trained in a folder that a live run holds")

        monkeypatch.setattr(utils, "fit", fit)

    def test_a_new_run_is_told_the_folder_is_in_use_by_which_process(self, live_run, capsys):
        process, _, folder = live_run
        code, _, err = call(lenet.main, fake("--out-dir", folder), capsys)
        assert process.poll() is None, "the background run ended too soon"
        assert code != 0
        assert "in use" in err and str(process.pid) in err, err

    def test_a_resume_is_told_the_folder_is_in_use(self, live_run, capsys):
        process, argv, _ = live_run
        code, _, err = call(lenet.main, [*argv, "--resume"], capsys)
        assert process.poll() is None, "the background run ended too soon"
        assert code != 0
        assert "in use" in err and str(process.pid) in err, err


def test_two_runs_started_together_take_two_folders(tmp_path):
    command = [sys.executable, str(ROOT / "lenet.py"), *fake()]
    processes = [subprocess.Popen(command, cwd=tmp_path, env=one_thread_env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        results = [process.communicate(timeout=240) for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    for process, (_, err) in zip(processes, results):
        assert "Traceback" not in err
        assert process.returncode == 0, err
    for name in ("lenet", "lenet2"):
        assert (tmp_path / "runs" / name / "metrics.json").is_file(), f"runs/{name} holds no finished run"


# --- 5, 6. options no network can take are argparse errors --------------------------------------------


@pytest.mark.parametrize("main, resolution", [
    pytest.param(vgg.main, 31, id="vgg-31"),
    pytest.param(inceptionnet.main, 7, id="inceptionnet-7"),
    pytest.param(resnet.main, 1, id="resnet-1"),
    pytest.param(efficientnet.main, 2, id="efficientnet-2"),
])
def test_a_resolution_too_small_for_the_network_is_an_argparse_error(capsys, monkeypatch, main, resolution):
    quick_plots(monkeypatch)
    code, _, err = call(main, fake("--resolution", str(resolution), "--out-dir", "run", limit=8), capsys)
    assert code == 2, err
    assert "resolution" in err and "Traceback" not in err


@pytest.mark.parametrize("main, smoothing", [
    pytest.param(vgg.main, "1.5", id="vgg-1.5"),
    pytest.param(resnet.main, "-0.5", id="resnet--0.5"),
])
def test_label_smoothing_outside_0_to_1_is_an_argparse_error(capsys, monkeypatch, main, smoothing):
    quick_plots(monkeypatch)
    code, _, err = call(main, fake("--label-smoothing", smoothing, "--out-dir", "run", limit=8), capsys)
    assert code == 2, err
    assert "--label-smoothing" in err


# --- 7, 8. options the command cannot honour -------------------------------------------------------


def test_evaluate_with_a_limit_counts_that_many_images_or_refuses(tmp_path, trained, capsys, monkeypatch):
    run = copy_run(trained[0], tmp_path / "run")
    quick_plots(monkeypatch)
    code, _, err = call(lenet.main, ["--evaluate", "--limit", "100", "--out-dir", run], capsys)
    if code == 2:
        assert "--limit" in err
        return
    assert code == 0, err
    assert read_metrics(run)["evaluation"]["test_samples"] == 100, "--limit 100 was not what was evaluated"


def test_a_batch_size_sweep_with_a_batch_of_one_is_refused_before_any_folder(tmp_path, capsys):
    code, _, err = call(cifar_norms.main, fake("--batch-sizes", "1,4", limit=16), capsys)
    assert code == 2, err
    assert "--batch-sizes" in err
    runs = tmp_path / "runs"
    assert not runs.exists() or list(runs.rglob("*")) == [], f"left behind: {sorted(runs.rglob('*'))}"


# --- 9, 10. the machine says no ------------------------------------------------------------------


def test_an_unreadable_data_dir_is_said_so(tmp_path, capsys, monkeypatch, no_network):
    write_mnist(tmp_path / "data", train=40, test=20)
    guarded = str((tmp_path / "data").resolve())
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and os.path.realpath(os.fspath(file)).startswith(guarded):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    code, _, err = call(lenet.main, ["--data-dir", "data", "--epochs", "1", "--out-dir", "run"], capsys)
    assert code != 0
    assert "ermission" in err, err
    # Files the user may not read are not damaged: deleting them is not the fix.
    assert "damaged" not in err and "delete" not in err, err


def test_running_out_of_cpu_memory_names_the_batch_size(tmp_path, capsys, monkeypatch):
    def forward(self, x):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 1099511627776 bytes.")

    monkeypatch.setattr(lenet.LeNet5, "forward", forward)
    with pytest.raises(SystemExit) as stopped:
        lenet.main(fake("--out-dir", "run"))
    assert stopped.value.code == 1
    err = capsys.readouterr().err
    assert "memory" in err and "--batch-size" in err, err


# --- 11, 13, 14. checkpoints that are not this model's -------------------------------------------------


def reshaped_checkpoint(folder: Path) -> None:
    """Give features.0.weight (6x1x5x5 in LeNet-5) another shape."""
    path = folder / "checkpoint.pt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"]["features.0.weight"] = torch.zeros(3, 1, 3, 3)
    torch.save(checkpoint, path)


@pytest.mark.parametrize("asking", ["--evaluate", "--predict", "--resume"])
def test_a_checkpoint_of_other_shapes_names_the_layer(tmp_path, trained, capsys, monkeypatch, asking):
    if asking == "--resume":  # a run stopped part-way, so that a resume has something to train
        argv = fake("--batch-size", "16", "--out-dir", tmp_path / "run", epochs=2)
        argv = [str(part) for part in argv]
        with monkeypatch.context() as patch, pytest.raises(SystemExit):
            interrupt_after(patch, 2)
            lenet.main(argv)
        argv = [*argv, "--resume"]
    else:
        copy_run(trained[0], tmp_path / "run")
        extra = [str(digit_png(tmp_path / "digit.png"))] if asking == "--predict" else []
        argv = [asking, *extra, "--out-dir", str(tmp_path / "run")]
    reshaped_checkpoint(tmp_path / "run")
    code, _, err = call(lenet.main, argv, capsys)
    assert code != 0
    assert "features.0" in err and "Traceback" not in err, err


@pytest.mark.parametrize("content", ["random-bytes", "plain-pickle"])
def test_a_file_that_is_no_checkpoint_is_said_so(tmp_path, capsys, content):
    folder = tmp_path / "F"
    folder.mkdir()
    if content == "random-bytes":
        (folder / "checkpoint.pt").write_bytes(torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0),
                                                             dtype=torch.uint8).numpy().tobytes())
    else:
        with open(folder / "checkpoint.pt", "wb") as file:
            pickle.dump({"epoch": 3, "notes": ["mine"]}, file)
    code, _, err = call(lenet.main, ["--evaluate", "--out-dir", folder], capsys)
    assert code != 0
    assert "not a checkpoint" in err, err
    assert "weights_only" not in err, "never advise loading a stranger's file with weights_only=False"


def test_a_torch_file_without_our_keys_is_no_checkpoint(tmp_path, capsys):
    folder = tmp_path / "F"
    folder.mkdir()
    torch.save({"a": torch.zeros(1)}, folder / "checkpoint.pt")
    code, _, err = call(lenet.main, ["--evaluate", "--out-dir", folder], capsys)
    assert code != 0
    assert "not a checkpoint" in err, err
    assert "is a  run" not in err


# --- 12, 15, 16. the user's own pictures -------------------------------------------------------------


def test_a_huge_picture_is_predicted_or_refused_naming_its_size(tmp_path, trained, capsys):
    run = copy_run(trained[0], tmp_path / "run")
    picture = tmp_path / "huge.png"
    draw_digit(14000).save(picture, optimize=False)
    code, out, err = call(lenet.main, ["--predict", picture, "--out-dir", run], capsys)
    assert "Traceback" not in err
    if code == 0:
        assert any(str(picture) in line for line in prediction_lines(out)), out
    else:
        assert "14000" in err, err


@pytest.mark.parametrize("ink", [pytest.param(0, id="ink-0"), pytest.param(2048, id="ink-3-percent")])
def test_a_16_bit_grey_picture_of_a_digit_is_predicted(tmp_path, trained, capsys, ink):
    import numpy as np
    from PIL import Image

    run = copy_run(trained[0], tmp_path / "run")
    # Black ink on white paper, 16 bits a pixel: ink at 0, or at 3 % of full scale as a scanner gives it.
    grey = np.asarray(draw_digit(200, mode="I", paper=65535, ink=ink), dtype=np.uint16)
    picture = tmp_path / "scan16.png"
    Image.fromarray(grey).save(picture)
    assert Image.open(picture).mode.startswith("I;16")
    code, out, err = call(lenet.main, ["--predict", picture, "--out-dir", run], capsys)
    assert code == 0, err
    assert any(str(picture) in line for line in prediction_lines(out)), out


def test_predict_on_a_comparison_names_each_model(tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as patch:
        quick_plots(patch)
        code, _, err = call(mnist_ablation.main, fake("--variant", "all", "--out-dir", tmp_path / "all", limit=32),
                            capsys)
    assert code == 0, err
    picture = digit_png(tmp_path / "digit.png")
    code, out, err = call(mnist_ablation.main, ["--predict", picture, "--out-dir", tmp_path / "all"], capsys)
    assert code == 0, err
    said = [line.replace(str(picture), "") for line in prediction_lines(out)]
    for variant in VARIANTS:
        assert any(re.search(rf"\b{variant}\b", line) for line in said), f"no prediction line names {variant}:\n{out}"


# --- 17. data that holds nothing -----------------------------------------------------------------------


def test_blank_mnist_files_are_refused_naming_the_file(tmp_path, capsys, no_network):
    write_mnist(tmp_path / "data", train=40, test=20)
    for prefix in ("train", "t10k"):
        path = tmp_path / "data" / "MNIST" / "raw" / f"{prefix}-images-idx3-ubyte"
        data = path.read_bytes()
        path.write_bytes(data[:16] + bytes(len(data) - 16))  # the header intact, every pixel 0
    code, _, err = call(lenet.main, ["--data-dir", "data", "--epochs", "1", "--out-dir", "run"], capsys)
    assert code != 0
    assert "blank" in err and "train-images-idx3-ubyte" in err, err
    assert "checkpoint" not in err, "nothing was trained, so no checkpoint is kept"


# --- 18. the learning-rate finder does not make up a rate -------------------------------------------------


def test_find_lr_on_random_labels_suggests_no_rate(tmp_path, capsys):
    # 1,024 random images with random labels: the loss cannot fall, so no rate is worth suggesting.
    code, out, err = call(lenet.main, ["--dataset", "fake", "--find-lr"], capsys)
    assert code == 0, err
    said = out + err
    assert "Suggested --lr" not in said, said
    assert re.search(r"no learning rate could be suggested", said, re.IGNORECASE), said
    assert (tmp_path / "runs" / "lenet" / "lr_finder.png").is_file()


def test_find_lr_suggests_no_rate_from_the_first_noisy_batches(monkeypatch):
    """A loss that only wobbles at the start and then rises: the wobble is no fall."""
    steps = iter(range(10**6))
    def wobbling(self, images, labels):
        number = next(steps)
        loss = 2.3 + (0.05 if number % 2 else -0.05) * (number < 12) + 0.01 * max(0, number - 12)
        return torch.tensor(loss), torch.zeros(len(labels), 10), {}
    monkeypatch.setattr(utils.TrainStep, "__call__", wobbling)
    args = lenet.parse_args(["--dataset", "fake", "--limit", "64"])
    data = utils.load_data("fake", ".", limit=64)
    model = lenet.build_model()
    run = utils.Run(Path("."), "lenet")
    found = utils.find_lr(model, data, torch.optim.SGD(model.parameters(), lr=0.1), args, run, utils.FitOptions(),
                          steps=60)
    assert found["suggested_lr"] is None


# --- 19, 20. what a run prints and writes ----------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available() or torch.version.cuda is None,
                    reason="about a CUDA build of PyTorch on a machine without a GPU")
def test_the_start_line_on_a_cpu_machine_is_ours(trained):
    printed = trained[1]
    assert "Found no NVIDIA driver" not in printed and "Please check" not in printed, printed[:600]
    reasons = [line for line in printed.splitlines() if re.search(r"NVIDIA|CUDA|GPU|driver", line)]
    for line in reasons:
        assert len(line) <= 160 and len(re.findall(r"[.!?](?:\s|$)", line)) <= 1, line
        assert "no NVIDIA driver" in line or "CPU" in line, line


def test_the_summary_has_no_torchinfo_enum_names(trained):
    summary = (trained[0] / "summary.txt").read_text()
    assert "Total params" in summary
    assert "Units." not in summary


# --- found in review: nested runs, and runs that died before their first metrics.json -------------


def test_a_new_run_never_deletes_runs_nested_deeper_in_its_folder(tmp_path, capsys):
    nested = tmp_path / "gn" / "batch-size-2" / "batch"
    nested.mkdir(parents=True)
    (tmp_path / "gn" / "metrics.json").write_text(json.dumps({"script": "cifar_norms", "args": {}, "runs": {}}))
    torch.save({"model": {}}, nested / "checkpoint.pt")
    code, _, err = call(lenet.main, fake("--out-dir", tmp_path / "gn"), capsys)
    assert code == 2 and "already holds a run" in err, err
    assert (nested / "checkpoint.pt").is_file()


def test_overwrite_of_a_comparison_keeps_a_separate_run_inside_it(tmp_path, capsys, monkeypatch):
    quick_plots(monkeypatch)
    argv = fake("--variant", "all", "--out-dir", tmp_path / "all", limit=32)
    assert call(mnist_ablation.main, argv, capsys)[0] == 0
    separate = tmp_path / "all" / "skip-2"  # as a later single-variant run's default folder would be
    shutil.copytree(tmp_path / "all" / "skip", separate)
    assert call(mnist_ablation.main, [*argv, "--overwrite"], capsys)[0] == 0
    assert (separate / "checkpoint.pt").is_file(), "--overwrite deleted a run that was not the comparison's"


def test_a_run_that_died_before_its_first_metrics_is_reused_and_overwritable(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "X"
    folder.mkdir()
    (folder / "summary.txt").write_text("the layer table of a run killed in epoch 1\n")
    quick_plots(monkeypatch)
    code, out, err = call(lenet.main, fake("--out-dir", folder), capsys)
    assert code == 0, err
    (folder / "checkpoint.pt").unlink()
    (folder / "metrics.json").unlink()
    code, _, err = call(lenet.main, fake("--out-dir", folder, "--overwrite"), capsys)
    assert code == 0, err
