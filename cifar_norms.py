"""BatchNorm vs GroupNorm vs LayerNorm: one small CIFAR-10 backbone, three normalizations.

Ioffe and Szegedy, "Batch Normalization", 2015; Wu and He, "Group Normalization", ECCV 2018
(whose layer norm for convolutional nets is GroupNorm with one group); Ba, Kiros and Hinton,
"Layer Normalization", 2016. Everything but the normalization layer is the same for all three.

Two choices make the per-sample norms train as well as they can on a net this small, measured on
real CIFAR-10 images (docs/results.md, "Why GroupNorm and LayerNorm lagged"): weight-standardized
3x3 convolutions (Qiao et al., "Micro-Batch Training with Batch-Channel Normalization and Weight
Standardization", 2019) and the normalization after the ReLU. All three variants get both.

    python cifar_norms.py [--variant all|batch|group|layer] [--batch-size 8]
    python cifar_norms.py --batch-sizes 2,4,8,16,32,64,128
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

import utils

SCRIPT = "cifar_norms"
VARIANTS = ("batch", "group", "layer")
DATASETS = ("cifar10", "cifar100", "fake")
PARAMETER_BUDGET = 50_000
# The GN paper keeps its accuracy as long as each group holds several channels and loses it as
# groups shrink towards one channel (instance norm). Our layers are only 16-32 channels wide, so
# rather than its 32 groups we use 8 channels per group: 2 to 4 groups, between LN and IN.
CHANNELS_PER_GROUP = 8
# Grad-CAM explains the last convolution's output (32 maps of 8x8), just before the global pooling.
GRADCAM_LAYER = "features.8"


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The normalization under comparison; each has a per-channel scale and shift (2C parameters)."""
    if kind == "batch":  # statistics over (N, H, W) per channel: depends on the batch
        return nn.BatchNorm2d(channels)
    if kind == "group":  # statistics over (C/G, H, W) per sample and group
        return nn.GroupNorm(channels // CHANNELS_PER_GROUP, channels)
    if kind == "layer":  # statistics over (C, H, W) per sample; the affine stays per channel, so its
        # size does not grow with the image as LayerNorm([C, H, W]) would.
        return nn.GroupNorm(1, channels)
    raise ValueError(f"unknown normalization {kind!r}; choose from {', '.join(VARIANTS)}")


class StandardizedConv2d(nn.Conv2d):
    """A convolution whose filters are standardized (zero mean, unit variance) at every forward.

    A filter with a non-zero mean adds the same multiple of its input patch's mean to every output;
    per-sample norms (GN, LN) then spend their statistics on that shared offset and the channels'
    own signal shrinks. Standardizing removes most of it: on our untrained net the offset was 32 %
    (GN) and 39 % (LN) of the normalized variance, and 11 % and 14 % with standardization.
    """

    def forward(self, x: Tensor) -> Tensor:
        variance, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (self.weight - mean) * torch.rsqrt(variance + 1e-5), self.bias)


def conv_norm(in_channels: int, out_channels: int, norm: str) -> nn.Sequential:
    """3x3 standardized convolution (padded: the size stays), ReLU, then normalization.

    Normalizing after the ReLU gives the next layer zero-mean inputs; before it, GN and LN halve
    the channels the ReLU lets through per sample. On real CIFAR-10 images it lifted GN and LN by
    about 8 points and BN by 1.5.
    """
    return nn.Sequential(
        StandardizedConv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.ReLU(inplace=True),
        norm_layer(norm, out_channels),
    )


def transition(in_channels: int, out_channels: int) -> nn.Sequential:
    """1x1 convolution to squeeze channels, then 2x2 max-pooling to halve the size."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False), nn.MaxPool2d(2))


class NormNet(nn.Module):
    """Three convolution stages at 32, 16 and 8 pixels, global average pooling, one linear layer.

    43,674 parameters with any of the three normalizations (each holds 2 per channel).
    """

    def __init__(self, norm: str = "batch", num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_norm(3, 16, norm),  # 32x32, RF 3
            conv_norm(16, 32, norm),  # 32x32, RF 5
            transition(32, 16),  # 16x16, RF 6
            conv_norm(16, 32, norm),  # 16x16, RF 10
            conv_norm(32, 32, norm),  # RF 14
            conv_norm(32, 32, norm),  # RF 18
            transition(32, 16),  # 8x8, RF 20
            conv_norm(16, 32, norm),  # 8x8, RF 28
            conv_norm(32, 32, norm),  # RF 36
            nn.AdaptiveAvgPool2d(1),  # RF 64: the whole image
        )
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def build_model(variant: str = "batch", num_classes: int = 10) -> nn.Module:
    """The backbone with one of VARIANTS as its normalization."""
    return NormNet(variant, num_classes)


def augment(images: Tensor) -> Tensor:
    # Shifts of up to 4 pixels and mirror images, without cutout. With cutout this 43k-parameter
    # net underfit even 3,728 real CIFAR-10 images (it classified 65 % (BN) and 39 % (GN) of them
    # right after training), so on 50,000 a regularizer can only hold it back further; and the
    # hole shifts the per-sample statistics GN and LN depend on (docs/results.md).
    return utils.random_hflip(utils.random_crop(images, padding=4))


def batch_size_list(text: str) -> list[int]:
    """argparse type: batch sizes separated by commas, such as 2,4,8,16,32,64,128."""
    sizes = [utils.positive_int(part) for part in text.split(",") if part.strip()]
    if not sizes:
        raise argparse.ArgumentTypeError(f"must be batch sizes separated by commas, got {text!r}")
    return sorted(set(sizes))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = utils.build_parser(
        __doc__, script=SCRIPT, datasets=DATASETS, epochs=30, batch_size=128, lr=0.05,
        variants=VARIANTS, default_variant="all", channels_last=utils.NOT_FOR_GROUP_NORM,
    )
    parser.add_argument(
        "--batch-sizes", type=batch_size_list, default=None, metavar="B1,B2,...",
        help="the GN paper's experiment: train the variants at each of these batch sizes for --epochs, the "
             "learning rate scaled from --lr at --batch-size in proportion, and plot accuracy against batch "
             "size (default: none; for example 2,4,8,16,32,64,128)",
    )
    args = parser.parse_args(argv)
    if args.batch_sizes and (utils.examines(args) or args.find_lr):
        parser.error("--batch-sizes trains runs: it does not go with --evaluate, --predict, --demo or --find-lr")
    if args.batch_sizes and args.batch_sizes[0] == 1 and args.variant in ("all", "batch"):
        parser.error("--batch-sizes with a batch of 1: BatchNorm needs at least two samples a batch to compute its "
                     "statistics; start the sizes at 2, or leave BatchNorm out with --variant group or layer")
    return args


def train_variant(variant: str, run: utils.Run, data: utils.ImageData, args: argparse.Namespace,
                  device: torch.device) -> dict:
    """Train one normalization from the same seed and recipe as the others."""
    utils.seed_everything(args.seed)
    model = utils.to_device(build_model(variant, data.num_classes), device)
    if utils.examines(args):
        return utils.examine(model, data, run, args, GRADCAM_LAYER)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
                                fused=utils.fused(device))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=utils.steps_per_epoch(data, args)
    )
    options = utils.FitOptions(scheduler=scheduler, scheduler_per="batch", augment=augment)
    if args.find_lr:
        return utils.find_lr(model, data, optimizer, args, run, options)
    utils.save_summary(model, data.shape, run.folder, quiet=True)
    record = utils.new_record(SCRIPT, variant, args, model, device)
    if utils.is_main_process():
        layout = "" if utils.uses_channels_last(args, device, model) == utils.uses_channels_last(args, device) else (
            ", contiguous memory (PyTorch's GroupNorm works so on CUDA)")
        print(f"{variant} norm: {record['params']:,} parameters{layout}")
    record, result = utils.fit(model, data, optimizer, args, run, record, options)
    utils.save_standard_plots(data, record, result.predictions, run.folder, model=model, explain=GRADCAM_LAYER)
    return record


def batch_size_experiment(args: argparse.Namespace, device: torch.device) -> dict:
    """Wu and He, "Group Normalization", 2018, Figure 1: accuracy against the batch size.

    Each batch size is a --variant all run of its own, in batch-size-<B>/ of the experiment's
    folder, with the learning rate scaled linearly (Goyal et al., 2017) and the same epochs;
    an interrupted experiment resumes run by run. Writes batch_sizes.md and batch_sizes.png.
    """
    folder = experiment_folder(args, f"{SCRIPT}_batch_sizes")
    data = utils.load_data(args.dataset, args.data_dir, limit=args.limit, fake_like="cifar10", device=device,
                           val_split=args.val_split)
    peak_lrs = {size: args.lr * size / args.batch_size for size in args.batch_sizes}
    results: dict[int, dict] = {}
    for size, peak_lr in peak_lrs.items():
        one = argparse.Namespace(**{**vars(args), "batch_sizes": None, "batch_size": size, "lr": peak_lr,
                                    "out_dir": str(folder / f"batch-size-{size}")})
        # Resuming the experiment: each batch size's run goes on, or starts if it had not begun.
        begun = any((Path(one.out_dir) / name).is_file() for name in ("metrics.json", "checkpoint.pt"))
        one.resume = args.resume and begun
        with utils.open_run(one, SCRIPT, device, VARIANTS) as run:
            record = utils.train_runs(
                run, one, lambda variant, variant_run: train_variant(variant, variant_run, data, one, device))
        results[size] = record["variants"] if "variants" in record else {record["variant"]: record}
    summary = {"script": SCRIPT, "experiment": "batch sizes", "dataset": args.dataset, "args": utils.args_record(args),
               "runs": {str(size): records for size, records in results.items()}}
    if utils.is_main_process():
        rows = [{"batch size": size, "peak lr": f"{peak_lrs[size]:.3g}",
                 **{f"{name} (%)": mean_and_sd(finals) for name, finals in finals_by_norm(records).items()}}
                for size, records in results.items()]
        table = utils.markdown_table(rows)
        utils.save_text(folder / "batch_sizes.md", table)
        plot_batch_sizes(results, folder / "batch_sizes.png", args)
        utils.save_json(folder / "metrics.json", summary)
        print(f"Final test accuracy against batch size ({folder}):\n" + table)
    return summary


def experiment_folder(args: argparse.Namespace, name: str) -> Path:
    """The folder of an experiment made of several runs (each with its own run folder inside):
    --out-dir, or the next free runs/<name>, <name>2, ...; with --resume the most recent one."""
    if args.out_dir:
        return Path(args.out_dir)
    base = utils.RUNS / name
    if not args.resume:
        return utils.next_folder(base)
    found = utils.numbered_folders(base)
    if not found:
        raise utils.RunError(f"Nothing to resume: there is no {name} experiment in {base}, {base}2, ... Run without "
                             "--resume to start one, or name its folder with --out-dir.")
    return found[-1][1]


def finals_by_norm(records: dict[str, dict]) -> dict[str, list[float]]:
    """Final test accuracies per normalization: one, or one per seed (--seeds)."""
    return {variant: [record["final_test_acc"] for record in runs] for variant, runs in utils.by_variant(records)}


def mean_and_sd(values: list[float]) -> float | str:
    return values[0] if len(values) == 1 else f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def plot_batch_sizes(results: dict[int, dict], path: Path, args: argparse.Namespace) -> None:
    """Test accuracy against batch size (log 2), one line per normalization: with --seeds, the mean over the
    seeds in a band from the lowest to the highest."""
    figure = Figure(figsize=(7, 4.5))
    axis = figure.add_subplot(1, 1, 1)
    sizes = sorted(results)
    by_size = [finals_by_norm(results[size]) for size in sizes]
    for name in by_size[0]:
        finals = [finals_of[name] for finals_of in by_size]
        line, = axis.plot(sizes, [statistics.mean(values) for values in finals], marker="o", label=f"{name} norm")
        if len(finals[0]) > 1:
            axis.fill_between(sizes, [min(values) for values in finals], [max(values) for values in finals],
                              color=line.get_color(), alpha=0.2)
    axis.set_xscale("log", base=2)
    axis.set_xticks(sizes, [str(size) for size in sizes])
    axis.set_xlabel("batch size (learning rate in proportion)")
    axis.set_ylabel("test accuracy after training (%)")
    axis.set_title(f"{args.epochs} epochs at each batch size, {args.dataset}")
    axis.grid(alpha=0.3)
    axis.legend()
    utils.save_figure(figure, path)


def main(argv: list[str] | None = None) -> dict:
    """Train one normalization or all three, write the run folders and return the metrics record."""
    args = parse_args(argv)
    with utils.friendly_errors():
        device = utils.prepare(args)
        if args.batch_sizes:
            return batch_size_experiment(args, device)
        with utils.open_run(args, SCRIPT, device, VARIANTS) as run:
            data = utils.load_run_data(args, run, device, fake_like="cifar10")
            record = utils.train_runs(
                run, args, lambda variant, variant_run: train_variant(variant, variant_run, data, args, device))
    return record


if __name__ == "__main__":
    main()
