"""Shared fixtures: the repository on sys.path, tiny dataset files written offline, helpers."""

from __future__ import annotations

import importlib
import json
import signal
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import utils  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# .ci/run sets it: there the optional packages and the browser are installed, so a test that needs
# them fails where it would be skipped on a user's machine that lacks them.
REQUIRE_OPTIONAL = bool(os.environ.get("REQUIRE_OPTIONAL_PACKAGES"))


def optional(module: str, install: str):
    """Import an optional package for a test, or skip the test where it is missing (not in CI)."""
    if REQUIRE_OPTIONAL:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"optional, not installed here: {install}")


def write_idx(path: Path, values: torch.Tensor) -> None:
    """Write a uint8 tensor in the IDX format of the original MNIST files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">I", 0x0800 + values.ndim) + b"".join(struct.pack(">I", size) for size in values.shape)
    path.write_bytes(header + values.to(torch.uint8).contiguous().numpy().tobytes())


def write_mnist(root: Path, folder: str = "MNIST", train: int = 96, test: int = 48, seed: int = 0) -> dict:
    """Tiny MNIST-format files under root/folder/raw, as torchvision reads them."""
    generator = torch.Generator().manual_seed(seed)
    splits = {}
    for prefix, count in (("train", train), ("t10k", test)):
        images = torch.randint(0, 256, (count, 28, 28), generator=generator, dtype=torch.uint8)
        labels = torch.arange(count) % 10
        write_idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", labels)
        splits[prefix] = (images, labels)
    return splits


def write_cifar10(root: Path, per_batch: int = 8, test: int = 16, seed: int = 0) -> dict:
    """A tiny cifar-10-batches-py folder: the five training pickles, the test pickle and the meta."""
    generator = torch.Generator().manual_seed(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    splits = {}
    names = [f"data_batch_{index}" for index in range(1, 6)] + ["test_batch"]
    for name in names:
        count = test if name == "test_batch" else per_batch
        data = torch.randint(0, 256, (count, 3 * 32 * 32), generator=generator, dtype=torch.uint8)
        labels = [int(label) for label in torch.randint(0, 10, (count,), generator=generator)]
        with open(folder / name, "wb") as file:
            pickle.dump({"data": data.numpy(), "labels": labels}, file)
        splits[name] = (data.view(count, 3, 32, 32), torch.tensor(labels))
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": classes}, file)
    return splits


@pytest.fixture(autouse=True)
def cpus_without_bfloat16(monkeypatch):
    """In-process runs answer as on a CPU without bfloat16 instructions, so that results do not depend on the
    host (mnist_8k would train in bfloat16 on one that has them); the precision tests simulate both kinds."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {}, raising=False)


@pytest.fixture
def skip_md5(monkeypatch):
    """Our fixture files cannot match the real CIFAR md5 sums: check that the files exist instead."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path))


@pytest.fixture
def no_network(monkeypatch):
    """Make every download fail at once, as on a machine without network."""
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled by the test")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def offline_env() -> dict[str, str]:
    """Environment for a subprocess whose downloads must fail fast, network or not."""
    env = {key: value for key, value in os.environ.items() if key.lower() != "no_proxy"}
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused
    env.update(http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead, HTTPS_PROXY=dead, PYTHONUNBUFFERED="1")
    return env


def run_script(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `python SCRIPT.py ARGS` as a user would, offline."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd, env=offline_env(), capture_output=True, text=True, timeout=300,
    )


def read_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path.name} was not written"
    assert path.read_bytes()[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert path.stat().st_size > 2000, f"{path.name} is nearly empty"


EPOCH_KEYS = {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds", "images_per_second"}
RECORD_KEYS = {"script", "variant", "dataset", "params", "device", "args", "epochs", "final_test_acc", "best_test_acc"}
STANDARD_PLOTS = ("samples", "curves", "predictions", "misclassified", "confusion_matrix")


def assert_run_folder(folder: Path, record: dict, epochs: int) -> None:
    """What docs/design.md promises of a run folder, checked against the record main() returned."""
    saved = read_metrics(folder)
    assert saved == json.loads(json.dumps(record)), "main() must return what it wrote to metrics.json"
    assert RECORD_KEYS <= saved.keys()
    assert len(saved["epochs"]) == epochs
    for row in saved["epochs"]:
        assert EPOCH_KEYS <= row.keys()
        assert 0.0 <= row["test_acc"] <= 100.0 and 0.0 <= row["train_acc"] <= 100.0
        assert row["seconds"] > 0 and row["images_per_second"] > 0
    assert saved["final_test_acc"] == saved["epochs"][-1]["test_acc"]
    assert saved["best_test_acc"] == max(row["test_acc"] for row in saved["epochs"])
    assert f"Total params: {saved['params']:,}" in (folder / "summary.txt").read_text()
    checkpoint = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert checkpoint["epoch"] == epochs
    for name in STANDARD_PLOTS:
        assert_png(folder / f"{name}.png")


def interrupt_after(monkeypatch, batches: int, signal_number: int = signal.SIGINT) -> None:
    """Press Ctrl-C (a real SIGINT, or another signal) once `batches` training batches have been handed out."""
    original = utils.Batches.epoch
    handed_out = {"count": 0}

    def epoch(self, epoch=0, start=0):
        for item in original(self, epoch, start):
            yield item
            if self.shuffle:
                handed_out["count"] += 1
                if handed_out["count"] == batches:
                    signal.raise_signal(signal_number)

    monkeypatch.setattr(utils.Batches, "epoch", epoch)
