"""The answer of bench/gpu_check.sh in about ten lines, from what it left in $OUT.

    python bench/gpu_summary.py OUT [--expect fused,native,...]

Reads junit-<group>.xml (pytest), sanitize-<tool>.log (compute-sanitizer) and linear-*.json (bench_linear),
from OUT or from OUT/details.tgz. Exit status 0 only when every expected group left its junit XML, no test
failed or errored, no test was skipped except the known multi-GPU ones, and every sanitizer log that is there
ends with 0 errors.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

# skips that a one-GPU machine is expected to give (tests that need two devices); any other skip is a failure
KNOWN_SKIP = re.compile(r"needs two (CUDA devices|GPUs)")


def _files(out: Path) -> dict:
    """name -> text of the files the summary reads, from OUT and from OUT/details.tgz (OUT wins)."""
    found = {}
    tgz = out / "details.tgz"
    if tgz.is_file():
        with tarfile.open(tgz) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    found[Path(m.name).name] = tar.extractfile(m).read().decode("utf-8", "replace")
    for p in out.iterdir():
        if p.is_file() and (p.suffix in (".xml", ".log", ".json")):
            found[p.name] = p.read_text(errors="replace")
    return found


def junit_counts(text: str) -> dict:
    """passed / failed (failures + errors) / known skips / unexpected skips, and the names of the bad ones."""
    root = ET.parse(io.StringIO(text)).getroot()
    c = {"passed": 0, "failed": 0, "known_skip": 0, "unexpected_skip": 0, "bad": []}
    for tc in root.iter("testcase"):
        name = f"{tc.get('classname', '')}::{tc.get('name', '')}"
        fail = tc.find("failure") if tc.find("failure") is not None else tc.find("error")
        skip = tc.find("skipped")
        if fail is not None:
            c["failed"] += 1
            c["bad"].append(f"FAIL {name}: {(fail.get('message') or '')[:100]}")
        elif skip is not None:
            msg = skip.get("message") or ""
            if KNOWN_SKIP.search(msg):
                c["known_skip"] += 1
            else:
                c["unexpected_skip"] += 1
                c["bad"].append(f"SKIP {name}: {msg[:100]}")
        else:
            c["passed"] += 1
    return c


def sanitizer_errors(text: str):
    """compute-sanitizer's error count (its last ERROR SUMMARY line), or None if the log has none (cut off)."""
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    return int(m[-1]) if m else None


def _geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def bench_lines(data: dict) -> list[str]:
    """Per M, the forward pass: each implementation's time against dequantize + cuBLAS (deq+mm's median / its
    median, > 1 = faster), geometric mean over the shapes measured; the fused kernel's % of copy bandwidth."""
    rows = [r for r in data.get("rows", []) if r.get("pass") == "fwd"]
    meta = data.get("meta", {})
    lines = []
    impls = ("fused", "cuda-decode", "dispatched", "bf16-lora", "bnb+peft")
    for M in sorted({r["M"] for r in rows}):
        at = [r for r in rows if r["M"] == M]
        base = {(r["N"], r["K"]): r["median_ms"] for r in at if r["impl"] == "deq+mm"}
        parts = []
        for impl in impls:
            x = _geomean([base[(r["N"], r["K"])] / r["median_ms"] for r in at
                          if r["impl"] == impl and (r["N"], r["K"]) in base])
            parts.append(f"{impl} {x:.2f}x" if x else f"{impl} -")
        copy = [r.get("%copy") for r in at if r["impl"] == "fused" and r.get("%copy")]
        shapes = len(base)
        lines.append(f"fwd M={M} vs deq+mm ({shapes} shapes): " + ", ".join(parts)
                     + (f"; fused at {max(copy):.0f}% of copy bandwidth" if copy else ""))
    other = [r for r in data.get("rows", []) if r.get("pass") != "fwd" and r["impl"] == "dispatched"
             and r.get("speedup")]
    if other:
        lines.append(f"dx + fwd/bwd: dispatched vs deq+mm geomean {_geomean([r['speedup'] for r in other]):.2f}x "
                     f"over {len(other)} cases")
    if not meta.get("complete", True):
        lines.append(f"bench cut off after {len({r['case'] for r in data.get('rows', [])})} cases (rows kept)")
    return lines


def summarize(out: Path, expect: list[str]) -> tuple[list[str], bool]:
    files = _files(out)
    lines, ok = [], True
    groups, bad = [], []
    names = sorted(n for n in files if n.startswith("junit-") and n.endswith(".xml"))
    for g in expect:
        if f"junit-{g}.xml" not in files:
            groups.append(f"{g} NO RESULT (timed out or crashed)")
            ok = False
    known = 0
    for n in names:
        g = n[len("junit-"):-len(".xml")]
        try:
            c = junit_counts(files[n])
        except ET.ParseError as exc:
            groups.append(f"{g} unreadable junit ({exc})")
            ok = False
            continue
        known += c["known_skip"]
        groups.append(f"{g} {c['passed']}/{c['failed']}/{c['unexpected_skip']}")
        bad += c["bad"]
        ok &= c["failed"] == 0 and c["unexpected_skip"] == 0 and c["passed"] > 0
    lines.append("tests passed/failed/unexpectedly skipped: " + ("; ".join(groups) or "none ran")
                 + f" (known multi-GPU skips: {known})")
    if bad:
        lines.append(f"{len(bad)} bad: " + " | ".join(bad[:3]) + (" | ..." if len(bad) > 3 else ""))
    san = []
    for tool in ("memcheck", "racecheck", "synccheck"):
        n = f"sanitize-{tool}.log"
        if n not in files:
            continue
        e = sanitizer_errors(files[n])
        san.append(f"{tool} {'cut off (no ERROR SUMMARY)' if e is None else f'{e} errors'}")
        ok &= e == 0
    lines.append("compute-sanitizer: " + (", ".join(san) if san else "no logs"))
    bench = sorted(n for n in files if n.startswith("linear-") and n.endswith(".json"))
    for n in bench[:1]:
        data = json.loads(files[n])
        meta = data.get("meta", {})
        lines.append(f"bench {n}: {meta.get('device')} copy {meta.get('copy_gbs') or 0:.0f} GB/s, "
                     f"matmul {meta.get('matmul_tflops') or 0:.0f} TFLOP/s (x = deq+mm time / its time)")
        lines += bench_lines(data)
    if not bench:
        lines.append("bench: no linear-*.json")
    lines.insert(0, f"VERDICT: {'CORRECT on this GPU' if ok else 'NOT SHOWN CORRECT'} (gpu_check summary of {out})")
    return lines, ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--expect", default="", help="comma-separated test groups that must have left a junit XML")
    args = p.parse_args(argv)
    lines, ok = summarize(args.out, [g for g in args.expect.split(",") if g])
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
