"""Static checks of the Triton kernels for real GPUs, without a GPU.

Every kernel, at each launch configuration the dispatcher can pick (the heuristic table fitted to the
benchmark shapes, plus the layout/dtype variants: odd K, K % blocksize != 0, no double quant, fp16/fp32,
rank 128, decode with and without split-K), is compiled for sm_80 and sm_90 with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`. The compiled kernel must
- use wgmma on sm_90 when a tile is >= 64 rows (the forward/dx main loop),
- spill no registers (ptxas -v from the ptxas bundled with triton, same flags triton uses),
- fit the device's shared memory (sm_90: 227 KiB, sm_80: 163 KiB per block).

The argument signature is not written by hand: the real launchers are called on meta tensors with the
kernels replaced by recorders, and the recorded arguments become the signature (ints equal to 1 become
constexprs and pointers / multiples of 16 get divisibility hints, as Triton's JIT specializes them).

The compilation runs in a subprocess without TRITON_INTERPRET (conftest sets it on machines without a GPU,
and `@triton.jit` then returns interpreter objects): this file is also the worker script.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMEM_LIMIT = {80: 166912, 90: 232448}
ARCH = {80: "sm_80", 90: "sm_90a"}
_ORIGINALS: dict = {}


# ------------------------------------------------------------------------------------------------ worker
def _record_launches(cap: int, op: str, M: int, N: int, K: int, blocksize: int, r: int, dq: bool, dtype_name: str,
                     bias: bool, config: tuple | None = None):
    """Call the real launcher on meta tensors with recorders in place of the kernels; return the launches."""
    import torch

    from qlora_kernels.triton_kernels import LaunchConfig, configs, decode, linear_dx, linear_fwd

    configs.capability = lambda device: cap // 10
    configs.sm_count = lambda device: 132 if cap == 90 else 108
    launches = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))

    for mod, names in ((linear_fwd, ["_nf4_linear_kernel"]), (linear_dx, ["_nf4_linear_dx_kernel"]),
                       (decode, ["_nf4_decode_kernel", "_nf4_decode_reduce_kernel"])):
        for name in names:
            fn = _ORIGINALS.setdefault((mod.__name__, name), getattr(mod, name))
            setattr(mod, name, Recorder(fn))
    dtype = getattr(torch, dtype_name)
    meta = torch.device("meta")
    n = N * K
    nb = -(-n // blocksize)
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=meta)
    if dq:
        absmax = torch.empty(nb, dtype=torch.uint8, device=meta)
        nested, offset = torch.empty(-(-nb // 256), device=meta), torch.empty((), device=meta)
    else:
        absmax, nested, offset = torch.empty(nb, device=meta), None, None
    t = lambda *s: torch.empty(*s, dtype=dtype, device=meta)  # noqa: E731
    w = (packed, absmax, nested, offset, N, K, blocksize)
    cfg = None if config is None else LaunchConfig(*config)
    u, b, bias_t = t(M, r) if r else None, t(N, r) if r else None, t(N) if bias else None
    if op == "fwd":
        linear_fwd.nf4_linear(t(M, K), *w, u, b, 0.5, bias_t, config=cfg)
    elif op == "decode":
        decode.nf4_decode(t(M, K), *w, u, b, 0.5, bias_t, config=cfg)
    else:
        linear_dx.nf4_linear_dx(t(M, N), *w, u, t(r, K) if r else None, 0.5, config=cfg)
    return launches


def _signature(fn, args, kwargs):
    import torch

    tys = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8"}
    names = fn.arg_names
    sig, consts, attrs = {}, {}, {}
    for i, (name, a) in enumerate(zip(names, args)):
        if isinstance(a, torch.Tensor):
            sig[name] = "*" + tys[a.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            if a == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32" if -(2**31) <= a < 2**31 else "i64"
                if a % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(a, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(a)}")
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
    for name, v in kwargs.items():
        sig[name], consts[name] = "constexpr", v
    missing = [nm for nm in names if nm not in sig]
    assert not missing, missing
    return sig, consts, attrs, options


def _ptxas_spills(ptx: str, cap: int) -> dict:
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(cap).path  # triton 3.9: get_ptxas(arch: int)
    except TypeError:  # older releases: get_ptxas()
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        cmd = [ptxas, "-lineinfo", "--fmad=false", "-v", "--regAllocOptLevel=2", f"--gpu-name={ARCH[cap]}", str(src),
               "-o", str(Path(d) / "k.o")]  # the flags triton 3.9 passes (compiler.py make_cubin)
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    stores = sum(int(v) for v in re.findall(r"(\d+) bytes spill stores", log))
    loads = sum(int(v) for v in re.findall(r"(\d+) bytes spill loads", log))
    regs = max([int(v) for v in re.findall(r"Used (\d+) registers", log)] or [0])
    return {"spill_stores": stores, "spill_loads": loads, "registers": regs}


def compile_case(case: dict) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget

    cap = case["cap"]
    out = []
    for fn, args, kwargs in _record_launches(**case):
        sig, consts, attrs, options = _signature(fn, args, dict(kwargs))
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
        ptx = k.asm["ptx"]
        info = {
            **case,
            "kernel": fn.__name__,
            "tiles": {c: consts[c] for c in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K") if c in consts},
            "num_warps": options.get("num_warps"),
            "num_stages": options.get("num_stages"),
            "wgmma": "wgmma.mma_async" in ptx,
            "mma": "mma.sync" in ptx,
            "async_copy": "cp.async" in ptx,
            "shared": k.metadata.shared,
        }
        info.update(_ptxas_spills(ptx, cap))
        out.append(info)
    return out


def cases() -> list[dict]:
    """Each configuration the dispatcher can pick on sm_80 and sm_90, and the layout/dtype variants."""
    base = dict(N=4096, K=4096, blocksize=64, r=64, dq=True, dtype_name="bfloat16", bias=True)
    out = []
    for cap in (80, 90):
        for op, ms in (("fwd", (64, 256, 1024, 4096)), ("dx", (64, 256, 1024, 4096)), ("decode", (16,))):
            for M in ms:
                out.append(dict(base, cap=cap, op=op, M=M))
        # layout / dtype / rank variants at the largest tiles: K % blocksize != 0 with rank 128 (two epilogue
        # chunks), odd K (bytes straddle rows) in fp16 without double quant, fp32 (exact FMA dots)
        variants = [("fwd", dict(M=4096, K=4100, r=128)), ("fwd", dict(M=4096, K=4097, dq=False, dtype_name="float16")),
                    ("fwd", dict(M=256, K=4097)), ("dx", dict(M=256, K=4100)),
                    ("fwd", dict(M=1024, dtype_name="float32", r=16)), ("dx", dict(M=1024, dtype_name="float32", r=16))]
        if cap == 90:
            variants += [("dx", dict(M=4096, K=4100, r=128)), ("dx", dict(M=4096, K=4097, dq=False, dtype_name="float16")),
                         ("decode", dict(M=1, config=(1, 16, 256, 1, 4, 3))),  # register-FMA decode for M == 1
                         ("decode", dict(M=1, N=512)),  # split-K + the reduce kernel
                         ("decode", dict(M=8, N=512, K=4097, blocksize=32, dq=False, dtype_name="float16"))]
        for op, v in variants:
            out.append(dict(base, cap=cap, op=op, **v))
    return out


def main() -> None:
    jobs = int(os.environ.get("QLORA_COMPILE_JOBS", os.cpu_count() or 1))
    todo = cases()
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        results = [r for rs in ex.map(compile_case, todo) for r in rs]
    print("RESULTS " + json.dumps(results))


# ------------------------------------------------------------------------------------------------- test
def _run_worker():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "0")
    res = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


def test_kernels_compile_for_sm80_and_sm90():
    import pytest

    pytest.importorskip("triton")
    results = _run_worker()
    problems = []
    for r in results:
        name = f"{r['kernel']} sm_{r['cap']} {r['op']} M={r['M']} N={r['N']} K={r['K']} {r['dtype_name']} {r['tiles']}"
        if r["spill_stores"] or r["spill_loads"]:
            problems.append(f"{name}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
        if r["shared"] > SMEM_LIMIT[r["cap"]]:
            problems.append(f"{name}: {r['shared']} B shared memory > {SMEM_LIMIT[r['cap']]}")
        big = r["tiles"].get("BLOCK_M", 0) >= 64 and r["kernel"] in ("_nf4_linear_kernel", "_nf4_linear_dx_kernel")
        if r["cap"] == 90 and big and r["dtype_name"] != "float32" and not r["wgmma"]:
            problems.append(f"{name}: no wgmma in the sm_90 PTX")
        if r["cap"] == 80 and big and r["dtype_name"] != "float32" and not r["mma"]:
            problems.append(f"{name}: no mma.sync in the sm_80 PTX")
    summary = "\n".join(
        f"{r['kernel']:<28} sm_{r['cap']} {r['op']:<6} M={r['M']:<5} K={r['K']:<5} {r['dtype_name']:<8} "
        f"{json.dumps(r['tiles'])} w{r['num_warps']} s{r['num_stages']} regs={r['registers']} "
        f"spill={r['spill_stores']}/{r['spill_loads']} smem={r['shared']} wgmma={r['wgmma']} cp.async={r['async_copy']}"
        for r in results
    )
    print(summary)
    assert not problems, "\n".join(problems) + "\n" + summary


if __name__ == "__main__":
    main()
