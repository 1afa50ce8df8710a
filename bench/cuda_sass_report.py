"""The native CUDA NF4 kernels (csrc/nf4_cuda.cu) read from their SASS: what one thread issues per value.

    python -m bench.cuda_sass_report [--caps 90,80] [--source FILE | --so PATH] [--out DIR] [--tag -before]

No GPU needed. The SASS comes from `nvcc -cubin` of the source (default csrc/nf4_cuda.cu, with the build's
flags: -O3 --fmad=false -Xptxas -v, so registers and spills come from ptxas) or, with --so, from
`cuobjdump -sass` of a built extension (registers and spills then from --dump-resource-usage).

For each dequantize_nf4_kernel<dtype, nested> and quantize_nf4_kernel<dtype> instantiation it counts, on the
aligned path (the path every full tile of a 16-byte aligned tensor takes; a thread handles 32 values there):
- `path_*`: the shortest entry -> EXIT path through every block holding a 16-byte global store (one thread,
  one tile / chunk, the prologue included);
- `loop_*`: when the 16-byte stores sit in a loop (the grid-stride loop), that loop's body: the steady-state
  cost of one more tile;
- `*_per_value`: divided by the 32 values a thread produces per pass;
- global loads / stores by width (`LDG.U8`, `LDG.32`, `LDG.128`, ...), shared loads / stores, shuffles;
- `dependent_global_loads`: global-memory latencies serialized before the first store under in-order issue
  (an instruction issues after every instruction before it, and after the loads its operands come from; a
  load's result is one latency later). The old dequantize: code byte -> map entry -> (the scale FMUL the
  16-byte load waits behind) -> packed load = 3.
Writes bench/results/cuda-sass-sm<cap>.json (a list of records) unless --out says otherwise.

The decode GEMM (csrc/nf4_decode_cuda.cu, nf4_decode_kernel<dtype, nested, n8 tiles>) is counted the same way
into bench/results/cuda-decode-sass-sm<cap>.json (--no-decode skips it): its main loop is the longest backward
branch whose body holds the HMMAs (one 16 x 256 warp tile: 128 weights per lane per iteration), so
`instructions_per_weight` = loop instructions / 128, plus memory instructions by width, narrow (< 16-byte)
global loads per weight, registers and spills. M = 1 runs the one-n8-tile instantiation, M = 16 the two-tile one.
"""

from __future__ import annotations

import argparse
import functools
import heapq
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "nf4_cuda.cu"
DTYPES = {0: "fp32", 1: "fp16", 2: "bf16"}
KERNELS = ("dequantize_nf4_kernel", "quantize_nf4_kernel")
AVOID = r"FCHK|CALL|ATOM|RED\b"
VALUES_PER_PASS = 32  # values one thread produces per tile (dequantize) or chunk (quantize)

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


# ------------------------------------------------------------------------------------------------ tools
def nvcc() -> str | None:
    for cand in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    return None


def cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    if Path("/usr/local/cuda/bin/cuobjdump").exists():
        return "/usr/local/cuda/bin/cuobjdump"
    try:  # the triton package ships one
        import triton

        cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if cand.exists():
            return str(cand)
    except ImportError:
        pass
    return None


def compile_cubin(cap: int, source: Path = SOURCE) -> tuple[bytes, str]:
    """(cubin bytes, ptxas -v log) of `source` for sm_<cap>, with the flags CMakeLists.txt builds _C with."""
    tool = nvcc()
    if tool is None:
        raise RuntimeError("nvcc not found")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "k.cubin"
        cmd = [tool, "-cubin", f"-arch=sm_{cap}", "-O3", "--fmad=false", "-std=c++17", "-Xptxas=-v",
               "-Xcompiler=-ffp-contract=off", f"-I{source.parent}", "-o", str(out), str(source)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed:\n{res.stderr[-4000:]}")
        return out.read_bytes(), res.stderr


@functools.lru_cache(maxsize=8)
def sass_of(binary: Path, cap: int) -> str:
    tool = cuobjdump()
    if tool is None:
        raise RuntimeError("cuobjdump not found")
    args = [tool, "-sass", str(binary)]
    if binary.suffix != ".cubin":
        args[2:2] = ["-arch", f"sm_{cap}"]
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def resources_of(binary: Path, cap: int) -> dict[str, dict]:
    """function -> {registers, stack, local} from cuobjdump --dump-resource-usage."""
    tool = cuobjdump()
    args = [tool, "--dump-resource-usage", str(binary)]
    if binary.suffix != ".cubin":
        args[2:2] = ["-arch", f"sm_{cap}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    res = {}
    for f, r, s, l in re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out):
        res[f] = dict(registers=int(r), stack=int(s), local=int(l))
    return res


def parse_ptxas(log: str) -> dict[str, dict]:
    """function -> {registers, spill_stores, spill_loads, stack} from ptxas -v output."""
    out, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = out.setdefault(m.group(1), {})
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and cur is not None:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m and cur is not None:
            cur["registers"] = int(m.group(1))
    return out


# ---------------------------------------------------------------------------------------------- parsing
def functions(sass: str) -> dict[str, list[tuple[int, str]]]:
    """function name -> [(address, instruction text without the trailing ';')]."""
    out: dict[str, list] = {}
    cur = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = out.setdefault(m.group(1), [])
            continue
        m = _INSTR.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def split_pred(text: str) -> tuple[str | None, str]:
    m = re.match(r"(@!?U?P[T\d]+)\s+(.*)", text)
    return (m.group(1), m.group(2)) if m else (None, text)


def opcode(text: str) -> str:
    return split_pred(text)[1].split()[0]


def kind(text: str) -> str | None:
    """'LDG.128', 'LDG.U8', 'STG.32', 'LDS.32', ... for memory instructions (width from the suffixes)."""
    op = opcode(text)
    base = op.split(".")[0]
    if base not in ("LDG", "STG", "LDS", "STS", "LD", "ST", "LDC", "ATOMG", "RED", "SHFL"):
        return None
    if base == "SHFL":
        return "SHFL"
    width = "32"
    for suffix in op.split(".")[1:]:
        if suffix in ("U8", "S8", "U16", "S16", "64", "128"):
            width = suffix
    return f"{base}.{width}"


def blocks(instrs: list[tuple[int, str]]):
    """Basic blocks: [(start index, end index exclusive)], successor lists (block indices), index of address."""
    at = {a: i for i, (a, _) in enumerate(instrs)}
    leaders = {0}
    for i, (_, t) in enumerate(instrs):
        op = opcode(t)
        if op == "BRA.DIV":  # taken only by a diverged warp (the shuffles' fallback): not the aligned path
            continue
        if op.startswith("BRA") or op in ("EXIT", "RET", "BRX") or op.startswith("EXIT"):
            leaders.add(i + 1)
            m = re.search(r"0x([0-9a-f]+)", split_pred(t)[1])
            if op.startswith("BRA") and m and int(m.group(1), 16) in at:
                leaders.add(at[int(m.group(1), 16)])
    starts = sorted(s for s in leaders if s < len(instrs))
    spans = [(s, starts[k + 1] if k + 1 < len(starts) else len(instrs)) for k, s in enumerate(starts)]
    block_of = {s: k for k, (s, _) in enumerate(spans)}
    succ = []
    for k, (s, e) in enumerate(spans):
        pred, body = split_pred(instrs[e - 1][1])
        op = body.split()[0]
        nxt = [k + 1] if k + 1 < len(spans) else []
        if op.startswith("BRA") and op != "BRA.DIV":
            m = re.search(r"0x([0-9a-f]+)", body)
            tgt = [block_of[at[int(m.group(1), 16)]]] if m and int(m.group(1), 16) in at else []
            if tgt and tgt[0] == k and pred is None:  # the trailing `BRA self` after the last EXIT
                succ.append([])
                continue
            succ.append(tgt + (nxt if pred else []))
        elif op.startswith("EXIT") or op == "RET":
            succ.append(nxt if pred else [])
        else:
            succ.append(nxt)
    return spans, succ


def shortest_path(spans, succ, must: list[int], avoid: set[int] = frozenset(), texts_of=()) -> list[int] | None:
    """Block sequence entry -> must[0] -> must[1] ... -> an EXIT block, fewest instructions (Dijkstra per leg),
    never entering a block of `avoid`."""
    size = [e - s for s, e in spans]

    def leg(src: int, dst_ok) -> list[int] | None:
        dist, prev, heap = {src: size[src]}, {src: None}, [(size[src], src)]
        while heap:
            d, b = heapq.heappop(heap)
            if d > dist[b]:
                continue
            if dst_ok(b):
                path = []
                while b is not None:
                    path.append(b)
                    b = prev[b]
                return path[::-1]
            for c in succ[b]:
                if c in avoid:
                    continue
                nd = d + size[c]
                if nd < dist.get(c, 1 << 60):
                    dist[c], prev[c] = nd, b
                    heapq.heappush(heap, (nd, c))
        return None

    path, cur = [0], 0
    for m in must:
        if m == cur and len(path) > 1:
            continue
        seg = leg(cur, lambda b, m=m: b == m) if m != cur else [cur]
        if seg is None:
            return None
        path += seg[1:]
        cur = m
    ends = {b for b, (s, e) in enumerate(spans) if not succ[b] or opcode(texts_of[e - 1]).startswith("EXIT")}
    seg = leg(cur, lambda b: b in ends)  # an EXIT, predicated ones included (the aligned path takes them)
    if seg is None:
        return None
    return path + seg[1:]


def dependent_loads(texts: list[str]) -> int:
    """Global-memory latencies serialized before the first global store on this straight-line sequence, under
    in-order issue (see the module docstring). Registers are R<n> (64-bit pairs cover R<n>, R<n+1>; 128-bit
    loads write R<n>..R<n+3>)."""
    ready: dict[str, int] = {}
    issue = 0
    for t in texts:
        _, body = split_pred(t)
        op = body.split()[0]
        operands = body[len(op):]
        regs = re.findall(r"\bR(\d+)\b", operands)
        k = kind(t) or ""
        dst: list[str] = []
        srcs = regs
        if regs and not op.startswith(("ST", "RED", "ATOM", "BRA", "EXIT", "BAR", "ISETP", "FSETP")):
            width = {"64": 2, "128": 4}.get(k.split(".")[-1], 1) if k else (2 if ".64" in op or ".WIDE" in op else 1)
            d = int(regs[0])
            dst = [f"R{d + j}" for j in range(width)]
            srcs = regs[1:]
        src_regs = set()
        for r in srcs:
            src_regs.add(f"R{r}")
        # 64-bit address pairs: [R8.64] reads R8, R9
        for r in re.findall(r"\[R(\d+)\.64", operands):
            src_regs.add(f"R{int(r) + 1}")
        issue = max([issue] + [ready.get(r, 0) for r in src_regs])
        if op.startswith("STG") or op.startswith("ST.E"):
            return issue
        lat = 1 if op.startswith("LDG") or op.startswith("LD.E") else 0
        for r in dst:
            ready[r] = issue + lat
    return issue


def analyse(name: str, instrs: list[tuple[int, str]]) -> dict:
    texts = [t for _, t in instrs]
    spans, succ = blocks(instrs)
    block_at = lambda i: next(k for k, (s, e) in enumerate(spans) if s <= i < e)  # noqa: E731
    reach, todo = {0}, [0]  # blocks reachable from the entry (a diverged warp's fallback code is not)
    while todo:
        for c in succ[todo.pop()]:
            if c not in reach:
                reach.add(c)
                todo.append(c)
    live = [i for k in sorted(reach) for i in range(*spans[k])]
    st16 = sorted({block_at(i) for i in live if kind(texts[i]) == "STG.128"})
    # the grid-stride loop: the longest backward branch whose body holds a 16-byte store
    loop = None
    for i in live:
        a, t = instrs[i]
        body = split_pred(t)[1]
        m = re.search(r"0x([0-9a-f]+)", body)
        if opcode(t).startswith("BRA") and opcode(t) != "BRA.DIV" and m and int(m.group(1), 16) < a:
            lo = next(j for j, (b, _) in enumerate(instrs) if b == int(m.group(1), 16))
            if any(kind(texts[j]) == "STG.128" for j in range(lo, i + 1)) and (loop is None or i - lo > loop[1] - loop[0]):
                loop = (lo, i)
    # the path visits every block holding a 16-byte load (the prologue's and, in a loop, the next tile's) and
    # the 16-byte stores: with a loop, one iteration
    ld16 = {block_at(i) for i in live if kind(texts[i]) == "LDG.128"}
    must = sorted(ld16 | {b for b in st16 if loop is None or spans[b][0] <= loop[1]})
    # not on the aligned path: division (the partial last block's true division: FCHK), the rare calls of the
    # correctly rounded reciprocal / division, atomics (non-finite input). Shortest alone would take the
    # partial block's code, which skips values past the end.
    avoid = {k for k in reach if any(re.match(AVOID, opcode(texts[i])) for i in range(*spans[k]))} - set(must)
    path = shortest_path(spans, succ, must, avoid, texts) if must else None
    rec: dict = {"function": name}
    if path is not None:
        ptexts = [texts[i] for b in path for i in range(*spans[b])]
        rec.update(_counts("path", ptexts))
        rec["dependent_global_loads"] = dependent_loads(ptexts)
    if loop is not None:
        ltexts = texts[loop[0] : loop[1] + 1]
        rec.update(_counts("loop", ltexts))
    rec["static_instructions"] = len([t for t in texts if opcode(t) != "NOP"])
    return rec


def _counts(prefix: str, texts: list[str]) -> dict:
    real = [t for t in texts if opcode(t) != "NOP"]
    mem: dict[str, int] = {}
    for t in real:
        k = kind(t)
        if k and not k.startswith("LDC"):
            mem[k] = mem.get(k, 0) + 1
    return {
        f"{prefix}_instructions": len(real),
        f"{prefix}_instructions_per_value": round(len(real) / VALUES_PER_PASS, 3),
        f"{prefix}_memory": dict(sorted(mem.items())),
        f"{prefix}_global_loads_per_value": round(sum(v for k, v in mem.items() if k.startswith("LDG")) / VALUES_PER_PASS, 4),
        f"{prefix}_global_stores_per_value": round(sum(v for k, v in mem.items() if k.startswith("STG")) / VALUES_PER_PASS, 4),
    }


def demangle_kernel(name: str) -> tuple[str, str, bool | None] | None:
    """(kernel, dtype, nested) of a mangled dequantize/quantize instantiation."""
    for k in KERNELS:
        m = re.search(rf"\d{k}ILi(\d)E(?:Lb([01])E)?E", name)
        if m and not re.search(rf"\dd{k}", name) and (k != "quantize_nf4_kernel" or "dequantize" not in name):
            return k, DTYPES[int(m.group(1))], (None if m.group(2) is None else m.group(2) == "1")
    return None


DECODE_SOURCE = ROOT / "csrc" / "nf4_decode_cuda.cu"
DECODE_WEIGHTS_PER_ITERATION = 128  # per lane: 2 rows x 64 k of a 16 x 256 warp tile (nf4_decode_layout.h)


def demangle_decode(name: str) -> tuple[str, bool, int] | None:
    """(dtype, nested, n8 tiles) of an nf4_decode_kernel<DT, NESTED, MT> instantiation."""
    m = re.search(r"\d+nf4_decode_kernelILi(\d)ELb([01])ELi(\d)EE", name)
    return (DTYPES[int(m.group(1))], m.group(2) == "1", int(m.group(3))) if m else None


def decode_loop(instrs: list[tuple[int, str]]) -> tuple[int, int] | None:
    """(first, last) index of the longest backward branch's body that holds an HMMA."""
    texts = [t for _, t in instrs]
    at = {a: i for i, (a, _) in enumerate(instrs)}
    best = None
    for i, (a, t) in enumerate(instrs):
        m = re.search(r"0x([0-9a-f]+)", split_pred(t)[1])
        if opcode(t).startswith("BRA") and m and int(m.group(1), 16) < a and int(m.group(1), 16) in at:
            lo = at[int(m.group(1), 16)]
            if any(opcode(texts[j]).startswith("HMMA") for j in range(lo, i + 1)) and (best is None or i - lo > best[1] - best[0]):
                best = (lo, i)
    return best


def decode_analyse(instrs: list[tuple[int, str]]) -> dict:
    loop = decode_loop(instrs)
    if loop is None:
        return {}
    real = [t for _, t in instrs[loop[0] : loop[1] + 1] if opcode(t) != "NOP"]
    mem: dict[str, int] = {}
    ops: dict[str, int] = {}
    for t in real:
        k = kind(t)
        if k and not k.startswith("LDC"):
            mem[k] = mem.get(k, 0) + 1
        base = opcode(t).split(".")[0]
        ops[base] = ops.get(base, 0) + 1
    w = DECODE_WEIGHTS_PER_ITERATION
    narrow = sum(v for k, v in mem.items() if k.startswith("LDG") and k != "LDG.128")
    return {
        "weights_per_lane_per_iteration": w,
        "loop_instructions": len(real),
        "instructions_per_weight": round(len(real) / w, 3),
        "loop_memory": dict(sorted(mem.items())),
        "loop_opcodes": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "global_loads_16B": mem.get("LDG.128", 0),
        "narrow_global_loads_per_weight": round(narrow / w, 4),
        "hmma": ops.get("HMMA", 0),
    }


def sass_and_resources(cap: int, source: Path | None, so: Path | None) -> tuple[str, dict, str]:
    """(SASS, per-function registers / spill bytes, where they came from): from a built _C (`so`) through
    cuobjdump, else from `source` compiled with nvcc -cubin (ptxas -v)."""
    with tempfile.TemporaryDirectory() as tmp:
        if so is not None:
            binary, res = so, resources_of(so, cap)
            regs = {f: dict(registers=r["registers"], spill_stores=r["local"], spill_loads=r["local"], stack=r["stack"])
                    for f, r in res.items()}
            origin = f"cuobjdump -sass -arch sm_{cap} {so}"
        else:
            cubin, log = compile_cubin(cap, source)
            binary = Path(tmp) / "k.cubin"
            binary.write_bytes(cubin)
            regs = parse_ptxas(log)
            origin = f"nvcc -cubin -arch=sm_{cap} -O3 --fmad=false {source.relative_to(ROOT) if source.is_relative_to(ROOT) else source}"
        return sass_of(binary, cap), regs, origin


def _records(cap: int, source: Path | None, so: Path | None, describe, analyse_one) -> list[dict]:
    """One record per kernel of the SASS that describe(mangled name) recognises: its leading fields, cap,
    origin, analyse_one(name, instructions), registers and spills (ptxas)."""
    sass, regs, origin = sass_and_resources(cap, source, so)
    out = []
    for name, instrs in functions(sass).items():
        rec = describe(name)
        if rec is None:
            continue
        rec.update(cap=cap, origin=origin)
        rec.update(analyse_one(name, instrs))
        r = regs.get(name, {})
        rec.update(registers=r.get("registers"), spill_stores=r.get("spill_stores"), spill_loads=r.get("spill_loads"))
        out.append(rec)
    return out


def decode_report(cap: int, source: Path | None = DECODE_SOURCE, so: Path | None = None) -> list[dict]:
    """One record per nf4_decode_kernel instantiation in `so` (a built _C) or compiled from `source`."""
    def describe(name):
        what = demangle_decode(name)
        if what is None:
            return None
        dtype, nested, mt = what
        return {"kernel": "nf4_decode", "dtype": dtype, "double_quant": nested, "n8_tiles": mt,
                "case": "M=1 (M<=8)" if mt == 1 else "M=16"}

    out = _records(cap, source, so, describe, lambda name, instrs: decode_analyse(instrs))
    out.sort(key=lambda r: (r["dtype"], r["double_quant"], r["n8_tiles"]))
    return out


def decode_table(records: list[dict]) -> str:
    lines = [f"{'decode case':<12}{'dtype':<6}{'dq':<4}{'sm':<4}{'regs':>5}{'spill':>6}{'loop':>6}{'w/lane':>7}"
             f"{'instr/w':>8}{'narrowLDG/w':>12}  loop memory"]
    for r in records:
        spill = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)
        mem = " ".join(f"{k}:{v}" for k, v in r.get("loop_memory", {}).items())
        lines.append(f"{r['case']:<12}{r['dtype']:<6}{'y' if r['double_quant'] else 'n':<4}{r['cap']:<4}"
                     f"{r['registers'] or 0:>5}{spill:>6}{r.get('loop_instructions', 0):>6}"
                     f"{r.get('weights_per_lane_per_iteration', 0):>7}{r.get('instructions_per_weight', 0):>8}"
                     f"{r.get('narrow_global_loads_per_weight', 0):>12}  {mem}")
    return "\n".join(lines)


def report(cap: int, source: Path | None = SOURCE, so: Path | None = None) -> list[dict]:
    def describe(name):
        what = demangle_kernel(name)
        if what is None:
            return None
        kernel, dtype, nested = what
        return {"kernel": kernel.replace("_kernel", ""), "dtype": dtype, "double_quant": nested}

    out = _records(cap, source, so, describe, analyse)
    out.sort(key=lambda r: (r["kernel"], r["dtype"], str(r["double_quant"])))
    return out


def table(records: list[dict]) -> str:
    head = (f"{'kernel':<16}{'dtype':<6}{'dq':<4}{'sm':<4}{'regs':>5}{'spill':>6}{'path/val':>9}{'loop/val':>9}"
            f"{'dep.loads':>10}  memory per pass (path)")
    lines = [head]
    for r in records:
        dq = "-" if r["double_quant"] is None else ("y" if r["double_quant"] else "n")
        spill = (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)
        lv = r.get("loop_instructions_per_value")
        mem = " ".join(f"{k}:{v}" for k, v in r.get("path_memory", {}).items())
        lines.append(f"{r['kernel']:<16}{r['dtype']:<6}{dq:<4}{r['cap']:<4}{r['registers'] or 0:>5}{spill:>6}"
                     f"{r.get('path_instructions_per_value', 0):>9}{lv if lv is not None else '-':>9}"
                     f"{r.get('dependent_global_loads', '-'):>10}  {mem}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caps", default="90,80")
    ap.add_argument("--source", type=Path, default=SOURCE)
    ap.add_argument("--so", type=Path, default=None, help="read a built extension instead of compiling --source")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--tag", default="", help="file name suffix, e.g. -before")
    ap.add_argument("--label", default=None, help="what the records' `origin` says instead of the command")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--no-decode", action="store_true", help="skip the decode GEMM (csrc/nf4_decode_cuda.cu)")
    args = ap.parse_args(argv)
    for cap in (int(c) for c in args.caps.split(",")):
        recs = report(cap, args.source, args.so)
        if args.label:
            for r in recs:
                r["origin"] = args.label
        print(table(recs))
        print()
        if not args.no_save:
            args.out.mkdir(parents=True, exist_ok=True)
            path = args.out / f"cuda-sass-sm{cap}{args.tag}.json"
            path.write_text(json.dumps(recs, indent=1) + "\n")
            print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
        if args.no_decode:
            continue
        drecs = decode_report(cap, DECODE_SOURCE, args.so)
        if args.label:
            for r in drecs:
                r["origin"] = args.label
        print(decode_table(drecs))
        print()
        if not args.no_save:
            path = args.out / f"cuda-decode-sass-sm{cap}{args.tag}.json"
            path.write_text(json.dumps(drecs, indent=1) + "\n")
            print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
