"""Training throughput: our in-memory pipeline against the tutorial DataLoader pipeline.

Both train the same model (same initial weights) with the same optimizer step and batch size,
one after the other in this process, alternating for a few rounds; only how batches are made
differs. The tutorial pipeline is `torchvision.datasets` + `DataLoader` + per-sample PIL
transforms equivalent to the script's own augmentation. Not a test (pytest does not collect it):

    python -m tests.benchmark --script mnist_8k --data-dir DIR   # DIR: a folder with the MNIST files
    python -m tests.benchmark --script cifar_norms --variant batch --dataset fake
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torchvision import datasets, transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import utils  # noqa: E402

CROP_FLIP = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
# Cutout the way tutorials write it: RandomErasing of one 16x16 square (a quarter of 32x32).
CUTOUT = [transforms.RandomErasing(p=1.0, scale=(0.25, 0.25), ratio=(1.0, 1.0), value=0)]
# Per-sample torchvision equivalents of each script's batched `augment`:
# (transforms on the PIL image, transforms on the tensor after ToTensor).
TUTORIAL_TRANSFORMS = {
    "lenet": ([transforms.RandomAffine(8, translate=(0.08, 0.08))], []),
    "mnist_8k": ([transforms.RandomRotation(7)], []),
    "mnist_ablation": ([transforms.RandomCrop(28, padding=1)], []),
    "cifar_norms": (CROP_FLIP, []),
    "cifar_dilated_dw": (CROP_FLIP, CUTOUT),
    "vgg": (CROP_FLIP, []),
    "resnet": (CROP_FLIP, []),
    "inceptionnet": (CROP_FLIP, []),
    "efficientnet": (CROP_FLIP, []),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--script", default="mnist_8k", help="which script's model and augmentation")
    parser.add_argument("--variant", default=None, help="the script's variant, where it has variants")
    parser.add_argument("--dataset", default=None, help="default: the script's own (mnist or cifar10)")
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--batch-size", type=utils.positive_int, default=128)
    parser.add_argument("--limit", type=utils.positive_int, default=None,
                        help="training samples to use (default: all; 20,000 with --dataset fake)")
    parser.add_argument("--batches", type=utils.positive_int, default=100, help="timed batches per round")
    parser.add_argument("--rounds", type=utils.positive_int, default=3, help="alternating rounds; medians reported")
    parser.add_argument("--loader-workers", type=utils.non_negative_int, nargs="+", default=[0, 2],
                        help="DataLoader worker counts to try for the tutorial pipeline (its best is used)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (both pipelines)")
    return parser.parse_args(argv)


def make_step(model: torch.nn.Module, device: torch.device, channels_last: bool,
              precision: torch.dtype | None) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """The scripts' own training step (utils.TrainStep), identical for both pipelines: SGD, the
    script's memory format and the precision the script chooses on this device."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    train_step = utils.TrainStep(model, optimizer, utils.gradient_scaler(device, precision), utils.cross_entropy(),
                                 precision)

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        if channels_last:  # the tutorial pipeline's batches arrive contiguous
            images = images.contiguous(memory_format=torch.channels_last)
        train_step(images, labels)

    return step


def timed(batches: Iterable, step: Callable, count: int, device: torch.device, warmup: int = 5) -> float:
    """Images per second over `count` batches after `warmup` batches, the batch making included."""
    iterator = iter(batches)
    for _ in range(warmup):
        step(*next(iterator))
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, images = time.perf_counter(), 0
    for _ in range(count):
        inputs, labels = next(iterator)
        step(inputs, labels)
        images += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def endless(make_epoch: Callable[[int], Iterable]) -> Iterable:
    epoch = 0
    while True:
        yield from make_epoch(epoch)
        epoch += 1


def tutorial_dataset(args: argparse.Namespace, data: utils.ImageData) -> Any:
    """The same samples, served the tutorial way: a torchvision dataset with per-sample transforms.

    With --dataset fake the images are already in memory; they are handed to torchvision's own
    MNIST or CIFAR10 class, so each sample still goes through its real __getitem__ (array to PIL
    image, then the transforms). FakeData would draw every image anew and flatter our side.
    """
    before, after = TUTORIAL_TRANSFORMS[args.script]
    pipeline = transforms.Compose([*before, transforms.ToTensor(), *after,
                                   transforms.Normalize(data.mean.tolist(), data.std.tolist())])
    if args.dataset != "fake":
        return utils.TORCHVISION_DATASETS[args.dataset](args.data_dir, train=True, transform=pipeline)
    images, labels = data.train_images.cpu(), data.train_labels.cpu()
    if data.shape[0] == 1:  # MNIST keeps a uint8 tensor (N, H, W)
        dataset = datasets.MNIST.__new__(datasets.MNIST)
        dataset.data, dataset.targets = images[:, 0], labels
    else:  # CIFAR keeps a numpy array (N, H, W, C) and a list of labels
        dataset = datasets.CIFAR10.__new__(datasets.CIFAR10)
        dataset.data, dataset.targets = images.permute(0, 2, 3, 1).numpy(), labels.tolist()
    dataset.transform, dataset.target_transform = pipeline, None
    return dataset


def build(args: argparse.Namespace, script: Any, data: utils.ImageData, device: torch.device,
          channels_last: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    options = {"num_classes": data.num_classes}
    if args.variant is not None:
        options["variant"] = args.variant
    model = script.build_model(**options).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if args.compile else model


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    script = importlib.import_module(args.script)
    args.dataset = args.dataset or getattr(script, "DATASETS")[0]
    device = utils.pick_device(args.device)
    # Train the way the script does by default: its memory format on this device.
    defaults = script.parse_args([])
    channels_last = utils.uses_channels_last(defaults, device)
    precision = utils.choose_precision(device, "auto", defaults.cpu_bf16)
    fake_like = "cifar10" if "cifar10" in getattr(script, "DATASETS") else "mnist"
    limit = args.limit or (20_000 if args.dataset == "fake" else None)
    data = utils.load_data(args.dataset, args.data_dir, fake_like=fake_like, limit=limit, device=device)
    augment = getattr(script, "augment", None)
    ours_batches = data.train_batches(args.batch_size, augment=augment, seed=0)
    ours = endless(ours_batches.epoch)
    tutorial_set = tutorial_dataset(args, data)

    def loader(workers: int) -> Iterable:
        return endless(lambda epoch: (
            (images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
            for images, labels in torch.utils.data.DataLoader(
                tutorial_set, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                pin_memory=device.type == "cuda", drop_last=True, persistent_workers=False)
        ))

    models = {"ours": build(args, script, data, device, channels_last)}
    models.update({f"tutorial, {w} workers": build(args, script, data, device, channels_last)
                   for w in args.loader_workers})
    sources = {"ours": ours}
    sources.update({f"tutorial, {w} workers": loader(w) for w in args.loader_workers})
    steps = {name: make_step(model, device, channels_last, precision) for name, model in models.items()}
    speeds: dict[str, list[float]] = {name: [] for name in sources}
    for _ in range(args.rounds):
        for name, source in sources.items():
            speeds[name].append(timed(source, steps[name], args.batches, device))
    medians = {name: statistics.median(values) for name, values in speeds.items()}
    best_tutorial = max((name for name in medians if name != "ours"), key=medians.get)
    ratio = medians["ours"] / medians[best_tutorial]
    layout = "channels-last" if channels_last else "contiguous"
    title = (f"{args.script}{' ' + args.variant if args.variant else ''} on {args.dataset}, batch {args.batch_size}, "
             f"{device} ({torch.get_num_threads()} threads, {layout}, {utils.precision_name(precision)})")
    print(f"training images/s, {title} (median of {args.rounds} rounds of {args.batches} batches):")
    for name, value in medians.items():
        print(f"  {name:<22} {value:>10,.0f}")
    print(f"  ours / best tutorial  {ratio:>10.2f}x")
    return {"medians": medians, "ratio": ratio, "best_tutorial": best_tutorial, "title": title}


if __name__ == "__main__":
    main()
