"""Choices that depend on the hardware, tested on the CPU by simulating what the hardware answers.

A simulated GPU is PyTorch's own device queries (torch.cuda.is_available, get_device_properties,
get_arch_list, ...) answering as that GPU would; the code under test runs unchanged. What only a
real GPU can prove, `python -m tests.gpu_smoke` runs there.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import inceptionnet
import lenet
import mnist_8k
import resnet
import utils
from conftest import interrupt_after

CURRENT_BUILD = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")  # PyTorch's CUDA 13.0 wheels


@pytest.fixture
def simulated_gpu(monkeypatch):
    """Make PyTorch's device queries answer as one GPU of the given compute capability would."""

    def install(major: int, minor: int, name: str = "Simulated GPU", built_for=CURRENT_BUILD) -> torch.device:
        properties = SimpleNamespace(major=major, minor=minor, name=name, total_memory=16 * 2**30)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(built_for))
        return torch.device("cuda", 0)

    return install


# --- precision per device ------------------------------------------------------------------


@pytest.mark.parametrize("capability, expected", [
    ((7, 0), torch.float16), ((7, 5), torch.float16), ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16),
], ids=["V100", "T4", "A100", "H100"])
def test_auto_precision_is_the_gpus_native_half_precision(simulated_gpu, capability, expected):
    device = simulated_gpu(*capability)
    assert utils.choose_precision(device, "auto") == expected


@pytest.mark.parametrize("kind", ["cpu", "mps"])
def test_the_cpu_and_mps_train_in_float32_unless_asked(kind):
    device = torch.device(kind)
    assert utils.choose_precision(device, "auto") is None
    assert utils.choose_precision(device, "bf16") == torch.bfloat16
    assert utils.choose_precision(device, "fp16") == torch.float16


@pytest.mark.parametrize("capabilities, expected", [
    ({"avx512_f": True, "avx512_bf16": True}, torch.bfloat16), ({"amx_bf16": True}, torch.bfloat16),
    ({"avx512_f": True, "avx2": True}, None), ({}, None),
], ids=["AVX512-BF16", "AMX", "AVX-512 without bf16", "unknown CPU"])
def test_auto_precision_on_a_cpu_is_bfloat16_only_with_its_instructions_and_for_scripts_that_measured_it(
        monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities, raising=False)
    cpu = torch.device("cpu")
    assert utils.choose_precision(cpu, "auto", cpu_bf16=True) == expected
    assert utils.choose_precision(cpu, "auto") is None, "a script that did not ask stays in float32"
    assert utils.choose_precision(cpu, "off", cpu_bf16=True) is None
    assert utils.choose_precision(torch.device("mps"), "auto", cpu_bf16=True) is None
    word = "bfloat16 mixed precision" if expected else "float32"
    assert f", {word}," in utils.describe_setup(cpu, mnist_8k.parse_args(["--device", "cpu"]))
    assert ", float32," in utils.describe_setup(cpu, lenet.parse_args(["--device", "cpu"]))


@pytest.mark.parametrize("native", [True, False], ids=["bf16 CPU", "other CPU"])
def test_mnist_8k_trains_in_the_precision_its_start_line_names(monkeypatch, tmp_path, capsys, native):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": native}, raising=False)
    record = mnist_8k.main(["--dataset", "fake", "--limit", "64", "--epochs", "1", "--device", "cpu",
                            "--out-dir", str(tmp_path / "run")])
    assert record["precision"] == ("bfloat16" if native else "float32")
    assert f", {'bfloat16 mixed precision' if native else 'float32'}," in capsys.readouterr().out
    # A run is resumed only in its own precision: --amp off names float32 on any CPU.
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": not native}, raising=False)
    with pytest.raises(SystemExit):
        mnist_8k.main(["--dataset", "fake", "--limit", "64", "--epochs", "1", "--device", "cpu", "--resume",
                       "--out-dir", str(tmp_path / "run")])
    assert f"--amp {'bf16' if native else 'off'} (now --amp {'off' if native else 'bf16'})" in capsys.readouterr().err


def test_no_amp_is_float32_everywhere(simulated_gpu):
    assert utils.choose_precision(simulated_gpu(9, 0), "off") is None
    assert lenet.parse_args(["--no-amp"]).amp == "off" and lenet.parse_args([]).amp == "auto"


def test_tf32_is_allowed_for_float32_matrix_products_on_cuda_only(simulated_gpu, monkeypatch):
    previous = torch.get_float32_matmul_precision()
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    try:
        torch.set_float32_matmul_precision("highest")
        utils.prepare(lenet.parse_args(["--device", "cpu"]))
        assert torch.get_float32_matmul_precision() == "highest", "the CPU path must not change"
        simulated_gpu(8, 0)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
        utils.prepare(lenet.parse_args(["--device", "cuda", "--no-amp"]))
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)


# --- nothing float64 on the training device (MPS has none) ---------------------------------


class Float64Watch(TorchDispatchMode):
    """Records every PyTorch operation that returns a float64 tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.operations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if any(isinstance(value, torch.Tensor) and value.dtype == torch.float64 for value in tree_flatten(result)[0]):
            self.operations.append(str(func))
        return result


def test_training_and_evaluation_create_no_float64_tensor(tmp_path):
    data = utils.load_data("fake", "unused", limit=48)
    args = mnist_8k.parse_args(["--epochs", "2", "--batch-size", "16"])
    model = mnist_8k.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, epochs=2, steps_per_epoch=3)
    options = utils.FitOptions(scheduler=scheduler, scheduler_per="batch", augment=mnist_8k.augment,
                               criterion=utils.cross_entropy(0.1))
    with Float64Watch() as watch:
        run = utils.Run(tmp_path, "test")
        record, _ = utils.fit(model, data, optimizer, args, run, {"script": "test"}, options)
    assert len(record["epochs"]) == 2
    assert watch.operations == [], f"float64 tensors made by {sorted(set(watch.operations))}"


# --- float16 with a gradient scaler: its state is part of the run --------------------------


def test_a_float16_run_resumes_exactly_with_its_loss_scale(tmp_path, monkeypatch):
    # A scale that grows every step overflows float16 now and then, so the scale moves and a
    # resume that lost it would skip other steps than the run that never stopped.
    original = torch.amp.GradScaler.__init__
    monkeypatch.setattr(torch.amp.GradScaler, "__init__",
                        lambda self, *args, **kwargs: original(self, *args, **{**kwargs, "growth_interval": 1}))
    options = ["--dataset", "fake", "--limit", "96", "--batch-size", "16", "--epochs", "2", "--amp", "fp16",
               "--device", "cpu"]
    straight = mnist_8k.main([*options, "--out-dir", str(tmp_path / "straight")])
    assert straight["precision"] == "float16"
    saved_scale = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)["scaler"]["scale"]
    assert saved_scale != 2.0**16, "the loss scale should have moved from its start"

    with monkeypatch.context() as patch:
        interrupt_after(patch, 9)
        with pytest.raises(SystemExit):
            mnist_8k.main([*options, "--out-dir", str(tmp_path / "stopped")])
    resumed = mnist_8k.main([*options, "--out-dir", str(tmp_path / "stopped"), "--resume"])
    keys = ("train_loss", "train_acc", "test_loss", "test_acc")
    rows = [[[row[k] for k in keys] for row in record["epochs"]] for record in (resumed, straight)]
    assert rows[0] == rows[1]
    weights = [torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("straight", "stopped")]
    assert weights[0]["scaler"] == weights[1]["scaler"]
    for name, tensor in weights[0]["model"].items():
        assert torch.equal(tensor, weights[1]["model"][name]), name


# --- evaluation batches sized for the images ------------------------------------------------


@pytest.mark.parametrize("argv, side, expected", [
    (["--batch-size", "128"], 32, 1000),
    (["--batch-size", "128"], 224, 128),
    (["--batch-size", "8"], 224, 20),
    (["--batch-size", "8"], 600, 8),
    (["--batch-size", "8", "--eval-batch-size", "64"], 600, 64),
])
def test_the_evaluation_batch_shrinks_as_the_images_grow(argv, side, expected):
    assert utils.eval_batch_size(resnet.parse_args(argv), side) == expected


def test_eval_batch_size_is_what_the_run_evaluates_with(tmp_path, monkeypatch):
    sizes = []
    original = utils.evaluate
    monkeypatch.setattr(utils, "evaluate", lambda model, batches, **kw: sizes.append(len(batches)) or original(
        model, batches, **kw))
    lenet.main(["--dataset", "fake", "--limit", "20", "--epochs", "1", "--eval-batch-size", "7",
                "--out-dir", str(tmp_path / "run")])
    assert sizes == [3], "20 test images in batches of at most 7"


# --- compile every variant -------------------------------------------------------------------


class TinyNet(nn.Module):
    """Variants of one class, as ResNet-18 to 152 are: they share TinyNet.forward."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, kernel_size=3)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_compile_variant_all_runs_every_variant_compiled(tmp_path, monkeypatch):
    # A backend that runs the captured graph as it is, counting how often compiled code runs:
    # quick to build on a CPU, and Dynamo's recompile limit applies to it as to Inductor.
    compiled_calls = {"count": 0}

    def counting_backend(graph, example_inputs):
        def run(*inputs):
            compiled_calls["count"] += 1
            return graph.forward(*inputs)
        return run

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))
    widths = ("4", "5", "6", "7", "8")
    parser = utils.build_parser(None, script="tiny", datasets=("fake",), epochs=1, batch_size=8, lr=0.1,
                                variants=widths, default_variant="all")
    # 20 samples in batches of 8: training and evaluation each see two batch shapes.
    args = parser.parse_args(["--limit", "20", "--eval-batch-size", "8", "--compile", "--out-dir", str(tmp_path)])
    data = utils.load_data("fake", "unused", limit=args.limit)
    per_variant = []

    def train_one(width: str, run: utils.Run) -> dict:
        model = TinyNet(int(width))
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
        before = compiled_calls["count"]
        record, _ = utils.fit(model, data, optimizer, args, run, utils.new_record("tiny", width, args, model, cpu))
        per_variant.append(compiled_calls["count"] - before)
        return record

    cpu = torch.device("cpu")
    with utils.open_run(args, "tiny", cpu, widths) as run:
        utils.train_runs(run, args, train_one)
    assert per_variant == [3 + 3] * len(widths), "each variant: 3 training and 3 test batches, all compiled"


def test_compile_keeps_static_shapes_for_an_uneven_last_batch(tmp_path, monkeypatch):
    # Without dynamic=False, Dynamo meets the second batch size and recompiles with a symbolic
    # batch dimension, which every later step then runs: record the shapes each graph is built for.
    symbolic = []

    def recording_backend(graph, example_inputs):
        symbolic.append(any(isinstance(value, torch.SymInt) for value in example_inputs))  # the batch, symbolic
        return graph.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=recording_backend))
    parser = utils.build_parser(None, script="tiny", datasets=("fake",), epochs=2, batch_size=8, lr=0.1)
    # 20 samples in batches of 8: batches of 7, 7 and 6, and evaluation's of 8, 8 and 4.
    args = parser.parse_args(["--limit", "20", "--eval-batch-size", "8", "--compile", "--out-dir", str(tmp_path)])
    data = utils.load_data("fake", "unused", limit=args.limit)
    model = TinyNet(4)
    cpu = torch.device("cpu")
    with utils.open_run(args, "tiny", cpu) as run:
        utils.fit(model, data, torch.optim.SGD(model.parameters(), lr=0.1), args, run,
                  utils.new_record("tiny", None, args, model, cpu))
    assert symbolic and not any(symbolic), "a graph was built for a symbolic batch size"
    assert len(symbolic) <= 6, "a static graph per batch shape (training's forward and backward, evaluation's)"


def test_questions_to_a_run_do_not_say_compiled(capsys):
    assert "not compiled" in utils.describe_setup(torch.device("cpu"), lenet.parse_args(["--compile", "--evaluate"]))
    assert "not compiled" in utils.describe_setup(torch.device("cpu"), lenet.parse_args(["--compile", "--find-lr"]))
    assert ", compiled" in utils.describe_setup(torch.device("cpu"), lenet.parse_args(["--compile"]))


# --- a GPU the installed build cannot run ---------------------------------------------------


@pytest.mark.parametrize("capability", [(7, 0), (6, 1)], ids=["V100", "P100-class"])
def test_an_older_gpu_than_the_build_gets_one_sentence_on_what_to_install(simulated_gpu, capability):
    device = simulated_gpu(*capability, name="Tesla V100-SXM2-16GB")
    with pytest.raises(utils.RunError) as error:
        utils.check_cuda_build(device)
    message = str(error.value)
    assert f"compute capability {capability[0]}.{capability[1]}" in message and "Tesla V100" in message
    assert "https://download.pytorch.org/whl/cu126" in message and "sm_75" in message


def test_a_newer_gpu_than_the_build_is_told_to_upgrade(simulated_gpu):
    device = simulated_gpu(12, 0, built_for=("sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"))
    with pytest.raises(utils.RunError, match="install a newer build"):
        utils.check_cuda_build(device)


@pytest.mark.parametrize("capability, built_for", [
    ((7, 5), CURRENT_BUILD), ((8, 9), CURRENT_BUILD), ((9, 0), CURRENT_BUILD),
    ((12, 1), ("sm_90", "compute_120")),  # PTX that the driver compiles for the newer GPU
])
def test_gpus_the_build_has_kernels_for_pass(simulated_gpu, capability, built_for):
    utils.check_cuda_build(simulated_gpu(*capability, built_for=built_for))


def test_a_script_on_an_unsupported_gpu_exits_1_without_traceback(simulated_gpu, tmp_path, capsys):
    simulated_gpu(7, 0)
    with pytest.raises(SystemExit) as error:
        lenet.main(["--dataset", "fake", "--limit", "8", "--out-dir", str(tmp_path / "run")])
    assert error.value.code == 1
    assert "pip install torch torchvision --index-url" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- the start line --------------------------------------------------------------------------


def test_the_start_line_says_device_precision_layout_compile_and_processes(tmp_path, capsys):
    lenet.main(["--dataset", "fake", "--limit", "8", "--epochs", "1", "--device", "cpu",
                "--out-dir", str(tmp_path / "run")])
    first_line = capsys.readouterr().out.splitlines()[0]
    threads = torch.get_num_threads()
    assert first_line == (f"Training on the CPU ({threads} thread{'s' if threads > 1 else ''}), float32, "
                          "channels-last, not compiled, 1 process.")


def test_the_start_line_names_the_gpu_and_its_precision(simulated_gpu):
    device = simulated_gpu(7, 5, name="Tesla T4")
    line = utils.describe_setup(device, resnet.parse_args(["--compile"]))
    assert line == ("Training on cuda:0 (Tesla T4, compute capability 7.5), float16 mixed precision with a "
                    "gradient scaler, channels-last, compiled, 1 process.")


def test_auto_falling_back_to_the_cpu_says_why(monkeypatch):
    def no_driver():
        raise RuntimeError("Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU\nmore")

    monkeypatch.setattr(torch.version, "cuda", "12.6")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", no_driver)
    line = utils.describe_setup(torch.device("cpu"), lenet.parse_args([]))
    assert line.endswith("\nNot on a GPU: no NVIDIA driver was found, so the CPU trains.")  # ours, not torch's
    assert "Not on a GPU" not in utils.describe_setup(torch.device("cpu"), lenet.parse_args(["--device", "cpu"]))


def test_a_cpu_only_build_is_named_as_the_reason(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert "built without CUDA" in utils.describe_setup(torch.device("cpu"), lenet.parse_args([]))


# --- MPS -------------------------------------------------------------------------------------


def test_torchrun_on_a_mac_trains_on_the_cpu_and_refuses_mps(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert utils.pick_device("auto") == torch.device("mps"), "one process takes the Apple GPU"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert utils.pick_device("auto") == torch.device("cpu")
    with pytest.raises(utils.UsageError, match="Gloo"):
        utils.pick_device("mps")


@pytest.mark.parametrize("size_in, size_out", [(14, 4), (8, 7), (19, 4), (7, 7), (9, (3, None))])
def test_portable_adaptive_pooling_equals_pytorchs(size_in, size_out):
    images = torch.randn(2, 3, size_in, size_in, requires_grad=True)
    expected = nn.AdaptiveAvgPool2d(size_out)(images)
    pooled = utils.AdaptiveAvgPool2dByMatmul(size_out)(images)
    torch.testing.assert_close(pooled, expected)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(torch.autograd.grad(pooled, images, grad)[0],
                               torch.autograd.grad(expected, images, grad)[0])


def test_mps_gets_portable_pools_where_pytorch_would_fail(monkeypatch):
    # GoogLeNet at 224 pixels pools 14x14 to 4x4 in its auxiliary heads: MPS refuses that size.
    model = inceptionnet.build_model(imagenet=True).eval()
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = model(images)
        utils.portable_pooling(model)
        assert isinstance(model.aux1.pool, utils.AdaptiveAvgPool2dByMatmul)
        assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d), "global pooling works everywhere: kept"
        torch.testing.assert_close(model(images), expected)


# --- random states and out-of-memory ---------------------------------------------------------


def test_only_the_training_gpus_random_state_is_saved_and_restored(simulated_gpu, monkeypatch):
    simulated_gpu(8, 0)
    calls = []
    state_of = lambda device="cuda": torch.tensor([7, torch.device(device).index])  # noqa: E731
    monkeypatch.setattr(torch.cuda, "get_rng_state", state_of)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append((state.tolist(), device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state was read"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("every GPU's state was set"))
    state = utils.rng_state(torch.device("cuda", 1))
    assert state["cuda"].tolist() == [7, 1]
    utils.set_rng_state(state, torch.device("cuda", 0))  # resumed where only one GPU is seen
    assert calls == [([7, 1], torch.device("cuda", 0))]
    assert "cuda" not in utils.rng_state(torch.device("cpu"))


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED"),  # what cuDNN 9 says
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"),
], ids=["cuda", "cudnn-host", "cudnn-device", "cublas", "mps"])
def test_running_out_of_gpu_memory_names_the_options_that_help(error, capsys):
    with pytest.raises(SystemExit) as stopped:
        with utils.friendly_errors():
            raise error
    assert stopped.value.code == 1
    message = capsys.readouterr().err
    assert "--batch-size" in message and "--eval-batch-size" in message and "--resolution" in message


# Out of memory under torchrun, in the main process or another: tests/test_distributed.py.


def test_other_runtime_errors_are_not_mistaken_for_memory(capsys):
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with utils.friendly_errors():
            raise RuntimeError("shape mismatch")


# --- the GPU check itself ---------------------------------------------------------------------


def test_the_gpu_check_covers_every_script_eager_and_compiled():
    from tests import gpu_smoke

    quick, compiled = gpu_smoke.quick_rows(512), gpu_smoke.compiled_rows(512)
    for rows in (quick, compiled):
        assert {row.script for row in rows} >= set(SCRIPTS)
    assert all("--compile" in row.options and row.compiled for row in compiled)
    assert not any("--compile" in row.options for row in quick)
    asked = " | ".join(" ".join(row.options) for row in quick)
    for words in ("--amp fp16", "--amp off", "--limit 510", "--resume", "--evaluate", "--predict", "--find-lr",
                  "--variant all", "--batch-size 128", "--batch-size 512", "--resolution 224"):
        assert words in asked, words
    assert any(row.interrupt_after and row.expect_exit == 130 for row in quick), "a Ctrl-C in the middle of a run"


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="a GPU is here")
def test_the_gpu_check_without_a_gpu_says_so_and_passes(capsys):
    from tests import gpu_smoke

    assert gpu_smoke.main([]) == 0
    assert capsys.readouterr().out.startswith("No GPU here")


# --- issue: MPS pools before the first forward, fused optimizers, GroupNorm's layout ------------

SCRIPTS = ["lenet", "mnist_8k", "mnist_ablation", "cifar_norms", "cifar_dilated_dw", "vgg", "inceptionnet",
           "resnet", "efficientnet"]


def test_mps_pools_are_swapped_as_the_model_reaches_the_device(monkeypatch):
    # What PyTorch answers on a Mac: the transfer succeeds (here it does nothing: there is no MPS).
    monkeypatch.setattr(nn.Module, "to", lambda self, *args, **kwargs: self)
    model = utils.to_device(inceptionnet.build_model(imagenet=True), torch.device("mps"))
    assert isinstance(model.aux1.pool, utils.AdaptiveAvgPool2dByMatmul), "before the summary's forward runs"
    cpu_model = utils.to_device(inceptionnet.build_model(imagenet=True), torch.device("cpu"))
    assert isinstance(cpu_model.aux1.pool, nn.AdaptiveAvgPool2d) and not isinstance(
        cpu_model.aux1.pool, utils.AdaptiveAvgPool2dByMatmul)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_builds_its_model_onto_the_device_through_to_device(script):
    source = (utils.Path(__file__).resolve().parents[1] / f"{script}.py").read_text()
    assert "utils.to_device(build_model(" in source and ").to(device)" not in source
    assert "fused=utils.fused(device)" in source, "its optimizer is fused on CUDA"


def test_optimizers_are_fused_on_cuda_only(simulated_gpu):
    assert utils.fused(simulated_gpu(8, 0)) is True
    assert utils.fused(torch.device("cpu")) is False and utils.fused(torch.device("mps")) is False


def test_a_fused_optimizer_lets_the_scaler_skip_its_host_sync(monkeypatch):
    """GradScaler.step hands a fused optimizer the inf check as a tensor, instead of reading it with .item()."""
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)  # the CPU has fused kernels too
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    reads = []
    original_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(self.shape) or original_item(self))
    step = utils.TrainStep(model, optimizer, scaler, utils.cross_entropy())
    step(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    assert reads == [], "no value was read back to the host during the step"


@pytest.mark.parametrize("variant, kind, argv, expected", [
    ("batch", "cuda", [], True), ("group", "cuda", [], False), ("layer", "cuda", [], False),
    ("group", "cpu", [], True), ("layer", "cpu", [], True),
    ("group", "cuda", ["--channels-last"], True), ("batch", "cuda", ["--no-channels-last"], False),
])
def test_cifar_norms_keeps_group_and_layer_norm_contiguous_on_cuda(variant, kind, argv, expected):
    import cifar_norms

    args = cifar_norms.parse_args(argv)
    model = cifar_norms.build_model(variant)
    assert utils.uses_channels_last(args, torch.device(kind), model) is expected


def test_cifar_norms_help_says_why_group_norm_runs_contiguous_on_cuda(capsys):
    import cifar_norms

    with pytest.raises(SystemExit):
        cifar_norms.parse_args(["--help"])
    assert "default: on, but off on CUDA for networks with GroupNorm" in " ".join(capsys.readouterr().out.split())
