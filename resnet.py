"""ResNet 18/34/50/101/152 on CIFAR-10.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016. Blocks learn
a residual F(x) that is added to their input, so a deep stack can start out as the identity and
still train. BasicBlock (two 3x3) builds ResNet 18 and 34; Bottleneck (1x1 down, 3x3, 1x1 up)
builds 50, 101 and 152.

    python resnet.py --variant 50
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

import utils

SCRIPT = "resnet"
VARIANTS = ("18", "34", "50", "101", "152")
DATASETS = ("cifar10", "cifar100", "fake")
# The original network halves the image five times: from 32 pixels on, a map of at least 1x1 is left.
SMALLEST_RESOLUTION = 32
# Grad-CAM explains the last stage's output (4x4 at 32 pixels, 7x7 at 224).
GRADCAM_LAYER = "layer4"


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding; no bias, BatchNorm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution; no bias, BatchNorm follows."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; the input is added before the last ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduces the channels, 3x3 works on fewer of them, 1x1 expands 4x; input added.

    The stride sits on the 3x3 convolution (as in torchvision, "ResNet v1.5"): the same
    parameters as the paper's stride on the first 1x1, and better accuracy.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# Blocks per stage, from the paper's Table 1.
ARCHITECTURES: dict[str, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    "18": (BasicBlock, [2, 2, 2, 2]),
    "34": (BasicBlock, [3, 4, 6, 3]),
    "50": (Bottleneck, [3, 4, 6, 3]),
    "101": (Bottleneck, [3, 4, 23, 3]),
    "152": (Bottleneck, [3, 8, 36, 3]),
}


class ResNet(nn.Module):
    """Stem, four stages of blocks (64, 128, 256, 512 planes), global average pooling, linear.

    With imagenet=True the stem is the paper's 7x7/2 convolution and 3x3/2 max-pool, for 224x224
    input. Otherwise it is one 3x3/1 convolution and no pooling, as the CIFAR literature does:
    a 32x32 image shrunk 4x before the first block would leave the last stage 1x1 pixels.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 10,
                 imagenet: bool = False) -> None:
        super().__init__()
        self.inplanes = 64
        if imagenet:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(3, 64)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Start each residual branch at zero (Goyal et al., 2017): every block begins as the
        # identity, which helps deep variants train from the first epoch.
        for module in self.modules():
            if isinstance(module, Bottleneck):
                nn.init.zeros_(module.bn3.weight)
            elif isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            # Projection shortcut (the paper's option B) where the shape changes.
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_model(variant: str = "18", num_classes: int = 10, imagenet: bool = False) -> nn.Module:
    """ResNet-`variant`; imagenet=True gives the original 224x224 network."""
    if variant not in ARCHITECTURES:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    block, layers = ARCHITECTURES[variant]
    return ResNet(block, layers, num_classes, imagenet)


def augment(images: Tensor) -> Tensor:
    # The standard CIFAR augmentation of the ResNet paper: 4-pixel shifts and mirror images.
    return utils.random_hflip(utils.random_crop(images, padding=4))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = utils.build_parser(
        __doc__, script=SCRIPT, datasets=DATASETS, epochs=30, batch_size=128, lr=0.1,
        variants=VARIANTS, default_variant="18", smallest_resolution=SMALLEST_RESOLUTION,
    )
    return parser.parse_args(argv)


def train_variant(variant: str, run: utils.Run, data: utils.ImageData, args: argparse.Namespace,
                  device: torch.device) -> dict:
    """Train one ResNet with the shared recipe; return its metrics record."""
    utils.seed_everything(args.seed)
    model = utils.to_device(build_model(variant, data.num_classes, imagenet=args.resolution is not None), device)
    if utils.examines(args):
        return utils.examine(model, data, run, args, GRADCAM_LAYER)
    # SGD with Nesterov momentum, weight decay 5e-4 and a one-cycle schedule: the usual CIFAR recipe,
    # aimed at the ~93 % published for ResNet-18 (no decay on BatchNorm and biases, which it only hurts).
    optimizer = torch.optim.SGD(utils.weight_decay_groups(model, 5e-4), lr=args.lr, momentum=0.9, nesterov=True,
                                fused=utils.fused(device))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=utils.steps_per_epoch(data, args)
    )
    options = utils.FitOptions(
        scheduler=scheduler, scheduler_per="batch", augment=augment, resize=args.resolution,
        criterion=utils.cross_entropy(args.label_smoothing),
    )
    if args.find_lr:
        return utils.find_lr(model, data, optimizer, args, run, options)
    utils.save_summary(model, data.input_shape(args.resolution), run.folder, quiet=args.variant == "all")
    record = utils.new_record(SCRIPT, variant, args, model, device)
    record, result = utils.fit(model, data, optimizer, args, run, record, options)
    utils.save_standard_plots(data, record, result.predictions, run.folder, model=model, explain=GRADCAM_LAYER,
                              resize=args.resolution)
    return record


def main(argv: list[str] | None = None) -> dict:
    """Train one ResNet or all five, write the run folders and return the metrics record."""
    args = parse_args(argv)
    with utils.friendly_errors():
        device = utils.prepare(args)
        with utils.open_run(args, SCRIPT, device, VARIANTS) as run:
            data = utils.load_run_data(args, run, device, fake_like="cifar10")
            record = utils.train_runs(
                run, args, lambda variant, variant_run: train_variant(variant, variant_run, data, args, device))
    return record


if __name__ == "__main__":
    main()
