"""--seeds: one run per seed in one folder, and the table that says how sure a number is."""

from __future__ import annotations

import signal
import statistics

import pytest

import lenet
import mnist_ablation
import utils
from conftest import assert_png, interrupt_after, read_metrics
from tests import results


def fake(*extra: str, limit: int = 48, epochs: int = 2) -> list[str]:
    return ["--dataset", "fake", "--limit", str(limit), "--epochs", str(epochs), "--batch-size", "16", *extra]


def learned(rows: list[dict]) -> list[dict]:
    """An epoch's numbers without its timings."""
    return [{key: value for key, value in row.items() if key not in ("seconds", "images_per_second")} for row in rows]


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({min(values):.2f} - {max(values):.2f})"


def test_three_seeds_train_in_one_folder_and_their_table_is_their_own_mean_and_sd(tmp_path):
    out = tmp_path / "seeds"
    record = lenet.main(fake("--seeds", "1,2,3", "--out-dir", str(out)))
    assert record["seeds"] == [1, 2, 3] and list(record["variants"]) == ["seed1", "seed2", "seed3"]
    finals = []
    for seed in (1, 2, 3):
        saved = read_metrics(out / f"seed{seed}")
        assert saved["args"]["seed"] == seed and len(saved["epochs"]) == 2
        finals.append(saved["final_test_acc"])
    assert len({str(learned(read_metrics(out / f"seed{seed}")["epochs"])) for seed in (1, 2, 3)}) == 3, \
        "each seed trains from its own random state"
    table = (out / "seeds.md").read_text()
    assert f"| - | 1, 2, 3 | {spread(finals)} |" in table, table
    assert_png(out / "seeds.png")
    single = lenet.main(fake("--seed", "2", "--out-dir", str(tmp_path / "alone")))
    assert learned(single["epochs"]) == learned(read_metrics(out / "seed2")["epochs"]), \
        "seed 2 of --seeds is the run --seed 2 makes"


def test_seeds_with_variant_all_table_each_variant_over_its_seeds(tmp_path, capsys):
    out = tmp_path / "grid"
    record = mnist_ablation.main(fake("--variant", "all", "--seeds", "1,2", "--out-dir", str(out), limit=32, epochs=1))
    names = [f"{variant}-seed{seed}" for variant in mnist_ablation.VARIANTS for seed in (1, 2)]
    assert list(record["variants"]) == names and record["variant"] == "all" and record["seeds"] == [1, 2]
    table = (out / "seeds.md").read_text()
    for variant in mnist_ablation.VARIANTS:
        finals = [read_metrics(out / f"{variant}-seed{seed}")["final_test_acc"] for seed in (1, 2)]
        assert f"| {variant} | 1, 2 | {spread(finals)} |" in table, (variant, table)
    assert_png(out / "seeds.png")
    capsys.readouterr()
    answer = mnist_ablation.main(["--evaluate", "--variant", "all", "--seeds", "1,2", "--out-dir", str(out)])
    assert list(answer["variants"]) == names, "a question goes to every run of the grid"


def test_an_interrupted_seeds_run_resumes_seed_by_seed(tmp_path, monkeypatch, capsys):
    straight = lenet.main(fake("--seeds", "1,2,3", "--out-dir", str(tmp_path / "straight")))
    argv = fake("--seeds", "1,2,3", "--out-dir", str(tmp_path / "stopped"))
    with monkeypatch.context() as patch, pytest.raises(SystemExit) as stopped:
        interrupt_after(patch, 8, signal.SIGINT)  # 3 batches an epoch: seed 1's six, then two of seed 2's
        lenet.main(argv)
    assert stopped.value.code == 130
    first = (tmp_path / "stopped" / "seed1" / "checkpoint.pt").read_bytes()
    assert not (tmp_path / "stopped" / "seed3").joinpath("checkpoint.pt").exists()
    capsys.readouterr()
    resumed = lenet.main([*argv, "--resume"])
    assert "seed1: finished all 2 epochs" in capsys.readouterr().out
    assert (tmp_path / "stopped" / "seed1" / "checkpoint.pt").read_bytes() == first, "a finished seed is kept"
    for name in ("seed1", "seed2", "seed3"):
        assert learned(resumed["variants"][name]["epochs"]) == learned(straight["variants"][name]["epochs"]), name


def test_seeds_share_one_validation_split_and_the_results_command_tables_them(tmp_path, capsys):
    out = tmp_path / "held"
    lenet.main(fake("--seeds", "1,2,3", "--val-split", "16", "--out-dir", str(out), limit=64))
    held = [read_metrics(out / f"seed{seed}")["validation"] for seed in (1, 2, 3)]
    assert held[0] == held[1] == held[2] and len(held[0]["indices"]) == 16
    assert "best_val_acc (%)" in (out / "seeds.md").read_text()
    capsys.readouterr()
    assert results.main([str(out)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `lenet.py`")]
    finals = [read_metrics(out / f"seed{seed}")["final_test_acc"] for seed in (1, 2, 3)]
    assert len(rows) == 1 and "| 1, 2, 3 |" in rows[0], rows
    assert f"{statistics.mean(finals):.2f} ± {statistics.stdev(finals):.2f} %" in rows[0]


def test_overwriting_a_seeds_folder_with_other_seeds_leaves_none_of_the_old_runs(tmp_path):
    group = tmp_path / "group"
    lenet.main(fake("--seeds", "1,2,3", "--out-dir", str(group), epochs=1, limit=32))
    (group / "notes.txt").write_text("mine")
    record = lenet.main(fake("--seeds", "1,2", "--overwrite", "--out-dir", str(group), epochs=1, limit=32))
    assert list(record["variants"]) == ["seed1", "seed2"]
    assert [path.name for path in (group / "seed3").iterdir() if path.name != ".lock"] == [], "seed 3 is gone"
    assert (group / "notes.txt").read_text() == "mine", "a file of the user's stays"


@pytest.mark.parametrize("value, words", [("1,x", "whole number"), ("-1", "at least 0")])
def test_a_seed_list_that_cannot_work_is_refused_in_one_sentence(tmp_path, capsys, value, words):
    with pytest.raises(SystemExit) as error:
        lenet.main(fake("--seeds", value, "--out-dir", str(tmp_path / "run")))
    err = capsys.readouterr().err
    assert error.value.code == 2 and words in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_a_folder_is_resumed_only_as_the_kind_of_run_it_holds(tmp_path, capsys):
    lenet.main(fake("--out-dir", str(tmp_path / "one"), epochs=1))
    with pytest.raises(SystemExit):
        lenet.main(["--resume", "--seeds", "1,2", "--out-dir", str(tmp_path / "one")])
    assert "holds no --seeds 1,2 run of lenet" in capsys.readouterr().err
    group = tmp_path / "group"
    lenet.main(fake("--seeds", "1,2", "--out-dir", str(group), epochs=1))
    with pytest.raises(SystemExit):  # other seeds: not this run
        lenet.main(["--resume", "--seeds", "4,5", "--out-dir", str(group)])
    assert "holds no --seeds 4,5 run of lenet" in capsys.readouterr().err
    for question in (["--resume"], ["--evaluate"]):  # asked as one run: the advice names --seeds, and works
        with pytest.raises(SystemExit) as error:
            lenet.main([*question, "--out-dir", str(group)])
        err = capsys.readouterr().err
        assert error.value.code == 2 and "add --seeds 1,2" in err and str(group / "seed1") in err, err
    assert list(lenet.main(["--evaluate", "--seeds", "1,2", "--out-dir", str(group)])["variants"]) == ["seed1", "seed2"]
    assert utils.group_members(lenet.parse_args(["--seeds", "3,1,3"]), ()) == {"seed3": (None, 3), "seed1": (None, 1)}
