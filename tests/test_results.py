"""The results command: tables of mean ± sd over seeds, built from run folders alone."""

from __future__ import annotations

import statistics

import pytest

import lenet
import mnist_ablation
from conftest import interrupt_after
from tests import results


def test_the_results_table_has_one_row_per_script_and_variant_with_its_seeds_spread(tmp_path, capsys):
    options = ["--dataset", "fake", "--limit", "48", "--epochs", "1"]
    finals = [lenet.main([*options, "--seed", str(seed), "--out-dir", str(tmp_path / f"lenet{seed}")])["final_test_acc"]
              for seed in (1, 2, 3)]
    lenet.main([*options, "--lr", "0.2", "--out-dir", str(tmp_path / "other_lr")])  # another recipe: its own row
    for seed in (1, 2):
        mnist_ablation.main([*options, "--variant", "all", "--seed", str(seed),
                             "--out-dir", str(tmp_path / f"abl{seed}")])
    lenet.main([*options, "--epochs", "2", "--val-split", "16", "--out-dir", str(tmp_path / "held")])

    assert results.main([str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| `")]
    # Two lenet recipes: each row names the option it differs in.
    default_lr = lenet.parse_args([]).lr
    lenet_rows = [line for line in lines
                  if line.startswith(f"| `lenet.py` --lr {default_lr} | fake, first 48 | 1 | 1, 2, 3 |")]
    assert len(lenet_rows) == 1, lines
    expected = f"{statistics.mean(finals):.2f} ± {statistics.stdev(finals):.2f} %"
    assert f"| {expected} | {min(finals):.2f} - {max(finals):.2f} % |" in lenet_rows[0]
    assert sum(line.startswith("| `lenet.py` --lr 0.2 | fake, first 48 | 1 | 1 |") for line in lines) == 1, "other lr"
    for variant in mnist_ablation.VARIANTS:
        assert sum(line.startswith(f"| `mnist_ablation.py` {variant} | fake, first 48 | 1 | 1, 2 |")
                   for line in lines) == 1, variant
    held = [line for line in lines if "16 held out for validation" in line]
    assert len(held) == 1 and "% (" in held[0], "the best validation accuracy and its epoch"
    assert len(lines) == 1 + 1 + 4 + 1
    capsys.readouterr()
    assert results.main([str(tmp_path / "abl1"), str(tmp_path / "abl2")]) == 0, "named: a --variant all run's folders"
    assert sum(line.startswith("| `mnist_ablation.py`") for line in capsys.readouterr().out.splitlines()) == 4


def test_a_run_that_did_not_finish_is_left_out_and_named(tmp_path, capsys, monkeypatch):
    options = ["--dataset", "fake", "--limit", "32", "--batch-size", "16", "--epochs", "3"]
    lenet.main([*options, "--out-dir", str(tmp_path / "done")])
    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        interrupt_after(patch, 2)  # stopped at the end of epoch 1 of 3
        lenet.main([*options, "--seed", "2", "--out-dir", str(tmp_path / "stopped")])
    assert results.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| `lenet.py` | fake, first 32 | 3 | 1 |" in out and "Left out: 1 run(s) not finished" in out


def test_the_results_command_names_a_missing_folder(tmp_path, capsys):
    assert results.main([str(tmp_path / "nowhere")]) == 2
    assert "No such folder" in capsys.readouterr().err
