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


# ------------------------------------------------------------------------- the README's code, run as written
# Every ```python block of README.md runs, in order and unchanged, in one temporary directory that stands in for
# a user's: "meta-llama/Llama-3.1-8B" and "llama-3.1-8b" are a tiny bf16 Llama checkpoint with a word-level
# tokenizer (transformers' from_pretrained takes a local directory of that name before the hub), "qwen3-30b-a3b"
# a tiny bf16 Qwen3-MoE checkpoint, train.txt eight short lines. torch.distributed's environment is that of a
# one-process torchrun (gloo), so the FSDP2 block shards over one rank. The blocks share the directory (one
# loads the adapter another saved), not their variables.
WORDS = "the a cat dog sat on mat ran to park and is was big small red blue".split()
TRAIN_LINES = ["the cat sat on the mat", "a dog ran to the park", "the big red dog is small",
               "a blue cat was on the mat"] * 2


def readme_python_blocks(text: str) -> list[str]:
    import re

    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def _tiny_checkpoints(root: Path) -> None:
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                     bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(llama).to(torch.bfloat16)
    for name in ("meta-llama/Llama-3.1-8B", "llama-3.1-8b"):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    moe = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                      num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    transformers.Qwen3MoeForCausalLM(moe).to(torch.bfloat16).save_pretrained(root / "qwen3-30b-a3b")
    (root / "train.txt").write_text("\n".join(TRAIN_LINES) + "\n")


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    _source_tree()
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("tokenizers")
    pytest.importorskip("trl")  # and datasets, which trl brings
    import torch.distributed as dist

    blocks = readme_python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 5, "README.md lost its python blocks"
    _tiny_checkpoints(tmp_path)
    monkeypatch.chdir(tmp_path)
    torchrun_env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", LOCAL_RANK="0",
                        WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    for i, code in enumerate(blocks):
        last = code.strip().splitlines()[-1]
        distributed = "init_process_group" in code  # only that block runs "under torchrun": with RANK set,
        with monkeypatch.context() as env:           # Trainer (accelerate) would start a process group itself
            if distributed:
                for key, value in torchrun_env.items():
                    env.setenv(key, value)
            try:
                exec(compile(code, f"README.md python block {i + 1}", "exec"), {"__name__": "__readme__"})
            except Exception as e:
                raise AssertionError(f"README.md python block {i + 1} (ending {last!r}) failed: {e!r}") from e
            finally:
                if distributed and dist.is_initialized():
                    dist.destroy_process_group()
    assert (tmp_path / "llama-lora" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "llama-merged" / "config.json").is_file()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_and_docs_links_resolve():
    """Every relative link in README.md and docs/*.md names a file that exists and, with a #fragment, a heading
    of it (GitHub's anchors: lower case, punctuation dropped, spaces to hyphens)."""
    import re

    _source_tree()

    def anchors(path: Path) -> set:
        heads = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
        return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}

    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(docs) >= 5, "docs/ is missing"
    for doc in docs:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, frag = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            assert path.is_file(), f"{doc.name}: link to {target} names no file"
            if frag:
                assert frag in anchors(path), f"{doc.name}: link to {target}: no such heading"


def test_readme_keeps_the_commands_ci_runs():
    """.ci/run reads the indented lines of the README's "## Tests" and "## Demo" sections and runs them exactly."""
    import re

    _source_tree()
    text = (ROOT / "README.md").read_text()

    def commands(name):
        section = re.search(rf"^## {name}\n(.*?)(?=^## |\Z)", text, re.S | re.M).group(1)
        return [ln.strip() for ln in section.splitlines() if ln.startswith("    ") and ln.strip()]

    assert commands("Tests") == ['pip install torch==2.13.0 && pip install ".[test]" && python -m pytest -q']
    assert commands("Demo") == ['pip install torch==2.13.0 && pip install ".[demo]"', "python -m qlora_kernels demo"]
