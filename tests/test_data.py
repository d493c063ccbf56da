"""The data path: torchvision's real loaders on files written here, batches, augmentation."""

from __future__ import annotations

import math

import pytest
import torch

import cifar_dilated_dw
import utils
from conftest import run_script, write_mnist


# --- loading through torchvision, offline --------------------------------------------------


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_mnist_family_loads_through_torchvision_from_idx_files(tmp_path, name, folder):
    written = write_mnist(tmp_path, folder, train=40, test=20)
    data = utils.load_data(name, tmp_path)
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape == (40, 1, 28, 28)
    assert torch.equal(data.train_images[:, 0], written["train"][0])
    assert torch.equal(data.train_labels, written["train"][1])
    assert torch.equal(data.test_images[:, 0], written["t10k"][0])
    assert data.classes == list(utils.TORCHVISION_DATASETS[name].classes)


def test_normalization_statistics_come_from_the_training_split(tmp_path):
    written = write_mnist(tmp_path, train=40, test=20)
    data = utils.load_data("mnist", tmp_path)
    pixels = written["train"][0].double() / 255
    assert data.mean.item() == pytest.approx(pixels.mean().item(), abs=1e-6)
    assert data.std.item() == pytest.approx(pixels.std(unbiased=False).item(), abs=1e-6)


def test_limit_keeps_the_first_samples_of_each_split(tmp_path):
    written = write_mnist(tmp_path, train=40, test=20)
    data = utils.load_data("mnist", tmp_path, limit=7)
    assert len(data.train_labels) == 7 and len(data.test_labels) == 7
    assert torch.equal(data.train_images[:, 0], written["train"][0][:7])
    assert torch.equal(data.test_labels, written["t10k"][1][:7])


def test_fake_data_has_the_shape_of_the_real_one():
    data = utils.load_data("fake", "unused", limit=12, fake_like="mnist")
    assert data.train_images.shape == (12, 1, 28, 28) and data.train_images.dtype == torch.uint8
    assert data.num_classes == 10
    assert not torch.equal(data.train_images, data.test_images), "train and test must be different samples"


def test_missing_files_and_no_network_give_one_sentence(tmp_path, no_network):
    with pytest.raises(utils.DataNotFoundError) as error:
        utils.load_data("mnist", tmp_path / "empty")
    message = str(error.value)
    assert "train-images-idx3-ubyte" in message and "t10k-labels-idx1-ubyte" in message
    assert str((tmp_path / "empty" / "MNIST" / "raw").resolve()) in message
    assert "--data-dir" in message and "--dataset fake" in message


def test_a_script_without_data_exits_1_without_traceback(tmp_path):
    result = run_script("lenet.py", "--data-dir", str(tmp_path / "nothing"), "--epochs", "1", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "Could not find mnist" in result.stderr and "--dataset fake" in result.stderr
    assert not (tmp_path / "runs" / "lenet" / "metrics.json").exists()


# --- batches cut from memory ---------------------------------------------------------------


def make_batches(count: int = 50, batch_size: int = 8, **options) -> utils.Batches:
    images = torch.arange(count, dtype=torch.uint8).view(count, 1, 1, 1).expand(count, 1, 4, 4).contiguous()
    labels = torch.arange(count)
    return utils.Batches(images, labels, torch.zeros(1), torch.ones(1), batch_size, **options)


def visited(batches: utils.Batches, epoch: int = 0) -> list[int]:
    return [int(label) for _, labels in batches.epoch(epoch) for label in labels]


def test_an_epoch_visits_every_sample_once_in_even_batches():
    batches = make_batches(50, 8, shuffle=True, seed=3)
    order = visited(batches)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    sizes = [len(labels) for _, labels in batches.epoch(0)]
    assert len(sizes) == len(batches) == math.ceil(50 / 8)
    assert max(sizes) <= 8 and max(sizes) - min(sizes) <= 1, "no tiny last batch"


def test_the_order_depends_on_seed_and_epoch_only():
    assert visited(make_batches(shuffle=True, seed=3), 1) == visited(make_batches(shuffle=True, seed=3), 1)
    assert visited(make_batches(shuffle=True, seed=3), 0) != visited(make_batches(shuffle=True, seed=3), 1)
    assert visited(make_batches(shuffle=True, seed=3), 0) != visited(make_batches(shuffle=True, seed=4), 0)


def test_starting_part_way_skips_exactly_the_batches_done():
    batches = make_batches(shuffle=True, seed=3)
    all_batches = [labels.tolist() for _, labels in batches.epoch(2)]
    assert [labels.tolist() for _, labels in batches.epoch(2, start=4)] == all_batches[4:]


def test_processes_share_an_epoch_without_overlap():
    shards = [visited(make_batches(51, 8, shuffle=True, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(51))
    counts = [len(make_batches(51, 8, shuffle=True, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert counts[0] == counts[1], "every process must take the same number of steps"


def test_batches_are_normalized_floats_with_their_own_labels():
    images = torch.arange(20, dtype=torch.uint8).mul(10).view(20, 1, 1, 1).expand(20, 1, 6, 6).contiguous()
    mean, std = torch.tensor([0.5]), torch.tensor([0.25])
    batches = utils.Batches(images, torch.arange(20), mean, std, 6, shuffle=True, augment=utils.random_hflip)
    for batch, labels in batches:
        assert batch.dtype == torch.float32 and batch.shape[1:] == (1, 6, 6)
        # every image is one flat value, 10 * its label: flips keep it, normalization is undone here
        values = ((batch * 0.25 + 0.5) * 255).round()
        assert torch.equal(values.amax(dim=(1, 2, 3)), labels.float() * 10)


# --- augmentation on whole batches ---------------------------------------------------------


def distinct_images() -> torch.Tensor:
    """64 copies of one image whose pixels are all different (so each transform is visible)."""
    image = torch.arange(1, 1 + 3 * 10 * 10, dtype=torch.float32).view(3, 10, 10) / 301
    return image.expand(64, 3, 10, 10).contiguous()


def test_random_crop_cuts_a_shifted_window_of_the_padded_image_per_sample():
    images = distinct_images()
    cropped = utils.random_crop(images, padding=2)
    assert cropped.shape == images.shape
    padded = torch.nn.functional.pad(images[0], (2, 2, 2, 2))
    offsets = set()
    for sample in cropped:
        matches = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(sample, padded[:, dy:dy + 10, dx:dx + 10])]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 5, "each sample must draw its own offset"


def test_random_hflip_mirrors_some_samples_and_keeps_the_others():
    images = distinct_images()
    flipped = utils.random_hflip(images)
    mirrored = [torch.equal(sample, images[0].flip(-1)) for sample in flipped]
    kept = [torch.equal(sample, images[0]) for sample in flipped]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert any(mirrored) and any(kept)


def test_random_affine_turns_each_sample_by_its_own_angle():
    images = distinct_images()
    rotated = utils.random_affine(images, degrees=15)
    assert rotated.shape == images.shape
    assert len({tuple(sample.flatten()[:50].tolist()) for sample in rotated}) > 50
    assert torch.allclose(utils.random_affine(images, degrees=0), images, atol=1e-5)


def test_cutout_zeroes_one_square_per_sample():
    images = torch.ones(64, 3, 32, 32)
    cut = cifar_dilated_dw.cutout(images, size=16)
    corners = set()
    for sample in cut:
        zeros = (sample == 0).all(dim=0).nonzero()
        assert len(zeros) == 16 * 16
        (top, left), (bottom, right) = zeros.min(dim=0).values.tolist(), zeros.max(dim=0).values.tolist()
        assert (bottom - top + 1, right - left + 1) == (16, 16), "the zeros must form one square"
        assert (sample[:, top:bottom + 1, left:right + 1] == 0).all()
        corners.add((top, left))
    assert len(corners) > 10, "each sample must draw its own square"


def test_augmentation_keeps_labels_through_the_batches(tmp_path):
    write_mnist(tmp_path, train=40, test=20)
    data = utils.load_data("mnist", tmp_path)
    batches = data.train_batches(16, augment=lambda x: utils.random_affine(utils.random_crop(x, 2), 10))
    seen = torch.cat([labels for _, labels in batches])
    assert sorted(seen.tolist()) == sorted(data.train_labels.tolist())


def test_expected_files_name_what_torchvision_reads():
    folder, files = utils.expected_files("mnist", utils.Path("d"))
    assert folder == utils.Path("d/MNIST/raw") and "train-images-idx3-ubyte" in files and len(files) == 4
    folder, files = utils.expected_files("cifar10", utils.Path("d"))
    assert folder.name == "cifar-10-batches-py" and "data_batch_5" in files and "test_batch" in files
