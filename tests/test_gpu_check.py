"""bench/gpu_check.sh's orchestration, on the CPU: its syntax, its refusal without a GPU (forced or not, never
exit 0), the step budget, the summary's counts on a fabricated $OUT, the per-test timeout it relies on
(tests/conftest.py), bench_linear's JSON after each case, and a smoke run of the sanitizer driver."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
sys.path.insert(0, str(ROOT))

from bench import gpu_summary  # noqa: E402

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: gpu_check.sh would run for real")


def _env(**kw):
    env = {k: v for k, v in os.environ.items() if k not in ("QLORA_CHECK_FORCE", "OUT")}
    env.update(kw)
    return env


def test_scripts_parse():
    for name in ("gpu_check.sh", "prepare_gpu_wheels.sh"):
        r = subprocess.run(["bash", "-n", str(ROOT / "bench" / name)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


@no_gpu
def test_refuses_without_a_gpu(tmp_path):
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300,
                       env=_env(OUT=str(tmp_path / "out"), QLORA_CHECK_PREFIX=str(tmp_path / "prefix")))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "no CUDA device visible" in r.stdout
    assert not (tmp_path / "prefix").exists()


@no_gpu
def test_forced_run_stops_naming_the_missing_gpu(tmp_path):
    """QLORA_CHECK_FORCE=1 on a machine without a GPU: facts written, then a non-zero exit whose message names the
    missing CUDA device; nothing built or installed, no test run (so never 'rc 0, N skipped')."""
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300,
                       env=_env(OUT=str(out), QLORA_CHECK_FORCE="1", QLORA_CHECK_PREFIX=str(tmp_path / "prefix")))
    assert r.returncode == 3, r.stdout + r.stderr
    assert re.search(r"STOP: missing: a CUDA device \(torch.cuda.is_available\(\) is False", r.stdout), r.stdout
    assert "STOP: missing: a CUDA device" in (out / "summary.txt").read_text()
    assert "--- nvcc" in (out / "facts.txt").read_text()
    assert not (tmp_path / "prefix").exists() and not list(out.glob("junit-*.xml"))


def _caps() -> dict:
    text = SCRIPT.read_text()
    caps = {m[0]: int(m[1]) for m in re.findall(r"^(G?CAP_\w+|TEST_TIMEOUT_S)=(\d+)", text, re.M)}
    code = "\n".join(ln.split("#", 1)[0] for ln in text.splitlines())
    for name in caps:  # every entry of the table is used by the script (it is the budget that runs)
        assert re.search(rf"\b{name}\b(?!=)", code), f"{name} is never used"
    return caps


def test_step_budget_fits_nine_minutes():
    caps = _caps()
    steps = {k: v for k, v in caps.items() if k.startswith("CAP_")}
    assert {"CAP_build", "CAP_tests", "CAP_memcheck", "CAP_bench", "CAP_oversubscribe"} <= set(steps)
    assert sum(steps.values()) <= 9 * 60, steps
    # the groups inside the tests step: fused beside the others, which run one after another
    assert caps["GCAP_fused"] <= caps["CAP_tests"]
    assert caps["GCAP_native"] + caps["GCAP_stress"] + caps["GCAP_other"] <= caps["CAP_tests"]
    assert caps["TEST_TIMEOUT_S"] < min(caps["GCAP_fused"], caps["GCAP_native"], caps["GCAP_stress"])


def _junit(cases) -> str:
    body = []
    for name, kind, msg in cases:
        inner = {"pass": "", "fail": f'<failure message="{msg}">trace</failure>',
                 "error": f'<error message="{msg}">trace</error>',
                 "skip": f'<skipped type="pytest.skip" message="{msg}">skip</skipped>'}[kind]
        body.append(f'<testcase classname="tests.t" name="{name}" time="0.1">{inner}</testcase>')
    return f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{"".join(body)}</testsuite></testsuites>'


def _fabricate(out: Path) -> None:
    out.mkdir()
    (out / "junit-fused.xml").write_text(_junit([("a", "pass", ""), ("b", "fail", "assert 1 == 2"),
                                                  ("c", "pass", "")]))
    (out / "junit-native.xml").write_text(_junit([
        ("d", "pass", ""), ("e", "skip", "needs a CUDA device"),
        ("f", "skip", "needs two CUDA devices"), ("g", "skip", "needs two GPUs"), ("h", "error", "fixture")]))
    (out / "sanitize-memcheck.log").write_text(
        "========= Invalid __global__ read of size 4 bytes\n========= ERROR SUMMARY: 3 errors\n")
    (out / "sanitize-racecheck.log").write_text("========= ERROR SUMMARY: 0 errors\n")
    (out / "sanitize-synccheck.log").write_text("========= COMPUTE-SANITIZER\n")  # cut off: no summary
    rows = []
    for M, ms in ((1, {"fused": 0.5, "cuda-decode": 0.25, "dispatched": 0.25, "deq+mm": 1.0, "bf16-lora": 0.8,
                       "bnb+peft": 2.0}), (4096, {"fused": 2.0, "dispatched": 1.0, "deq+mm": 1.0, "bf16-lora": 0.5})):
        for impl, t in ms.items():
            rows.append({"case": f"fwd N4096xK4096 r16 M{M}", "pass": "fwd", "impl": impl, "N": 4096, "K": 4096,
                         "r": 16, "M": M, "median_ms": t, "%copy": 40.0 if impl == "fused" else 10.0})
    meta = {"device": "NVIDIA H100 80GB HBM3", "copy_gbs": 3000.0, "matmul_tflops": 790.0, "complete": False}
    (out / "linear-nvidia-h100.json").write_text(json.dumps({"family": "linear", "meta": meta, "rows": rows}))


def test_summary_counts_a_fabricated_run(tmp_path):
    out = tmp_path / "out"
    _fabricate(out)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_summary.py"), str(out),
                        "--expect", "fused,native,stress"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    text = r.stdout
    lines = text.strip().splitlines()
    assert len(lines) <= 10, text
    assert lines[0].startswith("VERDICT: NOT SHOWN CORRECT")
    # passed/failed/unexpectedly skipped per group; the two multi-GPU skips are the known ones
    assert "stress NO RESULT" in text and "fused 2/1/0" in text and "native 1/1/1" in text, text
    assert "(known multi-GPU skips: 2)" in text
    assert "FAIL tests.t::b: assert 1 == 2" in text and "SKIP tests.t::e: needs a CUDA device" in text
    assert "memcheck 3 errors" in text and "racecheck 0 errors" in text and "synccheck cut off" in text
    m1 = next(ln for ln in lines if ln.startswith("fwd M=1 "))
    assert "fused 2.00x" in m1 and "cuda-decode 4.00x" in m1 and "bnb+peft 0.50x" in m1 and "bf16-lora 1.25x" in m1
    assert "fused at 40% of copy bandwidth" in m1
    m4096 = next(ln for ln in lines if ln.startswith("fwd M=4096 "))
    assert "fused 0.50x" in m4096 and "cuda-decode -" in m4096 and "bnb+peft -" in m4096
    assert any("bench cut off after 2 cases" in ln for ln in lines)


def test_summary_passes_a_clean_run_and_reads_the_archive(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    files = {"junit-fused.xml": _junit([("a", "pass", ""), ("m", "skip", "needs two GPUs")]),
             "junit-native.xml": _junit([("b", "pass", "")]),
             "sanitize-memcheck.log": "========= ERROR SUMMARY: 0 errors\n"}
    with tarfile.open(out / "details.tgz", "w:gz") as tar:  # as gpu_check.sh leaves them
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    lines, ok = gpu_summary.summarize(out, ["fused", "native"])
    assert ok, lines
    assert lines[0].startswith("VERDICT: CORRECT") and "fused 1/0/0; native 1/0/0" in lines[1]
    # a group that ran nothing is not a pass
    (out / "junit-other.xml").write_text(_junit([]))
    assert not gpu_summary.summarize(out, ["fused", "native"])[1]


def test_per_test_timeout(tmp_path):
    """QLORA_TEST_TIMEOUT_S: a test that overruns fails with TimeoutError; the next test still runs."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_slow.py").write_text(
        "import time\n\ndef test_hangs():\n    time.sleep(30)\n\ndef test_after():\n    assert True\n")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                        f"--rootdir={tmp_path}", str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env=_env(QLORA_TEST_TIMEOUT_S="2"), cwd=tmp_path)
    assert "1 failed, 1 passed" in r.stdout, r.stdout + r.stderr
    assert "TimeoutError: test exceeded QLORA_TEST_TIMEOUT_S=2 s" in r.stdout


def test_bench_linear_writes_json_after_each_case(tmp_path, monkeypatch):
    """A bench stopped during its second case (its caller's time cap) leaves the first case's rows on disk."""
    from bench import bench_linear

    calls = []

    def fake_case(L, impls, passes, ceilings, rows, notes, graph):
        calls.append(L.M)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what `timeout --signal=INT` delivers
        rows.append({"case": f"fwd N{L.N}xK{L.K} r{L.r} M{L.M}", "pass": "fwd", "impl": "fused", "N": L.N,
                     "K": L.K, "r": L.r, "M": L.M, "median_ms": 1.0})

    monkeypatch.setattr(bench_linear, "run_case", fake_case)
    monkeypatch.setattr(bench_linear, "copy_ceiling_gbs", lambda *a, **k: 1.0)
    monkeypatch.setattr(bench_linear, "matmul_ceiling_tflops", lambda *a, **k: 1.0)
    with pytest.raises(KeyboardInterrupt):
        bench_linear.main(["--quick", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("linear-quick-*.json")
    data = json.loads(path.read_text())
    assert [r["M"] for r in data["rows"]] == [1] and data["meta"]["complete"] is False


def test_sanitize_driver_smoke_on_cpu():
    """The driver's native part on the CPU (the CUDA-only decode left out): its calls and checks hold."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "sanitize_driver.py"), "--device", "cpu", "--part",
                        "native", "--small"], capture_output=True, text=True, timeout=600,
                       env=_env(TRITON_INTERPRET="1"), cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"sanitize_driver: \d+ checked results", r.stdout)
