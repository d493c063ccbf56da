"""The MNIST networks: output shapes and exact parameter counts, budgets included."""

from __future__ import annotations

import pytest
import torch

import lenet
import mnist_8k
import mnist_ablation
import utils


def output_shape(model: torch.nn.Module, batch: int = 2) -> tuple[int, ...]:
    model.eval()
    with torch.no_grad():
        return tuple(model(torch.randn(batch, 1, 28, 28)).shape)


def test_lenet5_has_the_classic_61706_parameters():
    model = lenet.build_model()
    assert utils.count_parameters(model) == 61_706
    assert output_shape(model) == (2, 10)


def test_lenet5_follows_the_paper_layer_sizes():
    model = lenet.build_model()
    convolutions = [layer for layer in model.modules() if isinstance(layer, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convolutions] == [(6, (5, 5)), (16, (5, 5)), (120, (5, 5))]
    linears = [layer for layer in model.modules() if isinstance(layer, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(120, 84), (84, 10)]


@pytest.mark.parametrize("net, parameters", [("net8k", 7_852), ("writeup", 7_496)])
def test_mnist_8k_networks_stay_under_the_budget(net, parameters):
    model = mnist_8k.build_model(net=net)
    assert utils.count_parameters(model) == parameters
    assert utils.count_parameters(model) < mnist_8k.PARAMETER_BUDGET
    assert output_shape(model) == (2, 10)


def test_mnist_8k_writeup_receptive_field_matches_the_hand_computed_table():
    rows = utils.receptive_field(mnist_8k.build_model(net="writeup"), (1, 28, 28))
    # The write-up's table: r_out and n_out per convolution / pooling, computed by hand.
    assert [row["r_out"] for row in rows] == [3, 5, 6, 6, 10, 14, 18, 28, 28, 28]
    assert [row["n_out"] for row in rows] == [26, 24, 12, 12, 10, 8, 6, 1, 1, 1]
    assert [row["j_out"] for row in rows] == [1, 1, 2, 2, 2, 2, 2, 2, 2, 2]


def test_mnist_8k_5x5_stem_sees_what_the_two_3x3_saw():
    ours, theirs = (utils.receptive_field(mnist_8k.build_model(net=net), (1, 28, 28)) for net in ("net8k", "writeup"))
    assert [row["r_out"] for row in ours] == [5, 6, 6, 10, 14, 18, 28, 28, 28]
    assert [(row["r_out"], row["n_out"]) for row in ours] == [(row["r_out"], row["n_out"]) for row in theirs[1:]]


@pytest.mark.parametrize("size, dtype", [(20, torch.float32), (7, torch.float32), (20, torch.bfloat16)])
def test_the_channels_last_max_pool_is_max_pool_forward_and_backward(size, dtype):
    images = torch.randn(4, 16, size, size).relu().to(dtype)  # ReLU's zeros: ties in a window
    ours, theirs = images.clone().requires_grad_(), images.clone().requires_grad_()
    pooled = mnist_8k.MaxPool2x2()(ours)
    assert type(pooled.grad_fn).__name__ == "_ChannelsLastMaxPoolBackward", "the channels-last way ran"
    expected = torch.nn.MaxPool2d(2)(theirs)
    gradient = torch.randn_like(expected)
    pooled.backward(gradient)
    expected.backward(gradient)
    assert pooled.is_contiguous() and torch.equal(pooled, expected)
    assert torch.equal(ours.grad, theirs.grad)


def test_the_channels_last_max_pool_leaves_what_it_cannot_do_to_max_pool():
    pool, images = mnist_8k.MaxPool2x2(), torch.randn(2, 16, 8, 8, requires_grad=True)
    already_channels_last = pool(images.contiguous(memory_format=torch.channels_last))
    assert type(already_channels_last.grad_fn).__name__ == "MaxPool2DWithIndicesBackward0"
    assert torch.equal(pool(images[0]), torch.nn.MaxPool2d(2)(images[0])), "one image, no batch dimension"
    elsewhere = pool(torch.empty(2, 16, 8, 8, device="meta", requires_grad=True))  # "meta" stands in for a GPU
    assert type(elsewhere.grad_fn).__name__ == "MaxPool2DWithIndicesBackward0", "off the CPU: PyTorch's own"
    torch.use_deterministic_algorithms(True)
    try:
        assert type(pool(images).grad_fn).__name__ == "MaxPool2DWithIndicesBackward0", "max_unpool2d: not deterministic"
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("net, sizes", [("net8k", [20, 10, 10, 8, 6, 4, 1, 1, 1]),
                                        ("writeup", [22, 20, 10, 10, 8, 6, 4, 1, 1, 1])])
def test_mnist_8k_crop_cuts_the_frame_off_and_nothing_else(net, sizes):
    whole, cropped = mnist_8k.build_model(net=net).eval(), mnist_8k.build_model(crop=2, net=net).eval()
    cropped.load_state_dict(whole.state_dict())  # the crop adds no parameter
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(cropped(images), whole(images[..., 2:26, 2:26]))
        frame_changed = images.clone()
        frame_changed[..., :2, :], frame_changed[..., -2:, :] = 9.0, 9.0
        frame_changed[..., :, :2], frame_changed[..., :, -2:] = 9.0, 9.0
        assert torch.equal(cropped(frame_changed), cropped(images)), "the outer two pixels are not looked at"
    rows = utils.receptive_field(cropped, (1, 28, 28))
    assert [row["n_out"] for row in rows] == sizes
    assert rows[-1]["r_out"] == 24


@pytest.mark.parametrize("argv, crop", [
    ([], 2), (["--dataset", "fashion-mnist"], 0), (["--dataset", "kmnist"], 0), (["--dataset", "fake"], 0),
    (["--crop", "0"], 0), (["--dataset", "kmnist", "--crop", "3"], 3),
])
def test_mnist_8k_crops_mnist_alone_unless_asked(argv, crop):
    assert mnist_8k.parse_args(argv).crop == crop


@pytest.mark.parametrize(
    "variant, parameters",
    [("base", 57_926), ("batchnorm", 58_118), ("dropout", 57_926), ("skip", 65_738)],
)
def test_ablation_variants_have_exact_parameter_counts(variant, parameters):
    model = mnist_ablation.build_model(variant)
    assert utils.count_parameters(model) == parameters
    assert output_shape(model) == (2, 10)


def test_ablation_variants_differ_only_by_what_they_add():
    layer_types = {
        variant: [type(layer).__name__ for layer in mnist_ablation.build_model(variant)]
        for variant in ("base", "batchnorm", "dropout")
    }
    assert "BatchNorm1d" not in layer_types["base"] and "Dropout" not in layer_types["base"]
    assert layer_types["batchnorm"].count("BatchNorm1d") == 2
    assert layer_types["dropout"].count("Dropout") == 2
    strip = lambda names, extra: [name for name in names if name != extra]  # noqa: E731
    assert strip(layer_types["batchnorm"], "BatchNorm1d") == layer_types["base"]
    assert strip(layer_types["dropout"], "Dropout") == layer_types["base"]


def test_ablation_skip_projects_only_where_channels_change():
    model = mnist_ablation.build_model("skip")
    shortcuts = [type(block.shortcut).__name__ for block in model.blocks]
    assert shortcuts == ["Sequential", "Identity", "Identity", "Identity"]


@pytest.mark.parametrize("module", [lenet, mnist_8k])
def test_models_take_another_class_count(module):
    assert output_shape(module.build_model(num_classes=26)) == (2, 26)


def test_ablation_rejects_an_unknown_variant():
    with pytest.raises(ValueError, match="base"):
        mnist_ablation.build_model("wide")


@pytest.mark.parametrize(
    "module, argv, expected",
    [
        (lenet, [], {"cpu": True, "cuda": True, "mps": False}),
        # mnist_8k runs slower channels-last on the CPU (oneDNN uses one thread for it).
        (mnist_8k, [], {"cpu": False, "cuda": True, "mps": False}),
        (mnist_8k, ["--channels-last"], {"cpu": True, "cuda": True, "mps": False}),
        (lenet, ["--no-channels-last"], {"cpu": False, "cuda": False, "mps": False}),
    ],
)
def test_channels_last_defaults_per_script_and_device(module, argv, expected):
    args = module.parse_args(argv)
    chosen = {kind: utils.uses_channels_last(args, torch.device(kind)) for kind in expected}
    assert chosen == expected
