"""EfficientNet B0-B7 with compound scaling, on CIFAR-10.

Tan and Le, "EfficientNet: Rethinking Model Scaling for Convolutional Neural Networks", ICML
2019. B0 is a stack of MBConv blocks (Sandler et al., "MobileNetV2", 2018: 1x1 expansion,
depthwise convolution, squeeze-and-excitation, 1x1 projection, residual). B1-B7 scale it
together in width (channels, rounded to multiples of 8), depth (blocks per stage, rounded up)
and resolution, by the paper's coefficients. Stochastic depth (Huang et al., 2016) drops whole
residual branches at random during training, more often the deeper the block.

    python efficientnet.py --variant b0 [--resolution 224]
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import utils

SCRIPT = "efficientnet"
VARIANTS = ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7")
DATASETS = ("cifar10", "cifar100", "fake")
# The original network halves the image five times: from 32 pixels on, a map of at least 1x1 is left.
SMALLEST_RESOLUTION = 32
# Grad-CAM explains the 1x1 head's output (4x4 at 32 pixels, 7x7 at 224), just before the pooling.
GRADCAM_LAYER = "features.8"

# Compound scaling per variant: width multiplier, depth multiplier, the paper's input resolution
# and the dropout before the classifier.
SCALING: dict[str, tuple[float, float, int, float]] = {
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4),
    "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5),
    "b7": (2.0, 3.1, 600, 0.5),
}
STOCHASTIC_DEPTH = 0.2  # drop probability of the last block; earlier ones drop less, linearly


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8, never more than 10 % below the unrounded value."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclass
class StageConfig:
    """One row of the paper's Table 1: MBConv expand ratio, kernel, first stride, channels, repeats."""

    expand_ratio: int
    kernel: int
    stride: int
    in_channels: int
    out_channels: int
    layers: int

    def scaled(self, width: float, depth: float) -> "StageConfig":
        return StageConfig(self.expand_ratio, self.kernel, self.stride, make_divisible(self.in_channels * width),
                           make_divisible(self.out_channels * width), math.ceil(self.layers * depth))


# EfficientNet-B0, the paper's Table 1 (stages 2 to 8).
B0_STAGES = [
    StageConfig(1, 3, 1, 32, 16, 1),
    StageConfig(6, 3, 2, 16, 24, 2),
    StageConfig(6, 5, 2, 24, 40, 2),
    StageConfig(6, 3, 2, 40, 80, 3),
    StageConfig(6, 5, 1, 80, 112, 3),
    StageConfig(6, 5, 2, 112, 192, 4),
    StageConfig(6, 3, 1, 192, 320, 1),
]


def conv_bn_act(in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                activation: bool = True) -> nn.Sequential:
    """Convolution (no bias), BatchNorm, SiLU (the paper's Swish) unless activation=False."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_channels, eps=1e-3),
    ]
    if activation:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """Hu et al., 2018: pool each channel to one number, learn a 0..1 weight per channel from them."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, kernel_size=1)
        self.fc2 = nn.Conv2d(squeezed, channels, kernel_size=1)
        self.activation = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        weights = torch.sigmoid(self.fc2(self.activation(self.fc1(self.pool(x)))))
        return x * weights


def stochastic_depth(x: Tensor, drop_probability: float, training: bool) -> Tensor:
    """Zero the whole branch for a random subset of the samples; scale the rest to keep the mean."""
    if not training or drop_probability == 0.0:
        return x
    keep = 1.0 - drop_probability
    mask = torch.empty(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask / keep


class MBConv(nn.Module):
    """Expand (1x1), depthwise (k x k), squeeze-excite, project (1x1, linear); residual when shapes match."""

    def __init__(self, config: StageConfig, drop_probability: float) -> None:
        super().__init__()
        expanded = make_divisible(config.in_channels * config.expand_ratio)
        layers: list[nn.Module] = []
        if expanded != config.in_channels:
            layers.append(conv_bn_act(config.in_channels, expanded))
        layers += [
            conv_bn_act(expanded, expanded, config.kernel, config.stride, groups=expanded),
            SqueezeExcitation(expanded, max(1, config.in_channels // 4)),
            conv_bn_act(expanded, config.out_channels, activation=False),  # linear bottleneck: no ReLU/SiLU
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = config.stride == 1 and config.in_channels == config.out_channels
        self.drop_probability = drop_probability

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        if self.use_residual:
            out = stochastic_depth(out, self.drop_probability, self.training) + x
        return out


class EfficientNet(nn.Module):
    """Stem, seven stages of MBConv blocks, 1x1 head to 4x the last width, pool, dropout, linear.

    With imagenet=True the strides are the paper's (32x smaller at the end: 224 -> 7). For
    32x32 CIFAR images the stem and the second stage keep stride 1, so the image shrinks 8x
    (to 4x4) instead of to 1x1 pixel: the same blocks and weights, fewer strides.
    """

    def __init__(self, width: float, depth: float, dropout: float, num_classes: int = 10,
                 imagenet: bool = False) -> None:
        super().__init__()
        stages = [stage.scaled(width, depth) for stage in B0_STAGES]
        if not imagenet:
            stages[1].stride = 1
        total_blocks = sum(stage.layers for stage in stages)
        layers: list[nn.Module] = [conv_bn_act(3, stages[0].in_channels, kernel=3, stride=2 if imagenet else 1)]
        block_index = 0
        for stage in stages:
            blocks = []
            for repeat in range(stage.layers):
                config = copy.copy(stage)
                if repeat > 0:  # only the first block of a stage changes channels and stride
                    config.in_channels, config.stride = stage.out_channels, 1
                blocks.append(MBConv(config, STOCHASTIC_DEPTH * block_index / total_blocks))
                block_index += 1
            layers.append(nn.Sequential(*blocks))
        head_channels = 4 * stages[-1].out_channels
        layers.append(conv_bn_act(stages[-1].out_channels, head_channels))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(head_channels, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def build_model(variant: str = "b0", num_classes: int = 10, imagenet: bool = False) -> nn.Module:
    """EfficientNet-`variant`; imagenet=True gives the original network (strides for 224+ pixels)."""
    if variant not in SCALING:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    width, depth, _, dropout = SCALING[variant]
    return EfficientNet(width, depth, dropout, num_classes, imagenet)


def augment(images: Tensor) -> Tensor:
    # 4-pixel shifts and mirror images: the standard CIFAR augmentation.
    return utils.random_hflip(utils.random_crop(images, padding=4))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = utils.build_parser(
        __doc__, script=SCRIPT, datasets=DATASETS, epochs=30, batch_size=128, lr=0.05,
        variants=VARIANTS, default_variant="b0", smallest_resolution=SMALLEST_RESOLUTION,
    )
    return parser.parse_args(argv)


def train_variant(variant: str, run: utils.Run, data: utils.ImageData, args: argparse.Namespace,
                  device: torch.device) -> dict:
    """Train one EfficientNet with the shared recipe; return its metrics record."""
    utils.seed_everything(args.seed)
    model = utils.to_device(build_model(variant, data.num_classes, imagenet=args.resolution is not None), device)
    if utils.examines(args):
        return utils.examine(model, data, run, args, GRADCAM_LAYER)
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
    """Train one EfficientNet or all eight, write the run folders and return the metrics record."""
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
