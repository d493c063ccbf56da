"""The CIFAR experiments: exact sizes and budgets, the real loading path offline, end to end."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from torch import nn

import cifar_dilated_dw
import cifar_norms
import utils
from conftest import assert_png, assert_run_folder, read_metrics, write_cifar10

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def output_shape(model: nn.Module) -> tuple[int, ...]:
    model.eval()
    with torch.no_grad():
        return tuple(model(torch.randn(2, 3, 32, 32)).shape)


# --- loading CIFAR through torchvision, offline --------------------------------------------


def test_cifar10_loads_through_torchvision_from_its_pickles(tmp_path, skip_md5):
    written = write_cifar10(tmp_path, per_batch=8, test=16)
    data = utils.load_data("cifar10", tmp_path)
    expected = torch.cat([written[f"data_batch_{index}"][0] for index in range(1, 6)])
    assert data.train_images.shape == (40, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert torch.equal(data.train_images, expected), "channels must come out as (C, H, W), unchanged"
    assert torch.equal(data.test_labels, written["test_batch"][1])
    assert data.classes == CIFAR10_CLASSES


def test_missing_cifar_names_its_files(tmp_path, no_network):
    with pytest.raises(utils.DataNotFoundError) as error:
        utils.load_data("cifar10", tmp_path)
    message = str(error.value)
    assert "data_batch_1" in message and "test_batch" in message and "cifar-10-batches-py" in message


# --- cifar_norms ---------------------------------------------------------------------------


@pytest.mark.parametrize("variant", cifar_norms.VARIANTS)
def test_norm_variants_share_one_size_under_the_budget(variant):
    model = cifar_norms.build_model(variant)
    assert utils.count_parameters(model) == 43_674 < cifar_norms.PARAMETER_BUDGET
    assert output_shape(model) == (2, 10)
    assert output_shape(cifar_norms.build_model(variant, num_classes=100)) == (2, 100)


def layer_shapes(model: nn.Module, kinds: tuple[type, ...]) -> list:
    return [(type(m).__name__, tuple(m.weight.shape)) for m in model.modules() if isinstance(m, kinds)]


def test_norm_variants_differ_in_their_normalization_only():
    models = {variant: cifar_norms.build_model(variant) for variant in cifar_norms.VARIANTS}
    convolutions = {variant: layer_shapes(model, (nn.Conv2d, nn.Linear)) for variant, model in models.items()}
    assert convolutions["batch"] == convolutions["group"] == convolutions["layer"]
    norms = {variant: [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm))]
             for variant, model in models.items()}
    assert all(isinstance(m, nn.BatchNorm2d) for m in norms["batch"])
    assert all(isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels // 8 >= 2 for m in norms["group"])
    # the convolutional layer norm of the GN paper, not LayerNorm([C, H, W]) with per-pixel weights
    assert all(isinstance(m, nn.GroupNorm) and m.num_groups == 1 for m in norms["layer"])
    assert len(norms["batch"]) == len(norms["group"]) == len(norms["layer"]) == 7


@pytest.mark.parametrize("variant, batch_independent", [("batch", False), ("group", True), ("layer", True)])
def test_only_batchnorm_lets_other_samples_change_an_output(variant, batch_independent):
    norm = cifar_norms.norm_layer(variant, 16).train()
    torch.manual_seed(0)
    sample, other, another = torch.randn(3, 1, 16, 4, 4)
    first = norm(torch.cat([sample, other]))[0]
    second = norm(torch.cat([sample, another * 5 + 3]))[0]
    assert torch.allclose(first, second, atol=1e-5) == batch_independent


def test_layer_norm_normalizes_each_sample_over_channels_and_pixels():
    norm = cifar_norms.norm_layer("layer", 16)
    x = torch.randn(2, 16, 5, 5) * 3 + 1
    out = norm(x)
    assert torch.allclose(out.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(out.var(dim=(1, 2, 3), unbiased=False), torch.ones(2), atol=1e-3)


def test_standardized_convolution_ignores_each_filters_mean_and_scale():
    torch.manual_seed(0)
    conv = cifar_norms.StandardizedConv2d(4, 6, kernel_size=3, padding=1, bias=False)
    x = torch.randn(2, 4, 8, 8)
    before = conv(x)
    with torch.no_grad():  # shift and scale each filter differently: a plain convolution would change
        conv.weight.mul_(torch.rand(6, 1, 1, 1) * 4 + 1).add_(torch.randn(6, 1, 1, 1))
    assert torch.allclose(conv(x), before, rtol=1e-2, atol=1e-2)  # up to the epsilon under the root
    weight = conv.weight.detach()
    standardized = (weight - weight.mean(dim=(1, 2, 3), keepdim=True)) / weight.std(dim=(1, 2, 3), keepdim=True,
                                                                                     unbiased=False)
    assert torch.allclose(before, nn.functional.conv2d(x, standardized, padding=1), rtol=1e-2, atol=1e-2)


def test_norm_blocks_normalize_after_the_relu():
    block = cifar_norms.conv_norm(3, 16, "group")
    assert [type(layer) for layer in block] == [cifar_norms.StandardizedConv2d, nn.ReLU, nn.GroupNorm]
    out = block(torch.randn(2, 3, 8, 8))
    # after the norm each sample's group is zero-mean, so negative values survive (a ReLU last would clip them)
    assert out.min() < 0


def test_cifar_norms_all_trains_three_and_compares(tmp_path):
    out = tmp_path / "norms"
    record = cifar_norms.main(["--dataset", "fake", "--limit", "32", "--epochs", "1", "--out-dir", str(out)])
    assert list(record["variants"]) == list(cifar_norms.VARIANTS)
    for variant in cifar_norms.VARIANTS:
        assert_run_folder(out / variant, record["variants"][variant], epochs=1)
    assert read_metrics(out) == json.loads(json.dumps(record))
    assert_png(out / "comparison.png")
    assert len((out / "comparison.md").read_text().splitlines()) == 2 + 3


def test_cifar_norms_trains_on_real_format_files_with_class_names(tmp_path, skip_md5):
    write_cifar10(tmp_path / "data")
    record = cifar_norms.main(["--data-dir", str(tmp_path / "data"), "--variant", "group", "--epochs", "1",
                               "--batch-size", "8", "--out-dir", str(tmp_path / "run")])
    assert record["dataset"] == "cifar10" and record["variant"] == "group"
    assert_run_folder(tmp_path / "run", record, epochs=1)


# --- cifar_dilated_dw ----------------------------------------------------------------------


def test_dilated_dw_net_stays_under_its_budget():
    model = cifar_dilated_dw.build_model()
    assert utils.count_parameters(model) == 162_058 < cifar_dilated_dw.PARAMETER_BUDGET
    assert output_shape(model) == (2, 10)


def test_dilated_dw_net_uses_what_it_teaches():
    model = cifar_dilated_dw.build_model()
    convolutions = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convolutions if c.groups == c.in_channels > 1]
    assert len(depthwise) == 8 and all(c.kernel_size == (3, 3) for c in depthwise)
    for separable in (m for m in model.modules() if isinstance(m, cifar_dilated_dw.SeparableConv2d)):
        depth, point = separable
        assert depth.groups == depth.in_channels and point.kernel_size == (1, 1)
    assert {c.dilation[0] for c in convolutions} == {1, 2, 4}
    assert not any(isinstance(m, (nn.MaxPool2d, nn.Linear)) for m in model.modules())
    assert isinstance(model.pool, nn.AdaptiveAvgPool2d) and model.classifier.kernel_size == (1, 1)


def test_a_residual_stage_adds_its_input():
    stage = cifar_dilated_dw.ResidualStage(8).eval()
    for parameter in stage.parameters():
        nn.init.zeros_(parameter)  # the body then outputs zeros: what is left is the shortcut
    x = torch.randn(2, 8, 6, 6)
    assert torch.equal(stage(x), x)


def test_separable_savings_count_weights_honestly():
    rows = cifar_dilated_dw.separable_savings(cifar_dilated_dw.build_model())
    for row in rows[:-1]:
        assert row["full 3x3"] == row["in"] * row["out"] * 9
        assert row["separable"] == row["in"] * 9 + row["in"] * row["out"]
        assert row["saved"] == row["full 3x3"] - row["separable"]
    assert rows[-1]["separable"] == sum(row["separable"] for row in rows[:-1])


def test_dilated_dw_receptive_field_covers_the_image():
    rows = utils.receptive_field(cifar_dilated_dw.build_model(), (3, 32, 32))
    fields = [row["r_out"] for row in rows if row["kernel"] > 1]
    # 3x3 layers grow it by 2 * dilation * jump; dilations 2 and 4 at jump 4 add 16 and 32.
    assert fields == [3, 5, 7, 9, 13, 21, 25, 41, 73, 101]


def test_cifar_dilated_dw_end_to_end(tmp_path):
    out = tmp_path / "run"
    record = cifar_dilated_dw.main(["--dataset", "fake", "--limit", "32", "--epochs", "1", "--out-dir", str(out)])
    assert_run_folder(out, record, epochs=1)
    assert "| all |" in (out / "separable_savings.md").read_text()
    assert "| 101 |" in (out / "receptive_field.md").read_text()


@pytest.mark.parametrize("script", [cifar_norms, cifar_dilated_dw])
def test_cifar_scripts_refuse_mnist(script, capsys):
    with pytest.raises(SystemExit) as error:
        script.main(["--dataset", "mnist"])
    assert error.value.code == 2 and "cifar100" in capsys.readouterr().err


def test_the_batch_size_experiment_trains_each_size_with_a_scaled_learning_rate(tmp_path):
    summary = cifar_norms.main(["--dataset", "fake", "--limit", "16", "--epochs", "1", "--batch-sizes", "8,4",
                                "--out-dir", str(tmp_path)])
    assert list(summary["runs"]) == ["4", "8"]
    for size in (4, 8):
        runs = summary["runs"][str(size)]
        assert list(runs) == list(cifar_norms.VARIANTS)
        for record in runs.values():
            assert record["args"]["batch_size"] == size and record["args"]["lr"] == pytest.approx(0.05 * size / 128)
            assert record["epochs"][0]["train_samples"] == 16
    table = (tmp_path / "batch_sizes.md").read_text().splitlines()
    assert table[0] == "| batch size | peak lr | batch (%) | group (%) | layer (%) |" and len(table) == 2 + 2
    assert_png(tmp_path / "batch_sizes.png")


def test_the_batch_size_experiment_with_seeds_tables_each_norm_over_its_seeds(tmp_path):
    summary = cifar_norms.main(["--dataset", "fake", "--limit", "16", "--epochs", "1", "--batch-sizes", "8",
                                "--variant", "group", "--seeds", "1,2", "--out-dir", str(tmp_path)])
    runs = summary["runs"]["8"]
    assert list(runs) == ["seed1", "seed2"] and [record["args"]["seed"] for record in runs.values()] == [1, 2]
    finals = [record["final_test_acc"] for record in runs.values()]
    expected = f"{statistics.mean(finals):.2f} ± {statistics.stdev(finals):.2f}"
    assert (tmp_path / "batch_sizes.md").read_text().splitlines()[2] == f"| 8 | 0.00313 | {expected} |"
    assert_png(tmp_path / "batch_sizes.png")


@pytest.mark.parametrize("value", ["0,4", "four", ","])
def test_batch_sizes_must_be_positive_whole_numbers(value, capsys):
    with pytest.raises(SystemExit) as error:
        cifar_norms.main(["--batch-sizes", value])
    assert error.value.code == 2 and "--batch-sizes" in capsys.readouterr().err


@pytest.mark.parametrize("net, parameters", [("norms-bn", 18_064), ("norms-ln", 47_236), ("dilated", 100_416)])
def test_the_writeups_networks_have_their_tables_parameter_counts(net, parameters):
    from tests import writeup_nets

    model = writeup_nets.build_model(net)
    assert utils.count_parameters(model) == parameters
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
