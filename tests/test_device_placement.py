"""Where the kernels run: every launch on its tensor's device (weights on cuda:1 while cuda:0 is current, as
device_map="auto" places them), and the per-device tables made when a weight arrives on a device, so a forward
copies nothing from the host and CUDA-graph capture of a layer's forward and backward works.

The CPU tests check the two mechanisms (the device guard of the native launches with torch.cuda stubbed; the
table cache filled by .to() / _apply and left alone by a forward); the gpu tests run them for real.
"""

from __future__ import annotations

import contextlib
import copy
import types
import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*native extension _C not available.*")

import qlora_kernels as qk  # noqa: E402
from qlora_kernels import QLoRALinear, _format, _ops, quantize_nf4  # noqa: E402
from qlora_kernels._backend import native_available  # noqa: E402

TABLES = ("nf4", "map")


def _keys(device) -> set:
    return {k for k in _format._device_tables if k[1] == torch.device(device)}


def _layer(n=64, k=128, dtype=torch.float32, device="cpu", seed=0, bias=True):
    torch.manual_seed(seed)
    layer = QLoRALinear.from_linear(nn.Linear(k, n, bias=bias).to(dtype), r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.weight.normal_(0, 0.2)  # B != 0: both adapters get gradients, the LoRA term shows
    return layer.to(device)


# ------------------------------------------------------------------------------------------ tables (CPU)
def test_tables_made_when_a_weight_arrives():
    _format._device_tables.clear()
    w = quantize_nf4(torch.randn(16, 64))  # made on the CPU (double quantization made the "lut" table too)
    assert _keys("cpu") >= {(t, torch.device("cpu")) for t in TABLES}
    _format._device_tables.clear()
    w.to("cpu")  # NF4Weight.to
    assert _keys("cpu") == {(t, torch.device("cpu")) for t in TABLES}
    layer = QLoRALinear(w)
    _format._device_tables.clear()
    layer.to("cpu")  # Module.to -> QLoRALinear._apply
    assert _keys("cpu") == {(t, torch.device("cpu")) for t in TABLES}
    _format._device_tables.clear()
    layer.to("meta")  # no kernel runs on meta: no tables there
    assert not _format._device_tables


@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_and_backward_make_no_table(double_quant):
    """After .to(device), a forward and backward find every table made (a table made lazily inside a
    forward is a pageable host -> device copy, which CUDA-graph capture refuses)."""
    torch.manual_seed(0)
    layer = QLoRALinear.from_linear(nn.Linear(128, 64), r=8, double_quant=double_quant)
    _format._device_tables.clear()
    layer.to("cpu")
    before = dict(_format._device_tables)
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.lora_A.weight.grad is not None
    assert _format._device_tables == before, f"made during the forward: {set(_format._device_tables) - set(before)}"


def test_device_table_one_entry_per_gpu_spelling(monkeypatch):
    """"cuda" and "cuda:<current>" are one GPU, so one cache entry (the kernels ask with the tensor's indexed
    device)."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    made = []
    monkeypatch.setattr(_format, "_device_tables", {})

    class Table:
        def to(self, device):
            made.append(device)
            return torch.zeros(1)

    monkeypatch.setattr(_format, "NF4_TABLE", Table())
    _format.device_table("nf4", "cuda")
    _format.device_table("nf4", torch.device("cuda", 0))
    assert made == [torch.device("cuda", 0)]


def test_missing_table_during_capture_is_a_clear_error(monkeypatch):
    """A table still missing while a CUDA graph is captured: a RuntimeError that says what to do, not the
    driver's "operation not permitted when stream is capturing"."""
    monkeypatch.setattr(_format, "_device_tables", {})
    monkeypatch.setattr(_format, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match=r"'map' table does not exist on cuda:0 .* before capturing"):
        _format.device_table("map", torch.device("cuda", 0))
    _format.prepare_device(torch.device("cuda", 0))  # makes nothing while capturing (and does not raise)
    assert not _format._device_tables


# ------------------------------------------------------------------------------------ device guard (CPU)
def test_native_cuda_launch_runs_on_the_tensors_device(monkeypatch):
    """A native CUDA launch for a tensor on cuda:1 runs with cuda:1 current (and that device's stream), then
    cuda:0 is current again; one on the current device switches nothing."""
    state = {"current": 0, "switches": []}

    @contextlib.contextmanager
    def device(index):
        prev, state["current"] = state["current"], int(index)
        state["switches"].append(int(index))
        try:
            yield
        finally:
            state["current"] = prev

    calls = []

    def kernel(*args):
        calls.append((state["current"], args))

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda d=None: types.SimpleNamespace(cuda_stream=100 + d.index))
    monkeypatch.setattr(_ops, "native_module", lambda: types.SimpleNamespace(dequantize_nf4_cuda=kernel))
    _ops._native("dequantize_nf4", torch.device("cuda", 1), 10)(7, 8)
    assert calls == [(1, (7, 8, 101))] and state["current"] == 0 and state["switches"] == [1]
    _ops._native("dequantize_nf4", torch.device("cuda", 0), 10)(7, 8)
    assert calls[-1] == (0, (7, 8, 100)) and state["switches"] == [1]


def test_triton_launchers_are_guarded():
    """The Triton launchers switch to their input's device too (triton_kernels/_common.on_input_device)."""
    pytest.importorskip("triton")
    from qlora_kernels.triton_kernels import decode, linear_dx, linear_fwd

    for fn in (linear_fwd.nf4_linear, linear_dx.nf4_linear_dx, decode.nf4_decode):
        assert getattr(fn, "__wrapped__", None) is not None, f"{fn.__name__} launches without a device guard"


# ----------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("backend", ["auto", "native"])
@pytest.mark.parametrize("plan", ["fused", "dequant"])
def test_layer_on_second_gpu(backend, plan):
    """A layer on cuda:1 while cuda:0 is current (device_map="auto"): quantize, dequantize, forward and backward
    run on cuda:1 and agree with the same layer on cuda:0; cuda:0 stays current."""
    from qlora_kernels.triton_kernels import set_plan_override

    torch.cuda.set_device(0)
    qk.set_backend(backend)
    set_plan_override(plan)
    try:
        lin = nn.Linear(256, 320, dtype=torch.bfloat16)
        w1 = quantize_nf4(lin.weight.detach().to("cuda:1"))  # the native quantize kernel on cuda:1
        w0 = quantize_nf4(lin.weight.detach().to("cuda:0"))
        assert w1.device == torch.device("cuda", 1)
        assert torch.equal(w1.packed.cpu(), w0.packed.cpu()) and torch.equal(w1.absmax.cpu(), w0.absmax.cpu())
        assert torch.equal(w1.dequantize().cpu(), w0.dequantize().cpu())
        layer0 = _layer(320, 256, torch.bfloat16, "cuda:0")
        layer1 = copy.deepcopy(layer0).to("cuda:1")
        outs = []
        for layer, dev in ((layer0, "cuda:0"), (layer1, "cuda:1")):
            x = torch.randn(64, 256, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1)).to(dev)
            x.requires_grad_()
            y = layer(x)
            y.float().square().sum().backward()
            assert y.device == torch.device(dev) and torch.cuda.current_device() == 0
            torch.cuda.synchronize(dev)
            outs.append([t.detach().cpu() for t in (y, x.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)])
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b)
    finally:
        qk.set_backend(None)
        set_plan_override(None)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("backend", ["auto", "native"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_cuda_graph_capture_forward_backward(backend, double_quant):
    """A QLoRALinear's forward and backward captured in one CUDA graph and replayed on new data == eager.
    The tables are dropped before the layer moves to the GPU, so only the eager creation in .to() can have
    made them: a lazy copy inside the captured forward fails the capture."""
    if backend == "native" and not native_available(torch.device("cuda")):
        pytest.skip("the native extension has no CUDA kernels")
    qk.set_backend(backend)
    try:
        dev = torch.device("cuda", torch.cuda.current_device())
        make = lambda: QLoRALinear.from_linear(  # noqa: E731
            nn.Linear(256, 512, dtype=torch.bfloat16, device="cpu"), r=16, double_quant=double_quant)
        # warm up (Triton compiles, cuBLAS picks its kernels) on another layer of the same shapes
        warm = make().to(dev)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                xw = torch.randn(64, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
                warm(xw).float().sum().backward()
        torch.cuda.current_stream().wait_stream(s)
        torch.cuda.synchronize()

        _format._device_tables.clear()
        torch.manual_seed(3)
        layer = make()
        with torch.no_grad():
            layer.lora_B.weight.normal_(0, 0.2)
        eager = copy.deepcopy(layer).to(dev)
        layer = layer.to(dev)  # makes the tables
        static_x = torch.randn(64, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
        static_dy = torch.randn(64, 512, device=dev, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        # no eager step of this layer before the capture: one would make missing tables lazily
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = layer(static_x)
            static_y.backward(static_dy)

        for seed in (10, 11):
            g = torch.Generator(device=dev).manual_seed(seed)
            x = torch.randn(64, 256, device=dev, dtype=torch.bfloat16, generator=g)
            dy = torch.randn(64, 512, device=dev, dtype=torch.bfloat16, generator=g)
            with torch.no_grad():
                static_x.copy_(x)
                static_dy.copy_(dy)
            graph.replay()
            torch.cuda.synchronize()
            xe = x.clone().requires_grad_()
            eager.zero_grad(set_to_none=True)
            ye = eager(xe)
            ye.backward(dy)
            torch.testing.assert_close(static_y, ye)
            torch.testing.assert_close(static_x.grad, xe.grad)
            torch.testing.assert_close(layer.lora_A.weight.grad, eager.lora_A.weight.grad)
            torch.testing.assert_close(layer.lora_B.weight.grad, eager.lora_B.weight.grad)
    finally:
        qk.set_backend(None)
