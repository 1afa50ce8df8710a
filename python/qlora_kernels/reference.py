"""Pure-PyTorch reference implementations of the NF4 ops: the test oracle and the fallback backend.

Each function reproduces bitsandbytes 0.50.2's CPU arithmetic step for step (float32, one rounding per
operation, no fused multiply-add), so its bits are the bits of the format. Inputs are assumed valid: the
op layer (`_ops.py`) checks arguments before anything reaches here.
"""

from __future__ import annotations

import torch

from ._format import DYNAMIC_LUT, DYNAMIC_MAP, LUT_SIZE, NESTED_BLOCKSIZE, NF4_TABLE, NF4_ZERO_CODE, device_table

# Smallest scale bitsandbytes divides by; keeps an all-zero block finite (its values then encode to code 7).
_TINY = 1e-38


def _nf4_midpoints(device) -> torch.Tensor:
    table = NF4_TABLE.to(device)
    return (table[:-1] + table[1:]) / 2


def nf4_codes_ref(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat NF4 codes (uint8 [n], one per value) and absmax (float32 [ceil(n / blocksize)]) of w.

    Full blocks scale by the float32 reciprocal of absmax; a partial last block divides by it instead, and
    stores it clamped to 1e-38 (bitsandbytes' CPU arithmetic). A value exactly on a midpoint between two NF4
    values takes the lower code.
    """
    flat = w.reshape(-1).to(torch.float32)
    n = flat.numel()
    full = n - n % blocksize
    head = flat[:full].reshape(-1, blocksize)
    absmax = head.abs().amax(dim=1) if full else flat.new_zeros(0)
    scaled = torch.clamp(head * (1.0 / absmax.clamp(min=_TINY)).unsqueeze(1), -1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    codes = torch.bucketize(scaled, _nf4_midpoints(w.device), out_int32=True).to(torch.uint8)
    return codes, absmax


def pack_nf4_ref(codes: torch.Tensor) -> torch.Tensor:
    """Pack flat 4-bit codes (uint8 [n]) two per byte, first code in the high nibble: uint8 [(n + 1) // 2].

    An odd count is padded with code 7 (the NF4 zero), as bitsandbytes does.
    """
    codes = codes.reshape(-1)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), NF4_ZERO_CODE)])
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nf4_ref(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_nf4_ref: uint8 [n] codes from the first ceil(n / 2) bytes of packed."""
    packed = packed.reshape(-1)[: (n + 1) // 2]
    return torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n]


def quantize_nf4_ref(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed NF4 (uint8 [(n + 1) // 2]) and absmax (float32 [ceil(n / blocksize)]) of w (any shape)."""
    codes, absmax = nf4_codes_ref(w, blocksize)
    return pack_nf4_ref(codes), absmax


def quantize_with_lut_ref(values: torch.Tensor, lut: torch.Tensor, blocksize: int):
    """Blockwise 8-bit quantization through a 65536-entry code LUT (bitsandbytes' CPU quantize_blockwise).

    Per block: absmax = max |v| (0 for an all-zero block, whose codes are then all 0); v * (1 / absmax),
    clamped to [-1, 1], maps to LUT index trunc(((v + 1) * 0.5) * 65535 + 0.5), each step in float32.
    Returns (codes uint8 [n], absmax float32 [ceil(n / blocksize)]).
    """
    flat = values.reshape(-1).to(torch.float32)
    n = flat.numel()
    nb = (n + blocksize - 1) // blocksize
    padded = torch.zeros(nb * blocksize, dtype=torch.float32, device=flat.device)
    padded[:n] = flat
    blocks = padded.reshape(nb, blocksize)
    absmax = blocks.abs().amax(dim=1) if nb else padded.new_zeros(0)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = torch.clamp(blocks * inv.unsqueeze(1), -1, 1)
    index = ((scaled + 1.0) * 0.5 * float(LUT_SIZE - 1) + 0.5).to(torch.int64)
    codes = lut.to(flat.device)[index]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n], absmax


def double_quantize_ref(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of the float32 block scales.

    offset = mean(absmax) (torch.mean, float32); the centred scales are quantized in blocks of 256 to codes
    of DYNAMIC_MAP. Returns (codes uint8 [nb], nested_absmax float32 [ceil(nb / 256)], offset float32 []).
    """
    offset = absmax.mean()
    codes, nested_absmax = quantize_with_lut_ref(absmax - offset, DYNAMIC_LUT.to(absmax.device), NESTED_BLOCKSIZE)
    return codes, nested_absmax, offset


def double_dequantize_ref(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Rebuild the float32 block scales: DYNAMIC_MAP[code] * nested_absmax[i // 256] + offset (two roundings)."""
    nb = codes.numel()
    nested = nested_absmax.reshape(-1).repeat_interleave(NESTED_BLOCKSIZE)[:nb]
    return device_table("map", codes.device)[codes.reshape(-1).long()] * nested + offset.to(torch.float32)


def dequantize_nf4_ref(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    offset: torch.Tensor | None,
    n: int,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Flat dequantized values [n] of `dtype`: NF4_TABLE[code] * scale in float32, then one cast.

    absmax is float32 scales, or uint8 scale codes when nested_absmax and offset are given (double quant).
    """
    if nested_absmax is not None:
        absmax = double_dequantize_ref(absmax, nested_absmax, offset)
    codes = unpack_nf4_ref(packed, n).long()
    scale = absmax.reshape(-1).repeat_interleave(blocksize)[:n]
    return (device_table("nf4", packed.device)[codes] * scale).to(dtype)
