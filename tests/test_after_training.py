"""After training: --predict a user's own images, Grad-CAM, --evaluate a saved run, --find-lr."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

import cifar_norms
import lenet
import mnist_ablation
import mnist_8k
import utils
from conftest import assert_png, read_metrics, write_mnist


def train(script, folder, *extra: str) -> dict:
    return script.main(["--dataset", "fake", "--limit", "48", "--epochs", "1", "--out-dir", str(folder), *extra])


def digit_on_paper(path, size=(300, 220), paper=(236, 232, 222), ink=(25, 25, 35), offset=(40, 10)) -> None:
    """A '7' drawn thick in dark ink, off-centre on light paper, as a photo of a written digit would be."""
    image = Image.new("RGB", size, paper)
    x, y = offset
    ImageDraw.Draw(image).line([(x + 60, y + 40), (x + 160, y + 40), (x + 100, y + 180)], fill=ink, width=16)
    image.save(path)


# --- preparing a user's image as the dataset's images were made -------------------------------


def centre_of_mass(image: torch.Tensor) -> tuple[float, float]:
    weights = image.float() / image.float().sum()
    rows, columns = torch.arange(image.shape[0]) + 0.5, torch.arange(image.shape[1]) + 0.5
    return (weights.sum(dim=1) * rows).sum().item(), (weights.sum(dim=0) * columns).sum().item()


def test_a_dark_digit_on_paper_becomes_an_mnist_digit(tmp_path):
    digit_on_paper(tmp_path / "seven.png")
    seen = utils.prepare_image(tmp_path / "seven.png", (1, 28, 28))
    assert seen.shape == (1, 28, 28) and seen.dtype == torch.uint8
    image = seen[0]
    assert image.max() == 255, "the ink is the brightest, as in MNIST"
    assert image[0].max() == image[-1].max() == image[:, 0].max() == image[:, -1].max() == 0, "black around it"
    rows, columns = (image > 64).any(dim=1).nonzero(), (image > 64).any(dim=0).nonzero()
    assert max(rows[-1] - rows[0] + 1, columns[-1] - columns[0] + 1).item() in (19, 20, 21), "longer side 20 px"
    row, column = centre_of_mass(image)
    assert abs(row - 14) <= 1 and abs(column - 14) <= 1, "centred by its centre of mass"


def test_light_ink_on_black_is_not_inverted(tmp_path):
    digit_on_paper(tmp_path / "light.png", paper=(0, 0, 0), ink=(255, 255, 255))
    digit_on_paper(tmp_path / "dark.png")
    light = utils.prepare_image(tmp_path / "light.png", (1, 28, 28))
    dark = utils.prepare_image(tmp_path / "dark.png", (1, 28, 28))
    assert (light.int() - dark.int()).abs().float().mean() < 8, "the same digit either way"


def test_a_cifar_image_is_its_centre_square_resized(tmp_path):
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 255, 0), (100, 0, 200, 100))  # the middle square is green
    image.save(tmp_path / "wide.jpg", quality=95)
    seen = utils.prepare_image(tmp_path / "wide.jpg", (3, 32, 32))
    assert seen.shape == (3, 32, 32)
    assert seen[1].float().mean() > 230 and seen[0].float().mean() < 25, "only the green centre is kept"


def test_a_blank_picture_is_refused_with_a_sentence(tmp_path):
    Image.new("L", (50, 50), 200).save(tmp_path / "blank.png")
    with pytest.raises(utils.RunError, match="Found no digit"):
        utils.prepare_image(tmp_path / "blank.png", (1, 28, 28))


# --- --predict end to end ----------------------------------------------------------------------


def test_predict_prints_the_top_3_and_draws_them(tmp_path, capsys):
    train(lenet, tmp_path / "run")
    digit_on_paper(tmp_path / "seven.png")
    capsys.readouterr()
    answer = lenet.main(["--predict", str(tmp_path / "seven.png"), str(tmp_path / "seven.png"),
                         "--out-dir", str(tmp_path / "run")])
    assert len(answer["predictions"]) == 2
    top = answer["predictions"][0]["top"]
    assert len(top) == 3 and top[0]["percent"] >= top[1]["percent"] >= top[2]["percent"]
    assert sum(item["percent"] for item in top) <= 100.0 + 1e-6
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(str(tmp_path / "seven.png"))]
    assert len(lines) == 2 and lines[0].count("%") == 3
    assert_png(tmp_path / "run" / "predictions_own.png")


def test_predict_uses_the_most_recent_finished_run_and_needs_no_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_mnist(tmp_path / "data", train=40, test=20)
    lenet.main(["--data-dir", "data", "--epochs", "1"])
    digit_on_paper(tmp_path / "seven.png")
    (tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").unlink()  # no dataset needed
    answer = lenet.main(["--predict", "seven.png"])
    assert answer["run"] == str(tmp_path.joinpath("runs", "lenet").relative_to(tmp_path))
    assert_png(tmp_path / "runs" / "lenet" / "predictions_own.png")


def test_predict_with_colour_images_and_a_variant(tmp_path):
    train(cifar_norms, tmp_path / "run", "--variant", "group")
    Image.new("RGB", (64, 48), (30, 120, 200)).save(tmp_path / "sky.png")
    answer = cifar_norms.main(["--variant", "group", "--predict", str(tmp_path / "sky.png"),
                               "--out-dir", str(tmp_path / "run")])
    assert answer["variant"] == "group" and len(answer["predictions"][0]["top"]) == 3


@pytest.mark.parametrize("problem", ["missing", "not an image"])
def test_predict_with_a_bad_file_says_so_and_writes_nothing(tmp_path, capsys, problem):
    train(lenet, tmp_path / "run")
    before = sorted(path.name for path in (tmp_path / "run").iterdir())
    bad = tmp_path / "digit.png"
    if problem == "not an image":
        bad.write_text("no picture here")
    digit_on_paper(tmp_path / "good.png")
    with pytest.raises(SystemExit) as error:
        lenet.main(["--predict", str(tmp_path / "good.png"), str(bad), "--out-dir", str(tmp_path / "run")])
    assert error.value.code == 1
    assert f"Cannot read {bad} as an image" in capsys.readouterr().err
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == before


def test_predict_without_a_trained_run_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    digit_on_paper(tmp_path / "seven.png")
    with pytest.raises(SystemExit) as error:
        lenet.main(["--predict", "seven.png"])
    assert error.value.code == 1 and "No finished run of lenet" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# --- Grad-CAM ------------------------------------------------------------------------------------


class BrightSpotFinder(nn.Module):
    """Two feature maps: bright pixels (what class 1 is about) and dark pixels (what nothing is about)."""

    def __init__(self) -> None:
        super().__init__()
        convolution = nn.Conv2d(1, 2, kernel_size=1)
        with torch.no_grad():
            convolution.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            convolution.bias.copy_(torch.tensor([0.0, 1.0]))
        self.features = nn.Sequential(convolution, nn.ReLU())

    def forward(self, x):
        bright = self.features(x)[:, 0].mean(dim=(1, 2))
        return torch.stack([torch.zeros_like(bright), bright], dim=1)


def test_grad_cam_lights_up_what_the_chosen_class_looked_at():
    images = torch.zeros(2, 1, 16, 16)
    images[:, :, :8, :8] = 1.0  # a bright spot top-left; the dark map is active everywhere else
    model = BrightSpotFinder()
    heat, logits = utils.grad_cam(model, model.features, images)
    assert (logits.argmax(dim=1) == 1).all()
    assert heat.shape == (2, 16, 16) and heat.min() >= 0 and heat.max() == pytest.approx(1.0)
    assert heat[:, :8, :8].min() == pytest.approx(1.0), "the spot the class was found in"
    assert heat[:, 8:, :].max() == 0 and heat[:, :, 8:].max() == 0, "the dark map did not count for class 1"


@pytest.mark.parametrize("build, layer", [(lenet.build_model, lenet.GRADCAM_LAYER),
                                          *((partial(mnist_8k.build_model, net=net), layer)
                                            for net, layer in mnist_8k.GRADCAM_LAYERS.items())])
def test_grad_cam_maps_have_the_inputs_size_and_no_negative_heat(build, layer):
    model = build().eval()
    images = torch.randn(4, 1, 28, 28)
    heat, _ = utils.grad_cam(model, model.get_submodule(layer), images)
    assert heat.shape == (4, 28, 28) and heat.min() >= 0 and heat.max() <= 1 + 1e-6


@pytest.mark.parametrize("net", list(mnist_8k.GRADCAM_LAYERS))
def test_mnist_8k_explains_its_last_3x3_convolution_before_the_global_pool(net):
    features = mnist_8k.build_model(net=net).features
    index = int(mnist_8k.GRADCAM_LAYERS[net].removeprefix("features."))
    assert features[index][0].kernel_size == (3, 3) and isinstance(features[index + 1], nn.AdaptiveAvgPool2d)


def test_training_saves_a_gradcam_picture(tmp_path):
    train(mnist_8k, tmp_path / "run")
    assert_png(tmp_path / "run" / "gradcam.png")


# --- --evaluate -----------------------------------------------------------------------------------


def test_evaluate_reproduces_the_last_epoch_and_adds_per_class_accuracy(tmp_path, capsys):
    write_mnist(tmp_path / "data", train=60, test=40)
    trained = mnist_8k.main(["--data-dir", str(tmp_path / "data"), "--epochs", "2", "--batch-size", "16",
                             "--out-dir", str(tmp_path / "run")])
    assert set(trained["per_class_test_acc"]) == set(utils.TORCHVISION_DATASETS["mnist"].classes)
    for name in ("gradcam", "confusion_matrix"):
        (tmp_path / "run" / f"{name}.png").unlink()
    capsys.readouterr()
    evaluated = mnist_8k.main(["--data-dir", str(tmp_path / "data"), "--evaluate", "--out-dir", str(tmp_path / "run")])
    assert evaluated["evaluation"]["test_acc"] == trained["final_test_acc"]
    assert evaluated["evaluation"]["test_loss"] == pytest.approx(trained["epochs"][-1]["test_loss"], rel=1e-6)
    assert evaluated["per_class_test_acc"] == trained["per_class_test_acc"]
    assert read_metrics(tmp_path / "run")["evaluation"]["test_acc"] == trained["final_test_acc"]
    assert f"test accuracy {trained['final_test_acc']:.2f} %" in capsys.readouterr().out
    for name in ("gradcam", "confusion_matrix"):
        assert_png(tmp_path / "run" / f"{name}.png")


def test_a_run_saved_before_the_crop_and_the_5x5_stem_is_evaluated_as_it_was_trained(tmp_path, monkeypatch):
    write_mnist(tmp_path / "data", train=60, test=40)
    data, run = ["--data-dir", str(tmp_path / "data")], ["--out-dir", str(tmp_path / "run")]
    mnist_8k.main([*data, "--net", "writeup", "--epochs", "1", "--batch-size", "16", *run])
    built = []
    build = mnist_8k.build_model
    monkeypatch.setattr(mnist_8k, "build_model", lambda *shape: built.append(shape[3:]) or build(*shape))
    mnist_8k.main([*data, "--evaluate", *run])
    checkpoint = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert checkpoint["args"].pop("crop") == 2, "MNIST trains on the inner 24x24"
    assert checkpoint["args"].pop("net") == "writeup"
    torch.save(checkpoint, tmp_path / "run" / "checkpoint.pt")  # as a run saved before --crop and --net existed
    mnist_8k.main([*data, "--evaluate", *run])
    assert built == [(2, "writeup"), (0, "writeup")]


def test_evaluate_takes_the_runs_own_options(tmp_path):
    trained = train(lenet, tmp_path / "run", "--limit", "24")  # the last --limit counts
    evaluated = lenet.main(["--dataset", "fake", "--evaluate", "--out-dir", str(tmp_path / "run")])
    assert evaluated["evaluation"]["test_samples"] == 24
    assert evaluated["evaluation"]["test_acc"] == trained["final_test_acc"]


def test_evaluate_each_variant_of_a_variant_all_run(tmp_path):
    train(mnist_ablation, tmp_path / "run", "--variant", "all", "--limit", "16")
    answer = mnist_ablation.main(["--dataset", "fake", "--variant", "all", "--evaluate", "--out-dir",
                                  str(tmp_path / "run")])
    assert list(answer["variants"]) == list(mnist_ablation.VARIANTS)
    for variant in mnist_ablation.VARIANTS:
        assert "evaluation" in json.loads((tmp_path / "run" / variant / "metrics.json").read_text())


def test_questions_and_resume_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as error:
        lenet.main(["--evaluate", "--resume"])
    assert error.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


# --- --find-lr --------------------------------------------------------------------------------------


def test_the_range_test_leaves_weights_and_optimizer_as_they_were(tmp_path):
    data = utils.load_data("fake", "unused", limit=64)
    args = mnist_8k.parse_args(["--batch-size", "16"])
    model = mnist_8k.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    optimizer.zero_grad()
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()  # some momentum to keep
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    momentum = {index: state["momentum_buffer"].clone() for index, state in optimizer.state_dict()["state"].items()}
    found = utils.find_lr(model, data, optimizer, args, utils.Run(tmp_path, "test"),
                          utils.FitOptions(augment=mnist_8k.augment), steps=60)
    # Random labels: the loss may not fall at all, and then no rate is suggested (tests/test_bad_input.py).
    assert (found["suggested_lr"] is None or 1e-7 <= found["suggested_lr"] <= 10) and len(found["lrs"]) <= 60
    assert found["lrs"] == sorted(found["lrs"]), "the rate only rises"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    for index, state in optimizer.state_dict()["state"].items():
        assert torch.equal(state["momentum_buffer"], momentum[index])
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert_png(tmp_path / "lr_finder.png")


def test_find_lr_writes_its_curve_and_nothing_else(tmp_path, capsys):
    found = lenet.main(["--dataset", "fake", "--limit", "64", "--batch-size", "16", "--find-lr",
                        "--out-dir", str(tmp_path / "run")])
    assert f"Suggested --lr {found['suggested_lr']:.2g}" in capsys.readouterr().out
    assert sorted(path.name for path in (tmp_path / "run").iterdir()) == [".lock", "lr_finder.png"]
