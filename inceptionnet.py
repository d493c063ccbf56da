"""GoogLeNet (Inception v1) with its two auxiliary classifiers, on CIFAR-10.

Szegedy et al., "Going Deeper with Convolutions", CVPR 2015. An Inception block looks at its
input through 1x1, 3x3 and 5x5 convolutions and a max-pool side by side and concatenates what
they find; 1x1 "reduce" convolutions before the 3x3 and 5x5 keep that affordable. Two small
classifiers on intermediate blocks add their loss (weight 0.3) during training, to push
gradient into the middle of the 22-layer network; at test time they are switched off.

The blocks follow the paper's Table 1, with true 5x5 convolutions (torchvision's GoogLeNet
uses 3x3 there), and BatchNorm after every convolution as torchvision has it (the paper
predates BatchNorm).

    python inceptionnet.py [--no-aux]
"""

from __future__ import annotations

import argparse

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor, nn

import utils

SCRIPT = "inceptionnet"
DATASETS = ("cifar10", "cifar100", "fake")
# The original network halves the image five times: from 32 pixels on, a map of at least 1x1 is left.
SMALLEST_RESOLUTION = 32
AUX_LOSS_WEIGHT = 0.3
# Grad-CAM explains the last Inception block's output (1024 maps of 4x4 at 32 pixels, 7x7 at 224).
GRADCAM_LAYER = "inception5b"

# The paper's Table 1: input channels, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
INCEPTION_TABLE: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "3a": (192, 64, 96, 128, 16, 32, 32),
    "3b": (256, 128, 128, 192, 32, 96, 64),
    "4a": (480, 192, 96, 208, 16, 48, 64),
    "4b": (512, 160, 112, 224, 24, 64, 64),
    "4c": (512, 128, 128, 256, 24, 64, 64),
    "4d": (512, 112, 144, 288, 32, 64, 64),
    "4e": (528, 256, 160, 320, 32, 128, 128),
    "5a": (832, 256, 160, 320, 32, 128, 128),
    "5b": (832, 384, 192, 384, 48, 128, 128),
}


class BasicConv2d(nn.Module):
    """Convolution (no bias), BatchNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_options: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_options)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class Inception(nn.Module):
    """Four branches side by side, concatenated along the channels."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
                 pool_proj: int) -> None:
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, kernel_size=1),
            BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, kernel_size=1),
            BasicConv2d(ch5x5red, ch5x5, kernel_size=5, padding=2),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_channels, pool_proj, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.branch1(x), self.branch2(x), self.branch3(x), self.branch4(x)], dim=1)


class InceptionAux(nn.Module):
    """The paper's auxiliary classifier: pool to 4x4, 1x1 conv 128, FC 1024, dropout 0.7, linear."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        # The paper's 5x5/3 average pool turns 14x14 into 4x4; adaptive pooling does so at any size.
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv = BasicConv2d(in_channels, 128, kernel_size=1)
        self.fc1 = nn.Linear(128 * 4 * 4, 1024)
        self.dropout = nn.Dropout(0.7)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.conv(self.pool(x)), 1)
        return self.fc2(self.dropout(F.relu(self.fc1(x), inplace=True)))


class GoogLeNet(nn.Module):
    """Stem, Inception 3a-3b, 4a-4e, 5a-5b with max-pools between, average pool, dropout, linear.

    In training mode with aux_logits the forward pass returns (main, aux1, aux2) logits; in
    evaluation mode the main logits alone. With imagenet=True the stem is the paper's
    (7x7/2 conv, 3x3/2 max-pool, 1x1 and 3x3 convs, 3x3/2 max-pool: 224 -> 28 before 3a). For
    32x32 CIFAR images it is 3x3/1 convolutions and one max-pool (32 -> 16 before 3a), so the
    blocks still see 16, 8 and 4 pixels instead of nothing.
    """

    def __init__(self, num_classes: int = 10, aux_logits: bool = True, imagenet: bool = False,
                 dropout: float = 0.4) -> None:
        super().__init__()
        def pool() -> nn.MaxPool2d:
            # The paper's 3x3/2 max-pool; on 32x32 input padded so each one halves exactly (16, 8, 4).
            if imagenet:
                return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)
            return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        if imagenet:
            self.stem = nn.Sequential(
                BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3), pool(),
                BasicConv2d(64, 64, kernel_size=1), BasicConv2d(64, 192, kernel_size=3, padding=1), pool(),
            )
        else:
            self.stem = nn.Sequential(
                BasicConv2d(3, 64, kernel_size=3, padding=1),
                BasicConv2d(64, 64, kernel_size=1), BasicConv2d(64, 192, kernel_size=3, padding=1), pool(),
            )
        self.inception3a = Inception(*INCEPTION_TABLE["3a"])
        self.inception3b = Inception(*INCEPTION_TABLE["3b"])
        self.maxpool3 = pool()
        self.inception4a = Inception(*INCEPTION_TABLE["4a"])
        self.inception4b = Inception(*INCEPTION_TABLE["4b"])
        self.inception4c = Inception(*INCEPTION_TABLE["4c"])
        self.inception4d = Inception(*INCEPTION_TABLE["4d"])
        self.inception4e = Inception(*INCEPTION_TABLE["4e"])
        self.maxpool4 = pool()
        self.inception5a = Inception(*INCEPTION_TABLE["5a"])
        self.inception5b = Inception(*INCEPTION_TABLE["5b"])
        self.aux1 = InceptionAux(512, num_classes) if aux_logits else None  # on 4a's output
        self.aux2 = InceptionAux(528, num_classes) if aux_logits else None  # on 4d's output
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(1024, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(module.weight, std=0.01, a=-2, b=2)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor, Tensor]:
        x = self.inception3b(self.inception3a(self.stem(x)))
        x = self.inception4a(self.maxpool3(x))
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.inception4e(x)
        x = self.inception5b(self.inception5a(self.maxpool4(x)))
        logits = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if aux1 is not None and aux2 is not None:
            return logits, aux1, aux2
        return logits


def build_model(num_classes: int = 10, imagenet: bool = False, aux_logits: bool = True) -> nn.Module:
    """GoogLeNet; imagenet=True gives the original 224x224 network."""
    return GoogLeNet(num_classes, aux_logits, imagenet)


def inception_loss(label_smoothing: float = 0.0) -> utils.Criterion:
    """Main loss + 0.3 x each auxiliary loss in training; the parts are logged per epoch."""

    def criterion(outputs: Tensor | tuple[Tensor, Tensor, Tensor], labels: Tensor):
        if not isinstance(outputs, tuple):  # no auxiliary heads (--no-aux)
            return F.cross_entropy(outputs, labels, label_smoothing=label_smoothing), outputs, {}
        parts = {name: F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
                 for name, logits in zip(("main", "aux1", "aux2"), outputs)}
        loss = parts["main"] + AUX_LOSS_WEIGHT * (parts["aux1"] + parts["aux2"])
        return loss, outputs[0], parts

    return criterion


def augment(images: Tensor) -> Tensor:
    # 4-pixel shifts and mirror images: the standard CIFAR augmentation.
    return utils.random_hflip(utils.random_crop(images, padding=4))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = utils.build_parser(
        __doc__, script=SCRIPT, datasets=DATASETS, epochs=30, batch_size=128, lr=0.05,
        smallest_resolution=SMALLEST_RESOLUTION,
    )
    parser.add_argument("--no-aux", action="store_true", help="train without the two auxiliary classifiers")
    return parser.parse_args(argv)


def plot_loss_parts(history: Sequence[dict], parts: Sequence[str], path: Path) -> None:
    """The named parts of the training loss per epoch (the main head and the two auxiliary ones)."""
    figure = Figure(figsize=(7, 4.5))
    axis = figure.add_subplot(1, 1, 1)
    epochs = [row["epoch"] for row in history]
    for part in parts:
        axis.plot(epochs, [row[f"train_loss_{part}"] for row in history], marker="o", markersize=3, label=part)
    axis.plot(epochs, [row["test_loss"] for row in history], linestyle="--", label="test (main head)")
    axis.set_xlabel("epoch")
    axis.set_ylabel("cross-entropy")
    axis.grid(alpha=0.3)
    axis.legend()
    utils.save_figure(figure, path)


def train(run: utils.Run, data: utils.ImageData, args: argparse.Namespace, device: torch.device) -> dict:
    """Train GoogLeNet from args.seed (or answer a question about a trained one); return its metrics record."""
    utils.seed_everything(args.seed)
    model = utils.to_device(build_model(data.num_classes, imagenet=args.resolution is not None,
                                        aux_logits=not args.no_aux), device)
    if utils.examines(args):
        return utils.examine(model, data, run, args, GRADCAM_LAYER)
    optimizer = torch.optim.SGD(utils.weight_decay_groups(model, 5e-4), lr=args.lr, momentum=0.9,
                                nesterov=True, fused=utils.fused(device))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=utils.steps_per_epoch(data, args)
    )
    options = utils.FitOptions(
        scheduler=scheduler, scheduler_per="batch", augment=augment, resize=args.resolution,
        criterion=inception_loss(args.label_smoothing),
    )
    if args.find_lr:
        return utils.find_lr(model, data, optimizer, args, run, options)
    utils.save_summary(model, data.input_shape(args.resolution), run.folder)
    record = utils.new_record(SCRIPT, None, args, model, device)
    record, result = utils.fit(model, data, optimizer, args, run, record, options)
    utils.save_standard_plots(data, record, result.predictions, run.folder, model=model, explain=GRADCAM_LAYER,
                              resize=args.resolution)
    if utils.is_main_process() and not args.no_aux:
        plot_loss_parts(record["epochs"], ("main", "aux1", "aux2"), run.folder / "aux_losses.png")
    return record


def main(argv: list[str] | None = None) -> dict:
    """Train GoogLeNet (once, or once per --seeds), write the run folder and return its metrics record."""
    args = parse_args(argv)
    with utils.friendly_errors():
        device = utils.prepare(args)
        with utils.open_run(args, SCRIPT, device) as run:
            data = utils.load_run_data(args, run, device, fake_like="cifar10")
            record = utils.train_runs(run, args, lambda _, one_run: train(one_run, data, args, device))
    return record


if __name__ == "__main__":
    main()
