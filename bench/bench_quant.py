"""NF4 quantize (with double quantization) and dequantize, side by side with the alternatives.

    python -m bench.bench_quant [--device cpu|cuda] [--shapes 4096x4096,8192x8192] [--reps 10] [--warmup 2]
                                [--out DIR]

Implementations, all measured in this one run on the same bf16 weight:
  qlora_kernels (auto backend: the native _C kernels when built), qlora_kernels reference (pure PyTorch),
  bitsandbytes quantize_4bit / dequantize_4bit (nf4, compress_statistics=True), torchao to_nf4 /
  get_original_weight, and a bf16 clone of the weight (a fresh output written once, as a dequantize does).
  "qlora_kernels out=" dequantizes into a reused buffer: the kernel without the allocation's page faults.
Every implementation gets the same warm-up and repetitions, taking turns (harness.time_cases). Rows report
median, p20 and p80 ms, GB/s (bytes read + written), x_floor (dequantize time over the best copy of the same
bytes, measured in this run at the full thread count; a row below 1 says why) and the speedup of qlora_kernels
over each alternative, "within noise" when the p20-p80 ranges overlap.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from bench.harness import (REPS, WARMUP, copy_floor, device_meta, floor_check, print_table, speedup, time_cases,
                           with_rates, write_results)


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


def run(device: str, shapes: list[tuple[int, int]], reps: int, warmup: int,
        skip_slow_reference: bool) -> tuple[list[dict], dict]:
    device = torch.device(device)
    impls = _alternatives(device)
    rows, floors = [], {}
    for n_out, k_in in shapes:
        case = f"{n_out}x{k_in} bf16"
        w = torch.randn(n_out, k_in, device=device, dtype=torch.bfloat16) * 0.02
        n = w.numel()
        out_bytes = 2 * n
        q_bytes = n // 2 + n // 64 + 4 * (n // 64 // 256)  # packed codes + scale codes + nested scales
        deq_bytes = q_bytes + out_bytes
        # the floor of a dequantize: the best of several copies moving its bytes, at the full thread count
        floor = floors[case] = copy_floor(device, deq_bytes)
        chosen = {name: fns for name, fns in impls.items()
                  if not (skip_slow_reference and name == "reference" and n > 4096 * 4096)}
        # every implementation: the same warm-up and repetitions, taking turns (harness.time_cases)
        tq = time_cases({name: (lambda q=q: q(w)) for name, (q, _) in chosen.items()}, device, warmup, reps)
        for name, t in tq.items():
            rows.append(with_rates({"case": case, "op": "quantize", "impl": name, **t}, nbytes=deq_bytes))
        states = {name: q(w) for name, (q, _) in chosen.items()}
        scratch = torch.empty_like(w)
        ours_state = states["qlora_kernels"]
        deq_fns = {name: (lambda d=d, st=states[name]: d(st)) for name, (_, d) in chosen.items()}
        # the kernel alone: into a reused buffer (no allocation, no first-touch page faults)
        deq_fns["qlora_kernels out="] = lambda: ours_state.dequantize(out=scratch)
        deq_fns["bf16 clone"] = lambda: w.clone()  # a fresh output written once, as a dequantize does
        td = time_cases(deq_fns, device, warmup, reps)
        for name, t in td.items():
            op = "copy" if name == "bf16 clone" else "dequantize"
            nbytes = 2 * out_bytes if op == "copy" else deq_bytes
            row = with_rates({"case": case, "op": op, "impl": name, **t}, nbytes=nbytes, copy_gbs=floor["GBps"])
            if op == "dequantize":
                row.update(floor_check(t, floor, deq_bytes))
                row["x_clone"] = t["median_ms"] / td["bf16 clone"]["median_ms"]
            rows.append(row)
        for op in ("quantize", "dequantize"):
            ours = next(r for r in rows if r["case"] == case and r["op"] == op and r["impl"] == "qlora_kernels")
            for r in rows:
                if r["case"] == case and r["op"] == op and r is not ours:
                    r.update(speedup(ours, r))  # >1: qlora_kernels is faster
    meta = device_meta(device)
    meta.update(warmup=warmup, reps=reps, copy_floor=floors)
    return rows, meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default="4096x4096,8192x8192")
    p.add_argument("--reps", type=int, default=REPS, help="repetitions, the same for every implementation")
    p.add_argument("--warmup", type=int, default=WARMUP, help="warm-up calls, the same for every implementation")
    p.add_argument("--out", default=None, help="results folder (default bench/results)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the timed calls (CPU); "
                   "the copy floor always uses every CPU")
    p.add_argument("--skip-slow-reference", action="store_true", help="skip the reference above 4096x4096")
    args = p.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, meta = run(args.device, shapes, args.reps, args.warmup, args.skip_slow_reference)
    for r in rows:
        r["impl"] = f"{r['op']}:{r['impl']}"
    print(f"device: {meta['device']} ({meta['cpu_model']}), SIMD path {meta.get('cpu_isa')}, "
          f"threads {meta['cpu_threads']}, load average {meta['load_avg_1_5_15']}; "
          f"warm-up {meta['warmup']}, reps {meta['reps']} for every implementation")
    for case, f in meta["copy_floor"].items():
        print(f"copy floor {case}: best of {f['trials']} copies of {f['bytes'] / 2**20:.1f} MiB = {f['GBps']:.1f} GB/s "
              f"({f['threads']} threads; trials {f['best_ms']:.2f}-{f['p80_ms']:.2f} ms best-p80)")
    print_table(rows, cols=("case", "impl", "median_ms", "p20_ms", "p80_ms", "GB/s", "x_floor", "x_clone", "speedup",
                            "speedup_verdict"))
    print("speedup = that row's time / qlora_kernels' time for the same op (>1: qlora_kernels is faster); "
          "'within noise' when the p20-p80 ranges overlap")
    print("x_floor = dequantize time / the best copy of its bytes read + written (measured above, same run)")
    print("x_clone = dequantize time / time of a bf16 clone of the output (fresh allocation in both)")
    for r in rows:
        if "beats_floor" in r:
            print(f"NOTE {r['case']} {r['impl']} is below its copy floor (x_floor {r['x_floor']:.2f}): {r['beats_floor']}")
    path = write_results("quant", rows, meta, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
