"""Launch parameters and the per-call choice of kernel for the Triton linear path.

Two decisions, both made on the host per call:

1. `plan_linear`: which implementation runs a call.
   - "decode": forward with M <= 16: the CUDA decode GEMM (csrc/nf4_decode_cuda.cu, via
     qlora_kernels._ops.nf4_decode_cuda) where it takes the call (a native CUDA build, fp16/bf16 x, K % 256 == 0,
     K % blocksize == 0, blocksize >= 64; QLORA_KERNELS_CUDA_DECODE=0 turns it off), else the split-K GEMV
     (decode.py);
   - "fused":  the fused dequant-matmul kernel (linear_fwd.py / linear_dx.py);
   - "dequant": dequantize W to a scratch buffer (torch.ops.qlora.dequantize_nf4, native CUDA kernel when
     built), cuBLAS matmul (+ bias through addmm), LoRA through a second addmm.
   Off-GPU (the interpreter) only the Triton kernels run. Override with `set_plan_override` or
   QLORA_KERNELS_TRITON_PLAN=auto|fused|dequant (decode stays the M <= 16 forward choice unless "dequant").

2. `pick_config` (configs.py, re-exported here): tile sizes, warps and stages from HEURISTICS, keyed on
   (op, capability major, M bucket), then fitted to N, K and the blocksize.

Crossover between "fused" and "dequant" (NOT MEASURED: no GPU was available when this was written; the
numbers below are a model, bench/bench_linear.py measures the real crossover and records it in its JSON
under "crossover"; put measured values in MEASURED_CROSSOVER or DEVICE_MODEL["fused_eff"]):

    fused   = max(2 M N (K + r) / (eta P),  (N K * 4.127/8 + 2 (M K + M N + M r + N r)) / BW)
    dequant = (N K * 4.127/8 + 2 N K) / BW                      dequantize: read 4-bit, write 16-bit W
            + max(2 M N K / P, 2 (N K + M K + M N) / BW)        cuBLAS at its measured peak P
            + max(2 M N r / P, 2 (2 M N + M r + N r) / BW)      LoRA addmm: read and rewrite y
            + launch overhead per extra kernel
    P, BW = measured bf16 matmul rate and device copy bandwidth; eta = the fused kernel's fraction of cuBLAS
    throughput on compute-bound shapes (its W tiles are dequantized on the CUDA cores between wgmma issues).

eta comes from bench/sass_report.py's static model of the compiled kernels (the forward's main loop counted
in its SASS: instructions issued per dequantized weight against the tensor-core time, overlapped only when
two CTAs share an SM): its roofline fraction of the forward at M = N = K = 4096, bf16, double quant
(bench/results/sass-sm90.json: 1.0, tensor-bound, with 4.8 instructions per weight and 2 CTAs per SM; the
register lookup with one block per tile row: 0.895 at 5.8; the first register lookup: 0.703 at 7.4; the
kernels before it: 0.404 at 15.4). That model is an optimistic bound (one instruction per scheduler per
clock, no stalls), so routing caps every unmeasured eta at UNMEASURED_EFF_CAP = 0.9 until a measured value
(DEVICE_MODEL[cap]["measured"] = True) replaces it. With P = 788 TFLOP/s and BW = 4.3 TB/s (both measured on
this workplace's H200) and eta = 0.9, `crossover_m` gives for N = K = 4096: M* = 2498 (r = 0), 12606
(r = 16), 8548 (r = 64); 8192 x 8192, r = 16: 3714; 14336 x 4096, r = 16: 9957. So M <= 16 -> decode, M up
to a few thousand -> fused, larger M -> dequant + cuBLAS. On sm_80 the model also puts the forward at the
tensor-core bound (eta = 1.0: mma.sync time exceeds the issue time). Measured crossovers go into
MEASURED_CROSSOVER, which takes precedence over the model.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Callable, Optional

import torch
from torch import Tensor

from .configs import (  # noqa: F401  (re-exported: users and tests import these from dispatch)
    DECODE_MAX_M, FP32_CAP, HEURISTICS, M_BUCKETS, LaunchConfig, capability, config_override, decode_split,
    fit_config, m_bucket, pick_config, set_config_override, sm_count, table_config,
)
from .decode import nf4_decode
from .linear_dx import nf4_linear_dx
from .linear_fwd import nf4_linear


# Roofline constants for the crossover model (see module docstring). peak/copy for sm_90: measured on an
# H200 of this workplace (bf16 8192^3 matmul 788 TFLOP/s, device copy 4.3 TB/s read+write); sm_80: A100
# datasheet x 0.9 (unmeasured). fused_eff: bench/sass_report.py's model (not measured), i.e. the roofline
# fraction of the forward at 4096^3 in bench/results/sass-sm90.json / sass-sm80.json (routing caps it at 0.9).
DEVICE_MODEL = {
    9: dict(peak_tflops=788.0, copy_gbs=4300.0, fused_eff=1.0, launch_us=2.0),
    8: dict(peak_tflops=280.0, copy_gbs=1800.0, fused_eff=1.0, launch_us=3.0),
}
# The static model has no stalls, so it can only overrate the fused kernel (sm_80 reads 1.0: tensor-core
# bound). Until bench_linear measures eta, routing uses at most this: at large M a wrong "dequant" costs the
# dequantize pass (a few % of the GEMM), a wrong "fused" costs the whole gap to cuBLAS.
UNMEASURED_EFF_CAP = 0.9
# Measured crossovers (from bench/results/linear-*.json "crossover"): (capability, op, N, K) -> the first M at
# which dequant + cuBLAS beats the fused kernel. Consulted before the model. Empty: nothing measured yet.
MEASURED_CROSSOVER: dict[tuple, int] = {}

_plan_override: Optional[str | Callable] = None


def _decode_cuda(*args):
    """qlora_kernels._ops.nf4_decode_cuda (None when it does not take the call). Imported on use: _ops imports
    this package lazily too."""
    from .._ops import nf4_decode_cuda

    return nf4_decode_cuda(*args)


# ------------------------------------------------------------------------------------------ crossover model
def predict_seconds(plan: str, M: int, N: int, K: int, r: int, cap: int = 9, bytes_per_act: int = 2) -> float:
    """Roofline estimate of one forward (or dx) call for plan "fused" or "dequant" (see module docstring)."""
    m = DEVICE_MODEL.get(cap, DEVICE_MODEL[8])
    P, BW, launch = m["peak_tflops"] * 1e12, m["copy_gbs"] * 1e9, m["launch_us"] * 1e-6
    eta = m["fused_eff"] if m.get("measured") else min(m["fused_eff"], UNMEASURED_EFF_CAP)
    e = bytes_per_act
    w4 = N * K * 4.127 / 8
    if plan == "fused":
        return max(2 * M * N * (K + r) / (eta * P), (w4 + e * (M * K + M * N + M * r + N * r)) / BW)
    t = (w4 + e * N * K) / BW + launch
    t += max(2 * M * N * K / P, e * (N * K + M * K + M * N) / BW)
    if r:
        t += max(2 * M * N * r / P, e * (2 * M * N + M * r + N * r) / BW) + launch
    return t


@lru_cache(maxsize=4096)
def crossover_m(N: int, K: int, r: int, cap: int = 9) -> int:
    """Smallest M at which the model predicts dequant + cuBLAS to be faster (a large number if never)."""
    lo, hi = 1, 1 << 22
    if predict_seconds("dequant", hi, N, K, r, cap) >= predict_seconds("fused", hi, N, K, r, cap):
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if predict_seconds("dequant", mid, N, K, r, cap) < predict_seconds("fused", mid, N, K, r, cap):
            hi = mid
        else:
            lo = mid + 1
    return lo


# ------------------------------------------------------------------------------------------ plan
def set_plan_override(plan) -> None:
    """None (model), "fused", "dequant", or fn(op, M, N, K, r, device) -> plan."""
    global _plan_override
    if plan is not None and not callable(plan) and plan not in ("fused", "dequant", "auto"):
        raise ValueError(f"plan must be 'auto', 'fused', 'dequant' or a callable, got {plan!r}")
    _plan_override = None if plan == "auto" else plan


def plan_linear(op: str, M: int, N: int, K: int, r: int, device: torch.device) -> str:
    """"decode" | "fused" | "dequant" for op "fwd" or "dx" (see module docstring)."""
    forced = _plan_override
    if forced is None:
        env = os.environ.get("QLORA_KERNELS_TRITON_PLAN", "auto").strip().lower()
        forced = None if env == "auto" else env
    if callable(forced):
        forced = forced(op, M, N, K, r, device)
    if forced == "dequant":
        return "dequant"
    small = op == "fwd" and M <= DECODE_MAX_M
    if forced == "fused" or device.type != "cuda":
        return "decode" if small else "fused"
    if small:
        return "decode"
    cap = capability(device)
    cross = MEASURED_CROSSOVER.get((cap, op, N, K)) or crossover_m(N, K, r, cap)
    return "fused" if M < cross else "dequant"


# ------------------------------------------------------------------------------------------ dispatchers
def _dequant_matrix(packed, absmax, nested_absmax, offset, n_out, k_in, blocksize, dtype) -> Tensor:
    flat = torch.ops.qlora.dequantize_nf4(packed, absmax, nested_absmax, offset, n_out * k_in, blocksize, dtype)
    return flat.view(n_out, k_in)


def nf4_linear_triton(x, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize,
                      lora_u, lora_b, scaling, bias) -> Tensor:
    """torch.ops.qlora.nf4_linear on the Triton path: decode GEMV, fused kernel, or dequantize + cuBLAS."""
    M, r = x.shape[0], (0 if lora_u is None else lora_u.shape[1])
    plan = plan_linear("fwd", M, out_features, in_features, r, x.device)
    args = (x, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize, lora_u, lora_b, scaling, bias)
    if plan == "decode":
        # the CUDA decode GEMM (csrc/nf4_decode_cuda.cu) where it takes the call; the Triton decode otherwise
        y = _decode_cuda(*args) if x.is_cuda else None
        return y if y is not None else nf4_decode(*args)
    if plan == "fused":
        return nf4_linear(*args)
    w = _dequant_matrix(packed, absmax, nested_absmax, offset, out_features, in_features, blocksize, x.dtype)
    y = x @ w.t() if bias is None else torch.addmm(bias.to(x.dtype), x, w.t())
    if lora_u is not None:
        y.addmm_(lora_u.to(x.dtype), lora_b.to(x.dtype).t(), alpha=scaling)
    return y


def nf4_linear_dx_triton(dy, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize,
                         lora_g, lora_a, scaling) -> Tensor:
    """torch.ops.qlora.nf4_linear_dx on the Triton path: fused kernel, or dequantize + cuBLAS."""
    M, r = dy.shape[0], (0 if lora_g is None else lora_g.shape[1])
    plan = plan_linear("dx", M, out_features, in_features, r, dy.device)
    if plan != "dequant":
        return nf4_linear_dx(dy, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize,
                             lora_g, lora_a, scaling)
    w = _dequant_matrix(packed, absmax, nested_absmax, offset, out_features, in_features, blocksize, dy.dtype)
    dx = dy @ w
    if lora_g is not None:
        dx.addmm_(lora_g.to(dy.dtype), lora_a.to(dy.dtype), alpha=scaling)
    return dx


def describe(N: int = 4096, K: int = 4096, r: int = 16, cap: int = 9) -> dict:
    """The model's crossover and predicted times at the benchmark's M values (for logs and the bench JSON)."""
    ms = (1, 16, 512, 4096, 16384)
    return {
        "crossover_m": crossover_m(N, K, r, cap),
        "predicted_us": {M: {p: 1e6 * predict_seconds(p, M, N, K, r, cap) for p in ("fused", "dequant")} for M in ms},
        "model": DEVICE_MODEL.get(cap, DEVICE_MODEL[8]),
        "fused_eff_source": "bench/sass_report.py static model (bench/results/sass-sm*.json)",
        "measured": False,
    }


__all__ = [
    "LaunchConfig", "HEURISTICS", "DEVICE_MODEL", "pick_config", "fit_config", "set_config_override", "config_override",
    "plan_linear", "set_plan_override", "crossover_m", "predict_seconds", "nf4_linear_triton", "nf4_linear_dx_triton",
    "describe",
]
