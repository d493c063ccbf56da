"""The GPU check: the paths the CPU suite can only simulate, run for real on the GPU here.

What the test suite proves on the CPU by simulating the hardware's answers (the precision per
compute capability, the loss scaler's checkpoint, no float64 on the device, the start line, ...),
this runs on a real GPU (CUDA or Apple's MPS). Not part of the pytest suite; two commands of a few
minutes each:

    python -m tests.gpu_smoke --quick      # eager: every script, --amp fp16 and off, uneven batches,
                                           # Ctrl-C and --resume, --evaluate, --predict, --find-lr,
                                           # --variant all, batch 128 against 512, ResNet-50 at 224 px
    python -m tests.gpu_smoke --compiled   # every script under --compile, each within --timeout

(no option: both). Each row runs a script as a user would, in a child process that also reports
the GPU's peak memory and how many graphs torch.compile made. A row passes when it exits as
expected and what it wrote says what was asked: metrics.json and the PNGs, the device, the
precision its start line names, compiled graphs that ran (no silent fall-back to eager), and,
for a resumed or evaluated run, the numbers of the run it continues (to rounding: cuDNN's
autotuned kernels are not deterministic). images/s is epoch 2's, after warm-up and compilation.
It prints one table row per run and exits 1 if any failed. On a machine without a GPU it says so
and exits 0 (`--device cpu` runs the rows on the CPU instead, to check this file itself).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [("lenet", []), ("mnist_8k", []), ("mnist_ablation", ["--variant", "all"]),
           ("cifar_norms", ["--variant", "all"]), ("cifar_dilated_dw", []), ("vgg", ["--variant", "11"]),
           ("inceptionnet", []), ("resnet", ["--variant", "18"]), ("efficientnet", ["--variant", "b0"])]
PLOTS = ("samples", "curves", "predictions", "misclassified", "confusion_matrix", "gradcam")


@dataclass
class Row:
    """One run: a script with options, what it must leave behind, and what came of it."""
    name: str
    script: str
    options: list[str]
    expect_exit: int = 0
    folder_of: str | None = None  # run in the folder of this earlier row (--resume, --evaluate, ...)
    writes: tuple[str, ...] = PLOTS
    compiled: bool = False
    interrupt_after: int | None = None  # batches, then a real SIGINT
    same_as: str | None = None  # its final numbers must be this row's, to rounding
    torchrun: bool = False
    result: dict = field(default_factory=dict)


def quick_rows(limit: int) -> list[Row]:
    smoke = ["--dataset", "fake", "--limit", str(limit), "--epochs", "2"]
    rows = [Row(f"{script} {' '.join(extra)}".strip(), script, [*smoke, *extra]) for script, extra in SCRIPTS]
    rows += [
        Row("lenet --amp fp16 (the gradient scaler)", "lenet", [*smoke, "--amp", "fp16"]),
        Row("lenet --amp off (TF32 matmuls)", "lenet", [*smoke, "--amp", "off"]),
        Row("mnist_8k, uneven last batch", "mnist_8k", [*smoke, "--limit", str(limit - 2)]),
        # Ctrl-C after 5 batches: the run stops after the sixth, part-way through an epoch of 4 or more batches;
        # resumed, it ends as the run that never stopped.
        Row("resnet 18, batch 16", "resnet", [*smoke, "--variant", "18", "--batch-size", "16"]),
        Row("resnet 18, batch 16, Ctrl-C", "resnet", [*smoke, "--variant", "18", "--batch-size", "16"],
            expect_exit=130, writes=(), interrupt_after=5),
        Row("resnet 18, batch 16, --resume", "resnet", [*smoke, "--variant", "18", "--batch-size", "16", "--resume"],
            folder_of="resnet 18, batch 16, Ctrl-C", same_as="resnet 18, batch 16"),
        Row("resnet 18, --evaluate", "resnet", ["--variant", "18", "--evaluate"], folder_of="resnet --variant 18",
            same_as="resnet --variant 18"),
        Row("resnet 18, --predict", "resnet", ["--variant", "18", "--predict", "IMAGE"],
            folder_of="resnet --variant 18", writes=("predictions_own",)),
        Row("lenet --find-lr", "lenet", [*smoke, "--find-lr"], writes=("lr_finder",)),
        Row("launch-bound? mnist_8k batch 128", "mnist_8k", [*smoke, "--limit", "8192", "--batch-size", "128"]),
        Row("launch-bound? mnist_8k batch 512", "mnist_8k", [*smoke, "--limit", "8192", "--batch-size", "512"]),
        Row("resnet 50 at 224 px", "resnet", [*smoke, "--variant", "50", "--resolution", "224", "--limit", "256"]),
    ]
    if torch.cuda.device_count() >= 2:
        rows.append(Row("mnist_8k, torchrun x2 (NCCL)", "mnist_8k", [*smoke, "--batch-size", "64"], torchrun=True))
    return rows


def compiled_rows(limit: int) -> list[Row]:
    smoke = ["--dataset", "fake", "--limit", str(limit), "--epochs", "2", "--compile"]
    return [Row(f"{script} {' '.join(extra)} --compile".replace("  ", " "), script, [*smoke, *extra], compiled=True)
            for script, extra in SCRIPTS]


def child(argv: list[str]) -> int:
    """Run one script's main() in this process; write the exit status, peak memory and graphs made."""
    report, script, interrupt, *options = argv
    sys.path.insert(0, str(ROOT))
    module, utils = importlib.import_module(script), importlib.import_module("utils")
    if int(interrupt):  # Ctrl-C once that many training batches were handed out, as a user would press it
        original, handed_out = utils.Batches.epoch, [0]

        def epoch(self, epoch=0, start=0):
            for item in original(self, epoch, start):
                yield item
                handed_out[0] += self.shuffle
                if handed_out[0] == int(interrupt):
                    signal.raise_signal(signal.SIGINT)

        utils.Batches.epoch = epoch
    status = 0
    try:
        module.main(options)
    except SystemExit as stopped:
        status = stopped.code if isinstance(stopped.code, int) else 1
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = torch.mps.driver_allocated_memory() if torch.backends.mps.is_available() else 0
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    Path(report).write_text(json.dumps({"status": status, "peak_mb": peak / 2**20, "graphs": graphs}))
    return status


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(row: Row, folder: Path, scratch: Path, device: str, timeout: int) -> tuple[str, str]:
    """Run the row; (what it printed, a problem or '')."""
    options = [str(scratch / "digit.png") if option == "IMAGE" else option for option in row.options]
    options += ["--out-dir", str(folder), "--device", device]
    report = folder.with_suffix(".json")
    if row.torchrun:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}", str(ROOT / f"{row.script}.py"), *options]
    else:
        command = [sys.executable, "-m", "tests.gpu_smoke", "--child", str(report), row.script,
                   str(row.interrupt_after or 0), *options]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return "", f"timed out after {timeout} s"
    output = done.stdout + done.stderr
    row.result = json.loads(report.read_text()) if report.exists() else {"status": done.returncode}
    if done.returncode != row.expect_exit:
        return output, f"exit status {done.returncode}, not {row.expect_exit}"
    return output, ""


def records(folder: Path) -> list[dict]:
    saved = json.loads((folder / "metrics.json").read_text())
    return list(saved["variants"].values()) if "variants" in saved else [saved]


def asked_precision(row: Row, device: str) -> str:
    """The precision a row asks for with --amp, else the one --amp auto picks for its script on this device."""
    import utils

    amp = row.options[row.options.index("--amp") + 1] if "--amp" in row.options else "auto"
    cpu_bf16 = importlib.import_module(row.script).parse_args([]).cpu_bf16  # a script's own choice on CPUs
    return utils.precision_name(utils.choose_precision(torch.device(device), amp, cpu_bf16))


def check(row: Row, folder: Path, output: str, device: str, precision: str, rows: dict[str, Row]) -> str:
    """What is wrong with what the row wrote ('' if nothing); `precision`: the one the row asks for."""
    if row.expect_exit:
        saved = torch.load(folder / "checkpoint.pt", weights_only=True)
        return "" if saved["batch"] > 0 else "the stop left no mid-epoch checkpoint"
    questions = "--find-lr" in row.options or "--predict" in row.options  # they write a PNG, no metrics
    folders = [] if questions else [folder / name for name in json.loads((folder / "metrics.json").read_text()).get(
        "variants", {})]
    missing = [f"{path.name}/{name}.png" for path in folders or [folder] for name in row.writes
               if not (path / f"{name}.png").is_file()]
    if missing or questions:
        return f"missing {', '.join(missing)}" if missing else ""
    start = next((line for line in output.splitlines() if line.startswith(("Training on", "Evaluating on"))), "")
    where = "the CPU" if device == "cpu" else device
    if not start.startswith(("Training on " + where, "Evaluating on " + where)):
        return f"the start line names another device: {start!r}"
    if precision not in start:
        return f"the start line names another precision than {precision}: {start!r}"
    saved = records(folder)
    if any(record["device"].split(":")[0] != device for record in saved):
        return f"trained on {saved[0]['device']}"
    if row.compiled and not row.result.get("graphs"):
        return "torch.compile made no graph: the model ran eager"
    if row.same_as:
        theirs = records(rows[row.same_as].result["folder"])[-1]
        mine = saved[-1]
        if "--evaluate" in row.options:
            mine = {"final_test_acc": mine["evaluation"]["test_acc"],
                    "epochs": [{"test_loss": mine["evaluation"]["test_loss"]}]}
        if abs(mine["final_test_acc"] - theirs["final_test_acc"]) > 1.0 or abs(
                mine["epochs"][-1]["test_loss"] - theirs["epochs"][-1]["test_loss"]) > 0.02 * abs(
                theirs["epochs"][-1]["test_loss"]):
            return (f"test accuracy {mine['final_test_acc']:.2f} %, loss {mine['epochs'][-1]['test_loss']:.4f}; the "
                    f"run it continues: {theirs['final_test_acc']:.2f} %, {theirs['epochs'][-1]['test_loss']:.4f}")
    return ""


def speed(folder: Path) -> float:
    try:
        return min(record["epochs"][-1]["images_per_second"] for record in records(folder))
    except (OSError, KeyError, IndexError, ValueError):
        return 0.0


def write_digit(path: Path) -> None:
    """A picture to --predict on: a white stroke on black, as a user's photo of a digit would become."""
    from PIL import Image, ImageDraw

    image = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(image).line([(32, 10), (32, 54)], fill=255, width=6)
    image.save(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the eager rows only")
    which.add_argument("--compiled", action="store_true", help="the --compile rows only")
    parser.add_argument("--timeout", type=int, default=240, help="seconds each run may take")
    parser.add_argument("--limit", type=int, default=512, help="fake images per split in most rows")
    parser.add_argument("--only", default="", metavar="TEXT", help="only the rows whose name holds TEXT")
    parser.add_argument("--device", choices=("auto", "cuda", "mps", "cpu"), default="auto",
                        help="where to run ('cpu': the rows on the CPU, to check this file)")
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else None
    if device is None:
        print("No GPU here: PyTorch sees neither CUDA nor MPS, so there is nothing for this check to prove "
              "(the test suite covers the CPU).")
        return 0
    sys.path.insert(0, str(ROOT))
    import utils

    precision = utils.precision_name(utils.choose_precision(torch.device(device), "auto"))
    name = torch.cuda.get_device_name(0) if device == "cuda" else {"mps": "Apple GPU (MPS)", "cpu": "the CPU"}[device]
    rows = ([] if args.compiled else quick_rows(args.limit)) + ([] if args.quick else compiled_rows(args.limit))
    wanted = {row.name for row in rows if args.only in row.name}
    rows = [row for row in rows if row.name in wanted or any(  # and the rows those depend on
        other.name in wanted and row.name in (other.folder_of, other.same_as) for other in rows)]
    print(f"GPU check on {name}, PyTorch {torch.__version__}, {precision} by default\n")
    print("| run | precision | images/s | peak MB | seconds | result |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    failures = 0
    by_name = {row.name: row for row in rows}
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        write_digit(scratch / "digit.png")
        for index, row in enumerate(rows):
            folder = by_name[row.folder_of].result["folder"] if row.folder_of else scratch / f"{index:02d}"
            began = time.perf_counter()
            output, problem = launch(row, folder, scratch, device, args.timeout)
            row.result["folder"] = folder
            if not problem:
                try:
                    problem = check(row, folder, output, device, asked_precision(row, device), by_name)
                except (OSError, KeyError, ValueError, RuntimeError) as error:
                    problem = f"{type(error).__name__}: {error}"
            print(f"| {row.name} | {asked_precision(row, device)} | {speed(folder):,.0f} | "
                  f"{row.result.get('peak_mb', 0):,.0f} | {time.perf_counter() - began:.0f} | "
                  f"{'FAIL: ' + problem if problem else 'pass'} |", flush=True)
            if problem:
                failures += 1
                print(output[-1500:], file=sys.stderr)
    print(f"\n{failures} of {len(rows)} runs failed." if failures else f"\nAll {len(rows)} runs passed.")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
