"""--tensorboard: the curves as TensorBoard events, read back with TensorBoard's own reader."""

from __future__ import annotations

import importlib.util

import pytest

import lenet
import utils
from conftest import interrupt_after, optional, read_metrics

event_accumulator = optional("tensorboard.backend.event_processing.event_accumulator", "pip install tensorboard")


def logged(folder) -> event_accumulator.EventAccumulator:
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def test_every_scalar_equals_metrics_json_also_after_ctrl_c_and_resume(tmp_path, monkeypatch):
    argv = ["--dataset", "fake", "--limit", "48", "--batch-size", "16", "--epochs", "3", "--tensorboard",
            "--out-dir", str(tmp_path / "run")]
    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        interrupt_after(patch, 4)  # 3 batches an epoch: stopped in epoch 2, after epoch 1 was logged
        lenet.main(argv)
    assert [event.step for event in logged(tmp_path / "run").Scalars("test_acc")] == [1]
    lenet.main([*argv, "--resume"])
    record, events = read_metrics(tmp_path / "run"), logged(tmp_path / "run")
    numbers = [key for key, value in record["epochs"][0].items() if isinstance(value, (int, float)) and key != "epoch"]
    assert {"train_loss", "test_acc", "lr", "images_per_second"} <= set(numbers) <= set(events.Tags()["scalars"])
    for key in numbers:
        points = events.Scalars(key)
        assert [point.step for point in points] == [1, 2, 3], f"{key}: one point per epoch, none twice"
        assert [point.value for point in points] == pytest.approx([row[key] for row in record["epochs"]], rel=1e-6)
    for name, value in record["per_class_test_acc"].items():
        if value is not None:
            assert events.Scalars(f"per_class_test_acc/{name}")[-1].value == pytest.approx(value, rel=1e-6)
    assert {"plots/curves", "plots/confusion_matrix", "plots/gradcam"} <= set(events.Tags()["images"])


def test_a_resume_purges_what_was_logged_past_its_checkpoint(tmp_path, monkeypatch):
    argv = ["--dataset", "fake", "--limit", "48", "--batch-size", "16", "--epochs", "3", "--tensorboard",
            "--out-dir", str(tmp_path / "run")]
    save_every_epoch, batches = utils.Checkpoint.end_epoch, utils.Batches.epoch

    def killed_in_epoch_3(self, epoch=0, start=0):
        if self.shuffle and epoch == 2:
            raise KeyboardInterrupt  # as if killed: no checkpoint of epoch 2 is written
        yield from batches(self, epoch, start)

    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        # As a GPU run that writes its checkpoint at most every 60 s: after epoch 1, not after epoch 2.
        patch.setattr(utils.Checkpoint, "end_epoch", lambda self, epoch: epoch == 1 and save_every_epoch(self, epoch))
        patch.setattr(utils.Batches, "epoch", killed_in_epoch_3)
        lenet.main(argv)
    assert [event.step for event in logged(tmp_path / "run").Scalars("test_acc")] == [1, 2]
    lenet.main([*argv, "--resume"])  # goes on from epoch 1's checkpoint: epoch 2 is trained, and logged, again
    record, events = read_metrics(tmp_path / "run"), logged(tmp_path / "run")
    assert [event.step for event in events.Scalars("test_acc")] == [1, 2, 3], "no epoch twice"
    assert [event.value for event in events.Scalars("test_acc")] == pytest.approx(
        [row["test_acc"] for row in record["epochs"]], rel=1e-6), "the points of the run as it went on"


def test_without_the_package_it_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else found(name, *a))
    with pytest.raises(SystemExit) as error:
        lenet.main(["--dataset", "fake", "--tensorboard", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert error.value.code == 2 and "pip install tensorboard" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
