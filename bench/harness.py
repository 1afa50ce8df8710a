"""The one benchmark harness every bench/ script uses.

- CPU: median wall time of `reps` calls after `warmup` calls (time.perf_counter).
- CUDA: triton.testing.do_bench (flushes L2 between runs) when triton is importable, with a CUDA graph
  for tiny calls (`graph=True`); else CUDA events. Returns milliseconds.
- Each row carries bytes and flops so the table shows GB/s, TFLOP/s and the percentage of a ceiling
  measured in the same run (a large device copy; a large matmul).
- Results: JSON (device name, versions, timestamp, rows) under bench/results/, and a PNG when matplotlib is
  installed.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device, warmup: int = 3, reps: int = 20, graph: bool = False) -> dict:
    """Median (and 20th/80th percentile) milliseconds of fn() on device."""
    device = torch.device(device)
    if device.type == "cuda":
        return _time_cuda(fn, device, warmup, reps, graph)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times)


def _summary(times: list[float]) -> dict:
    times = sorted(times)
    q = lambda p: times[min(len(times) - 1, int(p * len(times)))]  # noqa: E731
    return {"median_ms": statistics.median(times), "p20_ms": q(0.2), "p80_ms": q(0.8), "reps": len(times)}


def _time_cuda(fn, device, warmup, reps, graph):
    if graph:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    else:
        run = fn
    try:
        from triton.testing import do_bench

        ms = do_bench(run, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": ms[0], "p20_ms": ms[1], "p80_ms": ms[2], "reps": None}
    except ImportError:
        for _ in range(warmup):
            run()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            run()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        return _summary(times)


def copy_ceiling_gbs(device, nbytes: int = 1 << 28) -> float:
    """Measured device copy bandwidth, GB/s counting bytes read + written (the memory ceiling)."""
    device = torch.device(device)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * nbytes / (t["median_ms"] * 1e6)


def matmul_ceiling_tflops(device, n: int = 8192, dtype=torch.bfloat16) -> float:
    """Measured large square matmul throughput, TFLOP/s (the compute ceiling)."""
    device = torch.device(device)
    if device.type == "cpu":
        n, dtype = 2048, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, warmup=2, reps=5)
    return 2 * n**3 / (t["median_ms"] * 1e9)


def device_meta(device) -> dict:
    device = torch.device(device)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for mod in ("triton", "bitsandbytes", "torchao", "peft", "qlora_kernels"):
        try:
            meta[mod] = __import__(mod).__version__
        except Exception:  # not installed, or no __version__
            meta[mod] = None
    return meta


def with_rates(row: dict, *, nbytes: float | None = None, flops: float | None = None,
               copy_gbs: float | None = None, mm_tflops: float | None = None) -> dict:
    """Add GB/s, TFLOP/s and % of the measured ceilings to a row that has median_ms."""
    s = row["median_ms"] / 1e3
    if nbytes is not None:
        row["GB/s"] = nbytes / s / 1e9
        if copy_gbs:
            row["%copy"] = 100.0 * row["GB/s"] / copy_gbs
    if flops is not None:
        row["TFLOP/s"] = flops / s / 1e12
        if mm_tflops:
            row["%matmul"] = 100.0 * row["TFLOP/s"] / mm_tflops
    return row


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-").lower()[:40]


def write_results(family: str, rows: list[dict], meta: dict, out_dir: Path | None = None) -> Path:
    """Write bench/results/<family>-<device>.json (and .png when matplotlib is present); return the JSON path."""
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{family}-{slug(meta['device'])}.json"
    path.write_text(json.dumps({"family": family, "meta": meta, "rows": rows}, indent=1, default=str))
    try:
        _plot(path.with_suffix(".png"), family, rows, meta)
    except ImportError:
        pass
    return path


def _plot(path: Path, family: str, rows: list[dict], meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({r["case"] for r in rows}, key=lambda c: [r["case"] for r in rows].index(c))
    impls = sorted({r["impl"] for r in rows}, key=lambda c: [r["impl"] for r in rows].index(c))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
    width = 0.8 / max(1, len(impls))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, case in enumerate(cases):
            for r in rows:
                if r["case"] == case and r["impl"] == impl:
                    xs.append(j + i * width)
                    ys.append(r["median_ms"])
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))], cases, rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")  # the alternatives span three orders of magnitude
    ax.set_ylabel("median ms, log scale (lower is better)")
    ax.set_title(f"{family} on {meta['device']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(rows: list[dict], cols=("case", "impl", "median_ms", "GB/s", "%copy", "TFLOP/s", "%matmul", "speedup")) -> None:
    present = [c for c in cols if any(c in r for r in rows)]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in present]
    print("  ".join(c.ljust(w) for c, w in zip(present, widths)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(present, widths)))
