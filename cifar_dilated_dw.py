"""Dilated and depthwise-separable convolutions: aiming at 85 % on CIFAR-10 under 200,000 parameters.

A depthwise-separable convolution (Chollet, "Xception", 2017; Howard et al., "MobileNets",
2017) filters each channel on its own with a 3x3 kernel, then mixes channels with a 1x1
convolution: about 9x fewer weights than a full 3x3 convolution of the same widths. A dilated
convolution (Yu and Koltun, "Multi-Scale Context Aggregation by Dilated Convolutions", 2016)
spreads its 3x3 taps apart, widening the receptive field without more weights or less
resolution. The script prints both lessons: the receptive field per layer and the parameters
each separable convolution saves.

    python cifar_dilated_dw.py [--epochs 40]
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

import utils

SCRIPT = "cifar_dilated_dw"
DATASETS = ("cifar10", "cifar100", "fake")
PARAMETER_BUDGET = 200_000
TARGET_ACCURACY = 85.0
# Grad-CAM explains the last stage's output (192 maps of 8x8), the dilated one, before global pooling.
GRADCAM_LAYER = "stage3"


class SeparableConv2d(nn.Sequential):
    """Depthwise 3x3 (groups=in_channels: one filter per channel), then pointwise 1x1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=stride, padding=dilation,
                      dilation=dilation, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.stride, self.dilation = stride, dilation


def separable(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """Separable convolution, BatchNorm, ReLU."""
    return nn.Sequential(
        SeparableConv2d(in_channels, out_channels, stride, dilation),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ResidualStage(nn.Module):
    """Two separable layers added to their input.

    The shortcut is the identity (same size, same channels), so it adds no weights and the
    receptive field along the two layers is the stage's receptive field.
    """

    def __init__(self, channels: int, dilations: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        self.body = nn.Sequential(*(separable(channels, channels, dilation=d) for d in dilations))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class DilatedSeparableNet(nn.Module):
    """Stem, three residual stages at 32, 16 and 8 pixels, global average pooling, 1x1 classifier.

    Stride-2 separable convolutions halve the size between stages (no max-pooling); at 8x8,
    dilations of 2 and 4 carry the receptive field past the whole image without shrinking it.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (64, 128, 192)) -> None:
        super().__init__()
        first, second, third = widths
        self.stem = nn.Sequential(  # a full 3x3 convolution: with 3 input channels, separating saves nothing
            nn.Conv2d(3, first, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(first),
            nn.ReLU(inplace=True),
        )
        self.stage1 = ResidualStage(first)  # 32x32
        self.down1 = separable(first, second, stride=2)  # 16x16
        self.stage2 = ResidualStage(second, dilations=(1, 2))
        self.down2 = separable(second, third, stride=2)  # 8x8
        self.stage3 = ResidualStage(third, dilations=(2, 4))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(third, num_classes, kernel_size=1)  # a 1x1 convolution on the pooled map

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage1(self.stem(x))
        x = self.stage2(self.down1(x))
        x = self.stage3(self.down2(x))
        return torch.flatten(self.classifier(self.pool(x)), 1)


def build_model(num_classes: int = 10) -> nn.Module:
    """The dilated, depthwise-separable network for 32x32 images."""
    return DilatedSeparableNet(num_classes)


def separable_savings(model: nn.Module) -> list[dict]:
    """Per separable convolution: its weights against a full 3x3 convolution of the same widths."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, SeparableConv2d):
            separable_weights = utils.count_parameters(module)
            full_weights = module.in_channels * module.out_channels * 3 * 3
            rows.append({
                "layer": name, "in": module.in_channels, "out": module.out_channels,
                "stride": module.stride, "dilation": module.dilation,
                "separable": separable_weights, "full 3x3": full_weights,
                "saved": full_weights - separable_weights,
                "ratio": f"{full_weights / separable_weights:.1f}x",
            })
    total_separable = sum(row["separable"] for row in rows)
    total_full = sum(row["full 3x3"] for row in rows)
    rows.append({"layer": "all", "in": "", "out": "", "stride": "", "dilation": "", "separable": total_separable,
                 "full 3x3": total_full, "saved": total_full - total_separable,
                 "ratio": f"{total_full / total_separable:.1f}x"})
    return rows


def cutout(images: Tensor, size: int) -> Tensor:
    """Cutout: zero one size x size square per image, placed at random wholly inside it (DeVries & Taylor 2017)."""
    n, _, height, width = images.shape
    top = torch.randint(0, height - size + 1, (n, 1, 1), device=images.device)
    left = torch.randint(0, width - size + 1, (n, 1, 1), device=images.device)
    rows = torch.arange(height, device=images.device).view(1, -1, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, -1)
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return images.masked_fill(inside.unsqueeze(1), 0.0)


def augment(images: Tensor) -> Tensor:
    # The usual CIFAR recipe: shifts of up to 4 pixels, mirror images, and one 16x16 hole (cutout).
    return cutout(utils.random_hflip(utils.random_crop(images, padding=4)), size=16)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = utils.build_parser(__doc__, script=SCRIPT, datasets=DATASETS, epochs=40, batch_size=128, lr=0.1)
    return parser.parse_args(argv)


def train(run: utils.Run, data: utils.ImageData, args: argparse.Namespace, device: torch.device) -> dict:
    """Train the network from args.seed (or answer a question about a trained one); return its metrics record."""
    utils.seed_everything(args.seed)
    model = utils.to_device(build_model(data.num_classes), device)
    if utils.examines(args):
        return utils.examine(model, data, run, args, GRADCAM_LAYER)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4, fused=utils.fused(device))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=utils.steps_per_epoch(data, args)
    )
    options = utils.FitOptions(scheduler=scheduler, scheduler_per="batch", augment=augment)
    if args.find_lr:
        return utils.find_lr(model, data, optimizer, args, run, options)
    utils.save_summary(model, data.shape, run.folder)
    utils.save_receptive_field(model, data.shape, run.folder)
    savings = utils.markdown_table(separable_savings(model))
    if utils.is_main_process():
        utils.save_text(run.folder / "separable_savings.md", savings)
        print("Weights of each depthwise-separable convolution against a full 3x3 one:\n" + savings)
    record = utils.new_record(SCRIPT, None, args, model, device)
    record, result = utils.fit(model, data, optimizer, args, run, record, options)
    utils.save_standard_plots(data, record, result.predictions, run.folder, model=model, explain=GRADCAM_LAYER)
    return record


def main(argv: list[str] | None = None) -> dict:
    """Train the network (once, or once per --seeds), write the run folder and return its metrics record."""
    args = parse_args(argv)
    with utils.friendly_errors():
        device = utils.prepare(args)
        with utils.open_run(args, SCRIPT, device) as run:
            data = utils.load_run_data(args, run, device, fake_like="cifar10")
            record = utils.train_runs(run, args, lambda _, one_run: train(one_run, data, args, device))
    return record


if __name__ == "__main__":
    main()
