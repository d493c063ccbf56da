"""The networks of the notebook write-ups we replace (docs/results.md quotes them), as a yardstick.

Not one of the repository's scripts and not a test (pytest does not collect it): it trains the
write-ups' own networks, rebuilt from their layer tables, with the write-ups' plain recipe (SGD
at 0.01 with momentum 0.9, no weight decay, batch 128, no augmentation, a constant learning rate),
so that the scripts' networks can be compared with them on the same images:

    python tests/writeup_nets.py --variant norms-bn --data-dir DIR     # 18,064 parameters
    python tests/writeup_nets.py --variant norms-ln --data-dir DIR     # 47,236 ("GN" in its write-up)
    python tests/writeup_nets.py --variant dilated --data-dir DIR      # 100,416

(DIR: a folder with CIFAR-10's files; the numbers in docs/results.md came from a 3,728 / 932 image
subset of real CIFAR-10.)

Each run leaves an ordinary run folder (metrics.json, checkpoint, plots) under runs/writeup_nets/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402

SCRIPT = "writeup_nets"
VARIANTS = ("norms-bn", "norms-ln", "dilated")
# The write-ups do not give their dropout rate; 0.05 is our guess.
DROPOUT = 0.05


def conv_block(in_channels: int, out_channels: int, padding: int, size: int, norm: str) -> list[nn.Module]:
    """The write-ups' order: 3x3 convolution (no bias), ReLU, normalization, dropout."""
    normalization = nn.BatchNorm2d(out_channels) if norm == "bn" else nn.LayerNorm([out_channels, size, size])
    return [nn.Conv2d(in_channels, out_channels, 3, padding=padding, bias=False), nn.ReLU(inplace=True),
            normalization, nn.Dropout(DROPOUT)]


def norms_net(norm: str) -> nn.Sequential:
    """cifar_norms_writeup.md: its BN network (18,064 parameters) or its "GN" network, whose table
    shows LayerNorm([C, H, W]) layers (47,236 parameters). Sizes 32 -> 30, 28 | 14, 12, 12 | 6."""
    widths = (16, 32, 16, 16, 16) if norm == "bn" else (4, 8, 10, 16, 16)
    first, second, third, fourth, fifth = widths
    return nn.Sequential(
        *conv_block(3, first, 0, 30, norm), *conv_block(first, second, 0, 28, norm),
        nn.Conv2d(second, 10 if norm == "bn" else 4, 1, bias=False), nn.MaxPool2d(2),  # 14x14
        *conv_block(10 if norm == "bn" else 4, third, 1, 14, norm), *conv_block(third, fourth, 0, 12, norm),
        *conv_block(fourth, fifth, 1, 12, norm),
        nn.Conv2d(fifth, 10, 1, bias=False), nn.MaxPool2d(2),  # 6x6
        *conv_block(10, 16, 1, 6, norm), *conv_block(16, 16, 1, 6, norm), *conv_block(16, 16, 1, 6, norm),
        nn.AvgPool2d(6), nn.Conv2d(16, 10, 1, bias=False), nn.Flatten(),
    )


class GroupedBlock(nn.Module):
    """cifar_dilated_dw_writeup.md's block: a grouped 3x3 convolution 64 -> 128 (2,304 weights: 32
    groups), a 1x1 back to 64, each with ReLU, BatchNorm and dropout; added to its input where the
    size stays ("connected in a residual fashion", its text says; its table cannot show it)."""

    def __init__(self, padding: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(64, 128, 3, padding=padding, groups=32, bias=False), nn.ReLU(inplace=True),
            nn.BatchNorm2d(128), nn.Dropout(DROPOUT),
            nn.Conv2d(128, 64, 1, bias=False), nn.ReLU(inplace=True), nn.BatchNorm2d(64), nn.Dropout(DROPOUT),
        )
        self.residual = padding == 1

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def dilated_net() -> nn.Sequential:
    """cifar_dilated_dw_writeup.md's network (100,416 parameters): a 3x3 stem, nine grouped blocks
    at 28 and then 26 pixels, global average pooling, a 1x1 classifier. Its table shows no
    dilation (no size or parameter count depends on it), so none is used here."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, bias=False), nn.ReLU(inplace=True), nn.BatchNorm2d(64), nn.Dropout(DROPOUT),  # 30
        GroupedBlock(0), GroupedBlock(0), *(GroupedBlock(1) for _ in range(7)),  # 28, 26, 26 ...
        nn.AdaptiveAvgPool2d(1), nn.Conv2d(64, 10, 1, bias=False), nn.Flatten(),
    )


def build_model(variant: str) -> nn.Module:
    return dilated_net() if variant == "dilated" else norms_net(variant.split("-")[1])


def main(argv: list[str] | None = None) -> dict:
    parser = utils.build_parser(__doc__, script=SCRIPT, datasets=("cifar10", "fake"), epochs=15, batch_size=128,
                                lr=0.01, variants=VARIANTS, default_variant="norms-bn")
    args = parser.parse_args(argv)
    with utils.friendly_errors():
        device = utils.prepare(args)
        with utils.open_run(args, SCRIPT, device, VARIANTS) as run:
            data = utils.load_data(args.dataset, args.data_dir, limit=args.limit, fake_like="cifar10", device=device)

            def train_one(variant: str, variant_run: utils.Run) -> dict:
                utils.seed_everything(args.seed)
                model = build_model(variant).to(device)
                optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
                utils.save_summary(model, data.shape, variant_run.folder, quiet=True)
                record = utils.new_record(SCRIPT, variant, args, model, device)
                print(f"{variant}: {record['params']:,} parameters")
                record, result = utils.fit(model, data, optimizer, args, variant_run, record)
                utils.save_standard_plots(data, record, result.predictions, variant_run.folder, model=model,
                                          explain=str(len(model) - 4))
                return record

            return utils.train_runs(run, args, train_one)


if __name__ == "__main__":
    main()
