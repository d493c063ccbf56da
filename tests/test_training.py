"""The loop through the scripts' main(): run folders, honest accuracy, resume, and failures."""

from __future__ import annotations

import importlib
import json
import re

import pytest
import torch
from torch import nn

import lenet
import mnist_8k
import mnist_ablation
import utils
from conftest import assert_png, assert_run_folder, interrupt_after, read_metrics, write_mnist

COMMON_OPTIONS = ("--epochs", "--batch-size", "--lr", "--seed", "--device", "--data-dir", "--dataset",
                  "--out-dir", "--limit", "--resume", "--workers")


def fake_run(folder, *extra: str) -> list[str]:
    return ["--dataset", "fake", "--limit", "64", "--epochs", "1", "--out-dir", str(folder), *extra]


# --- end to end ----------------------------------------------------------------------------


def test_lenet_end_to_end_writes_the_run_folder(tmp_path):
    record = lenet.main(fake_run(tmp_path / "run"))
    assert_run_folder(tmp_path / "run", record, epochs=1)
    assert record["script"] == "lenet" and record["dataset"] == "fake" and record["params"] == 61_706
    assert_png(tmp_path / "run" / "feature_maps_c1.png")
    assert_png(tmp_path / "run" / "feature_maps_c3.png")


def test_mnist_8k_end_to_end_saves_its_receptive_field_table(tmp_path):
    record = mnist_8k.main(fake_run(tmp_path / "run"))
    assert_run_folder(tmp_path / "run", record, epochs=1)
    table = (tmp_path / "run" / "receptive_field.md").read_text()
    assert table.count("\n") == 2 + 9 and "| 28 |" in table  # header, rule, one row per convolution and pool
    assert "first_epoch_at_target" in record


def test_ablation_all_trains_the_four_variants_and_compares_them(tmp_path):
    out = tmp_path / "ablation"
    record = mnist_ablation.main(fake_run(out, "--limit", "32"))
    assert record["variant"] == "all" and list(record["variants"]) == list(mnist_ablation.VARIANTS)
    for variant in mnist_ablation.VARIANTS:
        assert_run_folder(out / variant, record["variants"][variant], epochs=1)
    assert read_metrics(out) == json.loads(json.dumps(record))
    assert_png(out / "comparison.png")
    table = (out / "comparison.md").read_text().splitlines()
    assert len(table) == 2 + 4 and all(variant in "".join(table) for variant in mnist_ablation.VARIANTS)


def test_a_single_variant_goes_to_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = mnist_ablation.main(["--variant", "dropout", "--dataset", "fake", "--limit", "32", "--epochs", "1"])
    assert record["variant"] == "dropout" and record["params"] == 57_926
    assert read_metrics(tmp_path / "runs" / "mnist_ablation" / "dropout")["variant"] == "dropout"


def test_accuracy_is_correct_over_total_of_the_whole_split(tmp_path):
    write_mnist(tmp_path / "data", train=96, test=48)
    record = lenet.main(["--data-dir", str(tmp_path / "data"), "--epochs", "1", "--batch-size", "10",
                         "--out-dir", str(tmp_path / "run")])
    model = lenet.build_model()
    model.load_state_dict(torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"])
    data = utils.load_data("mnist", tmp_path / "data")
    inputs = (data.test_images.float() / 255 - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1)
    with torch.no_grad():
        correct = (model.eval()(inputs).argmax(dim=1) == data.test_labels).sum().item()
    assert record["final_test_acc"] == pytest.approx(100 * correct / 48)
    train_correct = record["epochs"][0]["train_acc"] * 96 / 100
    assert train_correct == pytest.approx(round(train_correct)), "train accuracy must be a count over 96 samples"


# --- resume, interruption ------------------------------------------------------------------


def deterministic_fields(history: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key not in ("seconds", "images_per_second")}
            for row in history]


@pytest.mark.parametrize("stop_after", [3, 8], ids=["mid-epoch-1", "mid-epoch-2"])
def test_resume_continues_exactly_as_if_never_stopped(tmp_path, monkeypatch, capsys, stop_after):
    # BatchNorm, dropout, rotation augmentation and a per-batch one-cycle schedule: all must resume.
    options = ["--dataset", "fake", "--limit", "96", "--batch-size", "16", "--epochs", "2", "--dropout", "0.1"]
    straight = mnist_8k.main([*options, "--out-dir", str(tmp_path / "straight")])

    with monkeypatch.context() as patch:
        interrupt_after(patch, stop_after)
        with pytest.raises(SystemExit) as stopped:
            mnist_8k.main([*options, "--out-dir", str(tmp_path / "stopped")])
    assert stopped.value.code == 130
    assert "--resume" in capsys.readouterr().err
    assert torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["batch"] > 0

    resumed = mnist_8k.main([*options, "--out-dir", str(tmp_path / "stopped"), "--resume"])
    assert deterministic_fields(resumed["epochs"]) == deterministic_fields(straight["epochs"])
    weights = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["model"] for run in ("straight", "stopped")]
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


def test_resume_needs_a_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        lenet.main(fake_run(tmp_path / "none", "--resume"))
    assert error.value.code == 1
    assert "Nothing to resume" in capsys.readouterr().err


def test_resume_refuses_a_different_schedule_length(tmp_path, capsys):
    lenet.main(fake_run(tmp_path / "run"))
    with pytest.raises(SystemExit) as error:
        lenet.main(fake_run(tmp_path / "run", "--resume", "--epochs", "3"))
    assert error.value.code == 2
    assert "--epochs 1 (now --epochs 3)" in capsys.readouterr().err


class TurnsNaN(nn.Module):
    """A linear classifier whose training output turns NaN from a given training call on."""

    def __init__(self, poisoned_call: int) -> None:
        super().__init__()
        self.linear = nn.Linear(28 * 28, 10)
        self.calls, self.poisoned_call = 0, poisoned_call

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls >= self.poisoned_call:
                logits = logits * float("nan")
        return logits


def test_a_nan_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path):
    data = utils.load_data("fake", "unused", limit=64)
    args = lenet.parse_args(["--epochs", "3", "--batch-size", "16"])  # 4 batches per epoch
    model = TurnsNaN(poisoned_call=4 + 2)  # epoch 2, batch 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(utils.NonFiniteLossError, match=r"epoch 2, batch 2\b.*lower --lr"):
        utils.fit(model, data, optimizer, args, utils.Run(tmp_path, "test"), {"script": "test"})
    assert model.calls == 6, "training must stop at the bad batch, not later"
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert len(read_metrics(tmp_path)["epochs"]) == 1


def test_a_diverging_script_exits_1_with_a_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        lenet.main(fake_run(tmp_path / "run", "--lr", "1e30", "--batch-size", "8"))
    assert error.value.code == 1
    message = capsys.readouterr().err
    assert "The loss became" in message and "--lr" in message and "Traceback" not in message


# --- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lenet", "mnist_8k", "mnist_ablation", "cifar_norms", "cifar_dilated_dw",
                                  "vgg", "inceptionnet", "resnet", "efficientnet"])
def test_help_lists_every_option_with_its_default(name, capsys):
    with pytest.raises(SystemExit) as done:
        importlib.import_module(name).main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for option in COMMON_OPTIONS:
        assert option in text
    # One entry per option: its line starts with "  -", its help may wrap onto indented lines.
    entries = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    options = [entry for entry in entries if entry.strip() and not entry.strip().startswith("-h")]
    assert len(options) >= len(COMMON_OPTIONS)
    for entry in options:
        assert "(default:" in " ".join(entry.split()), f"no default in: {entry.strip()}"


@pytest.mark.parametrize(
    "script, argv, words",
    [
        (mnist_ablation, ["--variant", "wide"], ["invalid choice", "base", "skip"]),
        (lenet, ["--epochs", "-1"], ["--epochs", "at least 1"]),
        (mnist_8k, ["--epochs", "0"], ["--epochs", "at least 1"]),
        (lenet, ["--dataset", "cifar10"], ["invalid choice", "fashion-mnist"]),
        (mnist_8k, ["--batch-size", "many"], ["--batch-size"]),
        (lenet, ["--lr", "-0.1"], ["--lr", "above 0"]),
    ],
)
def test_a_wrong_option_exits_2_naming_the_valid_ones(script, argv, words, capsys):
    with pytest.raises(SystemExit) as error:
        script.main(argv)
    assert error.value.code == 2
    message = capsys.readouterr().err
    for word in words:
        assert word in message


# --- --checkpoint-every: fewer checkpoint writes on GPUs, the same run ------------------------


def epoch_rows(record: dict) -> list[dict]:
    return [{key: value for key, value in row.items() if key not in ("seconds", "images_per_second")}
            for row in record["epochs"]]


@pytest.fixture
def checkpoint_writes(monkeypatch):
    """(epoch, batch) of every checkpoint.pt written, in order."""
    writes, save_torch = [], utils.save_torch

    def spy(path, value):
        if path.name == "checkpoint.pt":
            writes.append((value["epoch"], value["batch"]))
        save_torch(path, value)

    monkeypatch.setattr(utils, "save_torch", spy)
    return writes


def test_checkpoint_every_writes_the_last_epoch_and_a_stop_and_resumes_exactly(tmp_path, monkeypatch,
                                                                               checkpoint_writes):
    options = ["--dataset", "fake", "--limit", "64", "--batch-size", "16", "--epochs", "3",
               "--checkpoint-every", "3600"]
    whole = lenet.main([*options, "--out-dir", str(tmp_path / "whole")])
    assert checkpoint_writes == [(3, 0)], "within the hour: only the last epoch is written"
    checkpoint_writes.clear()
    lenet.main(["--dataset", "fake", "--limit", "64", "--batch-size", "16", "--epochs", "3",
                "--out-dir", str(tmp_path / "cpu")])
    assert checkpoint_writes == [(1, 0), (2, 0), (3, 0)], "the CPU's default: every epoch"

    checkpoint_writes.clear()
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as stopped:
        interrupt_after(patch, 4)  # Ctrl-C during the last of epoch 1's four batches: it stops at its end
        lenet.main([*options, "--out-dir", str(tmp_path / "stopped")])
    assert stopped.value.code == 130 and checkpoint_writes == [(1, 0)], "a stop always writes its checkpoint"
    resumed = lenet.main([*options, "--out-dir", str(tmp_path / "stopped"), "--resume"])
    assert epoch_rows(resumed) == epoch_rows(whole)


def test_a_run_that_diverges_before_its_first_checkpoint_says_none_is_kept(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        lenet.main(fake_run(tmp_path / "run", "--lr", "1e6", "--epochs", "3", "--checkpoint-every", "3600"))
    message = capsys.readouterr().err
    assert error.value.code == 1 and "Training diverged in epoch 2" in message
    assert "No checkpoint was saved yet: start again with a lower --lr." in message
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    lenet.main(fake_run(tmp_path / "run", "--lr", "0.01", "--epochs", "1"))  # as the sentence says
    assert (tmp_path / "run" / "checkpoint.pt").exists()
