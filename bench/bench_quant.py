"""NF4 quantize (with double quantization) and dequantize, side by side with the alternatives.

    python -m bench.bench_quant [--device cpu|cuda] [--shapes 4096x4096,8192x8192] [--reps 20] [--out DIR]

Implementations, all measured in this one run on the same bf16 weight:
  qlora_kernels (auto backend: the native _C kernels when built), qlora_kernels reference (pure PyTorch),
  bitsandbytes quantize_4bit / dequantize_4bit (nf4, compress_statistics=True), torchao to_nf4 /
  get_original_weight, and a bf16 clone of the weight (a fresh output written once, as a dequantize does).
  "qlora_kernels out=" dequantizes into a reused buffer: the kernel without the allocation's page faults.
Rows report median ms, GB/s (bytes read + written), % of the measured copy bandwidth, and the speedup of
qlora_kernels over each alternative.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from bench.harness import copy_ceiling_gbs, device_meta, print_table, time_fn, with_rates, write_results


def _alternatives(device):
    """name -> (quantize fn(w) -> state, dequantize fn(state) -> bf16 tensor); those importable here."""
    import qlora_kernels as qk

    def ours(backend):
        def quant(w):
            qk.set_backend(backend)
            try:
                return qk.quantize_nf4(w, blocksize=64, double_quant=True)
            finally:
                qk.set_backend(None)

        def deq(q):
            qk.set_backend(backend)
            try:
                return q.dequantize(torch.bfloat16)
            finally:
                qk.set_backend(None)

        return quant, deq

    impls = {"qlora_kernels": ours("auto"), "reference": ours("reference")}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes.functional as bnbF

        impls["bitsandbytes"] = (
            lambda w: bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"),
            lambda s: bnbF.dequantize_4bit(s[0], s[1]),
        )
    except Exception as exc:  # bitsandbytes missing or without a backend for this device
        print(f"bitsandbytes skipped: {exc}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

        impls["torchao"] = (lambda w: to_nf4(w, 64, 256), lambda s: s.get_original_weight())
    except Exception as exc:
        print(f"torchao skipped: {exc}")
    return impls


def run(device: str, shapes: list[tuple[int, int]], reps: int, skip_slow_reference: bool) -> tuple[list[dict], dict]:
    device = torch.device(device)
    copy_gbs = copy_ceiling_gbs(device)
    impls = _alternatives(device)
    rows = []
    for n_out, k_in in shapes:
        case = f"{n_out}x{k_in} bf16"
        w = torch.randn(n_out, k_in, device=device, dtype=torch.bfloat16) * 0.02
        n = w.numel()
        out_bytes = 2 * n
        q_bytes = n // 2 + n // 64 + 4 * (n // 64 // 256)  # packed codes + scale codes + nested scales
        clone = time_fn(lambda: w.clone(), device, warmup=3, reps=reps)
        rows.append(with_rates({"case": case, "op": "copy", "impl": "bf16 clone", **clone},
                               nbytes=2 * out_bytes, copy_gbs=copy_gbs))
        floor_ms = (q_bytes + out_bytes) / (copy_gbs * 1e6)  # dequantize's bytes at copy speed
        for name, (quant, deq) in impls.items():
            if skip_slow_reference and name == "reference" and n > 4096 * 4096:
                continue
            qreps = max(3, reps // 4) if name in ("reference", "torchao", "bitsandbytes") else reps
            tq = time_fn(lambda: quant(w), device, warmup=1, reps=qreps)
            rows.append(with_rates({"case": case, "op": "quantize", "impl": name, **tq},
                                   nbytes=out_bytes + q_bytes, copy_gbs=copy_gbs))
            state = quant(w)
            td = time_fn(lambda: deq(state), device, warmup=3, reps=reps)
            rows.append(with_rates({"case": case, "op": "dequantize", "impl": name, **td,
                                    "x_floor": td["median_ms"] / floor_ms,
                                    "x_clone": td["median_ms"] / clone["median_ms"]},
                                   nbytes=out_bytes + q_bytes, copy_gbs=copy_gbs))
        # The kernel alone: dequantize into a reused buffer (no allocation, no first-touch page faults).
        state = impls["qlora_kernels"][0](w)
        scratch = torch.empty_like(w)
        td = time_fn(lambda: state.dequantize(out=scratch), device, warmup=3, reps=reps)
        rows.append(with_rates({"case": case, "op": "dequantize", "impl": "qlora_kernels out=", **td,
                                "x_floor": td["median_ms"] / floor_ms,
                                "x_clone": td["median_ms"] / clone["median_ms"]},
                               nbytes=out_bytes + q_bytes, copy_gbs=copy_gbs))
        for op in ("quantize", "dequantize"):
            ours = next(r for r in rows if r["case"] == case and r["op"] == op and r["impl"] == "qlora_kernels")
            for r in rows:
                if r["case"] == case and r["op"] == op:
                    r["speedup"] = r["median_ms"] / ours["median_ms"]  # how many times slower than ours
    meta = device_meta(device)
    meta["copy_GBps"] = copy_gbs
    return rows, meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="4096x4096,8192x8192")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--skip-slow-reference", action="store_true", help="skip the reference above 4096x4096")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows, meta = run(args.device, shapes, args.reps, args.skip_slow_reference)
    for r in rows:
        r["impl"] = f"{r['op']}:{r['impl']}"
    print(f"device: {meta['device']}  threads: {meta['cpu_threads']}  copy: {meta['copy_GBps']:.1f} GB/s")
    print_table(rows, cols=("case", "impl", "median_ms", "GB/s", "%copy", "x_floor", "x_clone", "speedup"))
    print("speedup = that row's time / qlora_kernels' time for the same op (>1: qlora_kernels is faster)")
    print("x_floor = dequantize time / (its bytes read + written at the measured copy speed into a reused buffer)")
    print("x_clone = dequantize time / time of a bf16 clone of the output (fresh allocation in both)")
    path = write_results("quant", rows, meta, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
