"""Static checks of the Triton kernels for real GPUs, without a GPU.

Every kernel, at each launch configuration the dispatcher can pick (the heuristic table fitted to the
benchmark shapes, plus the layout/dtype variants: odd K, K % blocksize != 0, no double quant, fp16/fp32,
rank 128, decode with and without split-K), is compiled for sm_80 and sm_90 with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`. The compiled kernel must
- use wgmma on sm_90 when a tile is >= 64 rows (the forward/dx main loop),
- spill no registers (ptxas -v from the ptxas bundled with triton, same flags triton uses),
- stay 10% below the device's shared memory (sm_90: 227 KiB, sm_80: 163 KiB per block), and <= 113 KB (two
  CTAs per SM) for the sm_90 forward and dx at M >= 512,
- on the aligned fast path: load the packed words with 16-byte loads (async copies in the sm_90 forward and
  dx), with no narrow load per weight; and stay within the instructions per weight reached (see below).
The counts come from bench.sass_report (the same functions `python -m bench.sass_report` prints with).

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


# ------------------------------------------------------------------------------------------------ worker
def compile_case(case: dict) -> list[dict]:
    """bench.sass_report's record of every kernel one call of `case` launches (SASS counts, ptxas, model)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.sass_report import analyze_case

    return [dict(case, config_given=case.get("config"), **rec) for rec in analyze_case(case)]


def cases() -> list[dict]:
    """Each configuration the dispatcher can pick on sm_80 and sm_90, and the layout/dtype variants."""
    base = dict(N=4096, K=4096, blocksize=64, r=64, dq=True, dtype_name="bfloat16", bias=True)
    out = []
    for cap in (80, 90):
        for op, ms in (("fwd", (64, 256, 512, 4096)), ("dx", (64, 256, 512, 4096)), ("decode", (1, 16))):
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


# Targets of the main loop on the benchmark configurations (sm_90, bf16, blocksize 64, double quant), from the
# same counts bench.sass_report prints. Issue 9 asks fwd <= 5, dx <= 6, decode <= 4 instructions per weight;
# these are the figures reached (bench/results/sass-sm90.json: 4.82, 5.09, 4.61-4.66), so a regression fails
# here. The forward and dx meet their targets; the Triton decode does not (README, SASS section).
MAX_INSTR_PER_WEIGHT = {"fwd": 4.9, "dx": 5.15, "decode": 4.7}
# triton < 3.9 (torch 2.11 pins 3.6) keeps the one-block tiles (configs.LEGACY_HEURISTICS); its figures under
# triton 3.6.0: 5.69, 5.70, 6.94 (bench/results/sass-sm90-triton3.6.json; CI's step 4 runs this file under 3.6.0)
MAX_INSTR_PER_WEIGHT_LEGACY = {"fwd": 5.75, "dx": 5.75, "decode": 7.0}
# No per-weight table gather or byte load (the NF4 lookup is in registers): what is left are the per-row scale
# loads (absmax code byte, dynamic-map entry, nested scale), 3 per tile row and block, so tiles with fewer than
# 64 weights per thread (the small-M configs: up to 0.156) stay above 0.1.
MAX_NARROW_LOADS_PER_WEIGHT = {True: 0.1, False: 0.25}  # keyed on weights_per_thread_per_iteration >= 64
SMEM_2_CTAS_SM90 = 113 * 1024  # forward and dx at M >= 512: two CTAs per SM


def _name(r):
    return f"{r['kernel']} sm_{r['cap']} M={r['M']} N={r['N']} K={r['K']} bs{r['blocksize']} {r['dtype_name']} {r['config']}"


def _problems(r) -> list[str]:
    name, out = _name(r), []
    cap, kern, c = r["cap"], r["kernel"], r["config"]
    if r["spill_stores"] or r["spill_loads"]:
        out.append(f"{name}: spills {r['spill_stores']} B stores / {r['spill_loads']} B loads")
    if r["shared_bytes"] > 0.9 * SMEM_LIMIT[cap]:
        out.append(f"{name}: {r['shared_bytes']} B shared memory, not 10% below {SMEM_LIMIT[cap]}")
    big = c.get("BLOCK_M", 0) >= 64 and kern in ("fwd", "dx") and r["dtype_name"] != "float32"
    if cap == 90 and big and not r["wgmma"]:
        out.append(f"{name}: no wgmma in the sm_90 PTX")
    if cap == 80 and big and not r["mma"]:
        out.append(f"{name}: no mma.sync in the sm_80 PTX")
    aligned = r["K"] % c.get("BLOCK_K", 1) == 0 and r["K"] % r["blocksize"] == 0 and r["dtype_name"] != "float32"
    if kern in ("fwd", "dx", "decode") and aligned:
        # the aligned fast path: packed words through 16-byte loads, no narrow load per weight
        # (the M == 1 register-FMA decode, only run when a config asks for it, loads without pipelining)
        limit = MAX_NARROW_LOADS_PER_WEIGHT[r["weights_per_thread_per_iteration"] >= 64 and r.get("config_given") is None]
        if r["narrow_global_loads_per_weight"] > limit:
            out.append(f"{name}: {r['narrow_global_loads_per_weight']:.3f} narrow global loads per weight "
                       f"(> {limit}): {r['memory']}")
        if not r["global_loads_16B"]:
            out.append(f"{name}: no 16-byte global load in the main loop: {r['memory']}")
    bench = (r["N"], r["K"], r["blocksize"], r["dq"], r["dtype_name"]) == (4096, 4096, 64, True, "bfloat16")
    bench_m = r["M"] >= 512 if kern in ("fwd", "dx") else True  # the benchmark's M: 512 and 4096; decode 1 and 16
    if cap == 90 and bench and bench_m and kern in MAX_INSTR_PER_WEIGHT and r.get("config_given") is None:
        from qlora_kernels.triton_kernels.configs import perm_k_supported

        limit = (MAX_INSTR_PER_WEIGHT if perm_k_supported() else MAX_INSTR_PER_WEIGHT_LEGACY)[kern]
        if r["instructions_per_weight"] > limit:
            out.append(f"{name}: {r['instructions_per_weight']:.2f} instructions per weight > {limit}")
        if kern in ("fwd", "dx"):
            if r["M"] >= 512 and r["shared_bytes"] > SMEM_2_CTAS_SM90:
                out.append(f"{name}: {r['shared_bytes']} B shared memory > {SMEM_2_CTAS_SM90} (2 CTAs per SM)")
            if not any(op.startswith("LDGSTS") and op.endswith(".128") for op in r["memory"]):
                out.append(f"{name}: the 16-byte loads are not async copies (not pipelined): {r['memory']}")
    return out


def test_kernels_compile_for_sm80_and_sm90():
    import pytest

    pytest.importorskip("triton")
    results = _run_worker()
    problems = [p for r in results for p in _problems(r)]
    summary = "\n".join(
        f"{r['kernel']:<13} sm_{r['cap']} M={r['M']:<5} K={r['K']:<5} {r['dtype_name']:<8} {json.dumps(r['config'])} "
        f"regs={r['registers']} spill={r['spill_stores']}/{r['spill_loads']} smem={r['shared_bytes']} "
        f"loop={r['loop_instructions']} ins/w={r['instructions_per_weight'] or 0:.2f} "
        f"narrow/w={r['narrow_global_loads_per_weight'] or 0:.3f} 16B={r['global_loads_16B']} wgmma={r['wgmma']}"
        for r in results
    )
    print(summary)
    assert not problems, "\n".join(problems) + "\n" + summary


if __name__ == "__main__":
    main()


# ------------------------------------------------------------------------- register lookup: bit-exactness
def _run_ptx(asm: str, inputs: list, n_out: int) -> list:
    """A tiny interpreter for the PTX of nf4_tile's register lookup (b32 logic, lop3, prmt, f32 mul, cvt, mov)."""
    import struct

    import torch

    regs: dict = {}
    ops = [f"${i}" for i in range(n_out)]
    for i, v in enumerate(inputs):
        regs[f"${n_out + i}"] = v & 0xFFFFFFFF
    f2u = lambda f: struct.unpack("<I", struct.pack("<f", f))[0]  # noqa: E731
    u2f = lambda u: struct.unpack("<f", struct.pack("<I", u))[0]  # noqa: E731

    def val(tok):
        tok = tok.strip()
        if tok.startswith("0f"):
            return int(tok[2:], 16)
        if tok.startswith("0x"):
            return int(tok, 16)
        if tok[0].isdigit():
            return int(tok)
        return regs[tok]

    def cvt16(f, kind):
        t = torch.tensor([u2f(f)], dtype=torch.float32).to(torch.bfloat16 if kind == "bf16" else torch.float16)
        return t.view(torch.int16).item() & 0xFFFF

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        if op == "mov.b32" and not rest.lstrip().startswith("{"):
            d, a0 = [t.strip() for t in rest.split(",")]
            regs[d] = val(a0)
            continue
        if op == "mov.b32":
            dst, src = rest.split("},")
            lo, hi = [d.strip() for d in dst.strip("{ ").split(",")]
            v = val(src)
            regs[lo], regs[hi] = v & 0xFFFF, v >> 16
            continue
        args = [a.strip() for a in rest.split(",")]
        d, a = args[0], args[1:]
        if op == "and.b32":
            r = val(a[0]) & val(a[1])
        elif op == "or.b32":
            r = val(a[0]) | val(a[1])
        elif op == "xor.b32":
            r = val(a[0]) ^ val(a[1])
        elif op == "shr.u32":
            r = val(a[0]) >> val(a[1])
        elif op == "shl.b32":
            r = val(a[0]) << val(a[1])
        elif op == "lop3.b32":  # bit i of d = bit 4 a_i + 2 b_i + c_i of immLut (PTX: immLut = F(0xF0, 0xCC, 0xAA))
            x, y, z, lut = val(a[0]), val(a[1]), val(a[2]), val(a[3])
            r = 0
            for i in range(32):
                idx = ((x >> i) & 1) << 2 | ((y >> i) & 1) << 1 | ((z >> i) & 1)
                r |= ((lut >> idx) & 1) << i
        elif op == "mul.rn.f32":
            r = f2u(float(torch.tensor(u2f(val(a[0])), dtype=torch.float32) * torch.tensor(u2f(val(a[1])), dtype=torch.float32)))
        elif op.startswith("cvt.rn."):
            kind = "bf16" if "bf16" in op else "fp16"
            r = cvt16(val(a[0]), kind) << 16 | cvt16(val(a[1]), kind)  # d = {a: high half, b: low half}
        elif op == "prmt.b32":
            src = val(a[0]) | val(a[1]) << 32
            sel = val(a[2])
            r = 0
            for i in range(4):
                s = (sel >> (4 * i)) & 0xF
                byte = (src >> (8 * (s & 7))) & 0xFF
                if s & 8:  # sign replicate
                    byte = 0xFF if byte & 0x80 else 0
                r |= byte << (8 * i)
        else:
            raise AssertionError(f"unknown PTX op {op}")
        regs[d] = r & 0xFFFFFFFF
    return [regs[o] for o in ops]


def test_register_lookup_is_bit_exact():
    """nf4_tile's PTX (table of the 16 products, then the PRMT lookup), run by the interpreter above, equals
    the reference round(NF4[c] * scale) bit for bit: every code in every word position, zero blocks, the
    largest and smallest scales, in bfloat16 and float16."""
    import random
    import struct

    import torch

    from qlora_kernels._format import NF4_TABLE
    from qlora_kernels.triton_kernels import nf4_tile

    assert [int(v[2:], 16) for v in nf4_tile._nf4_values()] == [v & 0xFFFFFFFF for v in NF4_TABLE.view(torch.int32).tolist()]
    rng = random.Random(0)
    scales = [0.0, 1.0, 0.0123, 3.4e38, 1e-45, 1.17e-38, 65504.0, 7e4, 2.5e-8] + [rng.uniform(0, 0.2) for _ in range(6)]
    # each word holds 8 codes; these words put every code in every position (and random mixes)
    words = [int(f"{c:x}" * 8, 16) for c in range(16)] + [0x0123_4567, 0x89AB_CDEF, 0xFEDC_BA98, 0x7654_3210]
    words += [rng.getrandbits(32) for _ in range(24)]
    f2u = lambda f: struct.unpack("<I", struct.pack("<f", f))[0]  # noqa: E731
    for dtype, asm in ((torch.bfloat16, nf4_tile._TABLE_ASM_BF16.value), (torch.float16, nf4_tile._TABLE_ASM_FP16.value)):
        for s in scales:
            s32 = torch.tensor(s, dtype=torch.float32)
            planes = _run_ptx(asm, [f2u(float(s32))], 8)
            ref = (NF4_TABLE * s32).to(dtype).view(torch.int16).tolist()
            for w in words:
                got = _run_ptx(nf4_tile._LOOKUP_ASM.value, [w, *planes], 4)
                byte = [(w >> (8 * j)) & 0xFF for j in range(4)]
                codes = [c for b in byte for c in (b >> 4, b & 0xF)]  # memory order: high nibble first
                vals = [ref[c] & 0xFFFF for c in codes]
                want = [vals[2 * i] | vals[2 * i + 1] << 16 for i in range(4)]  # pairs, lower code in the low half
                assert got == want, (dtype, s, hex(w), [hex(v) for v in got], [hex(v) for v in want])


def test_dispatch_model_uses_the_committed_sass_report():
    """dispatch.DEVICE_MODEL's fused efficiency is the sass_report model's figure in bench/results (until a GPU
    measures it): regenerating the report without updating the dispatcher fails here."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from bench.sass_report import fused_eff_from
    from qlora_kernels.triton_kernels.dispatch import DEVICE_MODEL

    for cap in (90, 80):
        records = json.loads((ROOT / "bench" / "results" / f"sass-sm{cap}.json").read_text())
        assert abs(fused_eff_from(records, cap) - DEVICE_MODEL[cap // 10]["fused_eff"]) < 1e-3, cap


def sass_figures(records: list[dict], cap: int = 90) -> str:
    """"fwd / dx / decode" instructions per weight of a saved sass_report at the benchmark shapes (bf16, double
    quant, N = K = 4096; forward and dx at M = 512 and 4096, decode at M = 1 and 16), as the README quotes them:
    "4.61-4.66" where the two M differ."""
    parts = []
    for kern in ("fwd", "dx", "decode"):
        vals = sorted({round(r["instructions_per_weight"], 2) for r in records
                       if (r["kernel"], r["cap"], r["N"], r["K"], r["dtype"], r["double_quant"]) ==
                       (kern, cap, 4096, 4096, "bfloat16", True)})
        assert vals, (kern, cap)
        parts.append(f"{vals[0]:.2f}" if len(vals) == 1 else f"{vals[0]:.2f}-{vals[-1]:.2f}")
    return " / ".join(parts)


def test_readme_support_matrix_quotes_the_committed_sass_figures():
    """The README's support matrix gives each triton version's tiles with their sm_90 figures: those of the
    committed reports (triton 3.9: sass-sm90.json, PERM_K tiles; triton 3.6.0: sass-sm90-triton3.6.json, the
    one-block tiles), so regenerating a report without updating the row fails here."""
    import pytest

    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("source tree not available (tests run from an installed copy)")
    row = next((ln for ln in readme.read_text().splitlines() if ln.startswith("| Triton |")), None)
    assert row, "README.md's support matrix has no Triton row"
    for name in ("sass-sm90.json", "sass-sm90-triton3.6.json"):
        figures = sass_figures(json.loads((ROOT / "bench" / "results" / name).read_text()))
        assert f"{figures} " in row and name in row, f"the README's Triton row does not quote {name}: {figures}"
