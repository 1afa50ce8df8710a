"""The CUDA decode GEMM's host side without a GPU: which shapes it takes, argument errors raised before
anything launches, the split heuristic, the Python launcher declining CPU tensors, and 0 spills in its
ptxas log. (On a GPU: tests/test_decode_cuda_gpu.py; layout: tests/test_decode_layout.py; SASS budget:
tests/test_cuda_sass.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels import _ops

from build_state import native_or_skip

C = native_or_skip()
cuda_build = pytest.mark.skipif(not C.has_cuda(), reason="_C was built without CUDA")
BF16, F16, F32 = 2, 1, 0


@cuda_build
@pytest.mark.parametrize("m,n,k,bs,dt,ok", [
    (1, 4096, 4096, 64, BF16, True), (16, 4096, 4096, 64, F16, True), (16, 1000, 1280, 256, BF16, True),
    (17, 4096, 4096, 64, BF16, False),  # M > 16
    (0, 4096, 4096, 64, BF16, False),
    (1, 4096, 4096, 64, F32, False),  # fp32 x stays on Triton
    (1, 4096, 4000, 64, BF16, False),  # K % 256
    (1, 4096, 4096, 32, BF16, False),  # a lane's 64 weights would span two blocks
    (1, 4096, 768, 512, BF16, False),  # K % blocksize
])
def test_supported_shapes(m, n, k, bs, dt, ok):
    assert C.nf4_decode_cuda_supported(m, n, k, bs, dt) is ok


def _call(**kw):
    args = dict(y_ptr=16, part_ptr=0, counters_ptr=0, x_ptr=16, packed_ptr=16, absmax_ptr=16, nested_absmax_ptr=0, offset_ptr=0,
                dynamic_map_ptr=0, lora_u_ptr=0, lora_b_ptr=0, bias_ptr=0, m=4, n=256, k=1024, r=0, ldx=1024, ldy=256,
                su_m=0, su_r=0, sb_n=0, sb_r=0, scaling=1.0, blocksize=64, dtype_code=BF16, split=1, stream=0)
    args.update(kw)
    return C.nf4_decode_cuda(**args)


@cuda_build
def test_declines_without_launching():
    # nothing here reaches a launch (the pointers are fake): unsupported shapes / alignment return False
    assert _call(k=1000, ldx=1000) is False
    assert _call(m=17) is False
    assert _call(x_ptr=24) is False  # x not 16-byte aligned
    assert _call(packed_ptr=8) is False


@cuda_build
@pytest.mark.parametrize("kw,match", [
    (dict(split=0), "split"), (dict(split=5), "split"),  # 4 tiles of 256
    (dict(split=2, part_ptr=0), "part"), (dict(blocksize=48), "blocksize"), (dict(dtype_code=7), "dtype"),
    (dict(y_ptr=0), "y"), (dict(r=4), "lora_u"), (dict(ldy=100), "ldy"),
    (dict(nested_absmax_ptr=16), "offset"),
])
def test_bad_arguments_raise_before_launch(kw, match):
    with pytest.raises(ValueError, match=match):
        _call(**kw)


def test_split_heuristic():
    # N = K = 4096 on 132 SMs: 256 row groups x 4 slices = 1024 CTAs, one tile per warp
    assert _ops.decode_cuda_split(1, 4096, 4096, 132) == 4
    assert _ops.decode_cuda_split(16, 8192, 8192, 132) == 2
    assert _ops.decode_cuda_split(1, 64, 256, 132) == 1  # one tile: no split
    assert 1 <= _ops.decode_cuda_split(1, 14336, 4096, 132) <= 4096 // 1024


def test_launcher_declines_cpu_tensors():
    w = torch.randn(64, 256) * 0.02
    p, a, n, o = qk.quantize_nf4(w, blocksize=64, double_quant=True).tensors()
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    assert _ops.nf4_decode_cuda(x, p, a, n, o, 64, 256, 64) is None


@cuda_build
def test_decode_kernels_spill_nothing():
    log = Path(C.__file__).parent / "_C_ptxas_decode.log"
    assert log.is_file(), f"{log} missing"
    text = log.read_text()
    archs = set(int(a) for a in re.findall(r"for 'sm_(\d+)'", text))
    assert set(C.cuda_archs()) <= archs, archs
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    assert spills and all(s == ("0", "0") for s in spills), spills
    assert "nf4_decode_kernel" in text and "nf4_decode_reduce_kernel" in text


def test_weight_and_lora_checks_name_the_tensor():
    """The fused launchers' shared checks (qlora_kernels/_checks.py: the Triton launchers and this CUDA
    launcher call them), on CPU tensors: each bad argument raises naming the tensor."""
    from qlora_kernels._checks import check_weight, lora_pair

    w = torch.randn(64, 256) * 0.02
    p, a, n, o = qk.quantize_nf4(w, blocksize=64, double_quant=True).tensors()
    cpu = torch.device("cpu")
    check_weight(p, a, n, o, 64, 256, 64, cpu)  # fine
    for args, exc, match in (
        ((p[:-1], a, n, o), ValueError, "packed has"),
        ((p, a[:-1], n, o), ValueError, "absmax has"),
        ((p, a, n[:0], o), ValueError, "nested_absmax has 0"),
        ((p.view(2, -1).t(), a, n, o), ValueError, "packed must be contiguous"),
        ((p.view(torch.int8), a, n, o), TypeError, "packed must be uint8"),
        ((p, a, n, None), TypeError, "double quantization"),
        ((p, a.float(), None, None), TypeError, None),
    ):
        if match is None:
            check_weight(*args, 64, 256, 64, cpu)  # float32 absmax without double quantization is fine
            continue
        with pytest.raises(exc, match=match):
            check_weight(*args, 64, 256, 64, cpu)
    u, b = torch.randn(3, 8), torch.randn(64, 8)
    assert lora_pair(u, b, 3, 64, "lora_u", "lora_b")[2] == 8
    for uu, bb, match in ((u, None, "together"), (u[0], b, r"lora_u must be \[3, r\]"), (u, b[:, :4], "lora_b must be")):
        with pytest.raises(ValueError, match=match):
            lora_pair(uu, bb, 3, 64, "lora_u", "lora_b")
