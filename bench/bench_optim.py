"""One optimizer step on a flat parameter of 1M / 16M / 64M elements, side by side in one run:

    python -m bench.bench_optim [--device cpu|cuda] [--sizes 1,16,64,16x256] [--dtype float32] [--reps 10] [--out DIR]

Every implementation of a case is built first, then timed one step of each per round (on a CPU, whose
speed may drift during a run; bench.harness.time_interleaved). Implementations (those that import and run
here): qlora_kernels AdamW8bit (fused 8-bit kernel) and PagedAdamW (fused 32-bit kernel; on the CPU paging
is off), torch.optim.AdamW foreach and fused, bitsandbytes AdamW8bit, torchao AdamW8bit. Rows: median step ms with the p20-p80 spread, GB/s of the bytes
each step must move (param read+write, grad read, states read+write), % of the measured copy bandwidth,
state bytes per parameter, x_floor (step time / the memory floor: the bytes each step must move at the best
copy bandwidth measured in this run, bench.harness.copy_floor; the GPU target for the fused 8-bit step is
<= 1.3), and qlora_kernels AdamW8bit's speedup over each row. --sizes takes fractions too (0.05 = 52K values);
SxK is S Mi values in K equal tensors (16x256: 256 tensors of 64K values, the LoRA matrices of r = 16 on
4096-wide layers), where per-tensor overheads show.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from bench.harness import (copy_ceiling_gbs, copy_floor, device_meta, floor_check, print_table, time_interleaved,
                           with_rates, write_results)


def _state_bytes(opt) -> int:
    total = 0
    seen = set()

    def add(t):
        nonlocal total
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            names, _ = t.__tensor_flatten__()
            for name in names:
                add(getattr(t, name))
            return
        key = (t.untyped_storage().data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for s in opt.state.values():
        for v in s.values():
            if isinstance(v, torch.Tensor):
                add(v)
    return total


def _impls(device):
    import qlora_kernels

    impls = {
        "qlora_kernels AdamW8bit": lambda ps: qlora_kernels.optim.AdamW8bit(ps, lr=1e-3),
        "qlora_kernels PagedAdamW (32-bit)": lambda ps: qlora_kernels.optim.PagedAdamW(ps, lr=1e-3),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    }
    try:
        import bitsandbytes as bnb

        impls["bitsandbytes AdamW8bit"] = lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-3)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"bitsandbytes unavailable: {exc}")
    try:
        from torchao.optim import AdamW8bit as AoAdamW8bit

        impls["torchao AdamW8bit"] = lambda ps: AoAdamW8bit(ps, lr=1e-3)
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"torchao unavailable: {exc}")
    return impls


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="1,16,64,16x256",
                    help="parameter counts in Mi elements (fractions allowed); SxK: in K equal tensors")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    sizes = []
    for entry in args.sizes.split(","):
        mi, _, k = entry.partition("x")
        sizes.append((float(mi), int(k or 1)))
    # 256 MiB copies for the real sizes (as before); less for tiny smoke runs
    copy_gbs = copy_ceiling_gbs(device, min(1 << 28, max(1 << 24, int(32 * max(s for s, _ in sizes) * (1 << 20)))))
    rows = []
    for mi, k in sizes:
        n = int(mi * (1 << 20))
        mi = f"{mi:g}M" + (f" in {k}" if k > 1 else "")
        torch.manual_seed(0)
        init = torch.randn(n, dtype=dtype, device=device)
        grad = torch.randn(n, dtype=dtype, device=device) * 1e-3
        bounds = [n * i // k for i in range(k + 1)]
        made = {}
        for name, make in _impls(device).items():
            params = []
            for a, b in zip(bounds, bounds[1:]):
                p = torch.nn.Parameter(init[a:b].clone())
                p.grad = grad[a:b].clone()
                params.append(p)
            try:
                opt = make(params)
                opt.step()  # creates the states
            except Exception as exc:  # noqa: BLE001
                print(f"  {name} at {mi}: does not run here ({type(exc).__name__}: {exc})")
                continue
            made[name] = (opt, params)
        reps = args.reps if n <= (16 << 20) else max(3, args.reps // 2)
        # every implementation of this case alive at once, timed round by round (bench.harness.time_interleaved)
        times = time_interleaved({name: opt.step for name, (opt, _) in made.items()}, device, warmup=1, reps=reps)
        case_rows = []
        for name, (opt, params) in made.items():
            t = times[name]
            sb = _state_bytes(opt)
            ps = params[0].element_size()
            moved = n * (3 * ps) + 2 * sb  # param r+w, grad r, states r+w
            row = {"case": f"{mi} {args.dtype}", "impl": name, **t, "spread_ms": f"{t['p20_ms']:.1f}-{t['p80_ms']:.1f}",
                   "state_B/param": sb / n, "bytes": moved}
            case_rows.append(with_rates(row, nbytes=moved, copy_gbs=copy_gbs))
            print(f"  {row['case']:>14}  {name:<34} {t['median_ms']:9.1f} ms  ({row['spread_ms']})  "
                  f"{sb / n:.3f} state B/param", flush=True)
        made.clear()
        opt = params = p = None  # free this case's tensors before the next
        ours = next((r for r in case_rows if r["impl"] == "qlora_kernels AdamW8bit"), None)
        # the memory floor of this size: a copy of the 8-bit step's byte count, best of 15, measured now
        floor = copy_floor(device, ours["bytes"] if ours else n * 16)
        for r in case_rows:
            r.update(floor_check(r, floor, r["bytes"]))
            if ours is not None:
                r["speedup"] = r["median_ms"] / ours["median_ms"]
        if ours is not None:
            print(f"  {ours['case']:>14}  qlora_kernels AdamW8bit at {ours['x_floor']:.2f}x its memory floor "
                  f"({ours['bytes'] / 1e6:.1f} MB at {floor['GBps']:.2f} GB/s = {ours['floor_ms']:.3f} ms; "
                  f"GPU target <= 1.3)", flush=True)
        rows += case_rows
    meta = device_meta(device)
    meta["copy_GB/s"] = copy_gbs
    print(f"{meta['device']}; copy ceiling {copy_gbs:.1f} GB/s; threads {meta['cpu_threads']}")
    print_table(rows, cols=("case", "impl", "median_ms", "spread_ms", "GB/s", "%copy", "x_floor", "state_B/param",
                            "speedup"))
    print("speedup = that row's step time / qlora_kernels AdamW8bit's (> 1: ours is faster)")
    print(write_results("optim", rows, meta, args.out))


if __name__ == "__main__":
    main()
