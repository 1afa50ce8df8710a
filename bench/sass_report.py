"""The fused Triton kernels' main loops, read from their sm_90 / sm_80 SASS, and a static performance model.

    python -m bench.sass_report [--out DIR] [--caps 90,80] [--jobs N] [--quick] [--grouped] [--save [TAG]]
    python -m bench.sass_report --from bench/results/sass-sm90.json      (re-model and print a saved report)

No GPU needed: every Triton kernel is compiled with `triton.compile(..., target=GPUTarget("cuda", cap, 32))`
at the configuration the dispatcher picks for each benchmark shape (the real launchers are called on meta
tensors with recorders in place of the kernels; the recorded arguments become the signature, specialized
as Triton's JIT would). Cases: bf16 and fp16, blocksize 64, double quant on and off; forward and dx at
M in {512, 4096}, decode at M in {1, 16}; N = K in {4096, 8192}; sm_90 and sm_80 (--quick: sm_90, bf16,
double quant, N = K = 4096 only). --grouped: only the grouped MoE kernels (gfwd / gdx, grouped_cases: E = 8
experts of 4096 x 4096 with 4096 rows, and Qwen3-30B-A3B's expert shapes; in the model the rows are spread
evenly over the experts).

Writes, under --out (default bench/results/sass/):
- `<kernel>-sm<cap>-<case>.sass` for every compiled kernel;
- `sass_report.json`: one record per compiled kernel and case with `kernel` (fwd / dx / decode /
  decode_reduce), `function`, `cap`, `dtype`, `case`, `sass`, `config`, `weights_per_thread_per_iteration`,
  `shared_bytes`, `registers`, `spills`, the main loop's counts (`loop_instructions`, `memory` by opcode,
  `tensor` by opcode, `global_loads_16B`, `narrow_global_loads`, `instructions_per_weight`,
  `narrow_global_loads_per_weight`) and `model` (see below);
and prints the table.

The main loop is the body of the longest backward branch in the SASS (label .. branch, labels excluded).
One loop iteration of one warp issues `loop_instructions` warp-instructions and dequantizes
`weights_per_thread_per_iteration` weights per thread, so `instructions_per_weight` = thread-instructions
per dequantized weight. "Narrow" global loads are LDG / LDGSTS narrower than 16 bytes.

The static model (an optimistic bound: one warp-instruction per scheduler per clock, perfect overlap of the
three pipes, the epilogue and the prologue ignored) gives per shape
    issue  = CTAs * iterations * warps * loop_instructions / (SMs * 4 schedulers * clock)
    tensor = 2 * M_padded * N * K / P                 (P: measured bf16 matmul rate, DEVICE_MODEL)
    memory = (N K bits/8 + e (M K + M N)) / BW         (W once at 4.127 or 4.5 bits, activations once)
    time   = max(issue, tensor, memory);   roofline fraction = max(2 M N K / P, memory) / time,
except that a loop waiting for its own wgmma (WARPGROUP.DEPBAR.LE gsb0, 0x0 in the loop) with one resident CTA
per SM (registers, shared memory) cannot overlap the two: time = max(issue + tensor, memory).
The dispatcher's fused efficiency (dispatch.DEVICE_MODEL["fused_eff"]) is this model's roofline fraction of
the forward at M = 4096, N = K = 4096 (bf16, double quant) until bench_linear measures it on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __name__ == "__main__":  # compile for real targets (must precede any triton import). Only as a script:
    # a process that imports this module as a library (the test suite, under the interpreter) keeps its env.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")

ROOT = Path(__file__).resolve().parents[1]
SMEM_LIMIT = {80: 166912, 90: 232448}
ARCH = {80: "sm_80", 90: "sm_90a"}
# issue model: SMs, schedulers per SM, clock (Hz); P and BW come from dispatch.DEVICE_MODEL
MACHINE = {90: dict(sms=132, schedulers=4, clock_hz=1.9e9, regs=65536, smem=233472),
           80: dict(sms=108, schedulers=4, clock_hz=1.41e9, regs=65536, smem=167936)}
SHORT = {"_nf4_linear_kernel": "fwd", "_nf4_linear_dx_kernel": "dx", "_nf4_decode_kernel": "decode",
         "_nf4_decode_reduce_kernel": "decode_reduce",
         "_nf4_grouped_linear_kernel": "gfwd", "_nf4_grouped_dx_kernel": "gdx"}  # grouped MoE (grouped.py)
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_ORIGINALS: dict = {}


# ------------------------------------------------------------------------------------------ compile
def record_launches(cap: int, op: str, M: int, N: int, K: int, blocksize: int, r: int, dq: bool, dtype_name: str,
                    bias: bool, config: tuple | None = None, E: int = 1):
    """Call the real launcher on meta tensors with recorders in place of the kernels; return the launches.
    op "gfwd" / "gdx": the grouped MoE kernels over E experts of [N, K] holding M rows in all (no bias)."""
    import torch

    from qlora_kernels.triton_kernels import LaunchConfig, configs, decode, grouped, linear_dx, linear_fwd

    configs.capability = lambda device: cap // 10
    configs.sm_count = lambda device: MACHINE[cap]["sms"]
    launches = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.fn, grid, args, kwargs))

    for mod, names in ((linear_fwd, ["_nf4_linear_kernel"]), (linear_dx, ["_nf4_linear_dx_kernel"]),
                       (decode, ["_nf4_decode_kernel", "_nf4_decode_reduce_kernel"]),
                       (grouped, ["_nf4_grouped_linear_kernel", "_nf4_grouped_dx_kernel"])):
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
    if op in ("gfwd", "gdx"):  # the experts' tensors stacked [E, ...] (qlora_kernels/_grouped_ops.py)
        offsets = torch.empty(E + 1, dtype=torch.int64, device=meta)
        stack = lambda v: None if v is None else v.reshape(1, -1).expand(E, -1).contiguous()  # noqa: E731
        gw = (offsets, stack(packed), stack(absmax), stack(nested), None if offset is None else offset.expand(E).contiguous(),
              N, K, blocksize)
        cfg = None if config is None else LaunchConfig(*config)
        if op == "gfwd":
            grouped.nf4_grouped_linear_triton(t(M, K), *gw, t(M, r) if r else None, t(E, N, r) if r else None, 0.5,
                                              config=cfg)
        else:
            grouped.nf4_grouped_linear_dx_triton(t(M, N), *gw, t(M, r) if r else None, t(E, r, K) if r else None,
                                                 0.5, config=cfg)
        return launches
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


def signature(fn, args, kwargs):
    """(signature, constexprs, attrs, options) as Triton's JIT specializes these arguments."""
    import torch

    tys = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8", torch.int64: "i64"}
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


def ptxas_info(ptx: str, cap: int) -> dict:
    """Registers and spill bytes from `ptxas -v` (the ptxas bundled with triton, with triton's flags)."""
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


# ------------------------------------------------------------------------------------------ SASS
_LABEL = re.compile(r"^\s*([A-Za-z_.$][\w.$]*):\s*$")
_BRANCH = re.compile(r"\bBRA(?:\.[\w.]+)?\s+`?\(?([A-Za-z_.$][\w.$]*)\)?")


def sass_instructions(sass: str) -> tuple[list[str], dict[str, int]]:
    """(instructions without control codes, label -> index of the instruction that follows it)."""
    instrs, labels = [], {}
    for line in sass.splitlines():
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        text = line.split("\t", 1)[1] if "\t" in line else line
        text = text.strip().rstrip(";").strip()
        if not text or text.startswith(("Function:", ".", "//")):
            continue
        instrs.append(text)
    return instrs, labels


def opcode(instr: str) -> str:
    """Full opcode with modifiers, predicate dropped: '@!P4 LDG.E.U8 R3, ...' -> 'LDG.E.U8'."""
    parts = instr.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def main_loop(sass: str) -> list[str]:
    """Body of the longest backward branch: instructions from its target label through the branch."""
    instrs, labels = sass_instructions(sass)
    best = (0, 0)
    for i, ins in enumerate(instrs):
        m = _BRANCH.search(ins)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            start = labels[m.group(1)]
            if i + 1 - start > best[1] - best[0]:
                best = (start, i + 1)
    return instrs[best[0]:best[1]]


def load_bytes(op: str) -> int:
    """Bytes per lane of a global load / async copy opcode."""
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if suffix in op:
            return size
    return 4


def loop_counts(body: list[str]) -> dict:
    memory, tensor = {}, {}
    for ins in body:
        op = opcode(ins)
        base = op.split(".")[0]
        if base.startswith(("LD", "ST", "ATOM", "RED", "UTMA", "UBLKCP", "SYNCS")):
            memory[op] = memory.get(op, 0) + 1
        elif base in ("HGMMA", "HMMA", "WARPGROUP", "WARPSYNC", "IMMA", "DMMA"):
            tensor[op] = tensor.get(op, 0) + 1
    glob = {op: c for op, c in memory.items() if op.split(".")[0] in ("LDG", "LDGSTS")}
    wide = sum(c for op, c in glob.items() if load_bytes(op) >= 16)
    return {
        "loop_instructions": len(body),
        "memory": dict(sorted(memory.items())),
        "tensor": dict(sorted(tensor.items())),
        "global_loads_16B": wide,
        "narrow_global_loads": sum(glob.values()) - wide,
        "table_gathers": sum(c for op, c in memory.items() if op.startswith(("LDGSTS.E", "LDS")) and load_bytes(op) == 4),
    }


# ------------------------------------------------------------------------------------------ model
def weights_per_thread(kernel: str, tiles: dict, warps: int) -> int:
    if kernel == "decode_reduce":
        return 0
    return tiles["BLOCK_N"] * tiles["BLOCK_K"] // (32 * warps)


def model(rec: dict, M: int, N: int, K: int, dq: bool, e: int = 2) -> dict:
    """Issue-, tensor- and memory-bound seconds of one call of this kernel (see the module docstring)."""
    from qlora_kernels.triton_kernels.dispatch import DEVICE_MODEL

    cap = rec["cap"]
    mach, dev = MACHINE[cap], DEVICE_MODEL[cap // 10]
    P, BW = dev["peak_tflops"] * 1e12, dev["copy_gbs"] * 1e9
    c = rec["config"]
    bm, bn, bk, split = c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c.get("SPLIT_K", 1)
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    kern = rec["kernel"]
    # grouped (gfwd / gdx): E experts of [N, K], the M rows spread evenly (M // E each); M-tiles per expert
    experts = rec.get("E", 1) if kern in ("gfwd", "gdx") else 1
    mtiles = experts * cdiv(M // experts, bm)
    if kern in ("fwd", "gfwd"):
        ctas, iters = mtiles * cdiv(N, bn), cdiv(K, bk)
    elif kern in ("dx", "gdx"):
        ctas, iters = mtiles * cdiv(K, bk), cdiv(N, bn)
    else:
        ctas, iters = cdiv(N, bn) * split, cdiv(cdiv(K, split), bk)
    warp_instr = ctas * iters * c["num_warps"] * rec["loop_instructions"]
    issue = warp_instr / (mach["sms"] * mach["schedulers"] * mach["clock_hz"])
    tensor = 2 * mtiles * bm * N * K / P
    memory = (experts * N * K * (4.127 if dq else 4.5) / 8 + e * (M * K + M * N)) / BW
    # A loop that waits for its own wgmma overlaps dequantization with the tensor cores only through a second
    # CTA on the SM; with one CTA per SM (registers or shared memory) the two add up.
    ctas = ctas_per_sm(rec)
    serial = rec.get("waits_for_own_mma", False) and ctas < 2
    t = max(issue + tensor if serial else max(issue, tensor), memory)
    ideal = max(2 * M * N * K / P, memory)
    bound = "memory" if t == memory else ("issue+tensor" if serial else ("issue" if issue >= tensor else "tensor"))
    return {"M": M, "N": N, "K": K, "issue_us": issue * 1e6, "tensor_us": tensor * 1e6, "memory_us": memory * 1e6,
            "ctas_per_sm": ctas, "serialized": serial, "predicted_us": t * 1e6, "bound": bound,
            "roofline_fraction": ideal / t}


def ctas_per_sm(rec: dict) -> int:
    """Resident CTAs per SM from registers (allocated per warp in units of 256) and shared memory (+1 KB each)."""
    mach = MACHINE[rec["cap"]]
    warps = rec["config"]["num_warps"]
    per_warp = -(-max(rec["registers"], 1) * 32 // 256) * 256
    by_regs = mach["regs"] // (warps * per_warp)
    by_smem = mach["smem"] // (rec["shared_bytes"] + 1024)
    return max(0, min(by_regs, by_smem, 32))


# ------------------------------------------------------------------------------------------ report
def cases(quick: bool = False, caps=(90, 80)) -> list[dict]:
    out = []
    for cap in caps:
        for dtype_name in (("bfloat16",) if quick else ("bfloat16", "float16")):
            for dq in ((True,) if quick else (True, False)):
                for nk in ((4096,) if quick else (4096, 8192)):
                    for op, ms in (("fwd", (512, 4096)), ("dx", (512, 4096)), ("decode", (1, 16))):
                        for M in ms:
                            out.append(dict(cap=cap, op=op, M=M, N=nk, K=nk, blocksize=64, r=16, dq=dq,
                                            dtype_name=dtype_name, bias=False))
    return out + grouped_cases(quick, caps)


# The grouped MoE kernels: E = 8 experts of 4096 x 4096 holding 4096 rows (the dense benchmark's weight shape,
# so the counts compare with the dense kernels'), and Qwen3-30B-A3B's experts (128 of them, hidden 2048,
# moe_intermediate 768: gate_up [1536, 2048], down [2048, 768]) for 4096 tokens routed to 8 experts each.
GROUPED_SHAPES = (dict(E=8, M=4096, N=4096, K=4096), dict(E=128, M=32768, N=1536, K=2048),
                  dict(E=128, M=32768, N=2048, K=768))


def grouped_cases(quick: bool = False, caps=(90, 80)) -> list[dict]:
    out = []
    for cap in caps:
        for shape in (GROUPED_SHAPES[:1] if quick else GROUPED_SHAPES):
            for op in ("gfwd", "gdx"):
                out.append(dict(cap=cap, op=op, blocksize=64, r=16, dq=True, dtype_name="bfloat16", bias=False,
                                **shape))
    return out


def case_name(c: dict) -> str:
    dt = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[c["dtype_name"]]
    experts = f"-E{c['E']}" if c.get("E", 1) > 1 else ""
    return f"{c['op']}{experts}-M{c['M']}-N{c['N']}-K{c['K']}-{dt}-bs{c['blocksize']}-{'dq' if c['dq'] else 'nodq'}"


def analyze_case(case: dict, sass_dir: str | None = None) -> list[dict]:
    """Compile every kernel one call of `case` launches; one record per kernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    cap = case["cap"]
    recs = []
    for fn, grid, args, kwargs in record_launches(**case):
        sig, consts, attrs, options = signature(fn, args, dict(kwargs))
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
        ptx, sass = k.asm["ptx"], k.asm["sass"]
        kern = SHORT.get(fn.__name__, fn.__name__)
        name = case_name(case)
        fname = f"{kern}-sm{cap}-{name}.sass"
        if sass_dir:
            Path(sass_dir, fname).write_text(sass)
        config = {c: consts[c] for c in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K") if c in consts}
        config.update(num_warps=options.get("num_warps"), num_stages=options.get("num_stages"))
        wpt = weights_per_thread(kern, config, config["num_warps"])
        body = main_loop(sass)
        counts = loop_counts(body)
        # the loop waits for its own wgmma group before the next iteration's dequantization
        counts["waits_for_own_mma"] = any(re.match(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0", i) for i in body)
        pinfo = ptxas_info(ptx, cap)
        rec = {
            "kernel": kern, "function": fn.__name__, "cap": cap, "dtype": case["dtype_name"], "case": name,
            "op": case["op"], "M": case["M"], "N": case["N"], "K": case["K"], "double_quant": case["dq"],
            "E": case.get("E", 1),
            "sass": fname, "config": config, "weights_per_thread_per_iteration": wpt,
            "shared_bytes": k.metadata.shared, "shared_limit": SMEM_LIMIT[cap],
            "registers": pinfo["registers"], "spills": pinfo["spill_stores"] + pinfo["spill_loads"],
            "spill_stores": pinfo["spill_stores"], "spill_loads": pinfo["spill_loads"],
            "wgmma": "wgmma.mma_async" in ptx, "mma": "mma.sync" in ptx, "async_copy": "cp.async" in ptx,
            **counts,
            "instructions_per_weight": counts["loop_instructions"] / wpt if wpt else None,
            "narrow_global_loads_per_weight": counts["narrow_global_loads"] / wpt if wpt else None,
        }
        if kern != "decode_reduce":
            rec["model"] = model(rec, case["M"], case["N"], case["K"], case["dq"],
                                 2 if case["dtype_name"] != "float32" else 4)
        recs.append(rec)
    return recs


def _analyze(args):
    return analyze_case(*args)


def run(todo: list[dict], sass_dir: str | None = None, jobs: int | None = None) -> list[dict]:
    jobs = jobs or os.cpu_count() or 1
    with ProcessPoolExecutor(max_workers=jobs) as ex:
        return [r for rs in ex.map(_analyze, [(c, sass_dir) for c in todo]) for r in rs]


def table(records: list[dict]) -> str:
    head = (f"{'kernel':<7}{'sm':>3} {'dtype':<6}{'dq':<3}{'M':>5}{'N=K':>6} {'tiles':<14}{'w':>2}{'s':>2} "
            f"{'loop':>5}{'w/thr':>6}{'ins/w':>6}{'narrow/w':>9}{'16B':>4}{'smem':>7}{'regs':>5}{'spill':>6} "
            f"{'issue':>8}{'tensor':>8}{'memory':>8}{'cta':>4}{'bound':>13}{'roof':>6}")
    lines = [head, "-" * len(head)]
    for r in records:
        c = r["config"]
        tiles = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c.get('BLOCK_K', '-')}" + (f"/{c['SPLIT_K']}" if c.get("SPLIT_K", 1) > 1 else "")
        m = r.get("model")
        ipw = f"{r['instructions_per_weight']:.2f}" if r["instructions_per_weight"] is not None else "-"
        npw = f"{r['narrow_global_loads_per_weight']:.3f}" if r["narrow_global_loads_per_weight"] is not None else "-"
        mod = (f"{m['issue_us']:8.1f}{m['tensor_us']:8.1f}{m['memory_us']:8.1f}{m.get('ctas_per_sm', 0):>4}{m['bound']:>13}"
               f"{m['roofline_fraction']:6.2f}"
               if m else "")
        nk = f"{r['N']}" if r.get("E", 1) == 1 else f" {r['N']}x{r['K']}/E{r['E']}"  # grouped: N x K per expert
        lines.append(
            f"{r['kernel']:<7}{r['cap']:>3} {SHORT_DTYPE.get(r['dtype'], r['dtype']):<6}{'y' if r['double_quant'] else 'n':<3}{r['M']:>5}{nk:>6} "
            f"{tiles:<14}{c['num_warps']:>2}{c['num_stages']:>2} {r['loop_instructions']:>5}"
            f"{r['weights_per_thread_per_iteration']:>6}{ipw:>6}{npw:>9}{r['global_loads_16B']:>4}{r['shared_bytes']:>7}"
            f"{r['registers']:>5}{r['spills']:>6} {mod}")
    lines.append("model times in microseconds per call (optimistic bound: perfect overlap, 1 instr/scheduler/clock)")
    return "\n".join(lines)


def fused_eff_from(records: list[dict], cap: int = 90) -> float | None:
    """The model's roofline fraction of the forward at M = 4096, N = K = 4096, bf16, double quant."""
    for r in records:
        if (r["kernel"], r["cap"], r["M"], r["N"], r["dtype"], r["double_quant"]) == ("fwd", cap, 4096, 4096, "bfloat16", True):
            return r["model"]["roofline_fraction"]
    return None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "sass"))
    ap.add_argument("--caps", default="90,80")
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--grouped", action="store_true",
                    help="only the grouped MoE kernels' cases (GROUPED_SHAPES); --save writes sass-grouped-sm<cap>.json")
    ap.add_argument("--from", dest="from_json", default=None, metavar="JSON",
                    help="recompute the model and print the table of a saved report instead of compiling")
    ap.add_argument("--save", nargs="?", const="", default=None, metavar="TAG",
                    help="also write bench/results/sass-sm<cap>[-TAG].json (the committed figures)")
    a = ap.parse_args(argv)
    if a.from_json:
        records = json.loads(Path(a.from_json).read_text())
        if a.save is not None:  # split a combined report into the committed per-capability files
            for cap in sorted({r["cap"] for r in records}):
                dest = ROOT / "bench" / "results" / f"sass-sm{cap}{'-' + a.save if a.save else ''}.json"
                dest.write_text(json.dumps([r for r in records if r["cap"] == cap], indent=1))
        for r in records:
            sass_file = Path(a.out) / r["sass"]
            if sass_file.exists():  # recount from the SASS kept under --out (older reports lack newer keys)
                body = main_loop(sass_file.read_text())
                r.update(loop_counts(body))
                r["waits_for_own_mma"] = any(re.match(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0", i) for i in body)
            if r["kernel"] != "decode_reduce":
                r["model"] = model(r, r["M"], r["N"], r["K"], r["double_quant"], 2 if r["dtype"] != "float32" else 4)
        Path(a.from_json).write_text(json.dumps(records, indent=1))
        print(table(records))
        for cap in sorted({r["cap"] for r in records}):
            eff = fused_eff_from(records, cap)
            if eff is not None:
                print(f"sm_{cap}: model roofline fraction of the forward at 4096^3 (dispatch fused_eff) = {eff:.3f}")
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    caps = tuple(int(c) for c in a.caps.split(","))
    records = run(grouped_cases(a.quick, caps) if a.grouped else cases(a.quick, caps), str(out), a.jobs)
    (out / "sass_report.json").write_text(json.dumps(records, indent=1))
    print(table(records))
    for cap in caps:
        eff = fused_eff_from(records, cap)
        if eff is not None:
            print(f"sm_{cap}: model roofline fraction of the forward at 4096^3 (dispatch fused_eff) = {eff:.3f}")
    print(f"wrote {out / 'sass_report.json'} and {len(records)} .sass files")
    if a.save is not None:
        for cap in caps:
            kind = "sass-grouped" if a.grouped else "sass"
            dest = ROOT / "bench" / "results" / f"{kind}-sm{cap}{'-' + a.save if a.save else ''}.json"
            dest.write_text(json.dumps([r for r in records if r["cap"] == cap], indent=1))
            print(f"wrote {dest}")


if __name__ == "__main__":
    main()
