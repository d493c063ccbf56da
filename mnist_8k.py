"""Under 8,000 parameters, at least 99.4 % on the MNIST test set.

How far careful design takes a tiny network: no compute spent on MNIST's blank frame, 3x3
convolutions with BatchNorm, one max-pool once the receptive field covers a stroke, a 1x1
convolution to squeeze channels, global average pooling instead of a large dense layer, light
rotation augmentation, a one-cycle learning-rate schedule (Smith and Topin, "Super-Convergence",
2018), weight decay and label smoothing.

    python mnist_8k.py [--epochs 12] [--seed 1] [--crop 2]
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

import utils

SCRIPT = "mnist_8k"
DATASETS = ("mnist", "fashion-mnist", "kmnist", "fake")
PARAMETER_BUDGET = 8_000
TARGET_ACCURACY = 99.4
# Grad-CAM explains the last 3x3 convolution's output (20 maps of 4x4 on MNIST), just before the global pooling.
GRADCAM_LAYER = "features.6"
# MNIST's digits were scaled into 20x20 and centred in 28x28, so its outer two pixels are nearly blank (0.3 % of
# the training images' ink, in 12 % of them): cutting them off saves a third of the multiply-adds. Other
# datasets fill the frame.
BLANK_BORDER = {"mnist": 2}


def conv_bn(in_channels: int, out_channels: int, kernel_size: int = 3, dropout: float = 0.0) -> nn.Sequential:
    """Convolution (no bias: BatchNorm's shift replaces it), BatchNorm, ReLU[, Dropout]."""
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class Net8k(nn.Module):
    """7,496 parameters; the comments give output size (28x28 MNIST, cropped to 24x24) and receptive field (RF)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0, crop: int = 0) -> None:
        super().__init__()
        self.crop = crop  # pixels cut off each side before the first convolution
        self.features = nn.Sequential(
            conv_bn(in_channels, 8, dropout=dropout),  # 22x22, RF 3
            conv_bn(8, 16, dropout=dropout),  # 20x20, RF 5
            nn.MaxPool2d(2),  # 10x10, RF 6: edges found, halve the resolution
            conv_bn(16, 8, kernel_size=1),  # 10x10: squeeze channels, cheaply
            conv_bn(8, 12, dropout=dropout),  # 8x8, RF 10
            conv_bn(12, 16, dropout=dropout),  # 6x6, RF 14
            conv_bn(16, 20, dropout=dropout),  # 4x4, RF 18
            nn.AdaptiveAvgPool2d(1),  # 1x1, RF 24: the whole digit
        )
        self.classifier = nn.Sequential(
            conv_bn(20, 16, kernel_size=1),
            nn.Conv2d(16, num_classes, kernel_size=1, bias=False),
            nn.Flatten(),
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.crop:
            x = x[..., self.crop:-self.crop, self.crop:-self.crop]
        return self.classifier(self.features(x))


def build_model(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0, crop: int = 0) -> nn.Module:
    """The sub-8k network for 28x28 images."""
    return Net8k(num_classes, in_channels, dropout, crop)


def augment(images: Tensor) -> Tensor:
    # Small rotations are what handwriting varies by; more than ~10 degrees starts to blur 6 and 9.
    return utils.random_affine(images, degrees=7)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # Each default measured on a 2-core CPU (docs/results.md, "Time to 99.4 % with under 8,000 parameters"):
    # - 12 epochs: chosen on a validation split over seeds 1-3, the shortest schedule whose every seed
    #   reached 99.3 % there and ended there (10 epochs did not; 15 got there 2-5 epochs later).
    # - crop 2 on MNIST: a step 10.8 against 14.4 ms, and 12 epochs still met that criterion (13 and 14
    #   did not: validation could not tell them apart).
    # - cpu_bf16: on CPUs with bfloat16 instructions --amp auto trains in bfloat16: an epoch took 9.4 s
    #   against 12.4 s in float32 (AVX512-BF16, medians of 3), and the accuracy over seeds 1-3 held.
    # - channels_last=None (on CUDA only): a step takes as long in channels-last on the CPU (its
    #   max-pool runs faster there, its BatchNorm slower).
    parser = utils.build_parser(__doc__, script=SCRIPT, datasets=DATASETS, epochs=12, batch_size=128, lr=0.1,
                                channels_last=None, cpu_bf16=True)
    parser.add_argument("--dropout", type=utils.probability, default=0.0, help="dropout after the 3x3 convolutions")
    parser.add_argument("--crop", type=int, choices=range(6), metavar="{0,...,5}",
                        help="pixels cut off each side of the image before the first convolution (default: 2 on "
                             "MNIST, whose outer two are nearly blank; 0 on the others)")
    args = parser.parse_args(argv)
    if args.crop is None:
        args.crop = BLANK_BORDER.get(args.dataset, 0)
    return args


def first_epoch_reaching(history: list[dict], accuracy: float) -> int | None:
    """The first epoch whose accuracy reached `accuracy`, or None: on the validation split when the run held
    one out (--val-split), else on the test split (then an optimistic choice: the test split picked it)."""
    split = "val_acc" if history and "val_acc" in history[0] else "test_acc"
    return next((row["epoch"] for row in history if row[split] >= accuracy), None)


def train(run: utils.Run, data: utils.ImageData, args: argparse.Namespace, device: torch.device) -> dict:
    """Train the sub-8k network from args.seed (or answer a question about a trained one); return its record."""
    utils.seed_everything(args.seed)
    if run.saved and "crop" not in run.saved["args"]:
        args.crop = 0  # a run saved before --crop existed saw the whole image
    model = utils.to_device(build_model(data.num_classes, data.shape[0], args.dropout, args.crop), device)
    if utils.examines(args):
        return utils.examine(model, data, run, args, GRADCAM_LAYER)
    # Weight decay and label smoothing: a tiny network underfits rather than overfits, but both
    # steady the last epochs, where 99.4 % is won or lost (docs/results.md: our sweep).
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4, fused=utils.fused(device))
    # One cycle: warm up to --lr over the first 20 % of the batches, then anneal to ~0.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=utils.steps_per_epoch(data, args),
        pct_start=0.2,
    )
    options = utils.FitOptions(scheduler=scheduler, scheduler_per="batch", augment=augment,
                               criterion=utils.cross_entropy(label_smoothing=0.1))
    if args.find_lr:
        return utils.find_lr(model, data, optimizer, args, run, options)
    utils.save_summary(model, data.shape, run.folder)
    utils.save_receptive_field(model, data.shape, run.folder)
    record = utils.new_record(SCRIPT, None, args, model, device)
    record, result = utils.fit(model, data, optimizer, args, run, record, options)
    record["first_epoch_at_target"] = first_epoch_reaching(record["epochs"], TARGET_ACCURACY)
    record["first_epoch_at_target_on"] = "validation" if args.val_split else "test (optimistic)"
    utils.save_record(run.folder, record)
    utils.save_standard_plots(data, record, result.predictions, run.folder, model=model, explain=GRADCAM_LAYER)
    return record


def main(argv: list[str] | None = None) -> dict:
    """Train the sub-8k network (once, or once per --seeds), write the run folder and return its metrics record."""
    args = parse_args(argv)
    with utils.friendly_errors():
        device = utils.prepare(args)
        with utils.open_run(args, SCRIPT, device) as run:
            data = utils.load_run_data(args, run, device, fake_like="mnist")
            record = utils.train_runs(run, args, lambda _, one_run: train(one_run, data, args, device))
    return record


if __name__ == "__main__":
    main()
