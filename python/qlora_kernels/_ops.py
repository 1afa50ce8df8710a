"""The op contract: every op defined once in the `qlora::` namespace with torch.library.

Each op has a fake (meta) implementation that checks shapes and dtypes, so torch.compile(fullgraph=True)
traces through it, and real implementations per device: the native `_C` kernels (CPU, CUDA), the Triton
kernels (linear ops), and the PyTorch reference (`reference.py`) as the fallback for every device.
Argument validation with user-facing messages happens in `functional.py` before an op is called; the
checks here guard the raw pointers that cross into `_C`.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from . import reference as ref
from ._checks import check_weight, lora_pair
from ._backend import linear_path, native_module, use_native
from ._format import DTYPE_CODES, NESTED_BLOCKSIZE, all_finite, device_table, num_blocks, packed_numel

# Elements per CPU thread below which the native kernels run on one thread. Two pools (csrc/cpu_threads.h):
# - torch's OpenMP runtime (Linux, torch's libgomp loaded): the kernels' chunks run on the workers torch's own
#   ops use, so they start at once. Measured right after a matmul (median of interleaved calls, 2 cores): the
#   bf16 dequantize gains 1.31x at 256K elements, 1.68x at 512K, 1.64x at 16M; the 8-bit AdamW step 1.79x
#   at 128K, 1.91x at 1M; the 32-bit step 1.52x at 256K.
# - std::thread (no libgomp in the process, or set_cpu_thread_pool("threads")): a thread started right after a
#   torch op shares its core with an OpenMP worker still spinning (~7 ms), so the same calls LOST with two
#   threads up to 16M elements (dequantize 0.29x at 128K .. 0.87x at 16M; 8-bit step 0.56x at 128K, 1.01x at
#   1M): large grains there.
_CPU_GRAIN = 1 << 17
_CPU_GRAIN_THREADS = 1 << 21
# The 8-bit optimizer step does ~3-6 ns of work per element (two divisions, a square root, four table
# lookups), so a second thread pays off sooner than for the NF4 kernels.
_OPTIM_GRAIN = 1 << 16
_OPTIM_GRAIN_THREADS = 1 << 19


def _grain(openmp_grain: int, threads_grain: int) -> int:
    """The grain for the CPU thread pool in use now."""
    mod = native_module()
    return openmp_grain if mod is not None and mod.cpu_thread_pool() != "threads" else threads_grain


def _launch_args(device: torch.device, work: int, grain: Optional[int] = None) -> tuple[str, int]:
    """The native function suffix and its last argument: CPU thread count, or the current CUDA stream.
    grain: elements per thread (default: the NF4 kernels' for the pool in use)."""
    if device.type == "cuda":
        return "_cuda", torch.cuda.current_stream(device).cuda_stream
    if grain is None:
        grain = _grain(_CPU_GRAIN, _CPU_GRAIN_THREADS)
    return "_cpu", max(1, min(torch.get_num_threads(), work // grain))


def _native(fn: str, device: torch.device, work: int, grain: Optional[int] = None):
    """The native `fn` for `device`, its last argument bound. A CUDA launch runs with the tensor's device
    current: the extension launches on the current device (and its stream must belong to it), so weights on
    cuda:1 (device_map="auto") while cuda:0 is current would otherwise launch on the wrong GPU."""
    suffix, last = _launch_args(device, work, grain)
    f = getattr(native_module(), fn + suffix)
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        def on_device(*args):
            with torch.cuda.device(device.index):
                return f(*args, last)

        return on_device
    return lambda *args: f(*args, last)


def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _raise_non_finite(count: int, first: int, shape) -> None:
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), tuple(shape))) if len(shape) else ()
    raise ValueError(
        f"w has {count} non-finite value(s) (NaN or inf); the first is at index {index} (flat {first}). "
        "NF4 cannot represent them: fix or mask the weight before quantizing"
    )


# ----------------------------------------------------------------------------------------------- quantize_nf4
@torch.library.custom_op("qlora::quantize_nf4", mutates_args=())
def quantize_nf4(w: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """w (any shape, f32/f16/bf16) -> packed uint8 [(n + 1) // 2], absmax float32 [ceil(n / blocksize)]."""
    n = w.numel()
    if use_native(w.device) and n > 0:
        flat = w.contiguous().reshape(-1)
        packed = torch.empty(packed_numel(n), dtype=torch.uint8, device=w.device)
        absmax = torch.empty(num_blocks(n, blocksize), dtype=torch.float32, device=w.device)
        status = torch.tensor([0, n], dtype=torch.int64, device=w.device)
        _native("quantize_nf4", w.device, n)(
            packed.data_ptr(), absmax.data_ptr(), status.data_ptr(), flat.data_ptr(), n, blocksize, DTYPE_CODES[w.dtype]
        )
        count, first = status.tolist()
        if count:
            _raise_non_finite(count, first, w.shape)
        return packed, absmax
    if not all_finite(w):
        bad = (~torch.isfinite(w)).reshape(-1)
        _raise_non_finite(int(bad.sum()), int(bad.nonzero()[0, 0]), w.shape)
    return ref.quantize_nf4_ref(w, blocksize)


@quantize_nf4.register_fake
def _(w, blocksize):
    torch._check(w.dtype in DTYPE_CODES, lambda: f"w must be float32/float16/bfloat16, got {w.dtype}")
    n = w.numel()
    return (
        w.new_empty((n + 1) // 2, dtype=torch.uint8),
        w.new_empty((n + blocksize - 1) // blocksize, dtype=torch.float32),
    )


# --------------------------------------------------------------------------------------------- double_quantize
@torch.library.custom_op("qlora::double_quantize", mutates_args=())
def double_quantize(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """float32 scales [nb] -> codes uint8 [nb], nested_absmax float32 [ceil(nb / 256)], offset float32 []."""
    nb = absmax.numel()
    if nb == 0:  # torch.mean of nothing is NaN; an empty weight gets a zero offset instead
        return absmax.new_empty(0, dtype=torch.uint8), absmax.new_empty(0), absmax.new_zeros(())
    absmax = absmax.contiguous()
    offset = absmax.mean()  # torch.mean on the device, exactly as bitsandbytes computes it
    if not bool(torch.isfinite(offset)):  # every backend: bitsandbytes would silently store NaN scales
        raise ValueError(
            "the block scales are too large to double-quantize (their float32 mean overflows, or one is not "
            "finite); quantize with double_quant=False"
        )
    if not use_native(absmax.device):
        return ref.double_quantize_ref(absmax)
    codes = torch.empty(nb, dtype=torch.uint8, device=absmax.device)
    nested = torch.empty(num_blocks(nb, NESTED_BLOCKSIZE), dtype=torch.float32, device=absmax.device)
    _native("double_quantize", absmax.device, nb)(
        codes.data_ptr(), nested.data_ptr(), absmax.data_ptr(), offset.data_ptr(),
        device_table("lut", absmax.device).data_ptr(), nb,
    )
    return codes, nested, offset


@double_quantize.register_fake
def _(absmax):
    torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    nb = absmax.numel()
    return (
        absmax.new_empty(nb, dtype=torch.uint8),
        absmax.new_empty((nb + NESTED_BLOCKSIZE - 1) // NESTED_BLOCKSIZE),
        absmax.new_empty(()),
    )


# ------------------------------------------------------------------------------------------- double_dequantize
@torch.library.custom_op("qlora::double_dequantize", mutates_args=())
def double_dequantize(codes: Tensor, nested_absmax: Tensor, offset: Tensor) -> Tensor:
    """codes uint8 [nb], nested_absmax float32, offset float32 [] -> float32 scales [nb]."""
    nb = codes.numel()
    if not use_native(codes.device) or nb == 0:
        return ref.double_dequantize_ref(codes, nested_absmax, offset)
    out = torch.empty(nb, dtype=torch.float32, device=codes.device)
    codes, nested_absmax, offset = codes.contiguous(), nested_absmax.contiguous(), offset.contiguous()
    _native("double_dequantize", codes.device, nb)(
        out.data_ptr(), codes.data_ptr(), nested_absmax.data_ptr(), offset.data_ptr(),
        device_table("map", codes.device).data_ptr(), nb,
    )
    return out


@double_dequantize.register_fake
def _(codes, nested_absmax, offset):
    torch._check(codes.dtype == torch.uint8, lambda: f"codes must be uint8, got {codes.dtype}")
    return codes.new_empty(codes.numel(), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- dequantize_nf4
def _dequantize_into(out, packed, absmax, nested_absmax, offset, n, blocksize) -> None:
    """Write the flat [n] dequantized values into out (contiguous, of the output dtype)."""
    if not use_native(packed.device) or n == 0:
        out.copy_(ref.dequantize_nf4_ref(packed, absmax, nested_absmax, offset, n, blocksize, out.dtype))
        return
    packed, absmax = packed.contiguous(), absmax.contiguous()
    if nested_absmax is not None:
        nested_absmax, offset = nested_absmax.contiguous(), offset.contiguous()
    _native("dequantize_nf4", packed.device, n)(
        out.data_ptr(), packed.data_ptr(), absmax.data_ptr(), _ptr(nested_absmax), _ptr(offset),
        device_table("map", packed.device).data_ptr(), n, blocksize, DTYPE_CODES[out.dtype],
    )


@torch.library.custom_op("qlora::dequantize_nf4", mutates_args=())
def dequantize_nf4(
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    offset: Optional[Tensor],
    n: int,
    blocksize: int,
    dtype: torch.dtype,
) -> Tensor:
    """Flat [n] values of `dtype`. absmax: float32 scales, or uint8 codes with nested_absmax + offset."""
    out = torch.empty(n, dtype=dtype, device=packed.device)
    _dequantize_into(out, packed, absmax, nested_absmax, offset, n, blocksize)
    return out


@dequantize_nf4.register_fake
def _(packed, absmax, nested_absmax, offset, n, blocksize, dtype):
    torch._check(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    torch._check(packed.numel() >= (n + 1) // 2, lambda: f"packed has {packed.numel()} bytes, needs {(n + 1) // 2}")
    return packed.new_empty(n, dtype=dtype)


@torch.library.custom_op("qlora::dequantize_nf4_out", mutates_args=("out",))
def dequantize_nf4_out(
    out: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    offset: Optional[Tensor],
    n: int,
    blocksize: int,
) -> None:
    """dequantize_nf4 into a caller's contiguous buffer of n elements (its dtype is the output dtype):
    a scratch buffer reused across calls skips the allocation and first-touch page faults."""
    _dequantize_into(out, packed, absmax, nested_absmax, offset, n, blocksize)


@dequantize_nf4_out.register_fake
def _(out, packed, absmax, nested_absmax, offset, n, blocksize):
    torch._check(out.numel() == n, lambda: f"out has {out.numel()} elements, needs {n}")
    return None


# ------------------------------------------------------------------------------------------- pack / unpack
@torch.library.custom_op("qlora::pack_nf4", mutates_args=())
def pack_nf4(codes: Tensor) -> Tensor:
    """uint8 codes [n] (values 0..15) -> packed uint8 [(n + 1) // 2], first code in the high nibble."""
    n = codes.numel()
    if not use_native(codes.device) or n == 0:
        return ref.pack_nf4_ref(codes)
    codes = codes.contiguous()
    out = torch.empty(packed_numel(n), dtype=torch.uint8, device=codes.device)
    _native("pack_nf4", codes.device, n)(out.data_ptr(), codes.data_ptr(), n)
    return out


@pack_nf4.register_fake
def _(codes):
    return codes.new_empty((codes.numel() + 1) // 2, dtype=torch.uint8)


@torch.library.custom_op("qlora::unpack_nf4", mutates_args=())
def unpack_nf4(packed: Tensor, n: int) -> Tensor:
    """packed uint8 -> codes uint8 [n]."""
    if not use_native(packed.device) or n == 0:
        return ref.unpack_nf4_ref(packed, n)
    packed = packed.contiguous()
    out = torch.empty(n, dtype=torch.uint8, device=packed.device)
    _native("unpack_nf4", packed.device, n)(out.data_ptr(), packed.data_ptr(), n)
    return out


@unpack_nf4.register_fake
def _(packed, n):
    torch._check(packed.numel() >= (n + 1) // 2, lambda: f"packed has {packed.numel()} bytes, needs {(n + 1) // 2}")
    return packed.new_empty(n, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------- decode (CUDA)
DECODE_CUDA_MAX_M = 16
# QLORA_KERNELS_CUDA_DECODE=0 (or CUDA_DECODE = False) keeps M <= 16 on the Triton decode / dequantize path:
# bench/bench_linear.py times both side by side.
CUDA_DECODE = os.environ.get("QLORA_KERNELS_CUDA_DECODE", "1").strip() != "0"
_DECODE_TILE_K = 256  # csrc/nf4_decode_layout.h kTileK
_DECODE_ROWS = 16     # W rows per CTA
_DECODE_CTAS_PER_SM = 6  # ~70 registers x 128 threads: 7 CTAs fit an SM; aim at about one full wave


def decode_cuda_split(m: int, n: int, k: int, sm_count: int) -> int:
    """K slices of the CUDA decode GEMM: enough CTAs (16 rows x one slice each) to fill every SM about once,
    at most one slice per 4 tiles of 256 k (a CTA's 4 warps each take a tile)."""
    ktiles = max(1, k // _DECODE_TILE_K)
    rows = (n + _DECODE_ROWS - 1) // _DECODE_ROWS
    want = (sm_count * _DECODE_CTAS_PER_SM + rows - 1) // max(1, rows)
    return max(1, min(want, ktiles // 4 if ktiles >= 4 else 1))


_decode_counters: dict = {}


def _decode_counter_buffer(device: torch.device, rows: int) -> Tensor:
    """uint32 arrival counters of the in-kernel split-K reduction, one per 16 rows, zero between launches (the
    kernel resets what it used). One buffer per (device, stream): launches on one stream are ordered, two streams
    must not share counters. While a CUDA graph is captured a buffer made now belongs to the graph (its zero fill
    is captured too), so it is not cached."""
    if _capturing_cuda():
        return torch.zeros(rows, dtype=torch.int32, device=device)
    key = (device, torch.cuda.current_stream(device).cuda_stream)
    buf = _decode_counters.get(key)
    if buf is None or buf.numel() < rows:
        buf = _decode_counters[key] = torch.zeros(max(rows, 1024), dtype=torch.int32, device=device)
    return buf


def _capturing_cuda() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def nf4_decode_cuda(x, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize,
                    lora_u=None, lora_b=None, scaling=1.0, bias=None, *, split: Optional[int] = None,
                    reduce_in_kernel: bool = True) -> Optional[Tensor]:
    """The CUDA decode GEMM (csrc/nf4_decode_cuda.cu) behind qlora::nf4_linear for M <= 16: y [M, N] in x.dtype,
    or None when it does not take the call (not a CUDA tensor, no native CUDA build, fp32 x, M > 16, a shape or
    alignment outside its fast path: K % 256, K % blocksize, blocksize >= 64), so the caller runs the Triton
    decode or dequantize + matmul. Same arguments as nf4_linear; split forces the K slices (tests);
    reduce_in_kernel=False sums the K slices in a second kernel instead of the last CTA (tests)."""
    mod = native_module()
    if (not CUDA_DECODE or mod is None or not x.is_cuda or not mod.has_cuda() or x.dim() != 2
            or x.dtype not in (torch.float16, torch.bfloat16)):
        return None
    M, N, K = x.shape[0], int(out_features), int(in_features)
    if not 1 <= M <= DECODE_CUDA_MAX_M or not mod.nf4_decode_cuda_supported(M, N, K, int(blocksize), DTYPE_CODES[x.dtype]):
        return None
    if x.shape[1] != K:
        raise ValueError(f"x has {x.shape[1]} features, weight expects {K}")
    check_weight(packed, absmax, nested_absmax, offset, N, K, int(blocksize), x.device)
    lora_u, lora_b, r = lora_pair(lora_u, lora_b, M, N, "lora_u", "lora_b")
    for name, t in (("lora_u", lora_u), ("lora_b", lora_b), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    if r:
        lora_u, lora_b = lora_u.to(x.dtype), lora_b.to(x.dtype)
    if bias is not None:
        if bias.numel() != N:
            raise ValueError(f"bias has {bias.numel()} elements, needs {N}")
        bias = bias.reshape(-1).to(x.dtype).contiguous()
    x = x.contiguous()
    packed, absmax = packed.reshape(-1), absmax.reshape(-1)  # contiguous (check_weight)
    if nested_absmax is not None:
        nested_absmax, offset = nested_absmax.reshape(-1), offset.reshape(-1)
    if x.data_ptr() % 16 or packed.data_ptr() % 16:
        return None
    if split is None:
        split = decode_cuda_split(M, N, K, torch.cuda.get_device_properties(x.device).multi_processor_count)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    part = torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else None
    counters = (_decode_counter_buffer(x.device, (N + 15) // 16) if split > 1 and reduce_in_kernel else None)
    ran = _native("nf4_decode", x.device, 0)(
        y.data_ptr(), _ptr(part), _ptr(counters), x.data_ptr(), packed.data_ptr(), absmax.data_ptr(), _ptr(nested_absmax), _ptr(offset),
        device_table("map", x.device).data_ptr() if nested_absmax is not None else 0,
        _ptr(lora_u), _ptr(lora_b), _ptr(bias), M, N, K, r, x.stride(0), y.stride(0),
        lora_u.stride(0) if r else 0, lora_u.stride(1) if r else 0, lora_b.stride(0) if r else 0,
        lora_b.stride(1) if r else 0, float(scaling), int(blocksize), DTYPE_CODES[x.dtype], int(split),
    )
    return y if ran else None


# ---------------------------------------------------------------------------------------------- linear ops
def _dequant_matrix(packed, absmax, nested_absmax, offset, n_out, k_in, blocksize, dtype) -> Tensor:
    return dequantize_nf4(packed, absmax, nested_absmax, offset, n_out * k_in, blocksize, dtype).view(n_out, k_in)


@torch.library.custom_op("qlora::nf4_linear", mutates_args=())
def nf4_linear(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    offset: Optional[Tensor],
    out_features: int,
    in_features: int,
    blocksize: int,
    lora_u: Optional[Tensor],
    lora_b: Optional[Tensor],
    scaling: float,
    bias: Optional[Tensor],
) -> Tensor:
    """y [M, N] = x [M, K] @ deq(W)^T + scaling * lora_u [M, r] @ lora_b [N, r]^T + bias [N], in x.dtype.

    The dequantized W lives only inside this call (a scratch buffer on the native/reference paths,
    registers on the Triton path).
    """
    path = linear_path(x.device)
    if path == "triton":
        from .triton_kernels import nf4_linear_triton

        return nf4_linear_triton(
            x, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize,
            lora_u, lora_b, scaling, bias,
        )
    if path == "native" and x.is_cuda and x.shape[0] <= DECODE_CUDA_MAX_M:  # no Triton: the CUDA decode GEMM
        y = nf4_decode_cuda(x, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize,
                            lora_u, lora_b, scaling, bias)
        if y is not None:
            return y
    w = _dequant_matrix(packed, absmax, nested_absmax, offset, out_features, in_features, blocksize, x.dtype)
    y = x @ w.t() if bias is None else torch.addmm(bias.to(x.dtype), x, w.t())
    if lora_u is not None:
        y.addmm_(lora_u.to(x.dtype), lora_b.to(x.dtype).t(), alpha=scaling)
    return y


@nf4_linear.register_fake
def _(x, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize, lora_u, lora_b, scaling, bias):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D [M, K], got {x.dim()}-D")
    torch._check(x.shape[1] == in_features, lambda: f"x has {x.shape[1]} features, weight expects {in_features}")
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("qlora::nf4_linear_dx", mutates_args=())
def nf4_linear_dx(
    dy: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Optional[Tensor],
    offset: Optional[Tensor],
    out_features: int,
    in_features: int,
    blocksize: int,
    lora_g: Optional[Tensor],
    lora_a: Optional[Tensor],
    scaling: float,
) -> Tensor:
    """dx [M, K] = dy [M, N] @ deq(W) + scaling * lora_g [M, r] @ lora_a [r, K], in dy.dtype."""
    path = linear_path(dy.device)
    if path == "triton":
        from .triton_kernels import nf4_linear_dx_triton

        return nf4_linear_dx_triton(
            dy, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize, lora_g, lora_a, scaling
        )
    w = _dequant_matrix(packed, absmax, nested_absmax, offset, out_features, in_features, blocksize, dy.dtype)
    dx = dy @ w
    if lora_g is not None:
        dx.addmm_(lora_g.to(dy.dtype), lora_a.to(dy.dtype), alpha=scaling)
    return dx


@nf4_linear_dx.register_fake
def _(dy, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize, lora_g, lora_a, scaling):
    torch._check(dy.dim() == 2, lambda: f"dy must be 2-D [M, N], got {dy.dim()}-D")
    torch._check(dy.shape[1] == out_features, lambda: f"dy has {dy.shape[1]} columns, weight has {out_features} rows")
    return dy.new_empty(dy.shape[0], in_features)


# ============================================================================================ optimizers
# Fused AdamW steps (qlora_kernels.optim). Each mutates param, its states and the step/skipped counters in
# place; contract in csrc/optim_kernels.h, reference in optim/reference.py. The validation of tensors happens
# in optim/adamw.py; the checks here guard the pointers.
def _raise_unless(cond: bool, message) -> None:
    """torch._check's contract without its symbolic-shape machinery (~3 us a call): the eager path's checks."""
    if not cond:
        raise RuntimeError(message())


def _check_step_tensors(param: Tensor, grad: Tensor, states: tuple, step: Tensor, skipped: Tensor,
                        check=torch._check) -> None:
    check(param.dtype in DTYPE_CODES, lambda: f"param must be float32/float16/bfloat16, got {param.dtype}")
    check(grad.dtype == param.dtype, lambda: f"grad dtype {grad.dtype} differs from param dtype {param.dtype}")
    check(grad.numel() == param.numel(), lambda: f"grad has {grad.numel()} elements, param {param.numel()}")
    check(grad.device == param.device, lambda: f"grad is on {grad.device}, param on {param.device}")
    for name, t, n, dtype in states:
        check(t.numel() == n, lambda: f"{name} has {t.numel()} elements, needs {n}")
        check(t.dtype == dtype, lambda: f"{name} must be {dtype}, got {t.dtype}")
        check(t.is_contiguous(), lambda: f"{name} must be contiguous")
        check(t.device == param.device, lambda: f"{name} is on {t.device}, param on {param.device}")
    for name, t in (("step", step), ("skipped", skipped)):
        check(t.dtype == torch.int64 and t.numel() == 1, lambda: f"{name} must be one int64, got {t.dtype} {tuple(t.shape)}")
        check(t.device == param.device, lambda: f"{name} is on {t.device}, param on {param.device}")
    check(param.is_contiguous(), lambda: "param must be contiguous")


def _check_step8(param, grad, state1, state2, absmax1, absmax2, step, skipped, check=torch._check) -> None:
    n = param.numel()
    nb = (n + 255) // 256
    _check_step_tensors(param, grad, (("state1", state1, n, torch.uint8), ("state2", state2, n, torch.uint8),
                                      ("absmax1", absmax1, nb, torch.float32), ("absmax2", absmax2, nb, torch.float32)),
                        step, skipped, check)


def _check_step32(param, grad, exp_avg, exp_avg_sq, step, skipped, check=torch._check) -> None:
    n = param.numel()
    _check_step_tensors(param, grad, (("exp_avg", exp_avg, n, torch.float32), ("exp_avg_sq", exp_avg_sq, n, torch.float32)),
                        step, skipped, check)


_optim_flags: dict = {}


def _optim_flag(device: torch.device) -> Tensor:
    """The kernels' int32 scratch flag on `device` (0 between calls; calls are stream-ordered)."""
    if device not in _optim_flags:
        # a process-wide scratch: made outside any dispatch mode (a fake mode must not supply it; a memory
        # tracker around the first step must not count it as that step's)
        with torch.utils._python_dispatch._disable_current_modes():
            _optim_flags[device] = torch.zeros((), dtype=torch.int32, device=device)
    return _optim_flags[device]


@torch.library.custom_op(
    "qlora::adamw8bit_step", mutates_args=("param", "state1", "state2", "absmax1", "absmax2", "step", "skipped")
)
def adamw8bit_step(
    param: Tensor,
    grad: Tensor,
    state1: Tensor,
    state2: Tensor,
    absmax1: Tensor,
    absmax2: Tensor,
    step: Tensor,
    skipped: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step with blockwise 8-bit states: state1/state2 uint8 codes (numel of param; signed /
    unsigned dynamic map), absmax1/absmax2 float32 [ceil(n / 256)], step/skipped int64 []. A gradient with
    NaN, inf or |g| >= 2^63 leaves everything but `skipped` (+1) untouched."""
    _run_adamw_steps([(param, grad, state1, state2, absmax1, absmax2, step, skipped)], [], lr, beta1, beta2, eps,
                     weight_decay)


@adamw8bit_step.register_fake
def _(param, grad, state1, state2, absmax1, absmax2, step, skipped, lr, beta1, beta2, eps, weight_decay):
    _check_step8(param, grad, state1, state2, absmax1, absmax2, step, skipped)
    return None


@torch.library.custom_op("qlora::adamw32bit_step", mutates_args=("param", "exp_avg", "exp_avg_sq", "step", "skipped"))
def adamw32bit_step(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    skipped: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step with float32 states exp_avg/exp_avg_sq (numel of param); counters as adamw8bit_step."""
    _run_adamw_steps([], [(param, grad, exp_avg, exp_avg_sq, step, skipped)], lr, beta1, beta2, eps, weight_decay)


@adamw32bit_step.register_fake
def _(param, grad, exp_avg, exp_avg_sq, step, skipped, lr, beta1, beta2, eps, weight_decay):
    _check_step32(param, grad, exp_avg, exp_avg_sq, step, skipped)
    return None


def adamw_steps(steps8: list, steps32: list, lr: float, beta1: float, beta2: float, eps: float,
                weight_decay: float, *, validate: bool = True) -> None:
    """The optimizers' eager path: the work of qlora::adamw8bit_step / qlora::adamw32bit_step on many tensors,
    without the dispatcher (torch.library's Python custom-op dispatch costs ~0.2-0.3 ms per call, more than a
    64K-element step, and a LoRA model has hundreds of tensors). With the native kernels all tensors of a state
    width go in ONE call: on the CPU one thread team over all their work (adamw*_steps_cpu), on CUDA the
    per-tensor launches back to back on the current stream (adamw*_steps_cuda).
    steps8: (param, grad, state1, state2, absmax1, absmax2, step, skipped) tuples; steps32: (param, grad,
    exp_avg, exp_avg_sq, step, skipped); one device per call. validate: check every tensor as the ops' fakes do
    (~15 us a tensor); the optimizers pass False: they build the states themselves and check each gradient."""
    if validate:
        for items, check in ((steps8, _check_step8), (steps32, _check_step32)):
            for item in items:
                check(*item, check=_raise_unless)
    _run_adamw_steps(steps8, steps32, lr, beta1, beta2, eps, weight_decay)


def _run_adamw_steps(steps8: list, steps32: list, lr, beta1, beta2, eps, weight_decay) -> None:
    """adamw_steps after its checks; also the qlora:: optimizer ops' body (their fakes check)."""
    from .optim import reference as optim_ref
    from .optim._format import kernel_table

    for items, reference in ((steps8, optim_ref.adamw8bit_step_ref), (steps32, optim_ref.adamw32bit_step_ref)):
        if not items:
            continue
        device = items[0][0].device
        if any(item[0].device != device for item in items):
            raise ValueError(f"adamw_steps takes the tensors of one device per call, got {device} and "
                             f"{next(item[0].device for item in items if item[0].device != device)}")
        if not use_native(device):
            for item in items:
                reference(*item, lr, beta1, beta2, eps, weight_decay)
            continue
        grads = [item[1].contiguous() for item in items]  # alive until the call returns
        ptrs = lambda k: [item[k].data_ptr() for item in items]  # noqa: E731
        ns = [item[0].numel() for item in items]
        codes = [DTYPE_CODES[item[0].dtype] for item in items]
        flag = _optim_flag(device).data_ptr()
        if items is steps8:
            _native("adamw8bit_steps", device, sum(ns), _grain(_OPTIM_GRAIN, _OPTIM_GRAIN_THREADS))(
                ptrs(0), [g.data_ptr() for g in grads], ptrs(2), ptrs(3), ptrs(4), ptrs(5), ptrs(6), ptrs(7), ns, codes,
                flag, kernel_table(device).data_ptr(), lr, beta1, beta2, eps, weight_decay)
        else:
            _native("adamw32bit_steps", device, sum(ns))(
                ptrs(0), [g.data_ptr() for g in grads], ptrs(2), ptrs(3), ptrs(4), ptrs(5), ns, codes, flag,
                lr, beta1, beta2, eps, weight_decay)


from . import _grouped_ops  # noqa: E402,F401  (registers qlora::nf4_grouped_linear / nf4_grouped_linear_dx)
