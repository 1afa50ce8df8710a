"""The blockwise 8-bit optimizer state format (bitsandbytes' blockwise 8-bit optimizers' layout).

A state tensor of n >= MIN_8BIT_SIZE elements is stored as uint8 codes [n] plus one float32 absmax per
BLOCKSIZE consecutive values; value = MAP[code] * absmax[i // BLOCKSIZE]. The first moment uses the signed
dynamic map (qlora_kernels._format.DYNAMIC_MAP), the second moment the unsigned one. Smaller tensors keep
float32 states (quantizing them saves almost nothing and costs accuracy).

Quantization rule (ours, on every device): per block, absmax = max |x| over the block's new values;
s = x * (1 / absmax) in float32 (s = 0 when absmax == 0); code = number of float32 midpoints
(MAP[j] + MAP[j + 1]) / 2 strictly below s, i.e. the nearest code, ties to the lower one. bitsandbytes'
CUDA kernels approximate this nearest-code search (a bucketed binary search); its CPU backend rounds through a
65536-entry grid, which cannot resolve the small values of the unsigned map.
"""

from __future__ import annotations

import torch

from .._format import DYNAMIC_MAP

BLOCKSIZE = 256  # values per absmax (fixed by the format)
MIN_8BIT_SIZE = 4096  # tensors with fewer elements keep float32 states (bitsandbytes' default)
# A gradient element with |g| >= 2^63 (or NaN / inf) skips the tensor's step: its square would overflow
# float32 in the second moment and poison the state.
GRAD_LIMIT = 2.0**63


def _make_unsigned_dynamic_map() -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed=False): for i in 0..6, the 2^(i+1) midpoints of
    linspace(0.1, 1, 2^(i+1) + 1) times 10^(i-6); plus 0 and 1.0; 256 float32 values, sorted."""
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** (i + 1) + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


SIGNED_MAP = DYNAMIC_MAP
UNSIGNED_MAP = _make_unsigned_dynamic_map()
# Code of 0.0 in each map: a zero state (what a fresh optimizer holds, with absmax 0) reads back as 0 with
# any code; these are the codes the quantizer writes for it.
SIGNED_ZERO_CODE = int((SIGNED_MAP == 0).nonzero()[0, 0])
UNSIGNED_ZERO_CODE = 0


def midpoints(code_map: torch.Tensor) -> torch.Tensor:
    """The 255 float32 midpoints (MAP[j] + MAP[j + 1]) / 2 that separate the codes."""
    return (code_map[:-1] + code_map[1:]) / 2


# ---- the kernels' quantizer: a bucket table instead of a binary search ---------------------------------------
# Bucket of a float32 s: its sign and the top 16 bits of |s| below the sign (8 exponent + 8 mantissa bits),
# clamped to exponents 2^-25 .. 2^0 (every midpoint's magnitude lies in that range). base[bucket] = number of
# midpoints below the bucket's lowest value; at most one midpoint lies inside any bucket (asserted when the
# table is built), so code = base + (mids[base] < s) with mids padded by +inf. Two loads and a compare per
# value instead of 8 dependent compares, identical to torch.bucketize (tests/test_optim.py checks every code).
BUCKET_SHIFT = 15
BUCKET_LO = (127 - 25) << 8  # first bucket: |s| < 2^-25 * (1 + 2^-8), zero included
BUCKET_HI = 128 << 8  # one past the last: |s| < 2.0
NUM_BUCKETS = BUCKET_HI - BUCKET_LO  # per sign


def _bucket_base(mids: torch.Tensor) -> torch.Tensor:
    k = torch.arange(BUCKET_LO, BUCKET_HI, dtype=torch.int64)
    lo_bits = (k << BUCKET_SHIFT).to(torch.int32)
    hi_bits = (((k + 1) << BUCKET_SHIFT) - 1).to(torch.int32)
    pos_lo, pos_hi = lo_bits.view(torch.float32), hi_bits.view(torch.float32)
    pos_lo = torch.where(k == BUCKET_LO, torch.zeros_like(pos_lo), pos_lo)  # the first bucket reaches down to 0
    # positive buckets span [pos_lo, pos_hi]; negative ones [-pos_hi, -pos_lo]
    base_pos = torch.searchsorted(mids, pos_lo, side="left")  # midpoints strictly below pos_lo
    base_neg = torch.searchsorted(mids, -pos_hi, side="left")
    inside_pos = torch.searchsorted(mids, pos_hi, side="right") - base_pos  # midpoints in [pos_lo, pos_hi]
    inside_neg = torch.searchsorted(mids, -pos_lo, side="right") - base_neg
    assert int(inside_pos.max()) <= 1 and int(inside_neg.max()) <= 1, "a bucket holds two midpoints"
    return torch.cat([base_pos, base_neg]).to(torch.int32)


def _kernel_table(code_map: torch.Tensor) -> torch.Tensor:
    """int32 [256 + 256 + 2 * NUM_BUCKETS]: the map and the midpoints (+inf pad) as float32 bits, then base."""
    mids = midpoints(code_map)
    mids_padded = torch.cat([mids, torch.tensor([float("inf")])])
    return torch.cat([code_map.view(torch.int32), mids_padded.view(torch.int32), _bucket_base(mids)])


TABLE_STRIDE = 256 + 256 + 2 * NUM_BUCKETS
# One int32 table for the kernels: [signed map table | unsigned map table].
KERNEL_TABLE = torch.cat([_kernel_table(SIGNED_MAP), _kernel_table(UNSIGNED_MAP)])

_device_tables: dict = {}


def kernel_table(device) -> torch.Tensor:
    """KERNEL_TABLE on `device`, copied once per device (the kernels read it through a raw pointer)."""
    key = torch.device(device)
    if key not in _device_tables:
        with torch.utils._python_dispatch._disable_current_modes():  # as _ops._optim_flag
            _device_tables[key] = KERNEL_TABLE.to(key)
    return _device_tables[key]


def num_state_blocks(n: int) -> int:
    return (n + BLOCKSIZE - 1) // BLOCKSIZE
