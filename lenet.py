"""LeNet-5 on MNIST: the network that started convolutional vision.

LeCun, Bottou, Bengio and Haffner, "Gradient-Based Learning Applied to Document Recognition",
Proceedings of the IEEE, 1998.

    python lenet.py [--epochs 10] [--dataset fashion-mnist]
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

import utils

SCRIPT = "lenet"
DATASETS = ("mnist", "fashion-mnist", "kmnist", "fake")
# Grad-CAM explains C3's output (16 maps of 10x10): the last convolution that still has a spatial map.
GRADCAM_LAYER = "features.4"


class LeNet5(nn.Module):
    """C1 6@5x5 - S2 - C3 16@5x5 - S4 - C5 120@5x5 - F6 84 - output, as in the paper.

    The paper fed 32x32 images; padding C1 by 2 gives 28x28 MNIST the same geometry. The
    activations are tanh and the subsampling layers average pooling, as in the original
    (whose S layers also had a trainable scale and bias, and whose C3 connected only some of
    S2's maps: today's full C3 is what everyone calls LeNet-5, with 61,706 parameters).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2),  # C1: 6 x 28 x 28
            nn.Tanh(),
            nn.AvgPool2d(2),  # S2: 6 x 14 x 14
            nn.Conv2d(6, 16, kernel_size=5),  # C3: 16 x 10 x 10
            nn.Tanh(),
            nn.AvgPool2d(2),  # S4: 16 x 5 x 5
            nn.Conv2d(16, 120, kernel_size=5),  # C5: 120 x 1 x 1
            nn.Tanh(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(120, 84),  # F6
            nn.Tanh(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def build_model(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """LeNet-5 for 28x28 images."""
    return LeNet5(num_classes, in_channels)


def augment(images: Tensor) -> Tensor:
    # A few degrees and pixels of jitter: digits stay readable, the net stops memorizing them.
    return utils.random_affine(images, degrees=8, translate=0.08)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = utils.build_parser(
        __doc__, script=SCRIPT, datasets=DATASETS, epochs=10, batch_size=128, lr=0.05
    )
    return parser.parse_args(argv)


def train(run: utils.Run, data: utils.ImageData, args: argparse.Namespace, device: torch.device) -> dict:
    """Train LeNet-5 from args.seed (or answer a question about a trained one); return its metrics record."""
    utils.seed_everything(args.seed)
    model = utils.to_device(build_model(data.num_classes, data.shape[0]), device)
    if utils.examines(args):
        return utils.examine(model, data, run, args, GRADCAM_LAYER)
    # SGD with Nesterov momentum and a cosine decay: simple, and past 99 % in a few epochs.
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4, fused=utils.fused(device))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    options = utils.FitOptions(scheduler=scheduler, augment=augment)
    if args.find_lr:
        return utils.find_lr(model, data, optimizer, args, run, options)
    utils.save_summary(model, data.shape, run.folder)
    record = utils.new_record(SCRIPT, None, args, model, device)
    record, result = utils.fit(model, data, optimizer, args, run, record, options)
    utils.save_standard_plots(data, record, result.predictions, run.folder, model=model, explain=GRADCAM_LAYER)
    if utils.is_main_process():
        utils.plot_feature_maps(model, model.features[1], data, run.folder / "feature_maps_c1.png")
        utils.plot_feature_maps(model, model.features[4], data, run.folder / "feature_maps_c3.png")
    return record


def main(argv: list[str] | None = None) -> dict:
    """Train LeNet-5 (once, or once per --seeds), write the run folder and return its metrics record."""
    args = parse_args(argv)
    with utils.friendly_errors():
        device = utils.prepare(args)
        with utils.open_run(args, SCRIPT, device) as run:
            data = utils.load_run_data(args, run, device, fake_like="mnist")
            record = utils.train_runs(run, args, lambda _, one_run: train(one_run, data, args, device))
    return record


if __name__ == "__main__":
    main()
