"""torchrun: two CPU processes (Gloo on 127.0.0.1) train as one; a plain run stays plain."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed

import cifar_norms
import mnist_8k
import utils
from conftest import ROOT, assert_run_folder, offline_env, read_metrics

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(ROOT / script), *args]
    return subprocess.run(command, cwd=cwd, env=offline_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script, extra", [
    (mnist_8k, ["--batch-size", "16"]),
    (cifar_norms, ["--variant", "batch", "--batch-size", "8"]),
], ids=["mnist_8k", "cifar_norms"])
def test_two_processes_count_every_sample_once_and_write_one_folder(tmp_path, script, extra):
    options = ["--dataset", "fake", "--limit", "75", "--epochs", "2", *extra]
    result = torchrun(f"{script.SCRIPT}.py", *options, "--out-dir", str(tmp_path / "two"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("epoch   2/2") == 1, "only the main process prints"

    two = read_metrics(tmp_path / "two")
    assert_run_folder(tmp_path / "two", two, epochs=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["two"], "one run folder, nothing else"
    one = script.main([*options, "--out-dir", str(tmp_path / "one")])
    for row_two, row_one in zip(two["epochs"], one["epochs"]):
        assert row_two["train_samples"] == row_one["train_samples"] == 75
        assert row_two["test_samples"] == row_one["test_samples"] == 75

    # The accuracy the two processes reported is the one a single process measures.
    model = script.build_model(**({"variant": "batch"} if script is cifar_norms else {}))
    model.load_state_dict(torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["model"])
    data = utils.load_data("fake", "unused", limit=75, fake_like="cifar10" if script is cifar_norms else "mnist")
    # evaluated as the script does it on the CPU: channels-last (other kernels round differently)
    model = model.to(memory_format=torch.channels_last)
    single = utils.evaluate(model, data.test_batches(32, channels_last=True))
    assert two["final_test_acc"] == pytest.approx(single.accuracy)
    assert two["epochs"][-1]["test_loss"] == pytest.approx(single.loss, rel=1e-5)


def test_sync_bn_on_the_cpu_is_refused_with_a_sentence(tmp_path, capsys):
    with pytest.raises(SystemExit) as error:
        cifar_norms.main(["--dataset", "fake", "--limit", "8", "--sync-bn", "--device", "cpu",
                          "--out-dir", str(tmp_path)])
    assert error.value.code == 2 and "--sync-bn needs CUDA" in capsys.readouterr().err


def test_a_plain_run_never_touches_torch_distributed(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a plain run called torch.distributed")

    for name in ("init_process_group", "all_reduce", "all_gather", "all_gather_object", "barrier"):
        monkeypatch.setattr(torch.distributed, name, forbidden)
    record = mnist_8k.main(["--dataset", "fake", "--limit", "32", "--epochs", "1", "--out-dir", str(tmp_path)])
    assert record["epochs"][0]["train_samples"] == 32
    assert not torch.distributed.is_initialized()


GATHER = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
import utils

dist.init_process_group("gloo")
total = 11  # uneven: rank 0 evaluates 6 samples, rank 1 five
mine = torch.arange(total)[utils.rank()::utils.world_size()] * 10
whole = utils.gather_shards(mine, total)
print(f"rank {{utils.rank()}} gathered {{whole.tolist()}}")
dist.destroy_process_group()
"""


def test_predictions_of_every_process_come_back_in_the_split_order(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER.format(root=str(ROOT)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(script)]
    result = subprocess.run(command, env=offline_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [value * 10 for value in range(11)]
    for process in (0, 1):
        assert f"rank {process} gathered {expected}" in result.stdout


def test_a_resume_with_another_number_of_processes_is_refused(tmp_path, monkeypatch):
    # One process, stopped at the end of its first epoch (4 batches of 16): a checkpoint at a boundary.
    from conftest import interrupt_after

    # --amp off: the in-process run answers as a CPU without bfloat16 (conftest), torchrun's as this host.
    options = ["--dataset", "fake", "--limit", "64", "--epochs", "2", "--batch-size", "16", "--amp", "off",
               "--out-dir", str(tmp_path / "run")]
    with monkeypatch.context() as patch, pytest.raises(SystemExit):
        interrupt_after(patch, 4)
        mnist_8k.main(options)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["batch"] == 0
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    result = torchrun("mnist_8k.py", *options, "--resume", cwd=tmp_path)
    # torchrun reports its workers' exit status 2 (a usage error) as its own failure
    assert result.returncode != 0 and "exitcode: 2" in result.stderr, result.stderr[-2000:]
    assert "trained by 1 process(es): resume it with as many (here: 2)" in result.stderr
    assert result.stderr.count("trained by 1 process") == 1
    assert 'utils.py", line' not in result.stderr, "a traceback through our code (torchrun's own report is not ours)"
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_questions_to_a_run_are_refused_under_torchrun_in_one_sentence(tmp_path):
    mnist_8k.main(["--dataset", "fake", "--limit", "32", "--epochs", "1", "--out-dir", str(tmp_path / "run")])
    result = torchrun("mnist_8k.py", "--evaluate", "--out-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode != 0 and "exitcode: 2" in result.stderr, result.stderr[-2000:]
    assert result.stderr.count("start them with python, not torchrun") == 1
    assert 'utils.py", line' not in result.stderr, "a traceback through our code (torchrun's own report is not ours)"


OUT_OF_MEMORY = """
import sys
sys.path.insert(0, {root!r})
import torch.distributed as dist
import utils

with utils.friendly_errors():
    dist.init_process_group("gloo")
    if utils.rank() > 0:  # as PyTorch's CPU allocator says it
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes.")
    dist.barrier()
"""


def test_out_of_memory_in_processes_other_than_the_main_one_is_said_once(tmp_path):
    script = tmp_path / "oom.py"  # processes 1 and 2 run out of memory, the main one waits for them
    script.write_text(OUT_OF_MEMORY.format(root=str(ROOT)))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=3", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", str(script)]
    result = subprocess.run(command, env=offline_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert (result.stdout + result.stderr).count(utils.OUT_OF_MEMORY) == 1, result.stderr[-3000:]


def two_nodes(options: list[str], cwd) -> list[subprocess.Popen]:
    """Two torchrun launchers, one process each, meeting at a c10d rendezvous: two machines' worth."""
    endpoint = f"127.0.0.1:{free_port()}"
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                              "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=test",
                              str(ROOT / "mnist_8k.py"), *options], cwd=cwd, env=offline_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]


def finish(nodes: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    """Each launcher's (exit status, stdout, stderr), once both have ended."""
    outputs = [node.communicate(timeout=300) for node in nodes]
    return [(node.returncode, *output) for node, output in zip(nodes, outputs)]


def test_two_nodes_train_as_one_and_resume_after_ctrl_c_on_one(tmp_path):
    import signal
    import time

    options = ["--dataset", "fake", "--limit", "320", "--epochs", "4", "--batch-size", "16"]
    nodes = two_nodes([*options, "--out-dir", str(tmp_path / "stopped")], tmp_path)
    deadline = time.monotonic() + 240
    while not (tmp_path / "stopped" / "metrics.json").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the first epoch is done: Ctrl-C reaches the second machine in one of the next three
    nodes[1].send_signal(signal.SIGINT)
    stopped = finish(nodes)
    assert all(code != 0 for code, _, _ in stopped)
    assert "Stopped by Ctrl-C" in stopped[0][2] and "--resume" in stopped[0][2], stopped[0][2][-2000:]
    saved = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert (saved["epoch"], saved["batch"]) < (4, 0)

    resumed = finish(two_nodes([*options, "--out-dir", str(tmp_path / "stopped"), "--resume"], tmp_path))
    assert all(code == 0 for code, _, _ in resumed), resumed[0][2][-2000:]
    resumed_record = read_metrics(tmp_path / "stopped")
    assert [row["test_samples"] for row in resumed_record["epochs"]] == [320] * 4, "the test split counted once"
    assert [row["train_samples"] for row in resumed_record["epochs"]] == [320] * 4, "and the training split"
    # The same numbers as one process trained the two shares would need another run: resuming exactly
    # is tested in one process (test_training.py), and the two processes' sums in the tests above.
