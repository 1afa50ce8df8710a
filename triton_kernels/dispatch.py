"""Launch parameters and the per-call choice of kernel for the Triton linear path.

Two decisions, both made on the host per call:

1. `plan_linear`: which implementation runs a call.
   - "decode": the split-K GEMV (decode.py), forward with M <= 16;
   - "fused":  the fused dequant-matmul kernel (linear_fwd.py / linear_dx.py);
   - "dequant": dequantize W to a scratch buffer (torch.ops.qlora.dequantize_nf4, native CUDA kernel when
     built), cuBLAS matmul (+ bias through addmm), LoRA through a second addmm.
   Off-GPU (the interpreter) only the Triton kernels run. Override with `set_plan_override` or
   QLORA_KERNELS_TRITON_PLAN=auto|fused|dequant (decode stays the M <= 16 forward choice unless "dequant").

2. `pick_config`: tile sizes, warps and stages from HEURISTICS, keyed on (op, capability major, M bucket),
   then fitted to N, K and the blocksize. Tests override with `set_config_override` / `config_override`.

Crossover between "fused" and "dequant" (NOT MEASURED: no GPU was available when this was written; the
numbers below are a roofline model, bench/bench_linear.py measures the real crossover and records it in
its JSON under "crossover"; put measured values in MEASURED_CROSSOVER or DEVICE_MODEL["fused_eff"]):

    fused   = max(2 M N (K + r) / (eta P),  (N K * 4.127/8 + 2 (M K + M N + M r + N r)) / BW)
    dequant = (N K * 4.127/8 + 2 N K) / BW                      dequantize: read 4-bit, write 16-bit W
            + max(2 M N K / P, 2 (N K + M K + M N) / BW)        cuBLAS at its measured peak P
            + max(2 M N r / P, 2 (2 M N + M r + N r) / BW)      LoRA addmm: read and rewrite y
            + launch overhead per extra kernel
    P, BW = measured bf16 matmul rate and device copy bandwidth; eta = the fused kernel's fraction of cuBLAS
    throughput on compute-bound shapes (its W tiles are dequantized on the CUDA cores between wgmma issues).

The dequant path pays a fixed ~(N K * 2.5 bytes) / BW plus launches, and per row of x the LoRA re-read and
rewrite of y (4 N bytes / BW); the fused path pays (1/eta - 1) * 2 N K / P per row. With H200 numbers
(P = 788 TFLOP/s, BW = 4.3 TB/s, both measured on this workplace's H200; eta = 0.85 ASSUMED) `crossover_m`
gives, for N = K = 4096: M* = 1573 (r = 0), 3558 (r = 16), 3128 (r = 64); 8192 x 8192, r = 16: 1899;
14336 x 4096, r = 16: 2820. So M <= 16 -> decode, M = 512 -> fused, M = 4096 and 16384 -> dequant + cuBLAS.
The model is knife-edged near M*: at 4096 x 4096 x 4096 it predicts 206 us fused vs 204 us dequant, so the
choice there costs little either way, but it flips to "fused" if the kernel reaches eta >= 0.86. Measured
crossovers go into MEASURED_CROSSOVER, which takes precedence over the model.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # decode only
    r_chunk: int = 64  # LoRA epilogue rank chunk (bounds the epilogue's registers and shared memory)


_C = LaunchConfig
# (op, capability major, M bucket) -> config. op: "fwd" (BLOCK_N = output columns, BLOCK_K = reduction),
# "dx" (BLOCK_K = output columns of dx, BLOCK_N = reduction over W's rows), "decode" (M <= 16).
# M buckets: upper bounds 16, 64, 256, 1024, and None for anything larger. Capability 0 = interpreter.
# sm_90: 64- and 128-row tiles so tl.dot lowers to wgmma (one warpgroup per 64 rows; checked in the PTX by
# tests/test_triton_compile.py, which also checks zero spills and the shared-memory limit for every entry);
# BLOCK_K = 64 = the default blocksize, so each W tile row has one scale. Small M: the grid is N / BLOCK_N
# programs, so BLOCK_N shrinks to keep >= 1 program per SM at N = 4096. NOT tuned on hardware yet.
HEURISTICS: dict[tuple, LaunchConfig] = {
    ("fwd", 9, 64): _C(64, 32, 64, 8, 4, 4),
    ("fwd", 9, 256): _C(64, 128, 64, 8, 4, 4),
    ("fwd", 9, 1024): _C(128, 128, 64, 8, 8, 3),
    ("fwd", 9, None): _C(128, 128, 64, 8, 8, 4),  # 128x256 spills (ptxas: 420 B) with W dequantized in registers
    ("dx", 9, 64): _C(64, 64, 64, 8, 4, 4),
    ("dx", 9, 256): _C(64, 64, 128, 8, 4, 4),
    ("dx", 9, 1024): _C(128, 64, 128, 8, 8, 3),
    ("dx", 9, None): _C(128, 64, 128, 8, 8, 4),  # BLOCK_K 256 spills (ptxas: 1600 B)
    # decode: block_m 16 = tl.dot on mma tiles for every M <= 16 (its loads are software-pipelined with
    # cp.async; the M = 1 register-FMA variant, block_m 1, is not: the bench compares both).
    ("decode", 9, 16): _C(16, 16, 256, 1, 4, 4),
    # sm_80 (A100; also used for 8.6/8.9 and anything older/newer not listed): mma.sync tiles.
    ("fwd", 8, 64): _C(64, 32, 64, 8, 4, 3),
    ("fwd", 8, 256): _C(64, 128, 64, 8, 8, 3),  # 4 warps spilled 4 B with triton 3.6
    ("fwd", 8, 1024): _C(128, 128, 64, 8, 8, 3),
    ("fwd", 8, None): _C(128, 128, 64, 8, 8, 3),
    ("dx", 8, 64): _C(64, 64, 64, 8, 4, 3),
    ("dx", 8, 256): _C(64, 64, 128, 8, 4, 3),
    ("dx", 8, 1024): _C(128, 64, 64, 8, 8, 3),  # BLOCK_K 128 spilled 40 B with triton 3.6
    ("dx", 8, None): _C(128, 64, 64, 8, 8, 3),
    ("decode", 8, 16): _C(16, 16, 256, 1, 4, 3),
    # interpreter: small tiles (it runs every program in Python)
    ("fwd", 0, None): _C(32, 32, 32, 4, 4, 1),
    ("dx", 0, None): _C(32, 32, 32, 4, 4, 1),
    ("decode", 0, 16): _C(16, 32, 64, 1, 4, 1),
}
# float32 activations take exact FMA dots (no tensor cores): tiles capped so they do not spill (ptxas:
# 128x128x64 spilled ~20 KB, 64x64x32 0.6-5 KB, 64x64x16 with rank 128 ~60 B; these caps spill nothing).
FP32_CAP = {"fwd": _C(64, 32, 16, 8, 4, 2), "dx": _C(64, 16, 32, 8, 4, 2), "decode": _C(16, 16, 64, 1, 4, 2)}
M_BUCKETS = (16, 64, 256, 1024, None)

# Roofline constants for the crossover model (see module docstring). peak/copy for sm_90: measured on an
# H200 of this workplace (bf16 8192^3 matmul 788 TFLOP/s, device copy 4.3 TB/s read+write); sm_80: A100
# datasheet x 0.9 (unmeasured). fused_eff: assumed, not measured.
DEVICE_MODEL = {
    9: dict(peak_tflops=788.0, copy_gbs=4300.0, fused_eff=0.85, launch_us=2.0),
    8: dict(peak_tflops=280.0, copy_gbs=1800.0, fused_eff=0.80, launch_us=3.0),
}
DECODE_MAX_M = 16
# Measured crossovers (from bench/results/linear-*.json "crossover"): (capability, op, N, K) -> the first M at
# which dequant + cuBLAS beats the fused kernel. Consulted before the model. Empty: nothing measured yet.
MEASURED_CROSSOVER: dict[tuple, int] = {}

_config_override: Optional[Callable] = None
_plan_override: Optional[str | Callable] = None


# ------------------------------------------------------------------------------------------ configs
def capability(device: torch.device) -> int:
    """Capability major used as the table key: 0 when not on a CUDA device (interpreter), else 8 or 9."""
    if device.type != "cuda":
        return 0
    major, _ = torch.cuda.get_device_capability(device)
    return 9 if major == 9 else 8


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 4


def m_bucket(M: int):
    for b in M_BUCKETS:
        if b is not None and M <= b:
            return b
    return None


def table_config(op: str, M: int, cap: int) -> LaunchConfig:
    if op == "decode":
        return HEURISTICS[("decode", cap, 16)]
    if cap == 0:
        return HEURISTICS[(op, 0, None)]
    bucket = m_bucket(M)
    if op in ("fwd", "dx") and bucket == 16:
        bucket = 64
    return HEURISTICS[(op, cap, bucket)]


def fit_config(op: str, cfg: LaunchConfig, M: int, N: int, K: int, blocksize: int,
               dtype: torch.dtype = torch.bfloat16, cap: int = 9) -> LaunchConfig:
    """Clamp a config to a shape: the W tile's K width <= blocksize unless K % blocksize == 0 (nf4_tile),
    tiles no larger than the (power-of-two padded) problem, >= 16 where tl.dot needs it; fp32 caps."""
    p2 = lambda v: 1 << max(0, (max(1, v) - 1).bit_length())  # noqa: E731
    bk, bn, bm, warps, stages = cfg.block_k, cfg.block_n, cfg.block_m, cfg.num_warps, cfg.num_stages
    if dtype == torch.float32:
        c = FP32_CAP[op]
        bm, bn, bk = min(bm, c.block_m), min(bn, c.block_n), min(bk, c.block_k)
        warps, stages = min(warps, c.num_warps), min(stages, c.num_stages)
    if K % blocksize != 0:
        # Blocks straddle rows: two candidate scales per tile row (and per-nibble parity when K is odd).
        # ptxas spilled 16-1800 B whenever the W tile had more than 8 values per thread (128x128x32 w8,
        # 64x128x32 w4, 128x64x64 w8); 128x64x32 w8 and smaller spill nothing.
        bk = min(bk, blocksize, 32)
        while bn > 16 and bn * bk > 8 * 32 * warps:
            bn //= 2
    bk = max(16, min(bk, p2(K)))
    bn = max(16, min(bn, p2(N)))
    if op == "decode":  # block_m: 1 = register FMA for M == 1, else tl.dot on 16-row tiles
        bm = 1 if (bm == 1 and M == 1) else 16
    else:
        bm = max(16, min(bm, p2(M)))
    return replace(cfg, block_m=bm, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                   split_k=max(1, cfg.split_k))


def decode_split(N: int, K: int, block_n: int, block_k: int, sms: int) -> int:
    """Split K only when N / BLOCK_N programs leave SMs idle: aim for 2 programs per SM, each chunk >= 4 tiles."""
    programs = -(-N // block_n)
    if programs >= sms:
        return 1
    return max(1, min(-(-2 * sms // programs), K // (4 * block_k)))


def pick_config(op: str, M: int, N: int, K: int, blocksize: int, device: torch.device,
                dtype: torch.dtype = torch.bfloat16, config: Optional[LaunchConfig] = None) -> LaunchConfig:
    """The launch config of one call: `config` if given, else the override (tests), else the heuristic
    table; always fitted to the shape and dtype. Decode's split_k is computed unless a config gave it."""
    cfg = config
    if cfg is None and _config_override is not None:
        cfg = _config_override(op, M, N, K, blocksize) if callable(_config_override) else _config_override.get(op)
    explicit = cfg is not None
    cap = capability(device)
    if cfg is None:
        cfg = table_config(op, M, cap)
    cfg = fit_config(op, cfg, M, N, K, blocksize, dtype, cap)
    if op == "decode" and not explicit:
        cfg = replace(cfg, split_k=decode_split(N, K, cfg.block_n, cfg.block_k, sm_count(device)))
    return cfg


def set_config_override(fn) -> None:
    """fn(op, M, N, K, blocksize) -> LaunchConfig or None (table), or a dict {op: LaunchConfig}, or None."""
    global _config_override
    _config_override = fn


@contextlib.contextmanager
def config_override(fn):
    global _config_override
    old = _config_override
    _config_override = fn
    try:
        yield
    finally:
        _config_override = old


# ------------------------------------------------------------------------------------------ crossover model
def predict_seconds(plan: str, M: int, N: int, K: int, r: int, cap: int = 9, bytes_per_act: int = 2) -> float:
    """Roofline estimate of one forward (or dx) call for plan "fused" or "dequant" (see module docstring)."""
    m = DEVICE_MODEL.get(cap, DEVICE_MODEL[8])
    P, BW, eta, launch = m["peak_tflops"] * 1e12, m["copy_gbs"] * 1e9, m["fused_eff"], m["launch_us"] * 1e-6
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
        from .decode import nf4_decode

        return nf4_decode(*args)
    if plan == "fused":
        from .linear_fwd import nf4_linear

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
        from .linear_dx import nf4_linear_dx

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
        "measured": False,
    }


__all__ = [
    "LaunchConfig", "HEURISTICS", "DEVICE_MODEL", "pick_config", "fit_config", "set_config_override", "config_override",
    "plan_linear", "set_plan_override", "crossover_m", "predict_seconds", "nf4_linear_triton", "nf4_linear_dx_triton",
    "describe",
]
