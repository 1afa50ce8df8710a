"""One QLoRA linear layer: forward, input gradient (dx) and forward + backward, side by side.

    python -m bench.bench_linear [--quick] [--out DIR] [--shapes 4096x4096,...] [--ranks 16,64]
                                 [--ms 1,16,512,4096,16384] [--passes fwd,dx,fwdbwd] [--budget-s S]

Implementations (same inputs, same run; bf16 on CUDA):
  fused       this package's Triton kernels, always (decode GEMV for M <= 16, else the fused kernel)
  cuda-decode the CUDA decode GEMM (csrc/nf4_decode_cuda.cu) behind torch.ops.qlora.nf4_linear, fwd at M <= 16
              (what "dispatched" runs there; "fused" keeps the Triton decode)
  dispatched  torch.ops.qlora.* with the Triton dispatcher's per-shape choice (fused / dequant + cuBLAS)
  deq+mm      PyTorch: dequantize W (torch.ops.qlora.dequantize_nf4), matmul, separate LoRA matmuls
  bnb+peft    bitsandbytes Linear4bit (nf4, double quant) + PEFT LoRA, when both import on the device
  bf16-lora   an unquantized bf16 W + LoRA matmuls (what QLoRA saves memory against)
Passes (all include the LoRA terms; U = x A^T is computed inside "fwd"):
  fwd     y = x W^T + s (x A^T) B^T + bias
  dx      dx = dy W + s (dy B) A
  fwdbwd  fwd, then dx, dA = s G^T x, dB = s dy^T U   (one layer of a training step)
Each row: median ms (harness: do_bench with L2 flush; CUDA graphs for M <= 16 for every implementation, the
baselines included), TFLOP/s and GB/s (weight bytes at the impl's storage: 4.127 bits/param for NF4, 16 for
bf16) and % of the measured ceilings (large device copy, large bf16 matmul), speedup vs deq+mm ("within noise"
when the p20-p80 ranges overlap). The JSON also records, per (N, K, r, pass), the measured fused/dequant
crossover (smallest M in --ms where deq+mm beats fused) next to the roofline
model's prediction (triton_kernels/dispatch.py), so the dispatcher's constants can be replaced by data.

--quick: tiny shapes on whatever device is there (CPU: the Triton interpreter, float32) to smoke-test the
script itself; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the Triton kernels run in the interpreter off-GPU (set before triton import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    from bench.harness import (copy_ceiling_gbs, device_meta, matmul_ceiling_tflops, print_table, speedup,
                               time_cases, with_rates, write_results)
except ImportError:  # run as a script from bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import (copy_ceiling_gbs, device_meta, matmul_ceiling_tflops, print_table, speedup,  # noqa: E402
                         time_cases, with_rates, write_results)

import qlora_kernels as qk  # noqa: E402

IMPLS = ("fused", "cuda-decode", "dispatched", "deq+mm", "bnb+peft", "bf16-lora")
PASSES = ("fwd", "dx", "fwdbwd")
NF4_BITS = 4.127


class Layer:
    """Inputs of one case: NF4 weight (and its bf16 original), LoRA A [r, K], B [N, r], bias, x, dy."""

    def __init__(self, N, K, r, M, dtype, device, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        w = (torch.randn(N, K, generator=g) * 0.02).to(device=device, dtype=dtype)
        self.N, self.K, self.r, self.M, self.dtype, self.device = N, K, r, M, dtype, device
        self.w_dense = w
        self.W = qk.quantize_nf4(w, blocksize=64, double_quant=True)
        self.A = (torch.randn(r, K, generator=g) / K**0.5).to(device=device, dtype=dtype)
        self.B = (torch.randn(N, r, generator=g) * 0.01).to(device=device, dtype=dtype)
        self.bias = torch.zeros(N, device=device, dtype=dtype)
        self.s = 2.0  # alpha / r with alpha = 2 r
        self.x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
        self.dy = torch.randn(M, N, generator=g).to(device=device, dtype=dtype)

    def wargs(self):
        p, a, n, o = self.W.tensors()
        return (p, a, n, o, self.N, self.K, self.W.blocksize)


def _ours(L: Layer, plan: str | None, cuda_decode: bool = True):
    """(fwd, dx, fwdbwd) closures on torch.ops.qlora.* with the Triton backend and a dispatcher plan;
    cuda_decode=False keeps M <= 16 on the Triton decode."""
    from qlora_kernels import _ops
    from qlora_kernels.triton_kernels import dispatch

    wargs = L.wargs()

    def with_plan(fn):
        def run():
            dispatch.set_plan_override(plan)
            saved, _ops.CUDA_DECODE = _ops.CUDA_DECODE, cuda_decode
            try:
                return fn()
            finally:
                dispatch.set_plan_override(None)
                _ops.CUDA_DECODE = saved
        return run

    def fwd():
        U = L.x @ L.A.t()
        return torch.ops.qlora.nf4_linear(L.x, *wargs, U, L.B, L.s, L.bias), U

    def dx():
        G = L.dy @ L.B
        return torch.ops.qlora.nf4_linear_dx(L.dy, *wargs, G, L.A, L.s)

    def fwdbwd():
        y, U = fwd()
        G = L.dy @ L.B
        dx_ = torch.ops.qlora.nf4_linear_dx(L.dy, *wargs, G, L.A, L.s)
        dA = (G.t() @ L.x).mul_(L.s)
        dB = (L.dy.t() @ U).mul_(L.s)
        return y, dx_, dA, dB

    return with_plan(fwd), with_plan(dx), with_plan(fwdbwd)


def _cuda_decode(L: Layer):
    """fwd through the CUDA decode GEMM only (M <= 16 on a CUDA build); dx / fwdbwd are the other rows' business."""
    from qlora_kernels import _ops

    mod = _ops.native_module()
    if L.device.type != "cuda" or L.M > _ops.DECODE_CUDA_MAX_M or mod is None or not mod.has_cuda():
        raise RuntimeError("the CUDA decode runs fwd at M <= 16 on a CUDA build")
    wargs = L.wargs()

    def fwd():
        U = L.x @ L.A.t()
        y = _ops.nf4_decode_cuda(L.x, *wargs, U, L.B, L.s, L.bias)
        if y is None:
            raise RuntimeError("the CUDA decode does not take this shape")
        return y, U

    return fwd, None, None, "fwd only (M <= 16)"


def _dense(L: Layer, weight):
    """(fwd, dx, fwdbwd) in plain PyTorch with W from weight() (dequantize each call, or a dense bf16 W)."""

    def fwd():
        w = weight()
        U = L.x @ L.A.t()
        y = torch.addmm(L.bias, L.x, w.t())
        return y.addmm_(U, L.B.t(), alpha=L.s), U

    def dx():
        w = weight()
        G = L.dy @ L.B
        return (L.dy @ w).addmm_(G, L.A, alpha=L.s)

    def fwdbwd():
        y, U = fwd()
        w = weight()
        G = L.dy @ L.B
        dx_ = (L.dy @ w).addmm_(G, L.A, alpha=L.s)
        return y, dx_, (G.t() @ L.x).mul_(L.s), (L.dy.t() @ U).mul_(L.s)

    return fwd, dx, fwdbwd


def _bnb_peft(L: Layer):
    """bitsandbytes Linear4bit + PEFT LoRA (autograd for the backward); raises when not available."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
        from peft import LoraConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = bnb.nn.Linear4bit(L.K, L.N, bias=True, compute_dtype=L.dtype, compress_statistics=True,
                                          quant_type="nf4")

        def forward(self, x):
            return self.proj(x)

    m = One()
    m.proj.weight = bnb.nn.Params4bit(L.w_dense.cpu(), requires_grad=False, compress_statistics=True,
                                      quant_type="nf4", blocksize=64)
    m = m.to(L.device)
    m = get_peft_model(m, LoraConfig(r=L.r, lora_alpha=2 * L.r, target_modules=["proj"], lora_dropout=0.0))
    m = m.to(L.dtype) if L.device.type == "cpu" else m
    xg = L.x.detach().clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return m(L.x)

    def dx():  # autograd: the backward of a forward we do not time separately is not available here
        y = m(xg)
        (gx,) = torch.autograd.grad(y, xg, L.dy)
        return gx

    def fwdbwd():
        xg.grad = None
        m(xg).backward(L.dy)
        return xg.grad

    return fwd, dx, fwdbwd, "dx includes its forward (autograd)"


def flops_bytes(L: Layer, pass_: str, weight_bytes: float) -> tuple[float, float]:
    M, N, K, r = L.M, L.N, L.K, L.r
    e = L.x.element_size()
    fwd_f = 2 * M * N * K + 2 * M * K * r + 2 * M * N * r
    dx_f = 2 * M * N * K + 2 * M * N * r + 2 * M * r * K
    act = e * (M * K + M * N + r * (K + N))
    if pass_ == "fwd":
        return fwd_f, weight_bytes + act
    if pass_ == "dx":
        return dx_f, weight_bytes + act
    return fwd_f + dx_f + 2 * M * N * r + 2 * M * r * K, 2 * weight_bytes + 2 * act + e * (M * K + M * N)


def run_case(L: Layer, impls, passes, ceilings, rows, notes, graph):
    dev = L.device
    nf4_bytes = L.N * L.K * NF4_BITS / 8
    builders = {
        "fused": lambda: (*_ours(L, "fused", cuda_decode=False), None),
        "cuda-decode": lambda: _cuda_decode(L),
        "dispatched": lambda: (*_ours(L, None), None),
        "deq+mm": lambda: (*_dense(L, lambda: L.W.dequantize(L.dtype)), None),
        "bnb+peft": lambda: _bnb_peft(L),
        "bf16-lora": lambda: (*_dense(L, lambda: L.w_dense), None),
    }
    case = f"N{L.N}xK{L.K} r{L.r} M{L.M}"
    built = {}
    for impl in impls:
        try:
            *fns, note = builders[impl]()
        except Exception as exc:  # not importable / no backend here
            notes.setdefault(impl, f"skipped: {type(exc).__name__}: {exc}"[:300])
            continue
        if note:
            notes.setdefault(impl, note)
        built[impl] = dict(zip(PASSES, fns))
    for pass_ in PASSES:
        if pass_ not in passes:
            continue
        # ours and the baselines: the same warm-up, repetitions and CUDA-graph treatment (harness.time_cases;
        # an implementation whose graph capture fails is timed without one, and its row says so)
        fns = {impl: f[pass_] for impl, f in built.items() if f[pass_] is not None}
        try:
            timings = time_cases(fns, dev, warmup=2, reps=5 if dev.type == "cpu" else 20, graph=graph)
        except Exception:  # one implementation failed: time the others alone, note the failure
            timings = {}
            for impl, fn in fns.items():
                try:
                    timings.update(time_cases({impl: fn}, dev, warmup=2, reps=5 if dev.type == "cpu" else 20,
                                              graph=graph))
                except Exception as exc:
                    notes[f"{impl} {pass_} {case}"] = f"failed: {type(exc).__name__}: {exc}"[:300]
        for impl, t in timings.items():
            wb = 2 * L.N * L.K if impl == "bf16-lora" else nf4_bytes
            flops, nbytes = flops_bytes(L, pass_, wb)
            row = {"case": f"{pass_} {case}", "pass": pass_, "impl": impl, "N": L.N, "K": L.K, "r": L.r, "M": L.M, **t}
            rows.append(with_rates(row, nbytes=nbytes, flops=flops, copy_gbs=ceilings["copy_gbs"],
                                   mm_tflops=ceilings["matmul_tflops"]))
    base = {r["pass"]: r for r in rows if r["impl"] == "deq+mm" and r["case"].endswith(case)}
    for r in rows:
        if r["case"].endswith(case) and r["pass"] in base and r is not base[r["pass"]]:
            r.update(speedup(r, base[r["pass"]]))  # deq+mm's median / this row's: >1 means this row is faster


def crossovers(rows, ms):
    """Per (N, K, r, pass): smallest measured M where deq+mm is faster than fused (None: never in --ms)."""
    out = {}
    keys = {(r["N"], r["K"], r["r"], r["pass"]) for r in rows}
    for N, K, rank, p in sorted(keys):
        t = {(r["impl"], r["M"]): r["median_ms"] for r in rows if (r["N"], r["K"], r["r"], r["pass"]) == (N, K, rank, p)}
        measured = next((M for M in sorted(ms) if ("fused", M) in t and ("deq+mm", M) in t
                         and t[("deq+mm", M)] < t[("fused", M)]), None)
        out[f"{p} N{N} K{K} r{rank}"] = {"measured_first_m_dequant_wins": measured}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, any device (smoke test of the script)")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--shapes", default="4096x4096,8192x8192,14336x4096", help="NxK list")
    p.add_argument("--ranks", default="16,64")
    p.add_argument("--ms", default="1,16,512,4096,16384")
    p.add_argument("--passes", default=",".join(PASSES))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--budget-s", type=float, default=None, help="stop starting new cases after this many seconds")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        shapes, ranks, ms = [(96, 80)], [8], [1, 24]
    else:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        ranks = [int(v) for v in args.ranks.split(",")]
        ms = [int(v) for v in args.ms.split(",")]
    if device.type == "cpu" and not args.quick:
        print("no CUDA device: real figures are GPU-only; use --quick for a smoke run")
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    passes = args.passes.split(",")
    impls = [i for i in args.impls.split(",") if i in IMPLS]
    if device.type == "cpu":
        qk.set_backend("triton")  # CPU tensors reach the Triton kernels only when forced (interpreter)
    else:
        qk.set_backend(None)
    meta = device_meta(device)
    meta["dtype"] = str(dtype).replace("torch.", "")
    ceilings = {"copy_gbs": copy_ceiling_gbs(device, 1 << 22 if args.quick else 1 << 30),
                "matmul_tflops": matmul_ceiling_tflops(device)}
    meta.update(ceilings)
    rows, notes = [], {}
    t0 = time.perf_counter()
    for N, K in shapes:
        for r in ranks:
            for M in ms:
                if args.budget_s and time.perf_counter() - t0 > args.budget_s:
                    notes.setdefault("budget", f"stopped before N{N}xK{K} r{r} M{M} (--budget-s {args.budget_s})")
                    continue
                L = Layer(N, K, r, M, dtype, device)
                run_case(L, impls, passes, ceilings, rows, notes, graph=M <= 16 and device.type == "cuda")
                del L
                # the JSON after each case: a run stopped by its caller's time cap keeps every finished row
                write_results("linear" + ("-quick" if args.quick else ""), rows,
                              {**meta, "complete": False, "notes": notes, "wall_s": round(time.perf_counter() - t0, 1)},
                              args.out, plot=False)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    qk.set_backend(None)
    cross = crossovers(rows, ms)
    try:
        from qlora_kernels.triton_kernels import dispatch

        cap = dispatch.capability(device) or 9
        for key in cross:
            _, n, k, rr = key.split()
            cross[key]["model_crossover_m"] = dispatch.crossover_m(int(n[1:]), int(k[1:]), int(rr[1:]), cap)
    except Exception as exc:  # the model is informative only
        notes["model"] = f"unavailable: {exc}"
    meta["crossover"] = cross
    meta["notes"] = notes
    meta["wall_s"] = round(time.perf_counter() - t0, 1)
    meta["complete"] = True
    path = write_results("linear" + ("-quick" if args.quick else ""), rows, meta, args.out)
    print_table(rows)
    for k, v in cross.items():
        print(f"crossover {k}: {v}")
    for k, v in notes.items():
        print(f"note {k}: {v}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
