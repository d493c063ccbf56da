"""The helpers behind the tables and plots: counts, projections, receptive fields, files."""

from __future__ import annotations

import builtins
import json

import pytest
import torch
from torch import nn

import mnist_8k
import utils
import vgg
from conftest import assert_png, optional, write_mnist


def test_confusion_matrix_counts_true_against_predicted():
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    predicted = torch.tensor([0, 1, 1, 2, 0, 2])
    counts = utils.confusion_matrix(labels, predicted, 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert counts.sum() == len(labels)


def test_pca_finds_the_direction_of_largest_spread():
    torch.manual_seed(0)
    spread = torch.randn(500, 1) * torch.tensor([[10.0, 0.0, 0.0]]) + torch.randn(500, 3) * 0.1
    points, name = vgg.project_2d(spread, "pca")
    assert name == "PCA" and points.shape == (500, 2)
    assert points[:, 0].var() > 100 * points[:, 1].var()


def test_tsne_draws_with_scikit_learn_where_it_is_installed():
    optional("sklearn", "pip install scikit-learn")
    torch.manual_seed(0)
    points, name = vgg.project_2d(torch.randn(60, 8), "tsne")
    assert name == "t-SNE" and points.shape == (60, 2)


def test_tsne_without_scikit_learn_says_so_and_draws_pca(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.startswith("sklearn"):
            raise ImportError("no scikit-learn here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    points, name = vgg.project_2d(torch.randn(50, 8), "tsne")
    assert name == "PCA" and points.shape == (50, 2)
    assert "scikit-learn" in capsys.readouterr().err


def test_receptive_field_counts_dilation_and_stride():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # r 3
        nn.Conv2d(8, 8, 3, stride=2, padding=1),  # r 5, jump 2
        nn.Conv2d(8, 8, 3, padding=2, dilation=2),  # effective 5x5 at jump 2: r 5 + 4 * 2 = 13
        nn.MaxPool2d(2),  # r 13 + 1 * 2 = 15, jump 4
        nn.AdaptiveAvgPool2d(1),  # 4x4 input: r 15 + 3 * 4 = 27
    )
    rows = utils.receptive_field(model, (3, 16, 16))
    assert [row["r_out"] for row in rows] == [3, 5, 13, 15, 27]
    assert [row["j_out"] for row in rows] == [1, 2, 2, 4, 4]
    assert [row["n_out"] for row in rows] == [16, 8, 8, 4, 1]


def test_markdown_table_has_a_header_a_rule_and_one_line_per_row():
    table = utils.markdown_table([{"name": "a", "params": 10, "acc": 99.456}, {"name": "b", "params": 2, "acc": 1.0}])
    lines = table.splitlines()
    assert lines[0] == "| name | params | acc |"
    assert lines[1] == "| --- | ---: | ---: |"
    assert lines[2] == "| a | 10 | 99.46 |" and len(lines) == 4


def test_files_are_replaced_whole(tmp_path):
    path = tmp_path / "metrics.json"
    utils.save_json(path, {"a": 1})
    utils.save_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"], "no temporary file may stay behind"


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    utils.save_torch(path, {"epoch": 1})
    with pytest.raises(Exception):
        utils.save_torch(path, {"epoch": 2, "unpicklable": lambda: None})
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_embedding_and_feature_map_plots_are_written(tmp_path):
    data = utils.load_data("fake", "unused", limit=40)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    vgg.plot_embeddings(model, model[-1], data, tmp_path / "embeddings.png")
    utils.plot_feature_maps(model, model[1], data, tmp_path / "maps.png")
    assert_png(tmp_path / "embeddings.png")
    assert_png(tmp_path / "maps.png")
    features = vgg.embeddings(model, model[-1], data.test_batches(16), limit=30)
    assert features.shape == (30, 4 * 26 * 26), "the inputs of the last layer, one row per sample"


def test_the_benchmark_measures_both_pipelines_side_by_side():
    from tests import benchmark

    result = benchmark.main(["--script", "lenet", "--dataset", "fake", "--limit", "512", "--batches", "2",
                             "--rounds", "1", "--loader-workers", "0"])
    assert set(result["medians"]) == {"ours", "tutorial, 0 workers"}
    assert all(value > 0 for value in result["medians"].values())
    assert result["ratio"] == result["medians"]["ours"] / result["medians"]["tutorial, 0 workers"]


def test_vgg_draws_its_embeddings_in_evaluation_sized_batches(tmp_path, monkeypatch):
    """At 224 pixels a fixed 250 images would need far more memory than the sized evaluation."""
    seen = []
    real = vgg.embeddings

    def recording(model, layer, batches, limit=2000, precision=None):
        seen.append(len(batches))
        return real(model, layer, batches, limit, precision)

    monkeypatch.setattr(vgg, "embeddings", recording)
    vgg.main(["--dataset", "fake", "--limit", "8", "--epochs", "1", "--variant", "11", "--eval-batch-size", "4",
              "--out-dir", str(tmp_path / "run")])
    assert seen == [2], "8 test images in the evaluation's batches of 4"


def test_time_to_target_races_both_recipes_in_turns_and_reports_the_ratio(tmp_path, capsys):
    """On tiny MNIST-format files: each seed trains the write-up's recipe and mnist_8k.py's defaults,
    in alternating order, and the table's seconds are the epochs' seconds summed up to the target."""
    from tests import time_to_target

    write_mnist(tmp_path / "data", train=64, test=20)
    out = tmp_path / "race"
    results = time_to_target.main(["--data-dir", str(tmp_path / "data"), "--seeds", "1,2", "--target", "0",
                                   "--out-dir", str(out)])
    printed = capsys.readouterr().out
    assert printed.index("seed 1: write-up") < printed.index("seed 1: ours")
    assert printed.index("seed 2: ours") < printed.index("seed 2: write-up"), "the order alternates"
    for seed in (1, 2):
        ours = json.loads((out / f"mnist_8k-seed{seed}" / "metrics.json").read_text())
        assert ours["args"]["seed"] == seed and ours["args"]["epochs"] == mnist_8k.parse_args([]).epochs
        assert [row["epoch"] for row in results[seed]["write-up"]["epochs"]] == list(range(1, 16))
        # A target of 0 % is reached at epoch 1: the seconds to it are epoch 1's.
        for name in ("write-up", "ours"):
            assert time_to_target.at_target(results[seed][name], 0) == (1, results[seed][name]["epochs"][0]["seconds"])
    report = (out / "results.md").read_text()
    assert report.count("| write-up |") == 2 and report.count("| ours |") == 2
    assert "Ratio of the seconds to 0.0 %" in report
    assert time_to_target.at_target(results[1]["ours"], 101) == (None, None), "never reached: no epoch, no seconds"


def test_time_to_target_says_not_reached_without_a_ratio():
    from tests import time_to_target

    runs = {"write-up": {"epochs": [{"epoch": 1, "test_acc": 99.0, "seconds": 30.0},
                                    {"epoch": 2, "test_acc": 99.5, "seconds": 30.0}], "wall": 65.0},
            "ours": {"epochs": [{"epoch": 1, "test_acc": 99.1, "seconds": 7.0},
                                {"epoch": 2, "test_acc": 99.3, "seconds": 7.0}], "wall": 20.0}}
    table = time_to_target.table({1: runs}, 99.4)
    assert "| 1 | write-up | 2 | 60 | 99.50 % |" in table
    assert "| 1 | ours | not reached | - | 99.30 % |" in table
    assert "Ratio" not in table and "x |" not in table
    assert "Never reached 99.4 %: ours with seed 1." in table
    runs["ours"]["epochs"][1]["test_acc"] = 99.4
    table = time_to_target.table({1: runs}, 99.4)
    assert "| 1 | ours | 2 | 14 | 99.40 % | 7.0 | 20 s | 4.29x |" in table and "Never reached" not in table


def test_time_to_target_without_the_mnist_files_says_how_to_get_them(tmp_path, capsys):
    from tests import time_to_target

    with pytest.raises(SystemExit) as stopped:
        time_to_target.main(["--data-dir", str(tmp_path / "empty"), "--seeds", "1", "--out-dir", str(tmp_path / "r")])
    assert stopped.value.code == 1
    said = capsys.readouterr().err
    assert "needs the real MNIST files" in said and f"python mnist_8k.py --data-dir {tmp_path / 'empty'}" in said
