"""The one benchmark harness every bench/ script uses.

- CPU: median wall time of `reps` calls after `warmup` calls (time.perf_counter).
- CUDA: triton.testing.do_bench (flushes L2 between runs) when triton is importable, with a CUDA graph
  for tiny calls (`graph=True`); else CUDA events. Returns milliseconds.
- `time_cases` times ours and every baseline of one case with the same warm-up, the same repetitions and the
  same CUDA-graph treatment (on a CPU they take turns, round after round, so a busy machine slows all alike).
- Each row carries bytes and flops so the table shows GB/s, TFLOP/s and the percentage of a ceiling
  measured in the same run (a large device copy; a large matmul).
- `copy_floor` is the memory floor of a kernel that moves B bytes: the best of several copies moving the same
  B bytes (B/2 read, B/2 written) at the full thread count, measured in the same run. `floor_check` flags a
  kernel that beats it, with the reason (a floor is not supposed to be beaten).
- `speedup` reports "within noise" when the two p20-p80 ranges overlap.
- Results: JSON (device name, CPU model, SIMD path, threads, load, versions, timestamp, rows) under
  bench/results/, and a PNG when matplotlib is installed.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import os
import platform
import statistics
import sys
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


def time_interleaved(fns: dict, device, warmup: int = 1, reps: int = 10) -> dict:
    """time_fn for several callables compared with each other: on the CPU one call of each per round (the
    order rotating), so a machine whose speed drifts over seconds (a shared VM) skews no ratio; on a GPU each
    is timed on its own (time_fn). {name: time_fn's dict}."""
    device = torch.device(device)
    if device.type == "cuda":
        return {name: time_fn(fn, device, warmup=warmup, reps=reps) for name, fn in fns.items()}
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for r in range(reps):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: _summary(ts) for name, ts in times.items()}


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


WARMUP = 2  # the defaults every implementation of a case gets (ours and the baselines alike)
REPS = 10


def time_cases(fns: dict, device, warmup: int = WARMUP, reps: int = REPS, graph: bool = False) -> dict:
    """{name: timing} for several implementations of one case, each with the same warm-up and repetitions.

    CPU: the implementations take turns, one call each, round after round, so a busy shared machine slows all
    of them alike (measured: a 2-core runner shared with compile jobs swung single runs by 5x); median, p20
    and p80 over the rounds. CUDA: time_fn per implementation, all with the same `graph` setting; when a CUDA
    graph cannot be captured for one, that one is timed without (its row says so in "cuda_graph").
    """
    device = torch.device(device)
    if device.type == "cuda":
        out = {}
        for name, fn in fns.items():
            try:
                out[name] = {**time_fn(fn, device, warmup=warmup, reps=reps, graph=graph), "cuda_graph": graph}
            except Exception as exc:  # capture failed (host sync, unsupported op): same timing without a graph
                if not graph:
                    raise
                out[name] = {**time_fn(fn, device, warmup=warmup, reps=reps, graph=False), "cuda_graph": False,
                             "cuda_graph_error": f"{type(exc).__name__}: {exc}"[:200]}
        return out
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {**_summary(ts), "warmup": warmup} for name, ts in times.items()}


def speedup(ours: dict, theirs: dict) -> dict:
    """theirs' median / ours' median, and whether that is outside the noise: when the p20-p80 ranges of the two
    overlap the difference is reported as "within noise" (not as faster or slower)."""
    x = theirs["median_ms"] / ours["median_ms"]
    overlap = ours["p20_ms"] <= theirs["p80_ms"] and theirs["p20_ms"] <= ours["p80_ms"]
    verdict = "within noise" if overlap else ("faster" if x > 1 else "slower")
    return {"speedup": x, "speedup_verdict": verdict}


def _advise_huge_pages(t: torch.Tensor) -> bool:
    """madvise(MADV_HUGEPAGE) on a CPU tensor's 2 MiB-aligned interior: the hint the native kernels give their
    outputs (csrc/nf4_cpu.cpp), so the floor's copy gets the same page size as the kernel it bounds."""
    if t.device.type != "cpu" or not hasattr(os, "sched_getaffinity"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        huge, p, n = 2 << 20, t.data_ptr(), t.numel() * t.element_size()
        lo, hi = (p + huge - 1) & ~(huge - 1), (p + n) & ~(huge - 1)
        return hi > lo and libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 14) == 0  # 14: MADV_HUGEPAGE
    except (OSError, AttributeError):
        return False


def full_thread_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def copy_floor(device, nbytes: int, trials: int = 15) -> dict:
    """The memory floor of a kernel that reads + writes `nbytes` in all: the BEST (minimum) time of `trials`
    copies of nbytes / 2 bytes into a reused buffer, at the full thread count, in this run. Returns ms, GB/s
    (bytes read + written) and the spread of the trials."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(full_thread_count())
    try:
        src = torch.empty(nbytes // 4, dtype=torch.float16, device=device).normal_()
        dst = torch.empty_like(src)
        thp = _advise_huge_pages(src) and _advise_huge_pages(dst)
        dst.copy_(src)  # first touch outside the timing
        times = []
        for _ in range(trials):
            sync(device)
            t0 = time.perf_counter()
            dst.copy_(src)
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        moved = 2 * src.numel() * src.element_size()
        summary = _summary(times)
        best = min(times)
        return {"bytes": moved, "best_ms": best, "GBps": moved / (best * 1e6), "median_ms": summary["median_ms"],
                "p20_ms": summary["p20_ms"], "p80_ms": summary["p80_ms"], "trials": trials,
                "threads": torch.get_num_threads(), "huge_pages": thp}
    finally:
        torch.set_num_threads(threads)


def _llc_bytes() -> int | None:
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text[:-1]) * 1024 if text.endswith("K") else int(text)
    except (OSError, ValueError):
        return None


def floor_check(kernel: dict, floor: dict, nbytes: int) -> dict:
    """x_floor = kernel median / floor (>= 1 expected). A kernel below its floor is flagged with the reasons
    that apply: data that fits in the last-level cache, a noisy floor measurement, or neither (then a bug in
    the byte count or the timing is the suspect)."""
    floor_ms = floor["best_ms"] * nbytes / floor["bytes"]
    out = {"floor_ms": floor_ms, "x_floor": kernel["median_ms"] / floor_ms}
    if out["x_floor"] < 1.0:
        reasons = []
        llc = _llc_bytes()
        if llc and nbytes <= 2 * llc:
            reasons.append(f"its {nbytes / 2**20:.0f} MiB working set is within 2x the {llc / 2**20:.0f} MiB "
                           "last-level cache, where a reused buffer stays partly cached between calls")
        if floor["p80_ms"] > 1.3 * floor["best_ms"]:
            reasons.append(f"the floor's own trials spread {floor['best_ms']:.2f}-{floor['p80_ms']:.2f} ms "
                           "(best to p80): the machine was busy while it was measured")
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if load > full_thread_count():
            reasons.append(f"the load average ({load:.1f}) exceeded the {full_thread_count()} CPUs: a copy at the "
                           "full thread count waits for every thread to be scheduled, a kernel on fewer threads does not")
        if not reasons:
            reasons.append("no known reason: suspect the byte count or the timing")
        out["beats_floor"] = "; ".join(reasons)
    return out


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


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_simd() -> dict:
    """The SIMD path the native CPU kernels take on this machine, and the ones it could take."""
    try:
        import qlora_kernels._C as C
    except ImportError as exc:
        return {"cpu_isa": None, "cpu_isa_note": f"native extension not loaded ({exc}): reference kernels"}
    return {"cpu_isa": C.cpu_isa(), "cpu_isas_supported": list(C.cpu_isas_supported())}


def device_meta(device) -> dict:
    device = torch.device(device)
    meta = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "device_type": device.type,
        "cpu_model": cpu_model(),
        "cpu_count": full_thread_count(),
        "cpu_threads": torch.get_num_threads(),
        **cpu_simd(),
        "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "command": " ".join(sys.argv),
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


def write_results(family: str, rows: list[dict], meta: dict, out_dir: Path | None = None, plot: bool = True) -> Path:
    """Write bench/results/<family>-<device>.json (and .png when matplotlib is present and `plot`); return the JSON
    path. The JSON is replaced atomically (written beside, then renamed): a bench that rewrites it after each case
    and is killed mid-write leaves the previous complete file."""
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{family}-{slug(meta['device'])}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"family": family, "meta": meta, "rows": rows}, indent=1, default=str))
    tmp.replace(path)
    if not plot:
        return path
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
