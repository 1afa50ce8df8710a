"""Launch parameters of the Triton kernels: LaunchConfig, the heuristic table, and `pick_config`.

Kept apart from dispatch.py so that the kernel files (which need `pick_config`) and the dispatcher (which
needs the kernels) do not import each other: kernels import configs; dispatch imports kernels and configs.

`pick_config`: tile sizes, warps and stages from HEURISTICS, keyed on (op, capability major, M bucket), then
fitted to N, K and the blocksize. Tests override with `set_config_override` / `config_override`.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Optional

import torch
import triton


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
# BLOCK_K = 128 = two blocks of the default blocksize (one scale per tile row and block). Small M: the grid is
# N / BLOCK_N programs, so BLOCK_N shrinks to keep >= 1 program per SM at N = 4096. NOT tuned on hardware yet.
HEURISTICS: dict[tuple, LaunchConfig] = {
    # BLOCK_K = 2 blocks (128 at blocksize 64) wherever it fits: the fast path then holds one whole block row
    # per thread (nf4_tile_fast, PERM_K: one 16-entry table per 64 weights instead of one per 32) and the
    # fixed per-iteration work spreads over twice the weights. sass_report, sm_90, bf16, double quant:
    # forward 5.83 -> 4.82 instructions per weight, dx 5.80 -> 5.09, decode 5.58 -> 4.66.
    ("fwd", 9, 64): _C(64, 32, 128, 8, 4, 4),  # 9.1 per weight (64x32x64: 12.4)
    ("fwd", 9, 256): _C(64, 128, 128, 8, 4, 3),
    # M > 256: 64-row tiles with one warpgroup: 4.8 per weight, 216 registers, 100-102 KB shared: 2 CTAs per
    # SM, so one CTA's dequantization overlaps the other's wgmma (64x128x64: 5.8, 158 registers, 3 CTAs).
    ("fwd", 9, 1024): _C(64, 128, 128, 8, 4, 3),
    ("fwd", 9, None): _C(64, 128, 128, 8, 4, 3),
    ("dx", 9, 64): _C(64, 64, 128, 8, 4, 4),  # 5.1 per weight (64x64x64: 7.5)
    ("dx", 9, 256): _C(64, 64, 128, 8, 4, 4),
    ("dx", 9, 1024): _C(64, 64, 128, 8, 4, 3),  # 5.1 per weight, 3 CTAs per SM
    ("dx", 9, None): _C(64, 64, 128, 8, 4, 4),
    # decode: block_m 16 = tl.dot on mma tiles for every M <= 16 (its loads are software-pipelined with
    # cp.async; the M = 1 register-FMA variant, block_m 1, is not: the bench compares both). 128 rows x 128
    # columns: 4.7 instructions per weight, 145-149 registers, 74 KB shared (16x256x128: 4.4 but 239
    # registers and 136 KB, one CTA per SM); split-K fills the SMs.
    ("decode", 9, 16): _C(16, 128, 128, 1, 4, 4),
    # sm_80 (A100; also used for 8.6/8.9 and anything older/newer not listed): mma.sync tiles.
    ("fwd", 8, 64): _C(64, 32, 128, 8, 4, 3),  # 8.8 per weight
    ("fwd", 8, 256): _C(64, 128, 128, 8, 8, 3),  # 6.1 per weight, 190 registers
    # 128-row tiles halve the dequantization per output; 128x128x128 spilled 124 B (triton 3.9)
    ("fwd", 8, 1024): _C(128, 128, 64, 8, 8, 3),
    ("fwd", 8, None): _C(128, 128, 64, 8, 8, 3),
    ("dx", 8, 64): _C(64, 64, 128, 8, 4, 3),  # 5.9 per weight
    ("dx", 8, 256): _C(64, 64, 128, 8, 4, 3),
    # 10.2 per weight, 0.094 narrow loads (128x64x64: 12.3; 128x64x128: 9.2 but 0.156: 3 scale loads per
    # (row, block) over 32 weights per thread; 128x128x128 spilled 268 B)
    ("dx", 8, 1024): _C(128, 128, 64, 8, 8, 3),
    ("dx", 8, None): _C(128, 128, 64, 8, 8, 3),
    ("decode", 8, 16): _C(16, 128, 128, 1, 4, 3),  # 4.6 per weight (16x128x64: 5.6)
    # grouped MoE kernels (grouped.py; "gfwd" / "gdx", one entry per capability: the rows per expert vary
    # within a launch): the dense kernels' 64-row tiles (wgmma on sm_90, one warpgroup; a 128-row tile would
    # waste half a tile more per expert on ragged groups) with their two-block K width (on every triton).
    ("gfwd", 9, None): _C(64, 128, 128, 8, 4, 3),
    ("gdx", 9, None): _C(64, 64, 128, 8, 4, 4),
    ("gfwd", 8, None): _C(64, 128, 128, 8, 8, 3),
    ("gdx", 8, None): _C(64, 64, 128, 8, 4, 3),
    ("gfwd", 0, None): _C(32, 32, 32, 4, 4, 1),
    ("gdx", 0, None): _C(32, 32, 32, 4, 4, 1),
    # interpreter: small tiles (it runs every program in Python)
    ("fwd", 0, None): _C(32, 32, 32, 4, 4, 1),
    ("dx", 0, None): _C(32, 32, 32, 4, 4, 1),
    ("decode", 0, 16): _C(16, 32, 64, 1, 4, 1),
}
# The two-block tiles above pay off through nf4_tile's PERM_K layout, which needs triton >= 3.9: triton 3.6
# (torch 2.11's) fails to compile it for sm_90 (TritonGPUOptimizeDotOperands: "PassManager::run failed"), and
# behind an opaque op it runs 6.1 (forward), 6.4 (dx) and 7.5 (decode) instructions per weight, where its
# one-block tiles below run 5.7, 5.7 and 6.9 (sass_report counts under triton 3.6.0). Older triton keeps them.
PERM_K_MIN_TRITON = (3, 9)
LEGACY_HEURISTICS: dict[tuple, LaunchConfig] = {
    ("fwd", 9, 64): _C(64, 32, 64, 8, 4, 4),
    ("fwd", 9, 256): _C(64, 128, 64, 8, 4, 4),
    ("fwd", 9, 1024): _C(64, 128, 64, 8, 4, 3),
    ("fwd", 9, None): _C(64, 128, 64, 8, 4, 4),
    ("dx", 9, 64): _C(64, 64, 64, 8, 4, 4),
    ("decode", 9, 16): _C(16, 128, 64, 1, 4, 4),
    ("fwd", 8, 64): _C(64, 32, 64, 8, 4, 3),
    ("fwd", 8, 256): _C(64, 128, 64, 8, 8, 3),
    ("dx", 8, 64): _C(64, 64, 64, 8, 4, 3),
    ("dx", 8, 1024): _C(128, 64, 64, 8, 8, 3),
    ("dx", 8, None): _C(128, 64, 64, 8, 8, 3),
    ("decode", 8, 16): _C(16, 128, 64, 1, 4, 3),
    # (no grouped entries: under triton 3.6.0 the two-block tiles above, without PERM_K, beat one-block ones:
    # sm_90 gfwd 5.37 vs 5.72 instructions per weight (64x128x64), gdx 5.72 vs 6.97 (64x64x64); sm_80 gfwd
    # 12.28 vs 12.81, gdx 9.70 vs 12.94; bench/sass_report.py counts)
}


@lru_cache(maxsize=None)
def perm_k_supported() -> bool:
    """True when this triton compiles nf4_tile's PERM_K tile well (see PERM_K_MIN_TRITON)."""
    version = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])
    return version >= PERM_K_MIN_TRITON


# float32 activations take exact FMA dots (no tensor cores): tiles capped so they do not spill (ptxas:
# 128x128x64 spilled ~20 KB, 64x64x32 0.6-5 KB, 64x64x16 with rank 128 ~60 B; these caps spill nothing).
FP32_CAP = {"fwd": _C(64, 32, 16, 8, 4, 2), "dx": _C(64, 16, 32, 8, 4, 2), "decode": _C(16, 16, 64, 1, 4, 2)}
FP32_CAP.update(gfwd=FP32_CAP["fwd"], gdx=FP32_CAP["dx"])
M_BUCKETS = (16, 64, 256, 1024, None)

DECODE_MAX_M = 16
_config_override: Optional[Callable] = None


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
        key = ("decode", cap, 16)
    elif cap == 0 or op in ("gfwd", "gdx"):  # grouped: one entry per capability
        key = (op, cap, None)
    else:
        bucket = m_bucket(M)
        key = (op, cap, 64 if op in ("fwd", "dx") and bucket == 16 else bucket)
    if not perm_k_supported() and key in LEGACY_HEURISTICS:
        return LEGACY_HEURISTICS[key]
    return HEURISTICS[key]


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


__all__ = [
    "LaunchConfig", "HEURISTICS", "LEGACY_HEURISTICS", "PERM_K_MIN_TRITON", "perm_k_supported", "FP32_CAP", "M_BUCKETS", "DECODE_MAX_M", "capability", "sm_count", "m_bucket",
    "table_config", "fit_config", "decode_split", "pick_config", "set_config_override", "config_override",
]
