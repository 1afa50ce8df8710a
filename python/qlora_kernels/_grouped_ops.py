"""Grouped NF4 linear ops for mixture-of-experts layers: qlora::nf4_grouped_linear and its input-gradient twin
qlora::nf4_grouped_linear_dx, one call over all experts.

Expert storage: E experts, each an [N, K] = [out, in] matrix quantized exactly as a Linear weight of that shape
(expert e's bytes are `quantize_nf4(W[e])`'s, double quant included: each expert has its own offset and nested
scales), stacked: packed uint8 [E, N*K/2]; absmax [E, N*K/blocksize] (uint8 codes with double quant, float32
without); nested_absmax float32 [E, ceil(N*K/blocksize/256)] or None; offset float32 [E] or None. N*K must be a
multiple of the blocksize, so no block straddles two experts.

Tokens grouped by expert: x [T, K] with its rows sorted by expert and `offsets` int64 [E+1] on x's device
(offsets[0] = 0, offsets[E] = T, non-decreasing; expert e owns rows offsets[e]:offsets[e+1]; an expert may own
none).

Backends (as the dense linear ops): Triton on CUDA (triton_kernels/grouped.py, one launch per op over all
experts); native = per expert, the native dequantize into one scratch buffer reused by every expert, then a
matmul (empty experts skipped); the reference (pure PyTorch, the oracle) otherwise. No path dequantizes more than
one expert's matrix at a time.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference as ref
from ._backend import linear_path
from ._format import NESTED_BLOCKSIZE, VALID_BLOCKSIZES

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------------------------------------- checks
def _raise(exc):
    def fail(cond, msg):
        if not cond:
            raise exc(msg())
    return fail


def check_grouped(x, offsets, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize,
                  lora_u, lora_v, *, dx: bool, fake: bool = False) -> int:
    """Validate the arguments of a grouped op (x is dy for dx) and return the expert count E.

    Shape, dtype and device rules only (no data read: the fakes run it too); ValueError / TypeError naming the
    argument in eager mode, torch._check's RuntimeError under a fake tensor mode. dx: lora_u is lora_g [T, r]
    and lora_v is lora_a [E, r, K] (else lora_b [E, N, r])."""
    if fake:
        val = typ = lambda cond, msg: torch._check(cond, msg)  # noqa: E731
    else:
        val, typ = _raise(ValueError), _raise(TypeError)
    N, K = out_features, in_features
    xname, cols = ("dy", N) if dx else ("x", K)
    typ(x.dtype in _FLOATS, lambda: f"{xname} must be float32, float16 or bfloat16, got {x.dtype}")
    val(x.dim() == 2, lambda: f"{xname} must be 2-D [T, {cols}], got shape {tuple(x.shape)}")
    val(x.shape[1] == cols, lambda: f"{xname} has {x.shape[1]} columns, the experts' [{N}, {K}] matrices need {cols}")
    val(blocksize in VALID_BLOCKSIZES, lambda: f"blocksize must be one of {VALID_BLOCKSIZES}, got {blocksize}")
    val(N >= 0 and K >= 0, lambda: f"out_features and in_features must be >= 0, got {N}, {K}")
    val((N * K) % blocksize == 0, lambda: f"out_features * in_features = {N} * {K} = {N * K} is not a multiple of "
        f"blocksize {blocksize}: an expert's last block would straddle the next expert")
    typ(packed.dtype == torch.uint8, lambda: f"packed must be uint8, got {packed.dtype}")
    val(packed.dim() == 2, lambda: f"packed must be 2-D [E, N*K/2], got shape {tuple(packed.shape)}")
    E = packed.shape[0]
    nb = N * K // blocksize
    val(packed.shape[1] == N * K // 2, lambda: f"packed must be [E, {N * K // 2}] for [{N}, {K}] experts, got "
        f"{tuple(packed.shape)}")
    typ(offsets.dtype == torch.int64, lambda: f"offsets must be int64, got {offsets.dtype}")
    val(offsets.dim() == 1 and offsets.shape[0] == E + 1,
        lambda: f"offsets must be 1-D [E + 1] = [{E + 1}] for {E} experts, got shape {tuple(offsets.shape)}")
    val(absmax.dim() == 2 and absmax.shape[0] == E and absmax.shape[1] == nb,
        lambda: f"absmax must be [{E}, {nb}] ({nb} blocks of {blocksize} per expert), got {tuple(absmax.shape)}")
    val((nested_absmax is None) == (offset is None),
        lambda: "nested_absmax and offset must be given together (double quantization) or not at all")
    if nested_absmax is None:
        typ(absmax.dtype == torch.float32, lambda: f"absmax must be float32 without double quantization, got {absmax.dtype}")
    else:
        nnb = (nb + NESTED_BLOCKSIZE - 1) // NESTED_BLOCKSIZE
        typ(absmax.dtype == torch.uint8, lambda: f"absmax must be uint8 codes with double quantization, got {absmax.dtype}")
        typ(nested_absmax.dtype == torch.float32, lambda: f"nested_absmax must be float32, got {nested_absmax.dtype}")
        typ(offset.dtype == torch.float32, lambda: f"offset must be float32, got {offset.dtype}")
        val(nested_absmax.dim() == 2 and nested_absmax.shape[0] == E and nested_absmax.shape[1] == nnb,
            lambda: f"nested_absmax must be [{E}, {nnb}], got {tuple(nested_absmax.shape)}")
        val(offset.dim() == 1 and offset.shape[0] == E, lambda: f"offset must be [{E}] (one per expert), got "
            f"{tuple(offset.shape)}")
    uname, vname = ("lora_g", "lora_a") if dx else ("lora_u", "lora_b")
    val((lora_u is None) == (lora_v is None), lambda: f"{uname} and {vname} must be given together")
    if lora_u is not None:
        typ(lora_u.dtype in _FLOATS and lora_v.dtype in _FLOATS,
            lambda: f"{uname} and {vname} must be floating point, got {lora_u.dtype}, {lora_v.dtype}")
        val(lora_u.dim() == 2 and lora_u.shape[0] == x.shape[0],
            lambda: f"{uname} must be [{x.shape[0]}, r] (one row per token), got {tuple(lora_u.shape)}")
        r = lora_u.shape[1]
        want = (E, r, K) if dx else (E, N, r)
        val(lora_v.dim() == 3 and tuple(lora_v.shape) == want,
            lambda: f"{vname} must be {list(want)}, got {tuple(lora_v.shape)}")
    for name, t in (("offsets", offsets), ("packed", packed), ("absmax", absmax), ("nested_absmax", nested_absmax),
                    ("offset", offset), (uname, lora_u), (vname, lora_v)):
        if t is not None:
            val(t.device == x.device, lambda: f"{name} is on {t.device}, {xname} on {x.device}")
    return E


def check_offsets(offsets: Tensor, rows: int) -> None:
    """The data rule of offsets: offsets[0] = 0, offsets[-1] = rows, non-decreasing. On a CPU tensor it raises
    ValueError; on CUDA it is an asynchronous device assert (no host sync on the Triton path)."""
    if offsets.is_cuda:
        ok = (offsets[0] == 0) & (offsets[-1] == rows) & (offsets.diff() >= 0).all()
        torch._assert_async(ok, "offsets must start at 0, end at the row count and never decrease")
        return
    o = offsets.tolist()
    if o[0] != 0 or o[-1] != rows:
        raise ValueError(f"offsets must start at 0 and end at the row count {rows}, got {o[0]} .. {o[-1]}")
    bad = next((e for e in range(len(o) - 1) if o[e + 1] < o[e]), None)
    if bad is not None:
        raise ValueError(f"offsets must be non-decreasing (rows sorted by expert); offsets[{bad + 1}] = {o[bad + 1]} "
                         f"< offsets[{bad}] = {o[bad]}")


def _expert(packed, absmax, nested_absmax, offset, e):
    """Expert e's tensors as a Linear weight's: flat packed, flat absmax, flat nested scales, a 0-d offset."""
    if nested_absmax is None:
        return packed[e], absmax[e], None, None
    return packed[e], absmax[e], nested_absmax[e], offset[e]


# --------------------------------------------------------------------------------------------- reference
def nf4_grouped_linear_ref(x, offsets, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize,
                           lora_u=None, lora_b=None, scaling=1.0) -> Tensor:
    """The oracle of qlora::nf4_grouped_linear in pure PyTorch: y [T, N] in x.dtype, expert by expert,
    y[rows_e] = x[rows_e] @ deq(W_e)^T + scaling * lora_u[rows_e] @ lora_b[e]^T, each expert dequantized alone
    with the reference dequantize (float32 values cast once to x.dtype). Float64 x and LoRA give the exact
    result."""
    N, K = out_features, in_features
    y = x.new_zeros(x.shape[0], N)
    bounds = offsets.tolist()
    for e in range(packed.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        if a == b:
            continue
        w = ref.dequantize_nf4_ref(*_expert(packed, absmax, nested_absmax, offset, e), N * K, blocksize,
                                   x.dtype).view(N, K)
        y[a:b] = x[a:b] @ w.t()
        if lora_u is not None:
            y[a:b] += scaling * (lora_u[a:b].to(x.dtype) @ lora_b[e].to(x.dtype).t())
    return y


def nf4_grouped_linear_dx_ref(dy, offsets, packed, absmax, nested_absmax, offset, out_features, in_features,
                              blocksize, lora_g=None, lora_a=None, scaling=1.0) -> Tensor:
    """The oracle of qlora::nf4_grouped_linear_dx: dx [T, K] in dy.dtype,
    dx[rows_e] = dy[rows_e] @ deq(W_e) + scaling * lora_g[rows_e] @ lora_a[e], one expert dequantized at a time."""
    N, K = out_features, in_features
    dx = dy.new_zeros(dy.shape[0], K)
    bounds = offsets.tolist()
    for e in range(packed.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        if a == b:
            continue
        w = ref.dequantize_nf4_ref(*_expert(packed, absmax, nested_absmax, offset, e), N * K, blocksize,
                                   dy.dtype).view(N, K)
        dx[a:b] = dy[a:b] @ w
        if lora_g is not None:
            dx[a:b] += scaling * (lora_g[a:b].to(dy.dtype) @ lora_a[e].to(dy.dtype))
    return dx


# ------------------------------------------------------------------------------------------- native path
def _grouped_native(x, offsets, packed, absmax, nested_absmax, offset, N, K, blocksize, lora_u, lora_v, scaling,
                    dx: bool) -> Tensor:
    """Per expert: the native dequantize into ONE scratch [N, K] buffer reused by every expert, then a matmul
    into the expert's rows of the output; experts without tokens cost nothing."""
    from ._ops import _dequantize_into

    out = torch.empty(x.shape[0], K if dx else N, dtype=x.dtype, device=x.device)
    if x.shape[0] == 0 or out.shape[1] == 0:
        return out
    x = x.contiguous()
    scratch = torch.empty(N, K, dtype=x.dtype, device=x.device)
    if lora_u is not None:
        lora_u, lora_v = lora_u.to(x.dtype), lora_v.to(x.dtype)
    bounds = offsets.tolist()
    for e in range(packed.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        if a == b:
            continue
        p, s, ns, off = _expert(packed, absmax, nested_absmax, offset, e)
        _dequantize_into(scratch.view(-1), p, s, ns, off, N * K, blocksize)
        rows = out[a:b]
        torch.mm(x[a:b], scratch if dx else scratch.t(), out=rows)
        if lora_u is not None:
            rows.addmm_(lora_u[a:b], lora_v[e] if dx else lora_v[e].t(), alpha=scaling)
    return out


def _run(x, offsets, packed, absmax, nested_absmax, offset, N, K, blocksize, lora_u, lora_v, scaling, dx: bool):
    check_grouped(x, offsets, packed, absmax, nested_absmax, offset, N, K, blocksize, lora_u, lora_v, dx=dx)
    check_offsets(offsets, x.shape[0])
    path = linear_path(x.device)
    if path == "triton":
        from .triton_kernels.grouped import nf4_grouped_linear_dx_triton, nf4_grouped_linear_triton

        fn = nf4_grouped_linear_dx_triton if dx else nf4_grouped_linear_triton
        return fn(x, offsets, packed, absmax, nested_absmax, offset, N, K, blocksize, lora_u, lora_v, scaling,
                  validate=False)  # checked above
    if path == "native":
        return _grouped_native(x, offsets, packed, absmax, nested_absmax, offset, N, K, blocksize, lora_u, lora_v,
                               scaling, dx)
    fn = nf4_grouped_linear_dx_ref if dx else nf4_grouped_linear_ref
    return fn(x, offsets, packed, absmax, nested_absmax, offset, N, K, blocksize, lora_u, lora_v, scaling)


# ------------------------------------------------------------------------------------------------- ops
@torch.library.custom_op("qlora::nf4_grouped_linear", mutates_args=())
def nf4_grouped_linear(
    x: Tensor,
    offsets: Tensor,
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
) -> Tensor:
    """y [T, N] in x.dtype: y[rows_e] = x[rows_e] @ deq(W_e)^T + scaling * lora_u[rows_e] @ lora_b[e]^T.

    x [T, K] f32/f16/bf16 sorted by expert, offsets int64 [E+1]; packed uint8 [E, N*K/2], absmax [E, nb]
    (float32, or uint8 codes with nested_absmax float32 [E, ceil(nb/256)] and offset float32 [E]); lora_u [T, r]
    and lora_b [E, N, r], or both None."""
    return _run(x, offsets, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize,
                lora_u, lora_b, scaling, dx=False)


@nf4_grouped_linear.register_fake
def _(x, offsets, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize, lora_u, lora_b,
      scaling):
    check_grouped(x, offsets, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize,
                  lora_u, lora_b, dx=False, fake=True)
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("qlora::nf4_grouped_linear_dx", mutates_args=())
def nf4_grouped_linear_dx(
    dy: Tensor,
    offsets: Tensor,
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
    """dx [T, K] in dy.dtype: dx[rows_e] = dy[rows_e] @ deq(W_e) + scaling * lora_g[rows_e] @ lora_a[e].

    dy [T, N] sorted by expert, offsets int64 [E+1]; the weight tensors as nf4_grouped_linear; lora_g [T, r] and
    lora_a [E, r, K], or both None."""
    return _run(dy, offsets, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize,
                lora_g, lora_a, scaling, dx=True)


@nf4_grouped_linear_dx.register_fake
def _(dy, offsets, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize, lora_g, lora_a,
      scaling):
    check_grouped(dy, offsets, packed, absmax, nested_absmax, offset, out_features, in_features, blocksize,
                  lora_g, lora_a, dx=True, fake=True)
    return dy.new_empty(dy.shape[0], in_features)
