"""The GPU check: every script trains for one epoch on the GPU here, eager and compiled.

What the test suite proves on the CPU by simulating the hardware (the precision per compute
capability, no float64 on the device, the start line, ...), this proves on a real GPU: CUDA or
Apple's MPS. Not part of the pytest suite; run it wherever a GPU exists:

    python -m tests.gpu_smoke            # every script, eager and --compile, + one zoo model at 224 pixels
    python -m tests.gpu_smoke --quick    # eager only

It prints one table row per run (script, options, device, precision, images/s, pass or fail) and
exits 1 if any run failed. On a machine without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--dataset", "fake", "--limit", "512", "--epochs", "1"]
# (script, extra options): each script with its default variant, the architectures' smallest.
RUNS = [
    ("lenet", []),
    ("mnist_8k", []),
    ("mnist_ablation", ["--variant", "all"]),
    ("cifar_norms", ["--variant", "all"]),
    ("cifar_dilated_dw", []),
    ("vgg", ["--variant", "11"]),
    ("inceptionnet", []),
    ("resnet", ["--variant", "18"]),
    ("efficientnet", ["--variant", "b0"]),
]
# The original ImageNet-shaped network on upsampled images: the sizes that run out of memory first.
LARGE = ("resnet", ["--variant", "50", "--resolution", "224", "--limit", "256"])


def gpu_kind() -> str | None:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return None


def run(command: list[str], folder: Path, timeout: int) -> tuple[bool, float, str]:
    """Run a command as a user would; (succeeded, seconds, the end of its output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    began = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, time.perf_counter() - began, f"timed out after {timeout} s"
    output = (result.stdout + result.stderr)[-2000:]
    return result.returncode == 0, time.perf_counter() - began, output


def records(folder: Path) -> list[dict]:
    """The per-model records of a run folder (one, or one per variant after --variant all)."""
    saved = json.loads((folder / "metrics.json").read_text())
    return list(saved["variants"].values()) if "variants" in saved else [saved]


def check(folder: Path, kind: str) -> tuple[str, str, float, str]:
    """(device, precision, images/s, problem or '') from what the run wrote."""
    rows = records(folder)
    device = rows[0]["device"]
    precision = rows[0].get("precision", "?")
    speed = min(row["epochs"][-1]["images_per_second"] for row in rows)
    problem = ""
    if not device.startswith(kind):
        problem = f"trained on {device}, not {kind}"
    elif any(not row["epochs"] or row["epochs"][-1]["test_loss"] is None for row in rows):
        problem = "no finite test loss"
    return device, precision, speed, problem


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plan(args: argparse.Namespace, kind: str) -> list[tuple[str, list[str], list[str]]]:
    """(name, command prefix, options) for every run to make."""
    python = [sys.executable]
    runs = []
    for script, extra in RUNS:
        for compiled in ([False] if args.quick else [False, True]):
            options = [*SMOKE, *extra, *(["--compile"] if compiled else [])]
            runs.append((script, [*python, str(ROOT / f"{script}.py")], options))
    script, extra = LARGE
    runs.append((script, [*python, str(ROOT / f"{script}.py")], [*SMOKE, *extra]))
    if kind == "cuda" and torch.cuda.device_count() >= 2:
        torchrun = [*python, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                    f"--master_port={free_port()}"]
        runs.append(("mnist_8k", [*torchrun, str(ROOT / "mnist_8k.py")], [*SMOKE, "--batch-size", "64"]))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="eager runs only, no --compile")
    parser.add_argument("--timeout", type=int, default=900, help="seconds each run may take")
    args = parser.parse_args(argv)
    kind = gpu_kind()
    if kind is None:
        print("No GPU here: PyTorch sees neither CUDA nor MPS, so there is nothing for this check to prove "
              "(the test suite covers the CPU).")
        return 0
    name = torch.cuda.get_device_name(0) if kind == "cuda" else "Apple GPU (MPS)"
    print(f"GPU check on {name}, PyTorch {torch.__version__}\n")
    print("| script | options | device | precision | images/s | result |")
    print("| --- | --- | --- | --- | ---: | --- |")
    failures = 0
    with tempfile.TemporaryDirectory() as scratch:
        for index, (script, command, options) in enumerate(plan(args, kind)):
            folder = Path(scratch) / f"{index:02d}-{script}"
            succeeded, seconds, output = run([*command, *options, "--out-dir", str(folder)], Path(scratch),
                                             args.timeout)
            shown = " ".join(option for option in options if option not in SMOKE) or "defaults"
            if "torch.distributed.run" in command:
                shown = f"torchrun x2, {shown}"
            device, precision, speed, problem = "?", "?", 0.0, ""
            if succeeded:
                device, precision, speed, problem = check(folder, kind)
            result = "pass" if succeeded and not problem else "FAIL"
            print(f"| {script} | {shown} | {device} | {precision} | {speed:,.0f} | {result} ({seconds:.0f} s) |",
                  flush=True)
            if result == "FAIL":
                failures += 1
                print(problem or output, file=sys.stderr)
    print(f"\n{failures} of the runs failed." if failures else "\nEvery run passed.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
