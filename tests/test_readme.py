"""The README's generated sections are what bench/readme_tables.py makes of the committed results
(bench/results/*.json, demo-cpu.log): a figure edited by hand, or results committed without regenerating the
README, fail here. The sections computed from code (the FSDP projection, the plan commands) are also
recomputed with the current code and compared with the committed JSON: a change to the planner that moves a
figure fails here until the bench is rerun and the README regenerated."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def _source_tree():
    if not (ROOT / "bench" / "readme_tables.py").is_file() or not (ROOT / "README.md").is_file():
        pytest.skip("source tree not available (tests run from an installed copy)")


def test_readme_figures_come_from_committed_results():
    _source_tree()
    script = ROOT / "bench" / "readme_tables.py"
    out = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_fsdp_projection_is_what_the_current_planner_computes():
    """bench/bench_fsdp.py's projection (llama-3-70b and llama-65b on 1-8 GPUs, and its check on the measured
    model) recomputed from the committed measured rows equals the committed one (the README renders that)."""
    _source_tree()
    pytest.importorskip("transformers")
    from bench import bench_fsdp

    data = json.loads((RESULTS / "fsdp-cpu.json").read_text())
    proj = bench_fsdp.projection(data["rows"], argparse.Namespace(**data["args"]))
    assert json.loads(json.dumps(proj)) == data["projection"], "rerun python bench/bench_fsdp.py --project-only"
    assert data["settings"] == dict(batch=bench_fsdp.BATCH, seq=bench_fsdp.SEQ)


def test_readme_plans_are_what_the_current_planner_computes():
    """Each README plan command (bench/bench_plan.py README_PLANS, run by `--readme`): the command line gives the
    recorded arguments, and plan_memory with them gives the recorded terms and, with the recorded search
    results, the recorded table to the character. For the default-settings plan the recorded largest sequence
    and batch are checked at their edges (the size fits, the next one does not)."""
    _source_tree()
    pytest.importorskip("transformers")
    from bench import bench_plan
    from qlora_kernels.planner import MAX_BATCH, SEQ_GRANULARITY, plan_memory

    data = json.loads((RESULTS / bench_plan.README_PLANS_FILE).read_text())
    assert [r["name"] for r in data["rows"]] == list(bench_plan.README_PLANS)
    for row in data["rows"]:
        args = bench_plan.README_PLANS[row["name"]]
        assert row["command"] == f"python -m qlora_kernels plan {args}", "rerun python bench/bench_plan.py --readme"
        kwargs = bench_plan.plan_kwargs(args.split())
        budget = kwargs.pop("device_memory")
        assert budget == row["device_memory"]
        plan = plan_memory(**kwargs)
        assert plan.terms == row["terms"] and plan.counts == row["counts"], (row["name"], plan.terms)
        plan.device_memory, plan.fits = budget, plan.total_bytes <= budget
        plan.max_seq_len, plan.max_batch_size = row["max_seq_len"], row["max_batch_size"]
        plan.seq_len_cap, plan.batch_size_cap = row["seq_len_cap"], MAX_BATCH
        assert plan.table() == row["table"], row["name"]
        if row["name"] == "float32 adapters":
            total = lambda **kw: plan_memory(**{**kwargs, **kw}).total_bytes  # noqa: E731
            seq, batch = row["max_seq_len"], row["max_batch_size"]
            assert total(seq_len=seq, batch_size=1) <= budget
            assert seq == row["seq_len_cap"] or budget < total(seq_len=seq + SEQ_GRANULARITY, batch_size=1)
            assert total(batch_size=batch) <= budget < total(batch_size=batch + 1)
