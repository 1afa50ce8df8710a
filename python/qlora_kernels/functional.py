"""Public functions on tensors: quantize, dequantize, pack, double quantization.

These check their arguments (every failure is a Python exception naming the argument) and call the ops of
`_ops.py`, so they run on any device, under torch.compile, and against any backend.
"""

from __future__ import annotations

import torch

from . import _ops
from ._format import FLOAT_DTYPES, all_finite, check_blocksize, check_tensor

__all__ = [
    "quantize_nf4",
    "dequantize_nf4",
    "pack_nf4",
    "unpack_nf4",
    "double_quantize",
    "double_dequantize",
]


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True):
    """Quantize a float tensor to NF4 (bit-compatible with bitsandbytes' nf4 `quantize_4bit`).

    Args:
        w: float32/float16/bfloat16 tensor of any shape, on CPU or CUDA; need not be contiguous; finite.
        blocksize: values per absmax block: 32, 64, 128, 256, 512, 1024, 2048 or 4096.
        double_quant: also quantize the float32 block scales to 8 bits in blocks of 256 (4.127 bits/param
            at blocksize 64 instead of 4.5), as bitsandbytes' `compress_statistics=True`.
    Returns:
        NF4Weight holding packed uint8 [(n + 1) // 2, 1] data and the scales.
    Raises:
        TypeError for a non-tensor or unsupported dtype, ValueError for a bad blocksize or non-finite values.
    """
    from .weight import NF4Weight

    check_tensor(w, "w")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"w must be float32, float16 or bfloat16, got {w.dtype}")
    if w.is_complex() or w.layout != torch.strided:
        raise TypeError("w must be a dense real tensor")
    check_blocksize(blocksize)
    w = w.detach()
    packed, absmax = _ops.quantize_nf4(w, blocksize)
    nested_absmax = offset = None
    if double_quant:
        absmax, nested_absmax, offset = _ops.double_quantize(absmax)  # raises when the scales overflow
    return NF4Weight(
        packed.view(-1, 1), absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize,
        nested_absmax=nested_absmax, offset=offset,
    )


def dequantize_nf4(q, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize an NF4Weight to a dense tensor of its original shape.

    Args:
        q: NF4Weight.
        dtype: output dtype (float32/float16/bfloat16); default: the dtype the weight was quantized from.
    Returns:
        Tensor of q.shape: NF4_TABLE[code] * scale in float32, rounded once to dtype.
    """
    from .weight import NF4Weight

    if not isinstance(q, NF4Weight):
        raise TypeError(f"q must be an NF4Weight, got {type(q).__name__}")
    return q.dequantize(dtype)


def pack_nf4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (uint8, any shape, values 0..15) two per byte, first in the high nibble.

    Returns uint8 [(n + 1) // 2]; an odd count is padded with code 7 (NF4 zero), as bitsandbytes does.
    """
    check_tensor(codes, "codes", dtype=torch.uint8)
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError(f"codes must be 4-bit values in 0..15, got a maximum of {int(codes.max())}")
    return _ops.pack_nf4(codes.reshape(-1))


def unpack_nf4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Unpack the first n 4-bit codes of a packed uint8 buffer: uint8 [n]."""
    check_tensor(packed, "packed", dtype=torch.uint8)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if packed.numel() < (n + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes, too short for n={n} codes (needs {(n + 1) // 2})")
    return _ops.unpack_nf4(packed.reshape(-1), n)


def double_quantize(absmax: torch.Tensor):
    """Quantize float32 block scales: (codes uint8 [nb], nested_absmax float32 [ceil(nb/256)], offset float32 []).

    offset = mean(absmax); (absmax - offset) is quantized to DYNAMIC_MAP codes in blocks of 256.
    """
    check_tensor(absmax, "absmax", dtype=torch.float32)
    if not all_finite(absmax):
        raise ValueError("absmax must be finite")
    return _ops.double_quantize(absmax.reshape(-1))


def double_dequantize(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Inverse of double_quantize: DYNAMIC_MAP[codes] * nested_absmax[i // 256] + offset, float32 [nb]."""
    check_tensor(codes, "codes", dtype=torch.uint8)
    check_tensor(nested_absmax, "nested_absmax", dtype=torch.float32, device=codes.device)
    offset = torch.as_tensor(offset, dtype=torch.float32, device=codes.device).reshape(())
    need = (codes.numel() + 255) // 256
    if nested_absmax.numel() != need:
        raise ValueError(f"nested_absmax must have {need} elements for {codes.numel()} codes, got {nested_absmax.numel()}")
    return _ops.double_dequantize(codes.reshape(-1), nested_absmax.reshape(-1), offset)
