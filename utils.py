"""What every script here shares: how a run trains, then (fenced off) what keeps runs safe.

Model code never lives here: each script defines its network, data choices and recipe. Read it top to bottom, in this
order (docs/design.md has the map in full):

Part I, how a run trains: the training loop (`TrainStep`, `train_one_epoch`, `evaluate`, `fit`); data on the device
    (`load_data`, `ImageData`, `Batches`); augmentation on whole batches; summaries; plots; after training (Grad-CAM,
    `examine` for --evaluate, --predict and --demo, `find_lr`); variants and seeds (`train_runs`).
Part II, what keeps runs safe (not needed to learn training): the command line (`build_parser`); devices, precision and
    processes; run folders (`open_run`); what a run writes (`Checkpoint`, atomic writes); failures (one sentence instead
    of a traceback, Ctrl-C, NaN losses, damaged files)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import errno
import importlib.util
import io
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import filelock
import matplotlib.image
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchinfo
from matplotlib.figure import Figure
from torch import Tensor, nn
from torchvision import datasets, transforms
from tqdm import tqdm

Augment = Callable[[Tensor], Tensor]
# A criterion maps (model output, labels) to (loss, logits, named loss parts to log).
Criterion = Callable[[Any, Tensor], "tuple[Tensor, Tensor, dict[str, Tensor]]"]

# ============================================================================================
# PART I: HOW A RUN TRAINS

# ---- The training loop: one step, one epoch, evaluation, the epochs ------------------------
def cross_entropy(label_smoothing: float = 0.0) -> Criterion:
    """The usual criterion: cross-entropy on logits, nothing else to log."""
    def criterion(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing), logits, {}
    return criterion

@dataclass
class FitOptions:
    """How `fit` trains, beyond the standard options in args."""
    scheduler: Any = None
    scheduler_per: str = "epoch"  # "batch" for schedules such as OneCycleLR
    criterion: Criterion | None = None
    augment: Augment | None = None
    resize: int | None = None  # --resolution: images upsampled on the device

@dataclass
class TrainStep:
    """One optimization step on one batch: what `fit`, `find_lr` and the benchmark all run."""
    model: nn.Module  # compiled and wrapped for DDP where asked
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # float16's loss scale; does nothing for bfloat16 and float32
    criterion: Criterion
    precision: torch.dtype | None = None  # the autocast dtype, None for float32

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        with torch.autocast(images.device.type, dtype=self.precision, enabled=self.precision is not None):
            loss, logits, parts = self.criterion(self.model(images), labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)  # skipped when float16 gradients overflowed; the scale then shrinks
        self.scaler.update()
        return loss, logits, parts

def train_one_epoch(step: TrainStep, batches: Batches, tally: EpochTally, epoch: int, epochs: int, *,
                    start: int = 0, scheduler: Any = None, stop: StopRequest | None = None) -> int:
    """Train one epoch (from batch `start`) into `tally`, stepping `scheduler` per batch; return the batches done."""
    step.model.train()
    device = tally.loss.device
    # Reading a number off the GPU waits for it: check the losses (and agree on stopping) every 20 there.
    check_every = 1 if device.type == "cpu" else 20
    checked = done = start
    progress = tqdm(total=len(batches), initial=start, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                    disable=None if is_main_process() else True, dynamic_ncols=True)
    began = time.perf_counter()
    for index, (images, labels) in enumerate(batches.epoch(epoch, start), start=start):
        loss, logits, parts = step(images, labels)
        if scheduler is not None:
            scheduler.step()
        tally.add(index, loss, logits, labels, parts)
        done = index + 1
        if done - checked >= check_every or done == len(batches):
            stopping = check_losses(tally.loss[checked:done], epoch, checked, stop is not None and stop.requested)
            progress.update(done - checked)
            if not progress.disable:
                progress.set_postfix(tally.running(done), refresh=False)
            checked = done
            if stopping:
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tally.seconds += time.perf_counter() - began
    progress.close()
    return done

@dataclass
class EvalResult:
    loss: float
    accuracy: float  # percent of the whole split
    count: int  # samples evaluated, over all processes
    predictions: Tensor  # predicted class per sample, in the split's order

@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, *, precision: torch.dtype | None = None) -> EvalResult:
    """Loss and accuracy over the whole split (correct / total, each process's share summed), every prediction."""
    model.eval()
    loss_sums, predictions = [], []
    for images, labels in batches:
        with torch.autocast(images.device.type, dtype=precision, enabled=precision is not None):
            logits = model(images)
        loss_sums.append(F.cross_entropy(logits.float(), labels, reduction="sum"))
        predictions.append(logits.argmax(dim=1))
    predicted = torch.cat(predictions)
    correct = (predicted == batches.labels[batches.order(0)]).sum().item()
    # Summed in Python's double precision on the CPU: nothing on the device is float64.
    loss, correct, count = sum_over_processes([math.fsum(torch.stack(loss_sums).tolist()), correct, len(predicted)])
    return EvalResult(loss / count, 100.0 * correct / count, int(count), gather_shards(predicted, len(batches.labels)))

def fit(model: nn.Module, data: ImageData, optimizer: torch.optim.Optimizer, args: argparse.Namespace, run: Run,
        record: dict[str, Any], options: FitOptions | None = None) -> tuple[dict[str, Any], EvalResult]:
    """Train for args.epochs, evaluating on the whole test split and saving the checkpoint and metrics.json after each
    epoch (a --resume goes on exactly where it stopped); return the record and the last evaluation, for the plots."""
    options = options or FitOptions()
    device = next(model.parameters()).device
    precision = choose_precision(device, args.amp, args.cpu_bf16)
    scaler = gradient_scaler(device, precision)
    train_batches, test_batches, val_batches = run_batches(data, args, model, options)
    refuse_lone_samples(model, train_batches, args, run)
    checkpoint = Checkpoint(run, model, optimizer, options.scheduler, scaler, data.description(options.resize), args)
    history, start_epoch = checkpoint.resume()  # from run.saved, if this run continues one
    trained, evaluated = adapt_model(model, args, device, training=True)
    step = TrainStep(trained, optimizer, scaler, options.criterion or cross_entropy(), precision)
    per_batch = options.scheduler if options.scheduler_per == "batch" else None
    record = {**record, "precision": precision_name(precision), "validation": data.validation, "epochs": history}
    board = tensorboard(run.folder, purge_step=start_epoch + 1) if args.tensorboard and is_main_process() else None
    result = None
    with StopRequest().installed() as stop, checkpoint.advising(), board or contextlib.nullcontext():
        for epoch in range(start_epoch, args.epochs):
            tally, start = checkpoint.begin_epoch(epoch, len(train_batches), optimizer.param_groups[0]["lr"])
            done = train_one_epoch(step, train_batches, tally, epoch, args.epochs, start=start, scheduler=per_batch,
                                   stop=stop)
            if done < len(train_batches):  # stopped part-way through the epoch
                checkpoint.stop(record, epoch, done, tally, stop)
            evaluation_start = time.perf_counter()
            share_buffers(evaluated)
            result = evaluate(evaluated, test_batches, precision=precision)
            held_out = val_batches and evaluate(evaluated, val_batches, precision=precision)  # --val-split
            eval_seconds = time.perf_counter() - evaluation_start
            if options.scheduler is not None and per_batch is None:
                options.scheduler.step()
            history.append(tally.row(epoch, result, eval_seconds, held_out))
            if is_main_process():
                print(epoch_line(history[-1], args.epochs), flush=True)
            stop_if_diverged(history[-1], record, run.folder, data.num_classes)
            checkpoint.end_epoch(epoch + 1)
            save_record(run.folder, record)
            if board is not None:
                log_epoch(board, history[-1])
            if epoch + 1 < args.epochs and all_reduce(torch.tensor([float(stop.requested)], device=device)).item():
                checkpoint.stop(record, epoch + 1, 0, None, stop)
    if result is None:  # resumed a finished run: nothing left to train, evaluate for the plots
        result = evaluate(evaluated, test_batches, precision=precision)
    record["per_class_test_acc"] = per_class_accuracy(result.predictions, data.test_labels, data.classes)
    save_record(run.folder, record)
    return record, result

def tensorboard(folder: Path, purge_step: int | None = None) -> Any:
    """--tensorboard's writer of events into the run folder (tensorboard --logdir runs); a resume purges what was
    logged past its checkpoint, so that each epoch stays one point on the curves."""
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(str(folder), purge_step=purge_step)

def log_epoch(writer: Any, row: dict[str, Any]) -> None:  # what metrics.json holds of an epoch, a scalar each
    for key, value in row.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
            writer.add_scalar(key, value, row["epoch"])
    writer.flush()

def log_end(folder: Path, record: dict[str, Any]) -> None:
    """After a run: each class's test accuracy, and every plot in the run folder."""
    with tensorboard(folder) as writer:
        for name, value in (record.get("per_class_test_acc") or {}).items():
            if value is not None:
                writer.add_scalar(f"per_class_test_acc/{name}", value, len(record["epochs"]))
        for path in sorted(folder.glob("*.png")):
            image = matplotlib.image.imread(path)[..., :3]
            writer.add_image(f"plots/{path.stem}", image, len(record["epochs"]), dataformats="HWC")

def run_batches(data: ImageData, args: argparse.Namespace, model: nn.Module,
                options: FitOptions) -> tuple[Batches, Batches, Batches | None]:
    """The training batches (shuffled, augmented, this process's share), the test and validation batches."""
    channels_last = uses_channels_last(args, next(model.parameters()).device, model)
    layout = {"rank": rank(), "world_size": world_size(), "channels_last": channels_last, "resize": options.resize}
    size = eval_batch_size(args, options.resize or data.shape[-1])
    return (data.train_batches(args.batch_size, augment=options.augment, seed=args.seed, **layout),
            data.test_batches(size, **layout), data.test_batches(size, validation=True, **layout) if data.validation
            else None)

def epoch_line(row: dict[str, Any], epochs: int) -> str:
    return (f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:6.2f}%"
            f"  test loss {row['test_loss']:.4f} acc {row['test_acc']:6.2f}%  lr {row['lr']:.3g}"
            f"  {row['seconds']:.1f} s  {row['images_per_second']:,.0f} img/s")

@dataclass
class EpochTally:
    """Per-batch results kept on the device (no sync per batch; float32, as MPS has no float64), summed at the end."""
    loss: Tensor  # each batch's mean loss
    correct: Tensor
    count: Tensor
    parts: dict[str, Tensor]  # each batch's named loss parts, if the criterion gives any
    seconds: float = 0.0  # of training alone, this epoch
    lr: float = 0.0  # at the start of the epoch

    @classmethod
    def empty(cls, num_batches: int, device: torch.device, lr: float) -> EpochTally:
        zeros = lambda dtype: torch.zeros(num_batches, device=device, dtype=dtype)  # noqa: E731
        return cls(zeros(torch.float32), zeros(torch.long), zeros(torch.long), {}, 0.0, lr)

    def add(self, index: int, loss: Tensor, logits: Tensor, labels: Tensor, parts: dict[str, Tensor]) -> None:
        self.loss[index] = loss.detach()
        self.correct[index] = (logits.detach().argmax(dim=1) == labels).sum()
        self.count[index] = labels.shape[0]
        for name, value in parts.items():
            if name not in self.parts:
                self.parts[name] = torch.zeros_like(self.loss)
            self.parts[name][index] = value.detach()

    def running(self, done: int) -> dict[str, str]:
        count = self.count[:done].sum().item()
        return {"loss": f"{(self.loss[:done] * self.count[:done]).sum().item() / count:.4f}",
                "acc": f"{100.0 * self.correct[:done].sum().item() / count:.2f}%"}

    def row(self, epoch: int, result: EvalResult, eval_seconds: float, val: EvalResult | None = None) -> dict[str, Any]:
        """The epoch's entry in metrics.json: sums over every batch (weighed by its size) and process."""
        counts = self.count.tolist()
        sums = {name: math.fsum(value * count for value, count in zip(means.tolist(), counts))
                for name, means in {"loss": self.loss, **self.parts}.items()}
        sums.update(correct=float(sum(self.correct.tolist())), count=float(sum(counts)))
        total = dict(zip(sums, sum_over_processes(list(sums.values()))))
        count = total["count"]
        return {"epoch": epoch + 1, "train_loss": total["loss"] / count, "train_acc": 100.0 * total["correct"] / count,
                "test_loss": result.loss, "test_acc": result.accuracy, "lr": self.lr,
                "seconds": self.seconds + eval_seconds, "images_per_second": count / self.seconds,
                "train_samples": int(count), "test_samples": result.count,
                **({"val_loss": val.loss, "val_acc": val.accuracy, "val_samples": val.count} if val else {}),
                **{f"train_loss_{name}": total[name] / count for name in self.parts}}

    def to(self, device: torch.device | str) -> EpochTally:
        """The same tally on `device`: the CPU for a checkpoint, the training device when resumed."""
        return EpochTally(self.loss.to(device), self.correct.to(device), self.count.to(device),
                          {name: value.to(device) for name, value in self.parts.items()}, self.seconds, self.lr)

def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on weights, none on biases and norm scales (shrinking those, the next layer only undoes it)."""
    return [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())

# ---- Data on the device: the whole split as one uint8 tensor, cut into batches there -------
TORCHVISION_DATASETS = {"mnist": datasets.MNIST, "fashion-mnist": datasets.FashionMNIST, "kmnist": datasets.KMNIST,
                        "cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}
FAKE_SHAPES, FAKE_SIZES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}, {"train": 1024, "test": 256}

@dataclass
class ImageData:
    """Both splits of a dataset in memory: uint8 images (N, C, H, W) and int64 labels."""
    name: str
    classes: list[str]
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    mean: Tensor  # per channel, of the whole training split, in [0, 1]
    std: Tensor
    val_images: Tensor | None = None  # --val-split: held out of the training split
    val_labels: Tensor | None = None
    validation: dict[str, Any] | None = None  # how: the count, the seed, the training indices held out

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_images.shape[1:])  # (C, H, W)

    def input_shape(self, resize: int | None = None) -> tuple[int, int, int]:
        return (self.shape[0], resize, resize) if resize else self.shape

    def description(self, resize: int | None = None) -> dict[str, Any]:
        """What a trained model needs to know of its data, saved in each checkpoint (for --predict)."""
        return {"name": self.name, "classes": self.classes, "mean": self.mean.tolist(), "std": self.std.tolist(),
                "shape": list(self.shape), "resize": resize}

    def to(self, device: torch.device) -> ImageData:
        for name in ("train_images", "train_labels", "test_images", "test_labels", "val_images", "val_labels"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def hold_out(self, count: int, seed: int = 0) -> ImageData:
        """--val-split: `count` training images, each class in proportion, the same for every seed and variant."""
        total = len(self.train_labels)
        if count > total // 2:
            raise UsageError(f"--val-split {count} would leave {total - count} of the {total} training images: hold "
                             "out at most half of them.")
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
        by_class = order[torch.argsort(self.train_labels.cpu()[order], stable=True)]  # shuffled within each class
        chosen = by_class[torch.linspace(0, total - 1, count).round().long()].sort().values  # evenly along it
        kept = ~torch.isin(torch.arange(total), chosen)
        self.val_images, self.val_labels = self.train_images[chosen], self.train_labels[chosen]
        self.train_images, self.train_labels = self.train_images[kept], self.train_labels[kept]
        self.validation = {"count": count, "seed": seed, "indices": chosen.tolist()}
        return self

    def train_batches(self, batch_size: int, *, augment: Augment | None = None, **options: Any) -> Batches:
        return Batches(self.train_images, self.train_labels, self.mean, self.std, batch_size, shuffle=True,
                       augment=augment, **options)

    def test_batches(self, batch_size: int, validation: bool = False, **options: Any) -> Batches:
        images, labels = (self.val_images, self.val_labels) if validation else (self.test_images, self.test_labels)
        return Batches(images, labels, self.mean, self.std, batch_size, **options)

def load_data(name: str, data_dir: str | Path, *, limit: int | None = None, fake_like: str = "mnist",
              device: torch.device | None = None, val_split: int | None = None) -> ImageData:
    """A dataset through torchvision (downloaded into data_dir when missing), or `fake` (FakeData shaped like
    `fake_like`); `limit` keeps the first N of each split, normalized with the whole training split's statistics."""
    with main_process_first():  # under torchrun one process downloads, the others wait for it
        if name == "fake":
            splits = [_fake_split(FAKE_SHAPES[fake_like], limit or FAKE_SIZES[split], offset)
                      for split, offset in (("train", 0), ("test", 10**6))]
            classes = [str(label) for label in range(10)]
        else:
            sets = [open_dataset(name, Path(data_dir), train) for train in (True, False)]
            # MNIST keeps (N, H, W); CIFAR keeps (N, H, W, C): both become (N, C, H, W).
            splits = [(torch.as_tensor(one.data), torch.as_tensor(one.targets, dtype=torch.long)) for one in sets]
            splits = [((images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)).contiguous(), labels)
                      for images, labels in splits]
            classes = list(sets[0].classes)
    mean, std = channel_stats(splits[0][0])  # of the whole training split
    if (std == 0).any():  # every pixel the same: normalizing would divide by zero, and nothing is there to learn
        folder, files = expected_files(name, Path(data_dir))
        paths = ", ".join(str(folder.resolve() / file) for file in files if "train" in file or "data_batch" in file)
        raise DataNotFoundError(f"The {name} training images in {paths} are blank (every pixel the same): the files "
                                "are damaged; delete them and run again to download them anew.")
    data = ImageData(name, classes, *(part[:limit].contiguous() for split in splits for part in split), mean, std)
    data = data.hold_out(val_split) if val_split else data
    return data.to(device) if device is not None else data

def load_run_data(args: argparse.Namespace, run: Run, device: torch.device, fake_like: str) -> ImageData:
    """--dataset from --data-dir as asked; --predict and --demo need only what the run saved (classes, normalizing)."""
    if args.predict or getattr(args, "demo", False):
        about = (run.saved if run.saved is not None else next(iter(run.children.values())).saved)["data"]
        no_images = torch.zeros(0, *about["shape"], dtype=torch.uint8, device=device)
        no_labels = torch.zeros(0, dtype=torch.long, device=device)
        return ImageData(about["name"], about["classes"], no_images, no_labels, no_images, no_labels,
                         torch.tensor(about["mean"]), torch.tensor(about["std"]))
    return load_data(args.dataset, args.data_dir, limit=args.limit, fake_like=fake_like, device=device,
                     val_split=getattr(args, "val_split", None))

def _fake_split(shape: tuple[int, int, int], size: int, offset: int) -> tuple[Tensor, Tensor]:
    fake = datasets.FakeData(size=size, image_size=shape, num_classes=10, transform=transforms.PILToTensor(),
                             random_offset=offset)
    images, labels = zip(*fake)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)

def channel_stats(images: Tensor, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    total, squares = torch.zeros(2, images.shape[1], dtype=torch.float64)
    for part in images.split(chunk):
        values = part.to(torch.float64).div_(255)
        total += values.sum(dim=(0, 2, 3)).cpu()
        squares += values.square().sum(dim=(0, 2, 3)).cpu()
    count = images.numel() / images.shape[1]
    mean = total / count
    return mean.float(), (squares / count - mean.square()).sqrt().float()

def batches_per_epoch(count: int, batch_size: int, world_size: int = 1) -> int:
    return max(1, math.ceil(math.ceil(count / world_size) / batch_size))
def steps_per_epoch(data: ImageData, args: argparse.Namespace) -> int:  # of this process, as schedules count them
    return batches_per_epoch(len(data.train_labels), args.batch_size, world_size())

class Batches:
    """One split in memory, cut into normalized float batches on its device. An epoch's order comes from (seed, epoch)
    alone (resumes and processes agree); a process takes every world_size-th sample, in batches of sizes within one."""
    def __init__(self, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor, batch_size: int, *,
                 shuffle: bool = False, augment: Augment | None = None, seed: int = 0, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False, resize: int | None = None) -> None:
        self.images, self.labels = images, labels
        self.mean, self.std = mean.to(images.device).view(1, -1, 1, 1), std.to(images.device).view(1, -1, 1, 1)
        self.shuffle, self.augment, self.seed, self.rank, self.world_size = shuffle, augment, seed, rank, world_size
        self.channels_last, self.resize = channels_last, resize
        self.num_batches = batches_per_epoch(len(labels), batch_size, world_size)

    def __len__(self) -> int:
        return self.num_batches

    def smallest(self) -> int:
        return len(range(self.rank, len(self.labels), self.world_size)) // self.num_batches

    def order(self, epoch: int) -> Tensor:
        seeded = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, rank=0))
        order = torch.randperm(len(self.labels), generator=seeded) if self.shuffle else torch.arange(len(self.labels))
        return order[self.rank :: self.world_size].to(self.images.device)

    def epoch(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        for index in self.order(epoch).tensor_split(self.num_batches)[start:]:
            yield self.prepare(self.images[index]), self.labels[index]

    __iter__ = epoch  # in a loop: epoch 0, from its first batch (the order of a split that is not shuffled)

    def prepare(self, images: Tensor) -> Tensor:
        """uint8 images to a normalized float batch: augment in [0, 1], then normalize."""
        batch = images.float().div_(255)
        if self.augment is not None:
            batch = self.augment(batch)
        if self.resize is not None and batch.shape[-1] != self.resize:
            batch = F.interpolate(batch, size=self.resize, mode="bilinear", align_corners=False)
        batch = (batch - self.mean) / self.std
        return batch.contiguous(memory_format=torch.channels_last) if self.channels_last else batch

# ---- Augmentation: on whole batches, a different random draw for every sample --------------
def random_crop(images: Tensor, padding: int) -> Tensor:
    """Pad with zeros, then cut a random window of the original size from each image."""
    n, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    top, left = (torch.randint(0, 2 * padding + 1, (n, 1), device=images.device) for _ in range(2))
    rows = top + torch.arange(height, device=images.device)  # (n, H)
    cols = left + torch.arange(width, device=images.device)  # (n, W)
    batch = torch.arange(n, device=images.device).view(n, 1, 1)
    # Advanced indexing around the channel slice puts channels last: (n, H, W, C).
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()
def random_hflip(images: Tensor, p: float = 0.5) -> Tensor:
    flip = torch.rand(images.shape[0], device=images.device) < p
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
def random_affine(images: Tensor, degrees: float = 0.0, translate: float = 0.0) -> Tensor:
    """Rotate by up to +-degrees, shift by up to +-translate of the size: one affine_grid + grid_sample a batch."""
    n, device = images.shape[0], images.device
    angle = (torch.rand(n, device=device) * 2 - 1) * math.radians(degrees)
    # grid_sample's coordinates span [-1, 1], so a shift of `translate` image sizes is 2 * translate.
    shift = (torch.rand(n, 2, device=device) * 2 - 1) * (2 * translate)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([cos, -sin, shift[:, 0], sin, cos, shift[:, 1]], dim=1).view(n, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

# ---- Summaries: the layer table and the receptive field ------------------------------------
def save_summary(model: nn.Module, shape: Sequence[int], folder: Path, *, quiet: bool = False) -> str:
    """The torchinfo layer table (one sample of `shape`), printed and saved as summary.txt."""
    text = str(torchinfo.summary(model, input_size=(1, *shape), device=next(model.parameters()).device, verbose=0,
                                 depth=4, col_names=("output_size", "kernel_size", "num_params")))
    # torchinfo labels its count of multiply-adds with an enum's name ("Units.MEGABYTES"): say millions.
    units = {"NONE": "", "KILOBYTES": " (thousands)", "MEGABYTES": " (millions)", "GIGABYTES": " (billions)",
             "TERABYTES": " (trillions)"}
    text = re.sub(r" \(Units\.(\w+)\)", lambda match: units.get(match.group(1), ""), text)
    if is_main_process():
        save_text(folder / "summary.txt", text + "\n")
        if not quiet:
            print(text)
    return text

@contextlib.contextmanager
def hooked(model: nn.Module, layers: Sequence[nn.Module], hook: Callable[..., Any]) -> Iterator[None]:
    """For the block: `model` in evaluation mode, `hook` on each layer's forward; then its mode back and no hooks."""
    was_training, handles = model.training, [layer.register_forward_hook(hook) for layer in layers]
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

def receptive_field(model: nn.Module, shape: Sequence[int]) -> list[dict[str, Any]]:
    """Size, jump and receptive field after each convolution and pool, as they run (one after another, identity
    skips allowed): r_out = r_in + (k_eff - 1) * j_in, j_out = j_in * s, k_eff = dilation * (k - 1) + 1."""
    calls: list[tuple[str, nn.Module, Tensor, Tensor]] = []
    names = {module: name for name, module in model.named_modules()}
    layers = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
    hooks = hooked(model, [module for module in model.modules() if isinstance(module, layers)],
                   lambda m, inputs, output: calls.append((names[m], m, inputs[0], output)))
    with hooks, torch.no_grad():
        model(torch.zeros(1, *shape, device=next(model.parameters()).device))
    rows, jump, field = [], 1, 1
    for name, module, inputs, output in calls:
        size_in, size_out = inputs.shape[-1], output.shape[-1]
        kernel, stride, padding, dilation = _window(module, size_in, size_out)
        field_out = field + dilation * (kernel - 1) * jump
        rows.append({"layer": f"{name} ({type(module).__name__})", "n_in": size_in, "n_out": size_out,
                     "ch_in": inputs.shape[1], "ch_out": output.shape[1], "kernel": kernel, "stride": stride,
                     "padding": padding, "dilation": dilation, "j_in": jump, "j_out": jump * stride,
                     "r_in": field, "r_out": field_out})
        jump, field = jump * stride, field_out
    return rows

def _window(module: nn.Module, size_in: int, size_out: int) -> tuple[int, int, int, int]:
    """(kernel, stride, padding, dilation) of a convolution or pool; an adaptive pool's as it ran."""
    first = lambda value: value[0] if isinstance(value, tuple) else value  # noqa: E731
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        stride = 1 if size_out == 1 else size_in // size_out
        return size_in - (size_out - 1) * stride, stride, 0, 1
    return (first(module.kernel_size), first(module.stride or module.kernel_size), first(module.padding),
            first(getattr(module, "dilation", 1)))

def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or rows[0].keys())
    cell = lambda value: f"{value:.2f}" if isinstance(value, float) else str(value)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join(" ---: " if isinstance(rows[0][c], (int, float)) else " --- " for c in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]) + "\n"

def save_receptive_field(model: nn.Module, shape: Sequence[int], folder: Path) -> list[dict[str, Any]]:
    rows = receptive_field(model, shape)
    if is_main_process():
        save_text(folder / "receptive_field.md", markdown_table(rows))
        print("Receptive field per layer:\n" + markdown_table(rows))
    return rows

# ---- Plots: PNG files through matplotlib's Agg canvas, never a blocking window -------------
def _draw_mosaic(axis: Any, images: Tensor, titles: Sequence[str], colors: Sequence[str] | None = None,
                 columns: int = 8, cmap: str = "gray") -> None:
    """uint8 images (N, C, H, W) as one picture with a title above each: one axes draws fast."""
    images = images.detach().cpu().float() / 255
    count, channels, height, width = images.shape
    gap, title_space = max(2, width // 10), max(8, height * 2 // 5)  # room for two lines of 7-point text
    cell_height, cell_width = title_space + height, gap + width
    canvas = torch.full((channels, max(1, math.ceil(count / columns)) * cell_height, columns * cell_width), math.nan)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        top, left = row * cell_height + title_space, column * cell_width
        canvas[:, top : top + height, left : left + width] = image
    if channels == 1:
        palette = matplotlib.colormaps[cmap].with_extremes(bad="white")
        axis.imshow(canvas[0].numpy(), cmap=palette, vmin=0, vmax=1, interpolation="nearest")
    else:
        axis.imshow(canvas.nan_to_num(1.0).permute(1, 2, 0).numpy(), interpolation="nearest")
    axis.axis("off")
    for index, title in enumerate(titles):
        row, column = divmod(index, columns)
        axis.text(column * cell_width + width / 2, row * cell_height + title_space - 1, title, ha="center",
                  va="bottom", fontsize=7, color=colors[index] if colors else "black")

def _image_grid(images: Tensor, titles: Sequence[str], colors: Sequence[str] | None = None) -> Figure:
    figure = Figure(figsize=(1.5 * 8, 1.9 * max(1, math.ceil(len(images) / 8))))
    _draw_mosaic(figure.add_axes((0, 0, 1, 1)), images, titles, colors)
    return figure

def plot_curves(runs: dict[str, Sequence[Sequence[dict[str, Any]]]], path: Path, title: str = "") -> None:
    """Loss and accuracy per epoch, train and test (validation dashed), one line per name (a legend when there are
    several); a name with several runs (--seeds) is their mean, in a band from the lowest to the highest."""
    figure = Figure(figsize=(10, 7))
    panels = (("train_loss", "train loss"), ("test_loss", "test loss"), ("train_acc", "train accuracy (%)"),
              ("test_acc", "test accuracy (%)"))
    for index, (key, label) in enumerate(panels):
        axis = figure.add_subplot(2, 2, index + 1)
        for name, histories in runs.items():
            length = min(len(history) for history in histories)
            epochs, color = [row["epoch"] for row in histories[0][:length]], None
            held_out = key.replace("test", "val") if key.startswith("test") else None  # --val-split: dashed
            for column in (key, held_out) if length and held_out in histories[0][0] else (key,):
                values = torch.tensor([[row[column] for row in history[:length]] for history in histories]).double()
                line, = axis.plot(epochs, values.mean(dim=0), marker="o" if column == key else None, markersize=3,
                                  linestyle="-" if column == key else "--", color=color,
                                  label=f"{name} validation".strip() if column == held_out else name or "test")
                color = line.get_color()
                if len(histories) > 1:
                    axis.fill_between(epochs, values.amin(dim=0), values.amax(dim=0), color=color, alpha=0.2)
        axis.set(title=label, xlabel="epoch")
        axis.grid(alpha=0.3)
        if len(axis.get_lines()) > 1:
            axis.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path)

def plot_predictions(data: ImageData, predictions: Tensor, path: Path, count: int = 32, *,
                     wrong_only: bool = False) -> None:
    """The first test images (or the first misclassified), each with its predicted class; wrong ones in red."""
    chosen = (predictions != data.test_labels) if wrong_only else torch.ones_like(data.test_labels, dtype=torch.bool)
    chosen = chosen.nonzero().flatten()[:count]
    pairs = list(zip(predictions[chosen].tolist(), data.test_labels[chosen].tolist()))
    titles = [f"pred {data.classes[p]}" + ("" if p == t else f"\ntrue {data.classes[t]}") for p, t in pairs]
    figure = _image_grid(data.test_images[chosen], titles, ["green" if p == t else "red" for p, t in pairs])
    if not pairs:
        figure.text(0.5, 0.5, "no misclassified test images", ha="center")
    save_figure(figure, path)

def confusion_matrix(labels: Tensor, predictions: Tensor, num_classes: int) -> Tensor:
    flat = labels.cpu() * num_classes + predictions.cpu()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)
def plot_confusion(data: ImageData, predictions: Tensor, path: Path) -> None:
    counts = confusion_matrix(data.test_labels, predictions, data.num_classes)
    figure = Figure(figsize=(min(20, 3 + 0.5 * data.num_classes),) * 2)
    axis = figure.add_subplot(1, 1, 1)
    axis.imshow(counts.numpy(), cmap="Blues")
    ticks = range(data.num_classes)
    axis.set_xticks(ticks, data.classes, rotation=90, fontsize=8)
    axis.set_yticks(ticks, data.classes, fontsize=8)
    axis.set(xlabel="predicted", ylabel="true")
    threshold = counts.max().item() / 2
    for true, predicted in itertools.product(ticks, ticks) if data.num_classes <= 20 else ():
        value = counts[true, predicted].item()
        axis.text(predicted, true, str(value), ha="center", va="center", fontsize=7,
                  color="white" if value > threshold else "black")
    figure.tight_layout()
    save_figure(figure, path)

def plot_feature_maps(model: nn.Module, layer: nn.Module, data: ImageData, path: Path, index: int = 0,
                      max_maps: int = 32, resize: int | None = None) -> None:
    """What `layer` outputs for one test image: the image, then up to max_maps channels."""
    captured: list[Tensor] = []
    image = data.test_images[index : index + 1]
    with hooked(model, [layer], lambda module, inputs, output: captured.append(output.detach())), torch.no_grad():
        model(data.test_batches(1, resize=resize).prepare(image))
    maps = captured[0][0, :max_maps].float().cpu()
    # Each map stretched to its own range: the pattern matters here, not the scale.
    low, high = maps.amin(dim=(1, 2), keepdim=True), maps.amax(dim=(1, 2), keepdim=True)
    maps = ((maps - low) / (high - low).clamp_min(1e-8) * 255).round().to(torch.uint8).unsqueeze(1)
    columns = min(8, len(maps))
    figure = Figure(figsize=(2.2 + 1.5 * columns, max(2.2, 1.9 * math.ceil(len(maps) / columns))))
    grid = figure.add_gridspec(1, 2, width_ratios=(2.2, 1.5 * columns), wspace=0.05)
    _draw_mosaic(figure.add_subplot(grid[0]), image, [f"input: {data.classes[data.test_labels[index]]}"], columns=1)
    _draw_mosaic(figure.add_subplot(grid[1]), maps, [f"channel {c}" for c in range(len(maps))], columns=columns,
                 cmap="viridis")
    figure.suptitle(f"feature maps of {type(layer).__name__} ({tuple(captured[0].shape[1:])})", fontsize=9)
    save_figure(figure, path)

def save_standard_plots(data: ImageData, record: dict[str, Any], predictions: Tensor, folder: Path, *,
                        model: nn.Module, explain: str, resize: int | None = None) -> None:
    """samples, curves, predictions, misclassified, confusion_matrix and gradcam (of layer `explain`) PNGs."""
    if not is_main_process():
        return
    samples = data.train_images[:32], [data.classes[label] for label in data.train_labels[:32].tolist()]
    save_figure(_image_grid(*samples), folder / "samples.png")
    title = f"{record['script']} {record.get('variant') or ''} on {record['dataset']}".replace("  ", " ")
    plot_curves({"": [record["epochs"]]}, folder / "curves.png", title)
    plot_predictions(data, predictions, folder / "predictions.png")
    plot_predictions(data, predictions, folder / "misclassified.png", wrong_only=True)
    plot_confusion(data, predictions, folder / "confusion_matrix.png")
    plot_gradcam(model, model.get_submodule(explain), data, predictions, folder / "gradcam.png", resize)

def show_plots(folder: Path) -> None:
    """--show: open the saved PNGs in windows (this blocks until they are closed, as asked)."""
    import matplotlib.pyplot as plt
    for path in sorted(folder.glob("*.png")):
        plt.figure(path.stem).add_subplot(1, 1, 1, frame_on=False, xticks=[], yticks=[]).imshow(plt.imread(path))
    plt.show()

# ---- After training: Grad-CAM, --evaluate, --predict, --find-lr ----------------------------
def grad_cam(model: nn.Module, layer: nn.Module, images: Tensor, targets: Tensor | None = None,
             size: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Grad-CAM (Selvaraju et al., 2017): where each image made the network choose a class. The gradient of the
    class score (the target, else the prediction) by `layer`'s output, averaged over each map, weighs that map;
    their sum through a ReLU is the heat map, in [0, 1], of `size` (default: the images')."""
    captured: dict[str, Tensor] = {}
    def keep(module: nn.Module, inputs: Any, output: Tensor) -> None:
        captured["maps"] = output
        output.register_hook(lambda gradient: captured.__setitem__("gradients", gradient))
    with hooked(model, [layer], keep), torch.enable_grad():
        logits = model(images)
        chosen = logits.argmax(dim=1) if targets is None else targets
        model.zero_grad(set_to_none=True)
        logits.gather(1, chosen[:, None]).sum().backward()
    weights = captured["gradients"].mean(dim=(2, 3), keepdim=True)
    heat = F.relu((weights * captured["maps"]).sum(dim=1, keepdim=True)).detach().float()
    heat = F.interpolate(heat, size=size or images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return heat / heat.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12), logits.detach()

def plot_gradcam(model: nn.Module, layer: nn.Module, data: ImageData, predictions: Tensor, path: Path,
                 resize: int | None = None, count: int = 8) -> None:
    """Test images the network got right (top row) and wrong (bottom), each under the heat map of the class chosen."""
    labels, predictions = data.test_labels.cpu(), predictions.cpu()
    right = (predictions == labels).nonzero().flatten()[:count]
    wrong = (predictions != labels).nonzero().flatten()[:count]
    chosen = torch.cat([right, wrong])
    images = data.test_images[chosen.to(data.test_images.device)]
    batch = data.test_batches(1, resize=resize).prepare(images)
    heat, _ = grad_cam(model, layer, batch, predictions[chosen].to(batch.device), size=images.shape[-2:])
    shown = with_heat(images, heat).split([len(right), len(wrong)])
    figure = Figure(figsize=(1.6 * count, 4.4))
    for row, (indices, color) in enumerate(((right, "green"), (wrong, "red"))):
        titles = [f"true {data.classes[labels[i]]}\npred {data.classes[predictions[i]]}" for i in indices.tolist()]
        _draw_mosaic(figure.add_subplot(2, 1, row + 1), shown[row], titles, [color] * len(titles), columns=count)
    name = next((name for name, module in model.named_modules() if module is layer), type(layer).__name__)
    figure.suptitle(f"Grad-CAM of {type(layer).__name__} ({name}): where the network looked for the class it chose; "
                    "top: right, bottom: wrong", fontsize=9)
    save_figure(figure, path)

def with_heat(images: Tensor, heat: Tensor) -> Tensor:
    """uint8 images (N, C, H, W) under their Grad-CAM maps (N, H, W) in jet colours at 45 %: uint8 RGB."""
    jet = torch.from_numpy(matplotlib.colormaps["jet"](heat.detach().cpu().numpy())[..., :3]).permute(0, 3, 1, 2)
    images = images.detach().cpu().float().div(255).expand(-1, 3, -1, -1)
    return (0.55 * images + 0.45 * jet.float()).mul(255).round().to(torch.uint8)

def per_class_accuracy(predictions: Tensor, labels: Tensor, classes: Sequence[str]) -> dict[str, float | None]:
    counts = confusion_matrix(labels, predictions, len(classes))
    totals = counts.sum(dim=1).tolist()
    return {name: 100.0 * counts[index, index].item() / totals[index] if totals[index] else None
            for index, name in enumerate(classes)}

def examine(model: nn.Module, data: ImageData, run: Run, args: argparse.Namespace, explain: str) -> dict[str, Any]:
    """--evaluate or --predict: answer with a run's saved weights, training nothing (Grad-CAM of `explain`)."""
    device = next(model.parameters()).device
    load_weights(model, run.saved, run.folder)
    model, _ = adapt_model(model, args, device, training=False)  # the layout it was evaluated in while training
    model.eval()
    precision, resize = choose_precision(device, args.amp, args.cpu_bf16), run.saved["data"]["resize"]
    layer = model.get_submodule(explain)
    if args.predict:
        return predict(model, layer, data, run, [Path(path) for path in args.predict], precision, resize)
    if args.demo:
        import demo  # the page, in a file of its own: Gradio is needed only there
        return demo.serve(model, layer, data, run, precision, resize, args)
    batches = data.test_batches(eval_batch_size(args, resize or data.shape[-1]),
                                channels_last=uses_channels_last(args, device, model), resize=resize)
    result = evaluate(model, batches, precision=precision)
    record = read_json(run.folder / "metrics.json")
    record["per_class_test_acc"] = per_class_accuracy(result.predictions, data.test_labels, data.classes)
    record["evaluation"] = {"test_acc": result.accuracy, "test_loss": result.loss, "test_samples": result.count,
                            "device": str(device), "precision": precision_name(precision),
                            "weights": progress_of(run.saved, run.saved["args"]["epochs"], resuming=False)}
    if is_main_process():
        print(f"{run.folder}: test accuracy {result.accuracy:.2f} % ({result.count:,} images), loss {result.loss:.4f}")
        print(markdown_table([{"class": name, "test accuracy (%)": "-" if value is None else f"{value:.2f}"}
                              for name, value in record["per_class_test_acc"].items()]))
        save_json(run.folder / "metrics.json", record)
        save_standard_plots(data, record, result.predictions, run.folder, model=model, explain=explain, resize=resize)
    return record

def predict(model: nn.Module, layer: nn.Module, data: ImageData, run: Run, paths: Sequence[Path],
            precision: torch.dtype | None, resize: int | None) -> dict[str, Any]:
    """Classify the user's own image files: print each one's top 3 classes, draw predictions_own.png."""
    # Every file is read before anything is written: a bad one stops the command with nothing done.
    seen = torch.stack([prepare_image(path, data.shape) for path in paths])
    probabilities, heat = classify(model, layer, data, seen, precision, resize)
    top = probabilities.topk(min(3, data.num_classes), dim=1)
    answers, tag = [], run.folder.name if run.seed is not None else run.variant
    for path, values, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
        best = [{"class": data.classes[index], "percent": 100.0 * value} for index, value in zip(indices, values)]
        answers.append({"image": str(path), "top": best})
        if is_main_process():
            print(f"{path}{f' ({tag})' if tag else ''}: " + ", ".join(f"{one['class']} {one['percent']:.1f} %"
                                                                     for one in best))
    if is_main_process():
        plot_own_predictions(paths, seen, probabilities, heat, data.classes, run.folder / "predictions_own.png")
    return {"script": run.script, "variant": run.variant, "run": str(run.folder), "predictions": answers}

def classify(model: nn.Module, layer: nn.Module, data: ImageData, seen: Tensor, precision: torch.dtype | None,
             resize: int | None) -> tuple[Tensor, Tensor]:
    """Prepared uint8 images (N, C, H, W): each one's class probabilities and Grad-CAM map (for the class chosen)."""
    device = next(model.parameters()).device
    batch = data.test_batches(1, resize=resize).prepare(seen.to(device))
    with torch.autocast(device.type, dtype=precision, enabled=precision is not None):
        heat, logits = grad_cam(model, layer, batch, size=seen.shape[-2:])
    return logits.float().softmax(dim=1).cpu(), heat.cpu()

def prepare_image(path: Path | Any, shape: Sequence[int]) -> Tensor:
    """A user's image (a file, or a PIL image) as the dataset's own images were made: uint8 (C, H, W) of `shape`.
    One channel (the MNIST family): grey, light ink on black, cropped to the ink, its longer side scaled to 20 of
    28 pixels and centred by its centre of mass, as MNIST was built. Three (CIFAR): RGB, the centre square."""
    from PIL import Image
    channels, height, _ = shape
    image = read_image(path) if isinstance(path, (str, Path)) else path.convert("RGBA")
    image.thumbnail((MAX_SIDE, MAX_SIDE))  # a picture handed over is shrunk as read_image shrinks a file
    flat = Image.alpha_composite(Image.new("RGBA", image.size, "white"), image)  # transparent: white paper
    pixels = torch.frombuffer(bytearray(flat.convert("L" if channels == 1 else "RGB").tobytes()), dtype=torch.uint8)
    pixels = pixels.view(image.size[1], image.size[0], -1).permute(2, 0, 1).float().div(255)
    if channels == 1:
        return _as_mnist_digit(pixels[0], path, size=height)
    side = min(pixels.shape[1:])
    top, left = (pixels.shape[1] - side) // 2, (pixels.shape[2] - side) // 2
    square = pixels[:, top : top + side, left : left + side]
    resized = F.interpolate(square[None], size=(height, height), mode="bilinear", antialias=True, align_corners=False)
    return resized[0].clamp(0, 1).mul(255).round().to(torch.uint8)

def _as_mnist_digit(grey: Tensor, path: Path, size: int = 28, box: int = 20) -> Tensor:
    """A grey picture of one digit, in [0, 1], as MNIST made its images: (1, size, size) uint8."""
    border = lambda picture: torch.cat([picture[0], picture[-1], picture[:, 0], picture[:, -1]])  # noqa: E731
    if border(grey).median() > 0.5:  # dark ink on light paper: MNIST is light ink on black
        grey = 1.0 - grey
    ink = (grey - border(grey).median()).clamp_min(0)  # the paper's own shade becomes black
    if ink.max() < 0.1:
        raise RunError(f"Found no digit in {path}: the picture is nearly uniform. Give a digit written on plain "
                       "paper, filling a good part of the picture.")
    ink = ink / ink.max()
    rows, columns = (ink > 0.25).any(dim=1).nonzero().flatten(), (ink > 0.25).any(dim=0).nonzero().flatten()
    ink = ink[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    scale = box / max(ink.shape)
    height, width = max(1, round(ink.shape[0] * scale)), max(1, round(ink.shape[1] * scale))
    ink = F.interpolate(ink[None, None], size=(height, width), mode="bilinear", antialias=True,
                        align_corners=False)[0, 0].clamp(0, 1)
    def place(mass: Tensor, length: int) -> int:  # its centre of mass (pixel centres at i + 0.5) at the middle
        return min(max(round(size / 2 - (mass * (torch.arange(length) + 0.5)).sum().item()), 0), size - length)
    weights = ink / ink.sum()
    top, left = place(weights.sum(dim=1), height), place(weights.sum(dim=0), width)
    return F.pad(ink, (left, size - width - left, top, size - height - top)).mul(255).round().to(torch.uint8)[None]

def plot_own_predictions(paths: Sequence[Path], seen: Tensor, probabilities: Tensor, heat: Tensor,
                         classes: Sequence[str], path: Path) -> None:
    """Per image: the file as given, what the network saw, its probabilities, and its Grad-CAM map."""
    figure = Figure(figsize=(12, 2.6 * len(paths)))
    for row, (file, image, values, cam) in enumerate(zip(paths, seen, probabilities, heat)):
        given, saw, bars, cam_axis = (figure.add_subplot(len(paths), 4, 4 * row + column) for column in (1, 2, 3, 4))
        given.imshow(read_image(file).convert("RGB"))
        given.set_title(file.name, fontsize=8)
        given.axis("off")  # _draw_mosaic turns the other two off
        _draw_mosaic(saw, image[None], [""], columns=1)
        saw.set_title("what the network saw", fontsize=8)
        order = values.argsort(descending=True)[:10]
        bars.barh([classes[i] for i in order.tolist()][::-1], (100 * values[order]).tolist()[::-1], color="tab:blue")
        bars.set_xlim(0, 100)
        bars.set_xlabel("probability (%)", fontsize=8)
        bars.tick_params(labelsize=7)
        _draw_mosaic(cam_axis, with_heat(image[None], cam[None]), [""], columns=1)
        cam_axis.set_title(f"Grad-CAM for {classes[int(values.argmax())]}", fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)

def find_lr(model: nn.Module, data: ImageData, optimizer: torch.optim.Optimizer, args: argparse.Namespace,
            run: Run, options: FitOptions, start: float = 1e-7, end: float = 10.0, steps: int = 300) -> dict[str, Any]:
    """Smith's range test (2017): where the loss falls fastest as the rate rises is a good peak; nothing is kept."""
    device = next(model.parameters()).device
    precision = choose_precision(device, args.amp, args.cpu_bf16)
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    batches = data.train_batches(args.batch_size, augment=options.augment, seed=args.seed,
                                 channels_last=uses_channels_last(args, device, model), resize=options.resize)
    step = TrainStep(model, optimizer, gradient_scaler(device, precision), options.criterion or cross_entropy(),
                     precision)
    rates, losses, smoothed = [], [], 0.0
    model.train()
    for number, (images, labels) in enumerate(itertools.chain.from_iterable(map(batches.epoch, itertools.count()))):
        rate = start * (end / start) ** (number / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss, _, _ = step(images, labels)
        smoothed = 0.98 * smoothed + 0.02 * loss.item()  # an average over ~50 batches, debiased below
        rates.append(rate)
        losses.append(smoothed / (1 - 0.98 ** (number + 1)))
        if number + 1 == steps or not math.isfinite(losses[-1]) or losses[-1] > 4 * min(losses):
            break  # done, or the loss has run away: larger rates teach nothing more
    model.load_state_dict(saved_model)
    optimizer.load_state_dict(saved_optimizer)
    # The suggestion: where the loss falls fastest against log(rate) before its lowest point, over spans of
    # batches (from one to the next, noise exceeds the fall), past the first 10 (still settling); or none.
    lowest, skip, span = losses.index(min(losses)), 10, max(1, len(losses) // 15)
    slopes = [(losses[i + span] - losses[i]) / math.log(rates[i + span] / rates[i]) for i in range(skip, lowest - span)]
    suggested = rates[skip + slopes.index(min(slopes)) + span // 2] if slopes and min(slopes) < 0 else None
    if is_main_process():
        plot_lr_finder(rates, losses, suggested, run.folder / "lr_finder.png")
        print(f"Suggested --lr {suggested:.2g}: where the loss fell fastest (it was lowest at {rates[lowest]:.2g})."
              if suggested else f"No learning rate could be suggested: the loss did not fall as the rate rose from "
              f"{start:.2g} to {rates[-1]:.2g}.", f"The curve: {run.folder / 'lr_finder.png'}")
    return {"script": run.script, "variant": run.variant, "suggested_lr": suggested, "lrs": rates, "losses": losses}

def plot_lr_finder(rates: Sequence[float], losses: Sequence[float], suggested: float | None, path: Path) -> None:
    axis = Figure(figsize=(7, 4.5)).add_subplot(1, 1, 1)
    finite = [(rate, loss) for rate, loss in zip(rates, losses) if math.isfinite(loss)]
    axis.plot(*zip(*finite))
    if suggested:
        axis.axvline(suggested, color="red", linestyle="--", label=f"suggested --lr {suggested:.2g}")
        axis.legend()
    axis.set(xscale="log", xlabel="learning rate", ylabel="training loss (smoothed)", title="learning-rate range test",
             ylim=(None, min(max(loss for _, loss in finite), 3 * min(loss for _, loss in finite))))
    axis.grid(alpha=0.3, which="both")
    save_figure(axis.figure, path)

# ---- Variants and seeds: one run each, then one comparison ---------------------------------
def train_runs(run: Run, args: argparse.Namespace,
               train_one: Callable[[str | None, Run], dict[str, Any]]) -> dict[str, Any]:
    """Train run, or each run in its folder (every variant of --variant all, every seed of --seeds) and compare
    them (metrics.json grows as they end); train_one starts from seed_everything(args.seed)."""
    runs, asked, seed, records = run.children or {"": run}, examines(args) or args.find_lr, args.seed, {}
    for name, one in runs.items():  # asked: a question to each run, nothing to compare
        args.seed = seed if one.seed is None else one.seed
        if args.resume and run.children and finished(one.folder):  # trained to the end before: kept as it is
            records[name] = read_json(one.folder / "metrics.json")
            continue
        records[name] = train_one(one.variant, one)
        if args.tensorboard and is_main_process() and not asked:
            log_end(one.folder, records[name])
        if run.children and is_main_process() and not asked:
            save_json(run.folder / "metrics.json", _comparison_record(records, {**args_record(args), "seed": seed}))
    args.seed = seed
    record = (records[""] if not run.children else {"variants": records} if asked else
              save_comparison(records, run.folder, args))
    if args.show:
        show_plots(run.folder)
    return record

def _comparison_record(records: dict[str, dict[str, Any]], args: dict[str, Any]) -> dict[str, Any]:  # args_record
    first, seeds = next(iter(records.values())), args.get("seeds")
    return {"script": first["script"], "variant": args.get("variant") if seeds else "all",
            **({"seeds": seeds} if seeds else {}), "dataset": first["dataset"], "device": first["device"],
            "args": args, "variants": records}

def save_comparison(records: dict[str, dict[str, Any]], folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """After --variant all: comparison.md and .png; after --seeds: seeds.md (mean ± sd over the seeds) and seeds.png
    (each variant's mean, in a band from its lowest to its highest run); a metrics.json holding every run."""
    summary = _comparison_record(records, args_record(args))
    name, table = ("seeds", seeds_table(records)) if summary.get("seeds") else ("comparison", markdown_table([
        {"variant": name, "params": record["params"], "best test acc (%)": record["best_test_acc"],
         "final test acc (%)": record["final_test_acc"],
         "seconds": round(sum(row["seconds"] for row in record["epochs"]), 1)} for name, record in records.items()]))
    if is_main_process():
        save_text(folder / f"{name}.md", table)
        plot_curves({variant: [record["epochs"] for record in runs] for variant, runs in by_variant(records)},
                    folder / f"{name}.png", f"{summary['script']} on {summary['dataset']}")
        save_json(folder / "metrics.json", summary)
        print(table)
    return summary

def by_variant(records: dict[str, dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:  # each one's seeds
    grouped = itertools.groupby(records.values(), lambda record: record["variant"])
    return [(variant or "", list(runs)) for variant, runs in grouped]
def seeds_table(records: dict[str, dict[str, Any]]) -> str:
    """seeds.md: per variant the mean ± sample standard deviation (lowest - highest) over its seeds, then each run."""
    keys = ["final_test_acc", "best_test_acc"] + ["best_val_acc", "test_acc_at_best_val"] * all(
        "best_val_acc" in record for record in records.values())
    def spread(values: list[float]) -> str:
        deviation = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.2f}{deviation} ({min(values):.2f} - {max(values):.2f})"
    summary = [{"variant": variant or "-", "seeds": ", ".join(str(record["args"]["seed"]) for record in runs),
                **{f"{key} (%)": spread([record[key] for record in runs]) for key in keys}}
               for variant, runs in by_variant(records)]
    each = [{"run": name, "seed": record["args"]["seed"], **{f"{key} (%)": record[key] for key in keys}}
            for name, record in records.items()]
    return (markdown_table(summary) + "\n" + markdown_table(each) + "\nbest_test_acc is the best epoch read off the "
            "test split: optimistic. Where intervals overlap, these runs do not show a difference.\n")

# ============================================================================================
# PART II: WHAT KEEPS RUNS SAFE. Nothing below needs to be read to learn how a network trains:
# it makes runs dependable (the command line, devices and processes, run folders that are never
# overwritten, checkpoints that resume exactly, atomic writes, one sentence for every failure).

# ---- Command line: the same words in every script ------------------------------------------
def _number(parse: Callable[[str], Any], accept: Callable[[Any], bool], words: str) -> Callable[[str], Any]:
    """An argparse type: text that `parse` reads as a number that `accept` takes; else `words` in the error."""
    def read(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text!r}")
        return value
    return read

positive_int = _number(int, lambda value: value >= 1, "a whole number of at least 1")
non_negative_int = _number(int, lambda value: value >= 0, "a whole number of at least 0")
positive_float = _number(float, lambda value: math.isfinite(value) and value > 0, "a number above 0")
probability = _number(float, lambda value: 0.0 <= value < 1.0, "a number from 0 up to (not including) 1")

class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):  # each default shown; a None one, the help says
    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)

def build_parser(doc: str | None, *, script: str, datasets: Sequence[str], epochs: int, batch_size: int, lr: float,
                 variants: Sequence[str] | None = None, default_variant: str | None = None,
                 smallest_resolution: int | None = None,
                 channels_last: bool | str | None = True, cpu_bf16: bool = False) -> argparse.ArgumentParser:
    """The options every script shares, with its defaults (smallest_resolution: for ImageNet-born nets)."""
    parser = argparse.ArgumentParser(prog=f"{script}.py", description=(doc or "").strip().split("\n\n")[0],
                                     formatter_class=_HelpFormatter)
    option = parser.add_argument
    if variants is not None:
        option("--variant", choices=(*variants, "all"), default=default_variant or variants[0],
               help="which variant to train; 'all' trains each and draws one comparison")
    option("--epochs", type=positive_int, default=epochs, help="epochs to train")
    option("--batch-size", type=positive_int, default=batch_size, help="training batch size (per process)")
    option("--lr", type=positive_float, default=lr, help="learning rate (peak of the schedule)")
    option("--seed", type=non_negative_int, default=1, help="random seed")
    option("--seeds", type=lambda text: list(dict.fromkeys(map(non_negative_int, text.split(",")))), default=None,
           metavar="S1,S2,...", help="one run per seed, in one folder; then seeds.md: mean ± sd (default: one run)")
    option("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto", help="where to train")
    option("--data-dir", default="./data", help="where the dataset is, or is downloaded to")
    option("--dataset", choices=datasets, default=datasets[0],
           help="which data; 'fake' is random images of the right shape, for a try with no download")
    option("--out-dir", default=None, help=f"run folder (default: a new runs/{script}{'/<variant>' * bool(variants)}"
           ", then ...2, ...3; with --resume, --evaluate or --predict: the most recent)")
    option("--limit", type=positive_int, default=None, help="keep only the first N training and N test samples "
           "(default: all of them)")
    option("--val-split", type=positive_int, default=None, metavar="N", help="hold out N training images (the same "
           "for every seed) as a validation split: best_val_acc and its epoch are chosen on it (default: none)")
    # What to do with the run folder: start a run (the default), go on with one, or ask about one.
    question = parser.add_mutually_exclusive_group().add_argument
    question("--resume", action="store_true",
             help="continue the run in --out-dir, or this script's most recent run, where it stopped")
    question("--evaluate", action="store_true", help="evaluate a trained run (--out-dir, or the most recent "
             "finished one) on the test split: accuracy per class, plots and Grad-CAM again; nothing is trained")
    question("--predict", nargs="+", metavar="IMAGE", default=None, help="classify your own image files (PNG, JPEG) "
             "with a trained run's weights (default: none, train instead)")
    question("--find-lr", action="store_true", help="learning-rate range test: a few hundred batches at rising "
             "rates, the loss curve in lr_finder.png and a suggested --lr; nothing is trained or kept")
    question("--demo", action="store_true", help="a page in your browser (on 127.0.0.1) to draw or upload a picture "
             "and see a trained run's top 3 classes and Grad-CAM (needs: pip install gradio)")
    option("--overwrite", action="store_true", help="replace the run in --out-dir (its files are deleted first)")
    option("--workers", type=non_negative_int, default=0,
           help="CPU threads for PyTorch (0: its default, one per core); data needs no loader processes")
    option("--eval-batch-size", type=positive_int, default=None,
           help="evaluation batch size (default: 1,000 CIFAR-sized images' worth of pixels, at least --batch-size)")
    cpus = ("bfloat16 on CPUs with bfloat16 instructions (AVX512-BF16, AMX), none on other CPUs and MPS" if cpu_bf16
            else "none on the CPU and MPS")
    option("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="mixed precision: 'auto' is bfloat16 "
           f"on CUDA GPUs of compute capability 8.0 and up, float16 with a gradient scaler below, {cpus}; 'bf16' or "
           "'fp16' on any device; 'off' (or --no-amp): float32")
    parser.set_defaults(cpu_bf16=cpu_bf16)
    option("--no-amp", dest="amp", action="store_const", const="off",
           help="the same as --amp off (default: --amp auto)")
    option("--channels-last", action=argparse.BooleanOptionalAction, default=channels_last,
           help="channels-last memory format on CUDA and the CPU (faster convolutions on both)"
           + (" (default: on CUDA only; this network runs slower so on the CPU)" if channels_last is None else ""))
    if smallest_resolution:
        option("--resolution", type=_number(int, lambda value: value >= smallest_resolution, f"a whole number of at "
               f"least {smallest_resolution}, the smallest image this network takes"), default=None,
               help="train the original ImageNet-shaped network on images upsampled to this size on the device "
                    "(default: none, the network adapted to 32x32 images)")
        option("--label-smoothing", type=probability, default=0.1, help="label smoothing of the training loss")
    option("--sync-bn", action="store_true", help="under torchrun, BatchNorm statistics over all processes' batches")
    option("--compile", action="store_true", help="torch.compile the model (pays off on long runs, mostly on GPUs)")
    option("--checkpoint-every", type=_number(float, lambda value: 0 <= value < math.inf, "0 seconds or more"),
           default=None, metavar="SECONDS", help="write checkpoint.pt at an epoch's end only this long after the "
           "last (default: each epoch on the CPU, at most every 60 s on GPUs); the last epoch and a stop always do")
    option("--show", action="store_true", help="also show the plots in a window at the end")
    option("--tensorboard", action="store_true", help="also log the curves and, at the end, the plots for "
           "TensorBoard, in the run folder (needs: pip install tensorboard; then: tensorboard --logdir runs)")
    return parser

# ---- Devices, precision and processes ------------------------------------------------------
def prepare(args: argparse.Namespace) -> torch.device:
    """Device, threads, CUDA settings, torchrun's process group and the seed, as asked; the start line."""
    device = pick_device(args.device)
    for option, package in (("tensorboard", "tensorboard"), ("demo", "gradio")):
        if getattr(args, option, False) and importlib.util.find_spec(package) is None:
            raise UsageError(f"--{option} needs the {package} package, which is not installed: pip install {package}")
    if args.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA devices: PyTorch's SyncBatchNorm does not run on the CPU or MPS; "
                         "leave it out there (each process then normalizes over its own batch).")
    if args.workers > 0:
        torch.set_num_threads(args.workers)
    elif distributed() and device.type == "cpu":  # processes sharing a machine would each take every core
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))))
    if device.type == "cuda":
        check_cuda_build(device)
        torch.cuda.set_device(device)
        # cuDNN picks its fastest kernels for our fixed shapes; nn.Linear's float32 uses TF32, as convolutions do.
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    if distributed() and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    seed_everything(args.seed)
    if is_main_process():
        print(describe_setup(device, args), flush=True)
    return device

def pick_device(name: str = "auto") -> torch.device:
    """CUDA, then MPS (not under torchrun: Gloo cannot reduce MPS tensors), then the CPU."""
    if name == "mps" and distributed():
        raise UsageError("--device mps cannot run under torchrun: its Gloo backend cannot reduce MPS tensors. "
                         "Train on MPS with one process (plain python), or under torchrun with --device cpu.")
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available() and not distributed(),
                 "cpu": True}
    if name == "auto":
        name = next(kind for kind in ("cuda", "mps", "cpu") if available[kind])
    elif not available[name]:
        raise UsageError(f"--device {name} was asked for, but PyTorch sees no {name.upper()} device on this "
                         "machine; use --device auto to take the best one present.")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if name == "cuda" else torch.device(name)

def why_no_cuda() -> str | None:
    """Why PyTorch cannot use CUDA here, in its own words; None if it can (or is not meant to: a Mac)."""
    if torch.cuda.is_available() or (torch.version.cuda is None and torch.backends.mps.is_available()):
        return None
    if torch.version.cuda is None:
        return "this PyTorch was built without CUDA (see docs/gpus.md, \"Picking a PyTorch build\")"
    try:
        torch.cuda.init()  # raises with the reason: no driver, a driver too old for this build, ...
    except Exception as error:  # noqa: BLE001 - any reason is worth a short sentence
        said = str(error).lower()
        return ("no NVIDIA driver was found, so the CPU trains" if "no nvidia driver" in said else
                "the NVIDIA driver is too old for this PyTorch build (see docs/gpus.md)" if "too old" in said else
                "no CUDA GPU could be started (see docs/gpus.md)")
    return None

def check_cuda_build(device: torch.device) -> None:
    """Stop in one sentence when this PyTorch has no kernels (sm_XY) or PTX (compute_XY) for the GPU."""
    built = [(kind, int(digits)) for kind, _, number in (name.partition("_") for name in torch.cuda.get_arch_list())
             if (digits := "".join(character for character in number if character.isdigit()))]
    major, minor = torch.cuda.get_device_capability(device)
    capability = 10 * major + minor
    if not built or any((kind == "sm" and number // 10 == major and number <= capability)
                        or (kind == "compute" and number <= capability) for kind, number in built):
        return  # kernels for it, or a build that does not say: let it try
    remedy = ("no current PyTorch build has kernels for it, so train on the CPU with --device cpu" if capability < 50
              else "install PyTorch's CUDA 12.6 build, the last with kernels for compute capability 5.0 to 7.0: pip "
              "install torch torchvision --index-url https://download.pytorch.org/whl/cu126"
              if capability < min(number for _, number in built) else "install a newer build: pip install --upgrade "
              "torch torchvision --index-url https://download.pytorch.org/whl/cu130")
    raise RunError(f"This PyTorch has no kernels for your GPU ({torch.cuda.get_device_name(device)}, compute "
                   f"capability {major}.{minor}; it was built for {', '.join(torch.cuda.get_arch_list())}): {remedy} "
                   "(see docs/gpus.md, \"Picking a PyTorch build\").")

def choose_precision(device: torch.device, amp: str = "auto", cpu_bf16: bool = False) -> torch.dtype | None:
    """--amp's dtype (None: float32); 'auto': bfloat16 on CUDA 8.0+ (float16 below), and on bf16 CPUs if cpu_bf16."""
    if amp == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if amp == "auto" and device.type == "cpu" and cpu_bf16:
        capabilities = getattr(torch.cpu, "get_capabilities", dict)()  # older PyTorch cannot tell: float32
        return torch.bfloat16 if capabilities.get("avx512_bf16") or capabilities.get("amx_bf16") else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)  # None: "off", or "auto" elsewhere
def precision_name(precision: torch.dtype | None) -> str:  # as metrics.json and the start line say it
    return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[precision]
def fused(device: torch.device) -> bool:
    """fused= on CUDA: one kernel for all parameters, and GradScaler's overflow check needs no .item() each step."""
    return device.type == "cuda"

def gradient_scaler(device: torch.device, precision: torch.dtype | None) -> torch.amp.GradScaler:
    """float16 scales its loss up so that small gradients do not underflow; off otherwise."""
    scaler = torch.amp.GradScaler(device.type, enabled=precision == torch.float16)
    if scaler.is_enabled():  # a step skipped for an overflow makes the scheduler warn: expected, and harmless
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
    return scaler

def describe_setup(device: torch.device, args: argparse.Namespace) -> str:
    """The line a run starts with: where and how it trains, and why not on CUDA when it could."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        where = f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"
    else:
        threads = torch.get_num_threads()
        where = "mps (Apple GPU)" if device.type == "mps" else f"the CPU ({threads} thread{'s' * (threads > 1)})"
    processes, precision = world_size(), choose_precision(device, args.amp, args.cpu_bf16)
    line = ", ".join([f"{'Evaluating' if args.evaluate else 'Predicting' if examines(args) else 'Training'} on {where}",
        precision_name(precision) + {None: "", torch.bfloat16: " mixed precision",
                                     torch.float16: " mixed precision with a gradient scaler"}[precision],
        "channels-last" if uses_channels_last(args, device) else "contiguous memory",
        "compiled" if args.compile and not (examines(args) or args.find_lr) else "not compiled",
        f"{processes} process{'es' * (processes > 1)}"]) + "."
    reason = why_no_cuda() if device.type == "cpu" and args.device == "auto" else None
    return line + (f"\nNot on a GPU: {reason}." if reason else "")

def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)

# A script's --channels-last default (cifar_norms.py): PyTorch's group_norm calls input.contiguous() off
# the CPU, so on CUDA a GroupNorm network in channels-last would copy activations around every norm.
NOT_FOR_GROUP_NORM = "on, but off on CUDA for networks with GroupNorm"

def uses_channels_last(args: argparse.Namespace, device: torch.device, model: nn.Module | None = None) -> bool:
    """Faster cuDNN and oneDNN convolutions (20-40 % a step here); a default of None: on CUDA only."""
    setting = args.channels_last
    if setting == NOT_FOR_GROUP_NORM:
        group_norm = model is not None and any(isinstance(module, nn.GroupNorm) for module in model.modules())
        setting = device.type != "cuda" or not group_norm
    return device.type == "cuda" if setting is None else setting and device.type in ("cuda", "cpu")

def eval_batch_size(args: argparse.Namespace, side: int) -> int:
    """--eval-batch-size, or 1,000 images at 32x32, fewer as pixels grow, at least a training batch."""
    return (args.eval_batch_size if args.eval_batch_size is not None else
            max(args.batch_size, min(1000, 1000 * 32 * 32 // (side * side))))

def adapt_model(model: nn.Module, args: argparse.Namespace, device: torch.device, *,
                training: bool) -> tuple[nn.Module, nn.Module]:
    """(what to train, what to evaluate): MPS pools, memory format; SyncBatchNorm, compile, DDP."""
    if uses_channels_last(args, device, model):
        model = model.to(memory_format=torch.channels_last)
    if not training:
        return model, model
    if distributed() and args.sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.compile:
        # Dynamo recompiles a function at most 8 times, all instances of a class together (ResNet-18 and
        # -34 share ResNet.forward), then runs it eager: a reset lets every variant of --variant all compile.
        # Static shapes: a smaller last batch gets a graph of its own, not one symbolic-batch graph for all.
        torch._dynamo.reset()
        model = torch.compile(model, dynamic=False)
    if not distributed():
        return model, model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids), model

def unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
    return model

class AdaptiveAvgPool2dByMatmul(nn.AdaptiveAvgPool2d):
    """nn.AdaptiveAvgPool2d as two matrix products: MPS pools only multiples (14 to 4 fails)."""
    def forward(self, x: Tensor) -> Tensor:
        size = self.output_size if isinstance(self.output_size, tuple) else (self.output_size,) * 2
        rows, columns = (self.windows(side, out or side, x) for side, out in zip(x.shape[-2:], size))
        return rows @ x @ columns.T

    @staticmethod
    def windows(size_in: int, size_out: int, like: Tensor) -> Tensor:
        index = torch.arange(size_out, device=like.device)
        start, end = index * size_in // size_out, ((index + 1) * size_in + size_out - 1) // size_out
        inputs = torch.arange(size_in, device=like.device)
        inside = (inputs >= start[:, None]) & (inputs < end[:, None])
        return inside.to(like.dtype) / (end - start)[:, None].to(like.dtype)

def to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """model.to(device), on MPS with portable pools first: every path (summary, training, questions) runs them."""
    return (portable_pooling(model) if device.type == "mps" else model).to(device)
def portable_pooling(model: nn.Module) -> nn.Module:
    for name, module in model.named_children():
        if isinstance(module, nn.AdaptiveAvgPool2d) and module.output_size not in (1, (1, 1)):
            setattr(model, name, AdaptiveAvgPool2dByMatmul(module.output_size))
        else:
            portable_pooling(module)
    return model

# Several processes (torchrun): small helpers that do nothing in a plain run of one process.
def rank() -> int:
    return int(os.environ.get("RANK", 0))  # this process's rank under torchrun, 0 otherwise
def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))  # how many processes train together
def is_main_process() -> bool:
    return rank() == 0  # only the main process prints, plots and writes files
def distributed() -> bool:
    return world_size() > 1  # a plain run never touches torch.distributed
def all_reduce(values: Tensor, op: str = "sum") -> Tensor:
    if distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MIN)
    return values

def sum_over_processes(values: list[float]) -> list[float]:
    """In double precision: on the CPU for Gloo, on the GPU for NCCL (never on MPS)."""
    if not distributed():
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=device)).tolist()

def share_buffers(model: nn.Module) -> None:
    """The main process's BatchNorm statistics to all: DDP syncs them only at training forwards."""
    for buffer in model.buffers() if distributed() else ():
        dist.broadcast(buffer, src=0)

def gather_shards(local: Tensor, total: int) -> Tensor:
    """Put together what each process computed for its samples rank, rank + world, ... in order."""
    if not distributed():
        return local
    padded = F.pad(local, (0, math.ceil(total / world_size()) - len(local)), value=-1)  # the same length in each
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.stack(parts, dim=1).flatten()[:total]  # sample k * world_size + rank is parts[rank][k]

def decided_by_main_process(decide: Callable[[], Any]) -> Any:
    """decide() on the main process; every process gets its answer or stops with its sentence."""
    if not distributed():
        return decide()
    outcome: list[Any] = [None]
    if is_main_process():
        try:
            outcome = [decide()]
        except RunError as error:
            outcome = [error]
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], RunError):
        raise outcome[0]
    return outcome[0]

def first_to_say(what: str) -> bool:
    """Whether this process is the first of torchrun's to say `what`: they count on torchrun's store."""
    if not distributed():
        return True
    with contextlib.suppress(Exception):  # no store to ask: better said by each than by none
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=10))
        return store.add(f"said: {what}", 1) == 1
    return True

@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """The main process runs the block (a download) while the others wait past NCCL's timeout."""
    waiting = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2)) if distributed() else None
    if waiting is not None and not is_main_process():
        dist.barrier(group=waiting)
    try:
        yield
    finally:
        if waiting is not None and is_main_process():
            dist.barrier(group=waiting)  # also when it failed: the others then fail with the same sentence
    if waiting is not None:
        dist.destroy_process_group(waiting)

# ---- Run folders: one per run, never overwritten, claimed while in use ---------------------
RUNS = Path("runs")
# Options that say how a run is carried out, not what it trains (and cpu_bf16, a script's setting): a resume
# may change them (compile, channels-last and threads may move the last bits of a sum, no more), and a script
# adds its own. All others shape the run and a resume must keep them; the device and precision are compared as
# resolved (--device auto is cpu on a CPU), the variant on its own (each folder of --variant all is one run).
HOW_OPTIONS = frozenset({"workers", "show", "device", "amp", "compile", "channels_last", "eval_batch_size",
                         "data_dir", "out_dir", "resume", "overwrite", "evaluate", "predict", "find_lr", "variant",
                         "checkpoint_every", "seeds", "tensorboard", "demo", "cpu_bf16"})
# The files a run of this repository writes, the scripts' own included: all that --overwrite deletes.
RUN_FILES = ("checkpoint.pt", "metrics.json", "summary.txt", "receptive_field.md", "comparison.md", "batch_sizes.md",
             "separable_savings.md", "samples.png", "curves.png", "predictions.png", "misclassified.png",
             "confusion_matrix.png", "gradcam.png", "comparison.png", "lr_finder.png", "predictions_own.png",
             "feature_maps_*.png", "embeddings.png", "aux_losses.png", "batch_sizes.png", "seeds.md", "seeds.png",
             "events.out.tfevents.*", ".*.tmp*")

@dataclass
class Run:
    """A run folder claimed by this process, and the saved run it continues or examines."""
    folder: Path
    script: str
    variant: str | None = None
    saved: dict[str, Any] | None = None  # the checkpoint this run continues (--resume) or examines
    children: dict[str, Run] = field(default_factory=dict)  # --variant all, --seeds: the runs inside, by folder
    seed: int | None = None  # --seeds: this run's

@contextlib.contextmanager
def open_run(args: argparse.Namespace, script: str, device: torch.device, variants: Sequence[str] = (),
             may_change: Sequence[str] = ()) -> Iterator[Run]:
    """Find, check and claim the folder before anything is written (--out-dir, or the next free one or the latest);
    the claim ends with the block."""
    if distributed() and examines(args):  # one process answers: the questions' batches are not sharded
        raise UsageError("--evaluate and --predict run in one process: start them with python, not torchrun.")
    if getattr(args, "demo", False) and group_members(args, variants):
        raise UsageError("--demo serves one run: leave out --variant all and --seeds, or name one with --out-dir.")
    plan = _FolderPlan(args, script, device, variants, HOW_OPTIONS | set(may_change))
    if args.overwrite and (args.out_dir is None or plan.mode != "new"):
        raise UsageError("--overwrite replaces the run in --out-dir with a new one: name the folder with --out-dir, "
                         "and leave out --resume, --evaluate, --predict and --find-lr.")
    # Under torchrun the main process decides (and claims the folders); every process follows or stops.
    folder, modes = decided_by_main_process(plan.decide)
    run = Run(folder, script, None if plan.variant == "all" else plan.variant, children={
        name: Run(folder / name, script, variant, seed=seed) for name, (variant, seed) in plan.members.items()})
    for mode, one in zip(modes, run.children.values() if run.children else [run]):
        if mode in ("resume", "examine"):
            one.saved = plan.read.get(one.folder / "checkpoint.pt") or read_checkpoint(one.folder / "checkpoint.pt")
    if plan.mode == "examine":  # take every option that shapes the run from the run itself (a --limit asked stays)
        for name, value in (next(iter(run.children.values())) if run.children else run).saved["args"].items():
            if name not in plan.how and hasattr(args, name) and not (name == "limit" and args.limit):
                setattr(args, name, value)
    if is_main_process():
        print(_opening_line(run, plan.mode, args, plan.replaced), flush=True)
    try:
        yield run
    finally:
        for lock in plan.locks.values():
            lock.release()

def examines(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "evaluate", False) or getattr(args, "predict", None) or getattr(args, "demo", False))
def group_members(args: argparse.Namespace, variants: Sequence[str]) -> dict[str, tuple[str | None, int | None]]:
    """The runs one command keeps in one folder, {folder name: (variant, seed)}: each variant of --variant all
    (`18`), each seed of --seeds (`seed2`), or both (`18-seed2`); none for a single run."""
    variant, seeds = getattr(args, "variant", None), getattr(args, "seeds", None)
    names = list(variants) if variant == "all" else [variant]
    if not seeds:
        return {name: (name, None) for name in names} if variant == "all" else {}
    return {(f"{name}-" if variant == "all" else "") + f"seed{seed}": (name, seed) for name in names for seed in seeds}

class _FolderPlan:
    """Which folder a command uses and how, the sentence that refuses what cannot work, the claim."""
    def __init__(self, args: argparse.Namespace, script: str, device: torch.device, variants: Sequence[str],
                 how: set[str]) -> None:
        self.args, self.script, self.device, self.how = args, script, device, how
        self.variant, self.seeds, self.members = (getattr(args, "variant", None), getattr(args, "seeds", None),
                                                  group_members(args, variants))
        self.mode = ("examine" if examines(args) else "resume" if args.resume else
                     "find-lr" if getattr(args, "find_lr", False) else "new")
        self.read: dict[Path, dict[str, Any]] = {}  # the checkpoints read while deciding
        self.locks: dict[Path, filelock.BaseFileLock] = {}
        self.replaced = ""  # what a new run's claim removed: "" or why

    def decide(self) -> tuple[Path, list[str]]:
        while True:  # runs started together without --out-dir: each takes the next free folder
            folder = Path(self.args.out_dir) if self.args.out_dir else self.default_folder()
            try:
                modes = self.check_all(folder)
                self.claim_all(folder, modes)
                return folder, modes
            except FolderInUse:
                for lock in self.locks.values():  # a part claimed (the comparison, not a variant) is let go
                    lock.release()
                self.locks.clear()
                if self.args.out_dir or self.mode not in ("new", "find-lr"):
                    raise

    def check_all(self, folder: Path) -> list[str]:
        if not self.members or self.mode in ("new", "find-lr"):
            self.check(folder, self.mode, self.variant)
            if not self.members:
                return [self.mode]
        elif not self.is_group(folder):
            what, single = ("--variant all", "a single variant's run") if self.variant == "all" else (
                f"--seeds {','.join(map(str, self.seeds))}", "a single run")
            raise RunError(f"{folder} holds no {what} run of {self.script}: name the folder of one with --out-dir, "
                           f"or leave {what} out to use {single}.")
        modes = []
        for name, (variant, seed) in self.members.items():
            # Resuming: finished runs stay, the interrupted one goes on, the rest start.
            modes.append("new" if self.mode == "resume" and not has_checkpoint(folder / name) else self.mode)
            self.check(folder / name, modes[-1], variant, seed)
        return modes

    def is_group(self, folder: Path) -> bool:  # a group of runs made as this command asks: these variants and seeds
        record = group_record(folder)
        return bool(record) and (record.get("variant"), record.get("seeds")) == (self.variant, self.seeds)

    def default_folder(self) -> Path:
        """The next free runs/<script>[/<variant>] for a new run, else the most recent to use."""
        script, variant, mode = self.script, self.variant, self.mode
        base = RUNS / script / variant if variant and variant != "all" else RUNS / script
        if mode in ("new", "find-lr"):
            return next_folder(base)
        if self.members:
            candidates = [path for _, path in numbered_folders(base) if self.is_group(path)
                          and (mode != "examine" or all(finished(path / name) for name in self.members))]
        else:  # a variant's folders inside --variant all runs count too
            candidates = [path for _, path in numbered_folders(base)]
            candidates += [path / variant for _, path in numbered_folders(RUNS / script) if variant]
            candidates = [path for path in candidates if finished(path) or (mode == "resume" and has_checkpoint(path))]
        if candidates:
            return max(candidates, key=lambda path: (path / ("metrics.json" if self.members else
                                                             "checkpoint.pt")).stat().st_mtime)
        what = f"{script} --variant {variant}" if variant else script
        where = f"{base}, {base}{'-' if base.name[-1].isdigit() else ''}2, ..."
        raise RunError(f"Nothing to resume: there is no run of {what} in {where}. Run without --resume to start one, "
                       "or name a run folder with --out-dir." if mode == "resume" else f"No finished run of {what} in "
                       f"{where}: train one first (the same command without --evaluate, --predict or --demo), or "
                       "name a run folder with --out-dir.")

    def check(self, folder: Path, mode: str, variant: str | None, seed: int | None = None) -> None:
        if folder.exists() and not folder.is_dir():
            raise RunError(f"The run folder {folder} is a file, not a folder: name another --out-dir.")
        refuse_if_in_use(folder)
        if mode == "find-lr":  # it adds lr_finder.png and touches nothing else
            return
        if mode == "new":
            ours = holds_our_run(folder)
            if ours and not self.args.overwrite and any(folder.rglob("checkpoint.pt")):
                raise UsageError(f"{folder} already holds a run: add --resume to continue it, --overwrite to replace "
                                 "it, or name another --out-dir (without --out-dir each run gets a new folder).")
            if holds_files(folder) and not ours:
                raise (RunError(f"--overwrite replaces run folders only, and {folder} holds other files: name "
                                "another --out-dir.") if self.args.overwrite else
                       UsageError(f"{folder} already holds files that are not a run of ours: name another "
                                  "--out-dir (without --out-dir each run gets a new folder)."))
            return
        if not self.members and (seeds := group_record(folder).get("seeds")):  # a --seeds folder, asked as one run
            raise UsageError(f"{folder} holds one run per seed: add --seeds {','.join(map(str, seeds))}, or name one "
                             f"of its runs with --out-dir (for example {folder / f'seed{seeds[0]}'}).")
        if not has_checkpoint(folder):
            raise RunError(f"Nothing to resume: there is no checkpoint in {folder}. Run without --resume to start."
                           if mode == "resume" else f"There is no trained run in {folder} (no checkpoint.pt): "
                           "train one first, or name a run folder with --out-dir.")
        saved = self.read[folder / "checkpoint.pt"] = read_checkpoint(folder / "checkpoint.pt")
        if saved["script"] != self.script or (variant != "all" and saved["variant"] != variant):
            found = " ".join(str(part) for part in (saved["script"], saved["variant"]) if part)
            wanted = f"{self.script} {variant}" if variant else self.script
            raise RunError(f"The run in {folder} is a {found} run, not a {wanted} one: name its own folder with "
                           "--out-dir, or run the script that made it.")
        if mode == "resume":
            self.check_same_options(saved, folder, seed)

    def check_same_options(self, saved: dict[str, Any], folder: Path, seed: int | None) -> None:
        before, now = saved["args"], {**args_record(self.args), **({"seed": seed} if seed is not None else {})}
        changed = [(name, before[name], now[name]) for name in before
                   if name in now and name not in self.how and before[name] != now[name]]
        precision = precision_name(choose_precision(self.device, self.args.amp, self.args.cpu_bf16))
        changed += [(name, value, current) for name, value, current in (
            ("device", saved.get("device_type"), self.device.type), ("precision", saved.get("precision"), precision))
            if value is not None and value != current]
        anew = ("add --overwrite to replace this one, or name another --out-dir" if self.args.out_dir else
                "it gets a folder of its own")
        if changed:
            listed = ", ".join(f"{_as_option(name, value)} (now {_as_option(name, current)})"
                               for name, value, current in changed)
            raise UsageError(f"The run in {folder} was made with other options: {listed}. Resume it with its own "
                             f"options, or start a new run without --resume ({anew}).")
        if len(saved["processes"]) != world_size():  # the steps per epoch, and so the schedule, depend on it
            raise UsageError(f"The run in {folder} was trained by {len(saved['processes'])} process(es): resume it "
                             f"with as many (here: {world_size()}), as its schedule counts their steps.")

    def claim_all(self, folder: Path, modes: list[str]) -> None:
        """Lock the folders; a new run removes what a run of ours left; a comparison gets metrics.json."""
        for path in [folder] + [folder / name for name in self.members]:
            if path not in self.locks:
                self.locks[path] = claim(path)
        if self.mode == "new" and holds_our_run(folder):
            self.replaced = " (--overwrite: the run there was deleted)" if self.args.overwrite else (
                " (the run there had stopped before its first checkpoint: replaced)")
            remove_run_files(folder, [*self.members, *group_record(folder).get("variants", {})])  # old runs too
        if self.members and self.mode == "new":
            seeds = {"seeds": self.args.seeds} if getattr(self.args, "seeds", None) else {}
            save_json(folder / "metrics.json", {"script": self.script, "variant": self.variant, **seeds,
                                                "dataset": self.args.dataset, "args": args_record(self.args),
                                                "variants": {}})

def _as_option(name: str, value: Any) -> str:
    """How an option's value reads on a command line: --seed 1, --limit (all), --no-aux, --amp bf16, ..."""
    if name == "precision":  # a run's precision is set by --amp
        name, value = "amp", {"float32": "off", "bfloat16": "bf16", "float16": "fp16"}[value]
    flag = name if name == "device" else "--" + name.replace("_", "-")
    return (flag if value else f"no {flag}") if value is None or isinstance(value, bool) else f"{flag} {value}"

def numbered_folders(base: Path) -> list[tuple[int, Path]]:
    """(number, folder) of base, base2, base3, ... that exist (base-2, ... when its name ends in a digit)."""
    pattern = re.compile(re.escape(base.name) + ("(?:-([0-9]+))?" if base.name[-1].isdigit() else "([0-9]+)?"))
    matches = [(pattern.fullmatch(path.name), path) for path in base.parent.iterdir()] if base.parent.is_dir() else []
    return sorted((int(match.group(1) or 1), path) for match, path in matches if match and path.is_dir())

def next_folder(base: Path) -> Path:
    existing = numbered_folders(base)
    if not existing:
        return base
    number, last = existing[-1]
    if not holds_files(last) and not in_use(last):  # left empty by a run that stopped before it wrote anything
        return last
    return base.with_name(f"{base.name}{'-' if base.name[-1].isdigit() else ''}{number + 1}")
def holds_files(folder: Path) -> bool:
    return folder.is_dir() and any(path.name != ".lock" for path in folder.iterdir())
def has_checkpoint(folder: Path) -> bool:
    return (folder / "checkpoint.pt").is_file()
def holds_our_run(folder: Path) -> bool:
    """Whether folder's metrics.json is one of ours (our keys, a script's name), or all its files are."""
    try:
        record = read_json(folder / "metrics.json")
        return isinstance(record.get("script"), str) and isinstance(record.get("args"), dict)
    except (OSError, ValueError, AttributeError):  # a run stopped in epoch 1 wrote only its summaries
        files = [path for path in folder.iterdir() if path.name != ".lock"] if folder.is_dir() else []
        return bool(files) and all(path.is_file() and any(path.match(n) for n in RUN_FILES) for path in files)

def remove_run_files(folder: Path, variants: Sequence[str] = ()) -> None:  # only this run's variants' folders
    for path in folder.iterdir():
        if path.is_dir() and path.name in variants and holds_our_run(path):
            remove_run_files(path)
            with contextlib.suppress(OSError):
                path.rmdir()  # unless the user keeps something of their own in it
        elif path.is_file() and any(path.match(name) for name in RUN_FILES):
            path.unlink()

def finished(folder: Path) -> bool:
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        record = read_json(folder / "metrics.json")
        return has_checkpoint(folder) and len(record["epochs"]) == record["args"]["epochs"] and not record.get(
            "diverged")
    return False

def group_record(folder: Path) -> dict[str, Any]:
    """The metrics.json of a --variant all or --seeds run (its runs lie in folders inside), else {}."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        record = read_json(folder / "metrics.json")
        return record if record.get("variant") == "all" or record.get("seeds") else {}
    return {}

def in_use(folder: Path) -> str | None:
    """Who holds folder's lock ("process 123 on host since ..."), or None if no live run does."""
    try:
        if (folder / ".lock").is_file():
            with filelock.FileLock(folder / ".lock", timeout=0):
                pass
    except filelock.Timeout:
        with contextlib.suppress(OSError):
            return (folder / ".lock").read_text(encoding="utf-8").strip() or "another process"
        return "another process"
    except OSError:  # a folder we may not lock is nobody's: claiming it then says why
        pass
    return None

def refuse_if_in_use(folder: Path, known_held: bool = False) -> None:
    if holder := in_use(folder) or (known_held and "another process"):
        raise FolderInUse(f"{folder} is in use by a run that is still going ({holder}): wait for it to end, or "
                          "choose another --out-dir.") from None

def claim(folder: Path) -> filelock.BaseFileLock:
    """Lock folder/.lock; the system drops the lock when the process ends, however it ends (SIGKILL too)."""
    lock = filelock.FileLock(folder / ".lock", timeout=0)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except filelock.Timeout:  # before OSError: it is a TimeoutError, an OSError
        refuse_if_in_use(folder, known_held=True)  # raises, naming the holder if it can
    except OSError as error:
        raise RunError(cannot_write(folder, error)) from None
    with contextlib.suppress(OSError):  # who holds it, for the sentence above (Windows may keep the file locked)
        (folder / ".lock").write_text(f"process {os.getpid()} on {socket.gethostname()} since "
                                      f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}\n", encoding="utf-8")
    return lock

def _opening_line(run: Run, mode: str, args: argparse.Namespace, replaced: str) -> str:
    if mode in ("new", "find-lr"):
        return f"Writing to {run.folder}{replaced}"
    if run.children:
        states = ", ".join(f"{name}: " + (progress_of(child.saved, args.epochs, mode == "resume") if child.saved
                                          else "to start") for name, child in run.children.items())
        return f"{'Resuming' if mode == 'resume' else 'Using'} {run.folder} ({states})"
    if mode == "resume":
        return f"Resuming {run.folder}: {progress_of(run.saved, args.epochs)}"
    return f"Using the run in {run.folder} ({progress_of(run.saved, run.saved['args']['epochs'], resuming=False)})"

def progress_of(saved: dict[str, Any], epochs: int, resuming: bool = True) -> str:
    """How far a saved run got: what a resume does with it, or (resuming=False) what its weights are."""
    epoch, batch = saved["epoch"], saved["batch"]
    if epoch >= epochs:
        return f"finished all {epochs} epochs, nothing left to train" if resuming else f"trained all {epochs} epochs"
    if not resuming:
        return f"weights after {epoch} of {epochs} epochs" + (f" and {batch} batches" if batch else "")
    return f"going on at epoch {epoch + 1} of {epochs}" + (f", batch {batch + 1}" if batch else "")

# ---- What a run writes: metrics, checkpoints, all atomically -------------------------------
def args_record(args: argparse.Namespace) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
def new_record(script: str, variant: str | None, args: argparse.Namespace, model: nn.Module,
               device: torch.device) -> dict[str, Any]:
    return {"script": script, "variant": variant, "dataset": args.dataset, "params": count_parameters(model),
            "device": str(device), "torch": torch.__version__, "args": args_record(args)}

def save_record(folder: Path, record: dict[str, Any]) -> None:
    history = [row for row in record["epochs"] if not row.get("diverged")]
    if history:
        record["final_test_acc"] = history[-1]["test_acc"]
        record["best_test_acc"] = max(row["test_acc"] for row in history)
        record["best_test_acc_note"] = "the best epoch's test accuracy, chosen on the test split itself: optimistic"
        if "val_acc" in history[-1]:  # the best epoch chosen where it may be: on the validation split
            best = max(history, key=lambda row: row["val_acc"])
            record.update(best_val_acc=best["val_acc"], best_val_epoch=best["epoch"],
                          test_acc_at_best_val=best["test_acc"])
    if is_main_process():
        save_json(folder / "metrics.json", record)

class Checkpoint:
    """A run's state after every epoch (or part-way, when stopped), put back on --resume."""
    def __init__(self, run: Run, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 scaler: torch.amp.GradScaler, data: dict[str, Any], args: argparse.Namespace) -> None:
        self.run, self.model, self.optimizer, self.scheduler, self.scaler = run, model, optimizer, scheduler, scaler
        self.device, self.seed, self.epochs = next(model.parameters()).device, args.seed, args.epochs
        every = getattr(args, "checkpoint_every", None)  # seconds; by default every epoch on the CPU, 60 s on GPUs
        self.every = every if every is not None else 60.0 * (self.device.type != "cpu")
        self.saved_epoch, self.saved_at = None, time.monotonic()  # the epoch of checkpoint.pt (None: none yet)
        self.about = {"script": run.script, "variant": run.variant, "device_type": self.device.type,
                      "precision": precision_name(choose_precision(self.device, args.amp, args.cpu_bf16)),
                      "data": data, "args": args_record(args)}
        self.history, self.start_batch, self.position = [], 0, None  # history: list[dict[str, Any]]

    def resume(self) -> tuple[list[dict[str, Any]], int]:
        """Put the saved run back (open_run checked that it is a run of this model): (history, first epoch)."""
        saved = self.run.saved
        if saved is None:
            return self.history, 0
        load_weights(self.model, saved, self.run.folder)
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.scheduler is not None and saved["scheduler"] is not None:
            self.scheduler.load_state_dict(saved["scheduler"])
        if saved["scaler"]:
            self.scaler.load_state_dict(saved["scaler"])
        self.history, self.start_batch, self.saved_epoch = saved["history"], saved["batch"], saved["epoch"]
        self.position = saved["processes"][rank()] if self.start_batch else None
        return self.history, saved["epoch"]

    def begin_epoch(self, epoch: int, num_batches: int, lr: float) -> tuple[EpochTally, int]:
        """The epoch's tally and first batch: fresh from the epoch's own seed, or as a stopped epoch left them."""
        if self.position is None:
            torch.manual_seed(epoch_seed(self.seed, epoch, rank()))
            return EpochTally.empty(num_batches, self.device, lr), 0
        set_rng_state(self.position["rng"], self.device)
        tally, start, self.position = EpochTally(**self.position["tally"]).to(self.device), self.start_batch, None
        return tally, start

    @contextlib.contextmanager
    def advising(self) -> Iterator[None]:  # a loss that ran away: what to do, given the checkpoint kept
        try:
            yield
        except NonFiniteLossError as error:  # with no checkpoint, the same folder takes the next run
            advice = (f"The checkpoint of epoch {self.saved_epoch} is kept: start again with a lower --lr, adding "
                      "--overwrite to replace this run in its --out-dir, or in another folder." if self.saved_epoch
                      else "No checkpoint was saved yet: start again with a lower --lr.")
            raise NonFiniteLossError(f"{error} {advice}") from None

    def end_epoch(self, epoch: int) -> None:
        """checkpoint.pt once --checkpoint-every seconds passed (epoch seeds keep resumes from earlier exact)."""
        if epoch == self.epochs or time.monotonic() - self.saved_at >= self.every:
            self.save(epoch)

    def save(self, epoch: int, batch: int = 0, tally: EpochTally | None = None) -> None:
        """checkpoint.pt after `epoch` epochs and `batch` batches of the next (0: at an epoch's end)."""
        processes: list[Any] = [None] * world_size()
        if batch and tally is not None:
            processes[rank()] = {"rng": rng_state(self.device), "tally": vars(tally.to("cpu"))}
            if distributed():  # every process's place filled in, from each
                dist.all_gather_object(processes, processes[rank()])
        if is_main_process():
            save_torch(self.run.folder / "checkpoint.pt", {
                **self.about,  # script, variant, device type, precision, data, args
                "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                "scaler": self.scaler.state_dict(),  # float16's loss scale ({} when not in use)
                "epoch": epoch, "batch": batch, "processes": processes, "history": self.history})
        self.saved_epoch, self.saved_at = epoch, time.monotonic()

    def stop(self, record: dict[str, Any], epoch: int, batch: int, tally: EpochTally | None,
             request: StopRequest) -> None:
        """Ctrl-C or SIGTERM: save where the run stands (part-way through an epoch), say how to go on."""
        if batch or self.saved_epoch != epoch:  # at an epoch's end, unless that epoch's checkpoint is written
            self.save(epoch, batch, tally)
            save_record(self.run.folder, record)
        position = f"after batch {batch} of epoch {epoch + 1}" if batch else f"at the end of epoch {epoch}"
        raise RunError(f"Stopped by {request.name} {position}: checkpoint and metrics saved in {self.run.folder}. To "
                       "continue, run the same command again with --resume.", 128 + request.signal_number)

def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    # Each epoch (and process) has its own seed: its draws do not depend on how the run got there.
    return (seed * 1_000_003 + epoch * 1009 + rank) % (2**63)

def rng_state(device: torch.device) -> dict[str, Any]:
    """The CPU's, Python's and the training device's random states (a resume may see fewer GPUs)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type in ("cuda", "mps"):
        state[device.type] = torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.mps.get_rng_state()
    return state

def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    elif "mps" in state and device.type == "mps":
        torch.mps.set_rng_state(state["mps"])

def load_weights(model: nn.Module, saved: dict[str, Any], folder: Path) -> None:
    """A saved run's weights into its model; one sentence naming the layers if the network is another."""
    mine, theirs = unwrap(model).state_dict(), saved["model"]
    shape = lambda weights, name: "x".join(map(str, weights[name].shape)) if name in weights else "none"  # noqa: E731
    changed = sorted(name for name in mine.keys() | theirs.keys() if shape(mine, name) != shape(theirs, name))
    if changed:
        listed = ", ".join(f"{name} ({shape(theirs, name)} saved, {shape(mine, name)} now)" for name in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise RunError(f"The run in {folder} was trained with another network than this script builds: {listed}{more}. "
                       f"Train it anew (with --overwrite --out-dir {folder}), or run the version of the script it had.")
    unwrap(model).load_state_dict(theirs)

# What every checkpoint of ours holds; a file without them was not written by this repository.
CHECKPOINT_KEYS = {"script", "variant", "args", "data", "model", "optimizer", "epoch", "batch", "processes", "history"}

def read_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of ours, read with weights_only=True (never unpickled); else one sentence."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a cut or damaged file raises many kinds of errors
        reason = str(error).strip().split("\n")[0] or type(error).__name__
        if "weights only" in reason.lower().replace("_", " "):  # never pass on torch's hint to unpickle it
            reason = "it holds more than tensors and plain values"
        raise RunError(f"The checkpoint {path} cannot be read ({reason}): it was cut short or damaged, or it is not "
                       "a checkpoint of this repository. Delete it, or name another --out-dir.") from None
    if not isinstance(saved, dict) or not CHECKPOINT_KEYS <= saved.keys():
        raise RunError(f"{path} is not a checkpoint of this repository (it lacks what every run saves: model, "
                       "optimizer, options, history): move it away, or name another --out-dir.")
    return saved
def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """write(temporary), then rename onto path: a killed run or failed write leaves the old file."""
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        raise RunError(cannot_write(path, error)) from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
def save_text(path: Path, text: str) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))
def save_figure(figure: Figure, path: Path) -> None:
    write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight"))
def save_json(path: Path, value: Any) -> None:
    """Strict JSON: NaN and infinities, which JSON has no words for, as null (read back as None below)."""
    strict = json.loads(json.dumps(value), parse_constant=lambda word: None)
    save_text(path, json.dumps(strict, indent=2, allow_nan=False) + "\n")
def save_torch(path: Path, value: Any) -> None:
    buffer = io.BytesIO()  # serialized in memory first: a failed write is then Python's OSError, naming its cause
    torch.save(value, buffer)
    write_atomically(path, lambda temporary: temporary.write_bytes(buffer.getbuffer()))

def cannot_write(path: Path, error: OSError) -> str:
    causes = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up", errno.EACCES:
              "permission denied", errno.EPERM: "permission denied", errno.EROFS: "the file system is read-only",
              errno.EEXIST: "a file is in the way of a folder", errno.ENOTDIR: "a file is in the way of a folder"}
    return (f"Cannot write {path}: {causes.get(error.errno, error.strerror or type(error).__name__)}. Files written "
            "before are intact; make room or choose another --out-dir, then run again (with --resume to go on from "
            "the last checkpoint).")

# ---- Failures a user can act on: one sentence, an exit status, no traceback ----------------
class RunError(Exception):
    """A failure whose message says what to do: printed as is, exit 1 (or 128 + the signal's number)."""
    exit_status = 1

    def __init__(self, message: str, exit_status: int | None = None) -> None:
        super().__init__(message)
        self.exit_status = exit_status or type(self).exit_status

class UsageError(RunError):
    """An option that cannot work on this machine: exit status 2, like argparse's errors."""
    exit_status = 2
class DataNotFoundError(RunError):
    """The dataset's files are missing and could not be downloaded."""
class NonFiniteLossError(RunError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""
class FolderInUse(RunError):
    """A live run holds the folder."""

OUT_OF_MEMORY = ("Out of memory: try a smaller --batch-size (training) or --eval-batch-size (evaluation), or a "
                 "smaller --resolution in the scripts that have one.")
OUT_OF_MEMORY_SIGNS = ("out of memory", "_ALLOCATION_FAILED", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED",
                       "DefaultCPUAllocator")  # cuDNN 9: CUDNN_STATUS_INTERNAL_ERROR_HOST/DEVICE_ALLOCATION_FAILED

@contextlib.contextmanager
def friendly_errors() -> Iterator[None]:
    """Failures a user can act on as one sentence and a non-zero exit; torchrun's group closed."""
    try:
        yield
    except RunError as error:
        if is_main_process():  # under torchrun every process reaches the same sentence
            print(error, file=sys.stderr)
        raise SystemExit(error.exit_status) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training began
        print("Stopped at once: files written so far are kept; --resume continues from the last checkpoint, if "
              "there is one.", file=sys.stderr)
        raise SystemExit(130) from None
    except RuntimeError as error:  # torch.cuda.OutOfMemoryError is one too; torchinfo wraps what it meets
        if not any(isinstance(cause, torch.cuda.OutOfMemoryError) or any(sign in str(cause) for sign in
                   OUT_OF_MEMORY_SIGNS) for cause in (error, error.__cause__) if cause is not None):
            raise
        if first_to_say("out of memory"):  # the process that ran out may not be the main one
            print(OUT_OF_MEMORY, file=sys.stderr)
        raise SystemExit(1) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

class StopRequest:
    """Ctrl-C (or SIGTERM) sets a flag read between batches; a second stops at once, unless within a second (then it
    is the same keypress, forwarded by torchrun)."""
    def __init__(self) -> None:
        self.requested, self.signal_number, self.first_signal, self.name = False, signal.SIGINT, 0.0, "Ctrl-C"

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if time.monotonic() - self.first_signal > 1.0:
                raise KeyboardInterrupt
            return
        self.requested, self.signal_number, self.first_signal = True, signum, time.monotonic()
        self.name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if is_main_process():
            print(f"\n{self.name}: stopping after this batch (Ctrl-C to stop at once) ...", file=sys.stderr)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        try:
            previous = {number: signal.signal(number, self._handle) for number in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread: signals cannot reach us anyway
            previous = {}
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

def check_losses(batch_losses: Tensor, epoch: int, first_batch: int, stop_requested: bool) -> bool:
    """Raise if a loss is NaN or infinite in any process; return whether all stop here."""
    bad = (~torch.isfinite(batch_losses)).nonzero()
    first_bad = first_batch + int(bad[0]) if len(bad) else math.inf
    flags = all_reduce(torch.tensor([first_bad, -float(stop_requested)], device=batch_losses.device), op="min")
    if math.isfinite(flags[0].item()):
        raise NonFiniteLossError(f"The loss became NaN or infinite in epoch {epoch + 1}, batch "
                                 f"{int(flags[0].item()) + 1}: training stopped.")
    return flags[1].item() < 0

def stop_if_diverged(row: dict[str, Any], record: dict[str, Any], folder: Path, num_classes: int) -> None:
    """Stop if the test loss is not finite or the training loss 10 x a guess's ln(classes): flagged, not saved."""
    chance = math.log(num_classes)
    if math.isfinite(row["test_loss"]) and row["train_loss"] <= 10.0 * chance:
        return
    row["diverged"] = record["diverged"] = True
    save_record(folder, record)
    what = (f"the test loss is {row['test_loss']}" if not math.isfinite(row["test_loss"]) else
            f"the training loss, {row['train_loss']:.3g}, is far above a random guess's {chance:.2f}")
    raise NonFiniteLossError(f"Training diverged in epoch {row['epoch']}: {what}. Training stopped, and the epoch is "
                             f"marked \"diverged\" in {folder / 'metrics.json'}.")

def refuse_lone_samples(model: nn.Module, batches: Batches, args: argparse.Namespace, run: Run) -> None:
    """BatchNorm cannot train on one sample: refuse, taking back what this new run wrote."""
    if batches.smallest() > 1 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    if run.saved is None and is_main_process():
        remove_run_files(run.folder)
    cause, fix = ("--batch-size 1", "--batch-size 2 or more") if args.batch_size == 1 else (
        f"--limit {args.limit}" if args.limit else "so few training samples", "--limit 2 or more per process")
    raise UsageError(f"With {cause} some training batches hold a single sample, and BatchNorm needs at least two "
                     f"to compute its statistics: use {fix}.")

MAX_PIXELS, MAX_SIDE = 89_478_485, 1024  # PIL's own guard against decompression bombs; far more than 28 or 32

def read_image(path: Path) -> Any:
    """An image file as an RGBA PIL image, turned as its EXIF says (phone photos carry their rotation)."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    try:
        Image.MAX_IMAGE_PIXELS, limit = None, Image.MAX_IMAGE_PIXELS  # we say it ourselves, with the size
        with Image.open(path) as opened:
            opened.draft(opened.mode, (MAX_SIDE, MAX_SIDE))  # JPEG only: decoded at 1/2, 1/4 or 1/8 scale
            if opened.width * opened.height > MAX_PIXELS:
                raise RunError(f"{path} is {opened.width} x {opened.height} pixels, more than this reads safely "
                               f"({MAX_PIXELS / 1e6:.0f} million): give a smaller copy of it.")
            image = ImageOps.exif_transpose(opened)
            if image.mode.startswith("I") and image.getextrema()[1] > 255:  # 16 bits a pixel: scale, not clip
                image = image.convert("I").point(lambda value: value / 257)
            image.thumbnail((MAX_SIDE, MAX_SIDE))
            return image.convert("L").convert("RGBA") if image.mode.startswith("I") else image.convert("RGBA")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        reason = "no such file" if isinstance(error, FileNotFoundError) else str(error).split("\n")[0]
        raise RunError(f"Cannot read {path} as an image ({reason}): give PNG or JPEG files.") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit

def open_dataset(name: str, data_dir: Path, train: bool) -> Any:
    """torchvision's dataset from data_dir, downloaded there when missing; one sentence if neither works."""
    cls = TORCHVISION_DATASETS[name]
    if data_dir.exists() and not data_dir.is_dir():
        raise DataNotFoundError(f"--data-dir {data_dir} is a file, not a folder: point it at the folder that holds "
                                f"(or is to hold) the {name} files.")
    folder, files = expected_files(name, data_dir)
    try:
        return cls(str(data_dir), train=train, download=False)
    except PermissionError as error:
        raise DataNotFoundError(f"Cannot read {error.filename or folder}: permission denied. Give yourself read access "
                                "to the dataset's files (chmod -R u+rX on Linux and macOS), or point --data-dir at a "
                                "copy you may read.") from None
    except Exception as error:  # noqa: BLE001 - files missing, or there and unreadable
        if all((folder / file).is_file() for file in files):
            raise DataNotFoundError(_damaged(name, folder, files, error)) from None
    if is_main_process():
        print(f"{name} is not in {folder}: downloading it ...", file=sys.stderr)
    new_folders = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torchvision prints each failed mirror: one sentence is better
            return cls(str(data_dir), train=train, download=True)
    except Exception as error:  # no network, a proxy, a full disk: all end the same way
        missing = [file for file in files if not (folder / file).is_file()] or files
        for path in new_folders:  # leave no empty folders behind from the attempt
            with contextlib.suppress(OSError):
                path.rmdir()
        raise DataNotFoundError(f"Could not find {name}: {', '.join(missing)} missing from {folder.resolve()}, and "
                                f"downloading failed ({type(error).__name__}); put the files there (or point "
                                "--data-dir at a folder that has them), or try --dataset fake for a run without "
                                "data.") from None

def expected_files(name: str, data_dir: Path) -> tuple[Path, list[str]]:
    cls = TORCHVISION_DATASETS[name]
    if issubclass(cls, datasets.MNIST):
        return data_dir / cls.__name__ / "raw", [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
    return data_dir / cls.base_folder, [file for file, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]

def _damaged(name: str, folder: Path, files: Sequence[str], error: Exception) -> str:
    """The sentence for dataset files that are all there but cannot be read: which, and what to do."""
    damaged = [file for file in files if not _readable(name, folder / file)] or list(files)
    one = len(damaged) == 1
    reason = str(error).strip().split("\n")[0] or type(error).__name__
    return (f"The {name} file{'' if one else 's'} {', '.join(str(folder.resolve() / file) for file in damaged)} "
            f"{'is' if one else 'are'} damaged ({reason}): delete {'it' if one else 'them'} and run again to download "
            f"{'it' if one else 'them'} anew, or put {'an intact copy' if one else 'intact copies'} there.")

def _readable(name: str, path: Path) -> bool:
    """Whether one dataset file reads as torchvision expects (CIFAR's: has its md5 sum, so it unpickles)."""
    cls = TORCHVISION_DATASETS[name]
    with contextlib.suppress(Exception):  # whatever a damaged file makes the reader raise
        if issubclass(cls, datasets.MNIST):
            return datasets.mnist.read_sn3_pascalvincent_tensor(str(path), strict=False).numel() > 0
        sums = {**dict(cls.train_list + cls.test_list), cls.meta["filename"]: cls.meta["md5"]}
        return datasets.cifar.check_integrity(str(path), sums[path.name])
    return False
