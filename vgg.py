"""VGG 11/13/16/19 with BatchNorm on CIFAR-10.

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition",
ICLR 2015: nothing but 3x3 convolutions and 2x2 max-pooling, stacked deep. Two 3x3 layers see
as far as one 5x5 with fewer weights and one more non-linearity. BatchNorm after every
convolution (Ioffe and Szegedy, 2015) is what lets the deep variants train from scratch.

    python vgg.py --variant 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

import utils

SCRIPT = "vgg"
VARIANTS = ("11", "13", "16", "19")
DATASETS = ("cifar10", "cifar100", "fake")
# The original network halves the image five times: from 32 pixels on, a map of at least 1x1 is left.
SMALLEST_RESOLUTION = 32
# How the embeddings are drawn says nothing about how the network trained: a resume may change it.
MAY_CHANGE_ON_RESUME = ("embedding",)

# Configurations A, B, D and E of the paper's Table 1: output channels of each 3x3 convolution,
# "M" for a 2x2 max-pool.
CONFIGURATIONS: dict[str, list[int | str]] = {
    "11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_features(configuration: list[int | str]) -> nn.Sequential:
    """The convolutional part: 3x3 convolution, BatchNorm, ReLU per number; max-pool per "M"."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in configuration:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(item), kernel_size=3, padding=1),
                       nn.BatchNorm2d(int(item)), nn.ReLU(inplace=True)]
            in_channels = int(item)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """Features, then the classifier.

    With imagenet=True the classifier is the paper's: 7x7x512 -> 4096 -> 4096 -> classes with
    dropout, for 224x224 input (torchvision's vgg*_bn). Otherwise, as for CIFAR: the five pools
    leave a 32x32 image 1x1x512, and one linear layer 512 -> classes suffices; the two 4096-wide
    layers would hold over 100 million of the weights and mostly memorize 50,000 images.
    """

    def __init__(self, features: nn.Sequential, num_classes: int = 10, imagenet: bool = False) -> None:
        super().__init__()
        self.features = features
        if imagenet:
            self.avgpool: nn.Module = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
                nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
                nn.Linear(4096, num_classes),
            )
        else:
            self.avgpool = nn.AdaptiveAvgPool2d(1)  # 1x1 already at 32x32; keeps larger inputs working
            self.classifier = nn.Sequential(nn.Linear(512, num_classes))
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def gradcam_layer(variant: str) -> str:
    """The layer Grad-CAM explains: the features' last ReLU, the last map with a spatial extent
    (2x2 at 32 pixels, 14x14 at 224). Each number of a configuration makes three modules
    (convolution, BatchNorm, ReLU), each "M" one, and the last "M" ends the features."""
    configuration = CONFIGURATIONS[variant]
    return f"features.{len(configuration) + 2 * sum(item != 'M' for item in configuration) - 2}"


def build_model(variant: str = "16", num_classes: int = 10, imagenet: bool = False) -> nn.Module:
    """VGG-`variant` with BatchNorm; imagenet=True gives the original 224x224 network."""
    if variant not in CONFIGURATIONS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    return VGG(make_features(CONFIGURATIONS[variant]), num_classes, imagenet)


def augment(images: Tensor) -> Tensor:
    # 4-pixel shifts and mirror images: the standard CIFAR augmentation.
    return utils.random_hflip(utils.random_crop(images, padding=4))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = utils.build_parser(
        __doc__, script=SCRIPT, datasets=DATASETS, epochs=30, batch_size=128, lr=0.05,
        variants=VARIANTS, default_variant="16", smallest_resolution=SMALLEST_RESOLUTION,
    )
    parser.add_argument("--embedding", choices=("pca", "tsne"), default="pca",
                        help="how to draw the penultimate-layer features (t-SNE needs scikit-learn)")
    return parser.parse_args(argv)


def train_variant(variant: str, run: utils.Run, data: utils.ImageData, args: argparse.Namespace,
                  device: torch.device) -> dict:
    """Train one VGG with the shared recipe; return its metrics record."""
    utils.seed_everything(args.seed)
    model = utils.to_device(build_model(variant, data.num_classes, imagenet=args.resolution is not None), device)
    if utils.examines(args):
        return utils.examine(model, data, run, args, gradcam_layer(variant))
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
    utils.save_standard_plots(data, record, result.predictions, run.folder, model=model, explain=gradcam_layer(variant),
                              resize=args.resolution)
    if utils.is_main_process():
        first_convolutions = [m for m in model.features if isinstance(m, nn.ReLU)][:2]
        for index, layer in enumerate(first_convolutions, start=1):
            utils.plot_feature_maps(model, layer, data, run.folder / f"feature_maps_conv{index}.png",
                                    resize=args.resolution)
        # Batches as large as evaluation's, in its precision: what fitted during training fits here.
        plot_embeddings(model, model.classifier[-1], data, run.folder / "embeddings.png", method=args.embedding,
                        resize=args.resolution, batch_size=utils.eval_batch_size(args, args.resolution or 32),
                        precision=utils.choose_precision(device, args.amp, args.cpu_bf16))
    return record


def embeddings(model: nn.Module, layer: nn.Module, batches: utils.Batches, limit: int = 2000,
               precision: torch.dtype | None = None) -> Tensor:
    """The inputs of `layer` (the last classifier) for the first `limit` samples, flattened."""
    captured: list[Tensor] = []
    hook = layer.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].detach().flatten(1)))
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for images, _ in batches:
                with torch.autocast(images.device.type, dtype=precision, enabled=precision is not None):
                    model(images)
                seen += len(images)
                if seen >= limit:
                    break
    finally:
        hook.remove()
    return torch.cat(captured)[:limit].float().cpu()


def project_2d(features: Tensor, method: str = "pca") -> tuple[Tensor, str]:
    """Two coordinates per row: PCA via torch, or t-SNE when scikit-learn is installed."""
    if method == "tsne":
        try:
            from sklearn.manifold import TSNE
        except ImportError:
            print("t-SNE needs scikit-learn (pip install scikit-learn); drawing PCA instead.", file=sys.stderr)
        else:
            points = TSNE(n_components=2, init="pca", random_state=0).fit_transform(features.numpy())
            return torch.from_numpy(points), "t-SNE"
    centered = features - features.mean(dim=0)
    _, _, components = torch.linalg.svd(centered, full_matrices=False)
    return centered @ components[:2].T, "PCA"


def plot_embeddings(model: nn.Module, layer: nn.Module, data: utils.ImageData, path: Path, method: str = "pca",
                    limit: int = 2000, resize: int | None = None, batch_size: int = 250,
                    precision: torch.dtype | None = None) -> None:
    """Test samples placed by their penultimate-layer features, colored by class."""
    batches = data.test_batches(batch_size, resize=resize)
    points, name = project_2d(embeddings(model, layer, batches, limit, precision), method)
    labels = data.test_labels[: len(points)].cpu()
    figure = Figure(figsize=(8, 7))
    axis = figure.add_subplot(1, 1, 1)
    colours = "tab10" if data.num_classes <= 10 else "tab20"
    scatter = axis.scatter(points[:, 0].numpy(), points[:, 1].numpy(), c=labels.numpy(), cmap=colours, s=6, alpha=0.7)
    if data.num_classes <= 20:
        handles, _ = scatter.legend_elements(num=data.num_classes)
        axis.legend(handles, data.classes, fontsize=7, loc="best", markerscale=1)
    axis.set_title(f"penultimate-layer features of {len(points)} test images ({name})")
    utils.save_figure(figure, path)


def main(argv: list[str] | None = None) -> dict:
    """Train one VGG or all four, write the run folders and return the metrics record."""
    args = parse_args(argv)
    with utils.friendly_errors():
        device = utils.prepare(args)
        with utils.open_run(args, SCRIPT, device, VARIANTS, may_change=MAY_CHANGE_ON_RESUME) as run:
            data = utils.load_run_data(args, run, device, fake_like="cifar10")
            record = utils.train_runs(
                run, args, lambda variant, variant_run: train_variant(variant, variant_run, data, args, device))
    return record


if __name__ == "__main__":
    main()
