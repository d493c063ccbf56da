"""The architecture zoo: faithful to the references, trainable on CIFAR, each script end to end."""

from __future__ import annotations

import pytest
import torch
import torchvision

import efficientnet
import inceptionnet
import resnet
import utils
import vgg
from conftest import assert_png, assert_run_folder

# The reference implementations' parameter counts with 1000 classes (the issue's table).
IMAGENET_PARAMETERS = {
    (resnet, "18"): 11_689_512, (resnet, "34"): 21_797_672, (resnet, "50"): 25_557_032,
    (resnet, "101"): 44_549_160, (resnet, "152"): 60_192_808,
    (vgg, "11"): 132_868_840, (vgg, "13"): 133_053_736, (vgg, "16"): 138_365_992, (vgg, "19"): 143_678_248,
    (efficientnet, "b0"): 5_288_548, (efficientnet, "b1"): 7_794_184, (efficientnet, "b2"): 9_109_994,
    (efficientnet, "b3"): 12_233_232, (efficientnet, "b4"): 19_341_616, (efficientnet, "b5"): 30_389_784,
    (efficientnet, "b6"): 43_040_704, (efficientnet, "b7"): 66_347_960,
}
TORCHVISION_NAMES = {resnet: "resnet{}", vgg: "vgg{}_bn", efficientnet: "efficientnet_{}"}
# Ours with 10 classes and the 32x32 stems (the CIFAR-10 shape scripts train by default).
CIFAR_PARAMETERS = {
    (resnet, "18"): 11_173_962, (resnet, "34"): 21_282_122, (resnet, "50"): 23_520_842,
    (resnet, "101"): 42_512_970, (resnet, "152"): 58_156_618,
    (vgg, "11"): 9_231_114, (vgg, "13"): 9_416_010, (vgg, "16"): 14_728_266, (vgg, "19"): 20_040_522,
    (efficientnet, "b0"): 4_020_358, (efficientnet, "b1"): 6_525_994, (efficientnet, "b2"): 7_715_084,
    (efficientnet, "b3"): 10_711_602, (efficientnet, "b4"): 17_566_546, (efficientnet, "b5"): 28_361_274,
    (efficientnet, "b6"): 40_758_754, (efficientnet, "b7"): 63_812_570,
}
FAMILIES = {"resnet": resnet, "vgg": vgg, "efficientnet": efficientnet}


def ids(case) -> str:
    return f"{case[0].SCRIPT}{case[1]}"


def parameters_on_meta(build) -> int:
    """Count parameters without allocating them: VGG's ImageNet shape alone holds ~140 million."""
    with torch.device("meta"):
        return utils.count_parameters(build())


@pytest.mark.parametrize("case", list(IMAGENET_PARAMETERS), ids=ids)
def test_imagenet_shape_matches_the_reference_parameter_count(case):
    module, variant = case
    ours = parameters_on_meta(lambda: module.build_model(variant, num_classes=1000, imagenet=True))
    reference = parameters_on_meta(getattr(torchvision.models, TORCHVISION_NAMES[module].format(variant)))
    assert ours == reference == IMAGENET_PARAMETERS[case]


@pytest.mark.parametrize("case", list(CIFAR_PARAMETERS), ids=ids)
def test_cifar_shape_has_its_exact_parameter_count_and_output(case):
    module, variant = case
    model = module.build_model(variant).eval()
    assert utils.count_parameters(model) == CIFAR_PARAMETERS[case]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_googlenet_follows_the_paper_with_true_5x5_convolutions():
    ours = parameters_on_meta(lambda: inceptionnet.build_model(1000, imagenet=True, aux_logits=False))
    assert ours == 7_005_832
    torchvision_3x3 = parameters_on_meta(lambda: torchvision.models.googlenet(aux_logits=False, init_weights=False))
    assert torchvision_3x3 == 6_624_904
    five_by_five = [conv for conv in inceptionnet.build_model().modules()
                    if isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (5, 5)]
    assert len(five_by_five) == 9, "one 5x5 branch per Inception block"


def test_googlenet_cifar_shape_sizes():
    assert utils.count_parameters(inceptionnet.build_model()) == 10_333_886
    assert utils.count_parameters(inceptionnet.build_model(aux_logits=False)) == 5_983_402


def test_auxiliary_heads_speak_in_training_only():
    model = inceptionnet.build_model()
    model.train()
    outputs = model(torch.randn(2, 3, 32, 32))
    assert isinstance(outputs, tuple) and [tuple(o.shape) for o in outputs] == [(2, 10)] * 3
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert inceptionnet.build_model(aux_logits=False).train()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_inception_loss_weights_each_auxiliary_head_by_0_3():
    labels = torch.tensor([1, 2])
    outputs = tuple(torch.randn(2, 10) for _ in range(3))
    loss, logits, parts = inceptionnet.inception_loss()(outputs, labels)
    assert logits is outputs[0] and set(parts) == {"main", "aux1", "aux2"}
    assert loss.item() == pytest.approx((parts["main"] + 0.3 * (parts["aux1"] + parts["aux2"])).item())


@pytest.mark.parametrize("build", [
    lambda: resnet.build_model("18", 1000, imagenet=True),
    lambda: vgg.build_model("11", 1000, imagenet=True),
    lambda: inceptionnet.build_model(1000, imagenet=True),
    lambda: efficientnet.build_model("b0", 1000, imagenet=True),
], ids=["resnet18", "vgg11", "googlenet", "efficientnet_b0"])
def test_the_smallest_imagenet_shape_of_each_family_runs_at_224(build):
    model = build().eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_cifar_stems_keep_the_image_large_enough():
    model = resnet.build_model("18")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert vgg.build_model("16").classifier[-1].in_features == 512
    sizes = []
    network = efficientnet.build_model("b0").eval()
    network.features[-1].register_forward_hook(lambda module, inputs, output: sizes.append(output.shape[-1]))
    with torch.no_grad():
        network(torch.randn(1, 3, 32, 32))
    assert sizes == [4], "EfficientNet on 32x32 must end at 4x4, not 1x1"


def test_efficientnet_scales_width_and_depth_by_the_paper():
    assert efficientnet.make_divisible(32 * 1.1) == 32 and efficientnet.make_divisible(16 * 1.4) == 24
    blocks = {variant: sum(len(stage) for stage in efficientnet.build_model(variant).features[1:-1])
              for variant in ("b0", "b7")}
    assert blocks == {"b0": 16, "b7": 55}
    b0 = efficientnet.build_model("b0")
    drops = [block.drop_probability for stage in b0.features[1:-1] for block in stage]
    assert drops[0] == 0.0 and drops == sorted(drops) and max(drops) < efficientnet.STOCHASTIC_DEPTH
    assert any(isinstance(m, efficientnet.SqueezeExcitation) for m in b0.modules())


def test_stochastic_depth_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.ones(4000, 2, 3, 3)
    out = efficientnet.stochastic_depth(x, 0.2, training=True)
    per_sample = out.flatten(1)
    assert ((per_sample == 0).all(dim=1) | (per_sample == 1.25).all(dim=1)).all()
    assert out.mean().item() == pytest.approx(1.0, abs=0.05)
    assert torch.equal(efficientnet.stochastic_depth(x, 0.2, training=False), x)


@pytest.mark.parametrize("script, variant", [(resnet, "18"), (vgg, "11"), (efficientnet, "b0"), (inceptionnet, None)],
                         ids=["resnet", "vgg", "efficientnet", "inceptionnet"])
def test_each_script_trains_its_smallest_variant_end_to_end(script, variant, tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset", "fake", "--epochs", "1", "--limit", "32", "--out-dir", str(out)]
    record = script.main(argv + (["--variant", variant] if variant else []))
    assert_run_folder(out, record, epochs=1)
    if script is vgg:
        for name in ("feature_maps_conv1", "feature_maps_conv2", "embeddings"):
            assert_png(out / f"{name}.png")
    if script is inceptionnet:
        assert_png(out / "aux_losses.png")
        assert {"train_loss_main", "train_loss_aux1", "train_loss_aux2"} <= record["epochs"][0].keys()


def test_resolution_trains_the_original_network_on_upsampled_images(tmp_path):
    record = resnet.main(["--dataset", "fake", "--epochs", "1", "--limit", "8", "--resolution", "64",
                          "--out-dir", str(tmp_path / "run")])
    assert record["params"] == utils.count_parameters(resnet.build_model("18", 10, imagenet=True))
    summary = (tmp_path / "run" / "summary.txt").read_text()
    # the 7x7/2 stem halves 64 to 32; after 32x in all, the last stage is 2x2
    assert "[1, 64, 32, 32]" in summary and "[1, 512, 2, 2]" in summary


def test_the_documented_usage_parses_exactly_as_typed():
    args = resnet.parse_args(["--variant", "50"])
    assert args.variant == "50" and args.dataset == "cifar10" and args.epochs > 0


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_unknown_variants_are_refused(family, capsys):
    with pytest.raises(ValueError):
        family.build_model("1000")
    with pytest.raises(SystemExit) as error:
        family.main(["--variant", "1000"])
    assert error.value.code == 2 and "invalid choice" in capsys.readouterr().err
