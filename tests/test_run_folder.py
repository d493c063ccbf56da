"""Run folders a user can trust: never overwritten, resumed only as they were made, every failure one sentence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import cifar_norms
import lenet
import mnist_8k
import mnist_ablation
import utils
from conftest import ROOT, interrupt_after, offline_env, read_metrics, run_script, write_mnist


def fake(*extra: str, limit: int = 64, epochs: int = 1) -> list[str]:
    return ["--dataset", "fake", "--limit", str(limit), "--epochs", str(epochs), *extra]


def stopped_run(monkeypatch, main, argv: list[str], after: int, signal_number=signal.SIGINT) -> SystemExit:
    """Run main(argv) and stop it with a signal once `after` training batches were handed out."""
    with monkeypatch.context() as patch:
        interrupt_after(patch, after, signal_number)
        with pytest.raises(SystemExit) as stopped:
            main(argv)
    return stopped.value


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and path.name != ".lock"}


# --- 1. a resume continues only the run it was ---------------------------------------------


@pytest.mark.parametrize("change, said", [
    (["--batch-size", "16"], "--batch-size 8 (now --batch-size 16)"),
    (["--limit", "96"], "--limit 64 (now --limit 96)"),
    (["--seed", "2"], "--seed 1 (now --seed 2)"),
    (["--dropout", "0.1"], "--dropout 0.0 (now --dropout 0.1)"),
])
def test_a_resume_with_other_options_is_refused_naming_each(tmp_path, monkeypatch, capsys, change, said):
    argv = fake("--batch-size", "8", "--out-dir", str(tmp_path / "run"), epochs=2)
    stopped_run(monkeypatch, mnist_8k.main, argv, after=3)
    before = files_of(tmp_path / "run")
    with pytest.raises(SystemExit) as error:
        mnist_8k.main([*argv, "--resume", *change])
    assert error.value.code == 2
    message = capsys.readouterr().err
    assert said in message and "start a new run without --resume" in message
    assert files_of(tmp_path / "run") == before, "a refused resume writes nothing"


def test_options_that_only_say_how_to_run_may_change_on_resume(tmp_path, monkeypatch):
    argv = fake("--batch-size", "8", "--out-dir", str(tmp_path / "run"), epochs=2)
    stopped_run(monkeypatch, mnist_8k.main, argv, after=3)
    record = mnist_8k.main([*argv, "--resume", "--workers", "1", "--eval-batch-size", "5", "--device", "cpu"])
    assert len(record["epochs"]) == 2


def test_a_resume_of_another_variant_of_the_same_shape_is_refused(tmp_path, capsys):
    argv = fake("--out-dir", str(tmp_path / "run"), limit=16)
    cifar_norms.main([*argv, "--variant", "group"])
    with pytest.raises(SystemExit) as error:
        cifar_norms.main([*argv, "--variant", "layer", "--resume"])
    assert error.value.code == 1
    assert "is a cifar_norms group run, not a cifar_norms layer one" in capsys.readouterr().err
    assert read_metrics(tmp_path / "run")["variant"] == "group"


# --- 2. a new run never replaces an old one --------------------------------------------------


def test_each_new_run_takes_the_next_free_folder_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    first = lenet.main(fake())
    second = lenet.main(fake("--seed", "2"))
    assert read_metrics(tmp_path / "runs" / "lenet") == json.loads(json.dumps(first))
    assert read_metrics(tmp_path / "runs" / "lenet2") == json.loads(json.dumps(second))
    out = capsys.readouterr().out
    assert f"Writing to {Path('runs') / 'lenet'}\n" in out and f"Writing to {Path('runs') / 'lenet2'}\n" in out


def test_variants_number_their_own_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        mnist_ablation.main(fake("--variant", "base", limit=16))
    assert sorted(path.name for path in (tmp_path / "runs" / "mnist_ablation").iterdir()) == ["base", "base2"]


def test_resume_without_out_dir_continues_the_most_recent_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    lenet.main(fake(epochs=2))
    stopped_run(monkeypatch, lenet.main, fake("--seed", "3", "--batch-size", "16", epochs=2), after=2)
    done = torch.load(tmp_path / "runs" / "lenet2" / "checkpoint.pt", weights_only=True)["batch"]
    record = lenet.main(fake("--seed", "3", "--batch-size", "16", "--resume", epochs=2))
    assert record["args"]["seed"] == 3 and len(record["epochs"]) == 2
    assert read_metrics(tmp_path / "runs" / "lenet2")["epochs"] == json.loads(json.dumps(record["epochs"]))
    out = capsys.readouterr().out
    assert f"Resuming {Path('runs') / 'lenet2'}: going on at epoch 1 of 2, batch {done + 1}" in out


def test_an_out_dir_holding_a_run_is_replaced_only_when_asked(tmp_path, capsys):
    argv = fake("--out-dir", str(tmp_path / "run"))
    lenet.main(argv)
    before = files_of(tmp_path / "run")
    with pytest.raises(SystemExit) as error:
        lenet.main([*argv, "--seed", "2"])
    assert error.value.code == 2
    assert "already holds a run" in capsys.readouterr().err and files_of(tmp_path / "run") == before
    replaced = lenet.main([*argv, "--seed", "2", "--overwrite"])
    assert read_metrics(tmp_path / "run")["args"]["seed"] == 2 == replaced["args"]["seed"]


def test_overwrite_never_deletes_a_folder_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as error:
        lenet.main(fake("--out-dir", str(tmp_path), "--overwrite"))
    assert error.value.code == 1 and "holds other files" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


# --- 3. one live run per folder ----------------------------------------------------------------


def test_a_folder_in_use_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    folder = tmp_path / "run"
    argv = fake("--out-dir", str(folder), epochs=200)
    live = subprocess.Popen([sys.executable, str(ROOT / "lenet.py"), *argv], cwd=tmp_path, env=offline_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (folder / "checkpoint.pt").exists():
            assert live.poll() is None and time.monotonic() < deadline, "the run in the background did not start"
            time.sleep(0.2)
        with pytest.raises(SystemExit) as error:
            lenet.main([*argv, "--resume"])
        assert error.value.code == 1
        message = capsys.readouterr().err
        assert "is in use by a run that is still going" in message and f"process {live.pid}" in message
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
    record = lenet.main(fake("--out-dir", str(folder), "--overwrite"))  # the kill left no lock behind
    assert len(record["epochs"]) == 1


# --- 4. an interrupted --variant all goes on where it stopped -------------------------------


def test_an_interrupted_variant_all_run_resumes_variant_by_variant(tmp_path, monkeypatch, capsys):
    options = fake("--variant", "all", "--batch-size", "8", limit=32, epochs=2)
    straight = mnist_ablation.main([*options, "--out-dir", str(tmp_path / "straight")])
    argv = [*options, "--out-dir", str(tmp_path / "stopped")]
    # 4 batches per epoch: 8 for base, then 3 of batchnorm's first epoch
    assert stopped_run(monkeypatch, mnist_ablation.main, argv, after=11).code == 130
    base = files_of(tmp_path / "stopped" / "base")
    assert not (tmp_path / "stopped" / "dropout" / "checkpoint.pt").exists()
    capsys.readouterr()
    resumed = mnist_ablation.main([*argv, "--resume"])
    assert "base: finished all 2 epochs" in capsys.readouterr().out
    assert files_of(tmp_path / "stopped" / "base") == base, "a finished variant is kept as it is"
    assert list(resumed["variants"]) == list(mnist_ablation.VARIANTS)
    for variant in mnist_ablation.VARIANTS:
        got = [row["test_acc"] for row in resumed["variants"][variant]["epochs"]]
        assert got == [row["test_acc"] for row in straight["variants"][variant]["epochs"]], variant
    assert (tmp_path / "stopped" / "comparison.md").read_text().count("\n") == 2 + 4


# --- 5. a refusal writes nothing --------------------------------------------------------------


def test_a_resume_of_another_scripts_run_writes_nothing(tmp_path, capsys):
    mnist_8k.main(fake("--out-dir", str(tmp_path / "run")))
    before = files_of(tmp_path / "run")
    with pytest.raises(SystemExit) as error:
        lenet.main(fake("--out-dir", str(tmp_path / "run"), "--resume"))
    assert error.value.code == 1
    assert "is a mnist_8k run, not a lenet one" in capsys.readouterr().err
    assert files_of(tmp_path / "run") == before


def test_resume_with_nothing_to_resume_creates_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as error:
        lenet.main(fake("--resume"))
    assert error.value.code == 1 and "Nothing to resume" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        lenet.main(fake("--resume", "--out-dir", str(tmp_path / "none")))
    assert sorted(tmp_path.iterdir()) == []


# --- 6. a diverged run is flagged and its last good checkpoint kept --------------------------


class NaNAtTest(nn.Module):
    """A linear classifier whose evaluation turns NaN from the second evaluation on."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(28 * 28, 10)
        self.evaluations = 0

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        if not self.training and x.shape[0] > 0:
            self.evaluations += 1
            if self.evaluations >= 2:
                logits = logits * float("nan")
        return logits


def strict_json(path: Path) -> dict:
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_nan_test_loss_keeps_the_last_finite_checkpoint_and_writes_strict_json(tmp_path):
    data = utils.load_data("fake", "unused", limit=32)
    args = lenet.parse_args(["--epochs", "3", "--batch-size", "16", "--eval-batch-size", "32"])
    model = NaNAtTest()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(utils.NonFiniteLossError, match=r"diverged in epoch 2: the test loss is nan.*lower --lr"):
        utils.fit(model, data, optimizer, args, utils.Run(tmp_path, "test"), {"script": "test"})
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    metrics = strict_json(tmp_path / "metrics.json")
    assert metrics["diverged"] is True and metrics["epochs"][1]["test_loss"] is None
    assert metrics["epochs"][1]["diverged"] is True and metrics["final_test_acc"] == metrics["epochs"][0]["test_acc"]


def test_a_runaway_loss_is_flagged_as_diverged(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        lenet.main(fake("--lr", "1e6", "--out-dir", str(tmp_path / "run"), epochs=3))
    assert error.value.code == 1
    message = capsys.readouterr().err
    assert "Training diverged in epoch 2: the training loss" in message and "lower --lr" in message
    metrics = strict_json(tmp_path / "run" / "metrics.json")
    assert metrics["diverged"] is True and metrics["epochs"][1]["train_loss"] > 23
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1, "epoch 1 was the last good"


# --- 7. a damaged checkpoint ------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_checkpoint_is_named_in_one_sentence(tmp_path, capsys, damage):
    argv = fake("--out-dir", str(tmp_path / "run"), epochs=2)
    lenet.main(argv)
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[: 2000] if damage == "truncated" else b"")
    with pytest.raises(SystemExit) as error:
        lenet.main([*argv, "--resume"])
    assert error.value.code == 1
    message = capsys.readouterr().err
    assert f"The checkpoint {checkpoint} cannot be read" in message and "cut short or damaged" in message
    assert message.count("\n") == 1


# --- 8. damaged data files --------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "zeros"])
def test_a_damaged_data_file_is_named_with_what_to_do(tmp_path, capsys, damage, no_network):
    write_mnist(tmp_path / "data", train=40, test=20)
    damaged = tmp_path / "data" / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[: size // 2] if damage == "truncated" else bytes(size))
    with pytest.raises(SystemExit) as error:
        lenet.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run")])
    assert error.value.code == 1
    message = capsys.readouterr().err
    assert f"{damaged.resolve()} is damaged" in message and "delete it" in message
    assert "missing" not in message and "downloading" not in message


def test_a_data_dir_that_is_a_file_is_said_so(tmp_path, capsys):
    (tmp_path / "data").write_text("not a folder")
    with pytest.raises(SystemExit) as error:
        lenet.main(["--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "run")])
    assert error.value.code == 1 and "is a file, not a folder" in capsys.readouterr().err


def test_a_failed_download_leaves_no_empty_folders(tmp_path, no_network):
    (tmp_path / "data").mkdir()
    with pytest.raises(utils.DataNotFoundError):
        utils.load_data("mnist", tmp_path / "data")
    assert list((tmp_path / "data").iterdir()) == []


# --- 9. a run folder that cannot be written ----------------------------------------------------


def test_an_out_dir_that_is_a_file_is_said_so(tmp_path, capsys):
    (tmp_path / "run").write_text("a file")
    with pytest.raises(SystemExit) as error:
        lenet.main(fake("--out-dir", str(tmp_path / "run")))
    assert error.value.code == 1 and "is a file, not a folder" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a device that is always full")
def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    argv = fake("--batch-size", "16", "--out-dir", str(tmp_path / "run"), epochs=2)
    stopped_run(monkeypatch, lenet.main, argv, after=4)  # stops at the end of epoch 1
    # The next checkpoint is written to this temporary name first: make it a full disk.
    (tmp_path / "run" / f".checkpoint.pt.tmp{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(SystemExit) as error:
        lenet.main([*argv, "--resume"])
    assert error.value.code == 1
    message = capsys.readouterr().err
    assert f"Cannot write {tmp_path / 'run' / 'checkpoint.pt'}: the disk is full." in message
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["epoch"] == 1


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_run_folder_is_said_so(tmp_path, capsys):
    (tmp_path / "run").mkdir(mode=0o555)
    with pytest.raises(SystemExit) as error:
        lenet.main(fake("--out-dir", str(tmp_path / "run")))
    assert error.value.code == 1 and "permission denied" in capsys.readouterr().err


def test_write_errors_name_their_cause():
    message = utils.cannot_write(Path("runs/x/metrics.json"), OSError(30, "Read-only file system"))
    assert message.startswith("Cannot write runs/x/metrics.json: the file system is read-only.")


# --- 10, 11. options that cannot work ----------------------------------------------------------


@pytest.mark.parametrize("argv, said", [
    (["--batch-size", "1"], "--batch-size 2 or more"),
    (["--limit", "1"], "--limit 2 or more"),
])
def test_batchnorm_is_never_handed_a_batch_of_one(tmp_path, capsys, argv, said):
    with pytest.raises(SystemExit) as error:
        mnist_8k.main(["--dataset", "fake", "--epochs", "1", "--limit", "8", *argv, "--out-dir", str(tmp_path)])
    assert error.value.code == 2
    assert said in capsys.readouterr().err


def test_a_network_without_batchnorm_trains_on_single_samples(tmp_path):
    record = mnist_ablation.main(fake("--variant", "base", "--batch-size", "1", "--out-dir", str(tmp_path), limit=4))
    assert record["epochs"][0]["train_samples"] == 4


def test_a_dropout_rate_outside_0_to_1_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as error:
        mnist_8k.main(["--dropout", "1.5"])
    assert error.value.code == 2 and "--dropout: must be a number from 0 up to" in capsys.readouterr().err


# --- 12. signals and finished runs ---------------------------------------------------------------


def test_sigterm_saves_names_the_signal_and_exits_143(tmp_path, monkeypatch, capsys):
    argv = fake("--batch-size", "16", "--out-dir", str(tmp_path / "run"), epochs=2)
    stopped = stopped_run(monkeypatch, lenet.main, argv, after=2, signal_number=signal.SIGTERM)
    assert stopped.code == 143
    message = capsys.readouterr().err
    done = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["batch"]
    assert f"Stopped by SIGTERM after batch {done} of epoch 1" in message and "Ctrl-C:" not in message


def test_resuming_a_finished_run_says_there_is_nothing_left(tmp_path, capsys):
    argv = fake("--out-dir", str(tmp_path / "run"), epochs=2)
    first = lenet.main(argv)
    again = lenet.main([*argv, "--resume"])
    assert "finished all 2 epochs, nothing left to train" in capsys.readouterr().out
    assert again["epochs"] == first["epochs"]


def test_the_script_as_a_user_runs_it_refuses_a_second_run_in_the_folder(tmp_path):
    first = run_script("lenet.py", *fake("--out-dir", "run"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = run_script("lenet.py", *fake("--out-dir", "run"), cwd=tmp_path)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert "already holds a run" in second.stderr
