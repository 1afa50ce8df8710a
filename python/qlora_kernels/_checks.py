"""Argument checks of the fused linear launchers (Triton and the CUDA decode GEMM): one place, no Triton import."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._format import NESTED_BLOCKSIZE

# The Triton fast path (triton_kernels/nf4_tile.py nf4_tile_fast) reads `packed` as int32 words in 16-byte
# vectors, its offsets declared multiples of 16 bytes: a view starting elsewhere (packed[1:], a slice of a
# bigger buffer) would load misaligned words, a CUDA "misaligned address" error that poisons the context.
PACKED_ALIGN = 16
_warned_misaligned = False


def check_weight(packed, absmax, nested_absmax, offset, n_out, k_in, blocksize, device) -> None:
    """A packed NF4 weight [n_out, k_in] and its scales, as the fused kernels read them: sizes, devices,
    contiguity and dtypes (ValueError / TypeError naming the tensor)."""
    n = n_out * k_in
    nb = (n + blocksize - 1) // blocksize
    if packed.numel() < (n + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes, needs {(n + 1) // 2} for [{n_out}, {k_in}]")
    if absmax.numel() < nb:
        raise ValueError(f"absmax has {absmax.numel()} entries, needs {nb}")
    if nested_absmax is not None and nested_absmax.numel() < (nb + NESTED_BLOCKSIZE - 1) // NESTED_BLOCKSIZE:
        raise ValueError(f"nested_absmax has {nested_absmax.numel()} entries, needs "
                         f"{(nb + NESTED_BLOCKSIZE - 1) // NESTED_BLOCKSIZE}")
    for name, t in (("packed", packed), ("absmax", absmax), ("nested_absmax", nested_absmax), ("offset", offset)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, activations on {device}")
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be uint8, got {packed.dtype}")
    if nested_absmax is None and absmax.dtype != torch.float32:
        raise TypeError(f"absmax must be float32 without double quantization, got {absmax.dtype}")
    if nested_absmax is not None and (absmax.dtype != torch.uint8 or offset is None):
        raise TypeError("double quantization needs uint8 absmax codes, nested_absmax and offset")


def aligned_packed(packed: Tensor) -> Tensor:
    """`packed` (uint8, contiguous) itself when its address is a multiple of PACKED_ALIGN bytes, else an aligned
    copy (a fresh allocation; one RuntimeWarning per process, since the copy is repeated on every call)."""
    global _warned_misaligned
    if packed.data_ptr() % PACKED_ALIGN == 0 or packed.numel() == 0:
        return packed
    if not _warned_misaligned:
        _warned_misaligned = True
        import warnings

        warnings.warn(f"qlora_kernels: packed NF4 weight at an address that is not a multiple of {PACKED_ALIGN} "
                      f"bytes (a view at byte offset {packed.storage_offset()}): copied before each fused kernel; "
                      f"keep the packed weight in its own tensor to avoid the copy", RuntimeWarning, stacklevel=3)
    copy = torch.empty_like(packed, memory_format=torch.contiguous_format)
    if copy.data_ptr() % PACKED_ALIGN:  # torch's allocators align far beyond 16 bytes; say so if one does not
        raise RuntimeError(f"a fresh {packed.device} allocation is not {PACKED_ALIGN}-byte aligned")
    return copy.copy_(packed)


def lora_pair(u: Optional[Tensor], v: Optional[Tensor], rows: int, cols: int, u_name: str, v_name: str):
    """(u [rows, r], v [cols, r] as a possibly transposed view, r); v is indexed [col, r] by the kernels."""
    if (u is None) != (v is None):
        raise ValueError(f"{u_name} and {v_name} must be given together")
    if u is None:
        return None, None, 0
    if u.dim() != 2 or u.shape[0] != rows:
        raise ValueError(f"{u_name} must be [{rows}, r], got {tuple(u.shape)}")
    r = u.shape[1]
    if v.dim() != 2 or v.shape != (cols, r):
        raise ValueError(f"{v_name} must be [{cols}, {r}] (as indexed), got {tuple(v.shape)}")
    return u, v, r
