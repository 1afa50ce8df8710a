"""Small, ragged and misaligned launches of every GPU kernel, for compute-sanitizer (bench/gpu_check.sh):

    compute-sanitizer --tool memcheck  python bench/sanitize_driver.py --part all
    compute-sanitizer --tool racecheck python bench/sanitize_driver.py --part native --small
    compute-sanitizer --tool synccheck python bench/sanitize_driver.py --part native --small

native: the CUDA kernels of _C: quantize / dequantize (n not a multiple of the blocksize, odd n, packed / absmax /
out views at unaligned addresses, which take the scalar path), the decode GEMM (ragged N, M 1..16, split-K
reduced by the last CTA and by the second kernel), the AdamW 8-bit and 32-bit steps (ragged sizes, paged states).
triton: the fused forward, decode and dx kernels on ragged and aligned shapes, strided activations, a packed view
at an unaligned address. Shapes are small: under the sanitizer each launch is 10-100x slower.
Each result is also compared with the reference, so a kernel that reads the wrong (but valid) memory fails too.
Exit status 0 only if every launch ran and matched.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

import qlora_kernels as qk
from qlora_kernels import _ops
from qlora_kernels import reference as ref

DEV = "cuda"
launches = 0


def _check(cond: bool, what: str) -> None:
    global launches
    launches += 1
    if not cond:
        raise AssertionError(what)


def _unaligned(t: torch.Tensor, elems: int = 1) -> torch.Tensor:
    """A copy of t (flat) at an address `elems` elements past an aligned allocation."""
    buf = torch.empty(t.numel() + elems, dtype=t.dtype, device=t.device)
    view = buf[elems:]
    view.copy_(t.reshape(-1))
    return view


def native(small: bool) -> None:
    sizes = [(7, 64, False), (1001, 64, True), (4160, 128, True)] if not small else [(1001, 64, True)]
    for n, bs, dq in sizes:
        w = torch.randn(n, device=DEV)
        W = qk.quantize_nf4(w, blocksize=bs, double_quant=dq)
        p, a, nn, o = W.tensors()
        want = ref.dequantize_nf4_ref(p, a, nn, o, n, bs, torch.bfloat16)
        got = _ops.dequantize_nf4(p, a, nn, o, n, bs, torch.bfloat16)
        _check(torch.equal(got, want), f"dequantize n={n} bs={bs} dq={dq}")
        # misaligned packed, absmax codes / scales, and output
        pu, au = _unaligned(p, 1), _unaligned(a, 1)
        out = _unaligned(torch.empty(n, dtype=torch.bfloat16, device=DEV), 1)
        _ops.dequantize_nf4_out(out, pu, au, nn, o, n, bs)
        _check(torch.equal(out, want), f"dequantize misaligned n={n} bs={bs} dq={dq}")
    # the decode GEMM: K % 256 == 0, ragged N, split-K both ways (a CUDA-only kernel)
    K = 512
    for N in ([272, 1000] if not small else [272]) if DEV == "cuda" else []:
        W = qk.quantize_nf4(torch.randn(N, K, device=DEV) * 0.02, blocksize=64, double_quant=True)
        p, a, nn, o = W.tensors()
        for M in ((1, 3, 16) if not small else (3,)):
            x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
            ys = []
            for split, in_kernel in ((1, True), (2, True), (2, False)):
                y = _ops.nf4_decode_cuda(x, p, a, nn, o, N, K, 64, split=split, reduce_in_kernel=in_kernel)
                _check(y is not None, f"decode declined N={N} M={M}")
                ys.append(y)
            _check(torch.equal(ys[1], ys[2]), f"decode split-K reductions differ N={N} M={M}")
    # optimizer steps: ragged sizes (not multiples of the 2048-value state block), 8-bit and 32-bit, paged
    params = [torch.nn.Parameter(torch.randn(s, device=DEV)) for s in ((4097, 33) if not small else (4097,))]
    for cls in (qk.AdamW8bit, qk.PagedAdamW32bit):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # paged states unavailable: device memory
            opt = cls(params, lr=1e-3, min_8bit_size=0) if cls is qk.AdamW8bit else cls(params, lr=1e-3)
        for _ in range(2):
            for q in params:
                q.grad = torch.randn_like(q)
            opt.step()
        _check(all(torch.isfinite(q).all() for q in params), f"{cls.__name__} step")


def triton(small: bool) -> None:
    from qlora_kernels.triton_kernels import nf4_decode, nf4_linear, nf4_linear_dx

    # (N, K): ragged (masked path), aligned (fast path); r 8
    for N, K in ([(100, 200), (128, 256)] if not small else [(100, 200)]):
        W = qk.quantize_nf4(torch.randn(N, K, device=DEV) * 0.02, blocksize=64, double_quant=True)
        p, a, nn, o = W.tensors()
        w64 = ref.dequantize_nf4_ref(p, a, nn, o, N * K, 64, torch.float64).view(N, K)
        r = 8
        B = torch.randn(N, r, device=DEV, dtype=torch.bfloat16) * 0.05
        A = torch.randn(r, K, device=DEV, dtype=torch.bfloat16) * 0.05
        for M in (1, 5, 33):
            xs = torch.randn(M, K + 3, device=DEV, dtype=torch.bfloat16)[:, 1:1 + K]  # strided rows
            U = torch.randn(M, r, device=DEV, dtype=torch.bfloat16)
            want = xs.double() @ w64.t() + U.double() @ B.double().t()
            for packed in (p, _unaligned(p, 1)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # the misaligned copy's warning
                    y = nf4_linear(xs, packed, a, nn, o, N, K, 64, U, B, 1.0)
                    _check((y.double() - want).abs().max().item() < 0.05 * (1 + want.abs().max().item()),
                           f"triton forward N={N} K={K} M={M}")
                    if M <= 16:
                        y = nf4_decode(xs, packed, a, nn, o, N, K, 64, U, B, 1.0)
                        _check((y.double() - want).abs().max().item() < 0.05 * (1 + want.abs().max().item()),
                               f"triton decode N={N} K={K} M={M}")
                    dy = torch.randn(M, N, device=DEV, dtype=torch.bfloat16)
                    dx = nf4_linear_dx(dy, packed, a, nn, o, N, K, 64, U, A, 1.0)
                    dwant = dy.double() @ w64 + U.double() @ A.double()
                    _check((dx.double() - dwant).abs().max().item() < 0.05 * (1 + dwant.abs().max().item()),
                           f"triton dx N={N} K={K} M={M}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("native", "triton", "all"), default="all")
    p.add_argument("--small", action="store_true", help="one shape per kernel (racecheck / synccheck are slower)")
    p.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (tests/test_gpu_check.py; "
                   "Triton in its interpreter, TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    global DEV
    DEV = args.device
    if DEV == "cuda" and not torch.cuda.is_available():
        print("sanitize_driver: no CUDA device", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.part in ("native", "all"):
        native(args.small)
    if args.part in ("triton", "all"):
        triton(args.small)
    if DEV == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize_driver: {launches} checked results, part {args.part}, {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
