"""--val-split: a validation split held out of the training images, and what is chosen on it."""

from __future__ import annotations

import pytest
import torch

import lenet
import utils
from conftest import read_metrics


def test_the_validation_images_are_held_out_of_training_the_same_way_every_time():
    whole = utils.load_data("fake", "unused", limit=300)
    data = utils.load_data("fake", "unused", limit=300, val_split=60)
    indices = torch.tensor(data.validation["indices"])
    assert len(indices) == len(set(indices.tolist())) == 60 and len(data.train_labels) == 240
    assert torch.equal(data.val_images, whole.train_images[indices])
    assert torch.equal(data.val_labels, whole.train_labels[indices])
    kept = torch.tensor([index for index in range(300) if index not in set(indices.tolist())])
    assert torch.equal(data.train_images, whole.train_images[kept]), "no image is in both splits"
    again = utils.load_data("fake", "unused", limit=300, val_split=60)
    assert again.validation == data.validation, "the same images for every run (and every --seed)"
    assert torch.equal(data.test_images, whole.test_images), "the test split is untouched"


def test_each_class_is_held_out_in_proportion():
    whole = utils.load_data("fake", "unused", limit=400)
    data = utils.load_data("fake", "unused", limit=400, val_split=100)
    shares = torch.bincount(whole.train_labels, minlength=10) / 400
    held = torch.bincount(data.val_labels, minlength=10)
    assert (held - 100 * shares).abs().max() <= 1.5, (held.tolist(), (100 * shares).tolist())


def test_a_run_with_a_validation_split_chooses_its_best_epoch_there(tmp_path):
    options = ["--dataset", "fake", "--limit", "128", "--epochs", "3", "--val-split", "32"]
    record = lenet.main([*options, "--out-dir", str(tmp_path / "one")])
    rows = record["epochs"]
    assert all(row["val_samples"] == 32 and row["train_samples"] == 96 and row["test_samples"] == 128
               for row in rows)
    best = max(rows, key=lambda row: row["val_acc"])
    assert (record["best_val_acc"], record["best_val_epoch"], record["test_acc_at_best_val"]) == (
        best["val_acc"], best["epoch"], best["test_acc"])
    assert read_metrics(tmp_path / "one")["validation"]["indices"] == record["validation"]["indices"]
    other = lenet.main([*options, "--seed", "2", "--out-dir", str(tmp_path / "two")])
    assert other["validation"] == record["validation"], "every seed holds out the same images"
    plain = lenet.main(["--dataset", "fake", "--limit", "128", "--epochs", "1", "--out-dir", str(tmp_path / "plain")])
    assert "best_val_acc" not in plain and plain["validation"] is None and "val_acc" not in plain["epochs"][0]


@pytest.mark.parametrize("value, words", [("200", "would leave 56 of the 256 training images"),
                                          ("ten", "must be a whole number")])
def test_a_validation_split_that_leaves_too_little_is_refused(tmp_path, capsys, value, words):
    with pytest.raises(SystemExit) as error:
        lenet.main(["--dataset", "fake", "--limit", "256", "--val-split", value, "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert error.value.code == 2 and words in err and "Traceback" not in err


def test_mnist_8k_finds_its_first_epoch_at_the_target_on_validation_when_it_has_one():
    import mnist_8k

    rows = [{"epoch": 1, "test_acc": 99.5, "val_acc": 99.0}, {"epoch": 2, "test_acc": 99.3, "val_acc": 99.45}]
    assert mnist_8k.first_epoch_reaching(rows, 99.4) == 2
    assert mnist_8k.first_epoch_reaching([{key: row[key] for key in ("epoch", "test_acc")} for row in rows], 99.4) == 1
