"""plan_memory against measured training steps: the planner's total vs the measured peak, one row per config.

    python bench/bench_plan.py [--quick] [--out DIR]

Each config is a small Llama (transformers, random init) prepared with every Linear but lm_head adapted.
Measured (CPU): peak bytes of live tensor storages over a second full training step (forward with labels,
backward, AdamW step, zero_grad), tracked by qlora_kernels.planner.LiveTensorTracker (a TorchDispatchMode that
also enters the NF4 linear ops, so their dequantize scratch counts); parameters, gradients and optimizer
states included. On a GPU: torch.cuda.max_memory_allocated over the same step, against the plan's
tensor_bytes (the total without the context/fragmentation allowance).
Output: a table, bench/results/plan-<device>.json and a planned-vs-measured scatter plot (.png).

    python bench/bench_plan.py --readme [--out DIR]

runs the README's `python -m qlora_kernels plan` commands (README_PLANS: the QLoRA paper's LLaMA-65B setting
and two variants) and writes their tables, terms, searches and times to bench/results/plan-readme.json, which
bench/readme_tables.py renders into README.md (tests/test_readme.py recomputes the terms with the current code).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

import torch

try:
    from bench.harness import RESULTS_DIR, device_meta, print_table, slug
except ImportError:  # run as a script from bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import RESULTS_DIR, device_meta, print_table, slug


def measure(config, r, seq, batch, checkpointing, device, dtype):
    import transformers

    import qlora_kernels as qk
    from qlora_kernels.planner import measure_step

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    qk.prepare_model(model, r=r, verbose=False)
    model.train()
    if checkpointing:
        from qlora_kernels.checkpoint import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    if device.type == "cuda":
        for _ in range(1):  # states exist before the measured step, as in steady training
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return measure_step(model, ids, opt)


# The README's plan commands (the arguments after `python -m qlora_kernels plan`)
README_PLANS = {
    "paper": "llama-65b --seq 512 --batch 1 --r 64 --gpu 48GB --optimizer paged_adamw_32bit --adapter-dtype bfloat16",
    "float32 adapters": "llama-65b --gpu 48GB",
    "adamw_torch": "llama-65b --gpu 48GB --optimizer adamw_torch",
}
README_PLANS_FILE = "plan-readme.json"


def plan_kwargs(argv: list) -> dict:
    """The plan_memory keyword arguments the `plan` command passes for `argv` (its own parser, not a copy)."""
    import qlora_kernels.planner as planner
    from qlora_kernels.__main__ import main as cli

    seen = {}

    def capture(config, **kwargs):
        seen.update(kwargs, config_or_model=config)
        raise ValueError("captured")

    real, planner.plan_memory = planner.plan_memory, capture
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # the command's "plan: captured"
            cli(["plan", *argv, "--quiet"])
    finally:
        planner.plan_memory = real
    seen.pop("progress", None)
    return seen


def plan_record(plan) -> dict:
    """What the README shows of a plan (JSON-ready)."""
    return {"table": plan.table(), "terms": plan.terms, "total_bytes": plan.total_bytes,
            "tensor_bytes": plan.tensor_bytes, "device_memory": plan.device_memory, "fits": plan.fits,
            "max_seq_len": plan.max_seq_len, "max_batch_size": plan.max_batch_size,
            "seq_len_cap": plan.seq_len_cap, "counts": plan.counts}


def readme_plans(out_dir: Path) -> int:
    from qlora_kernels.planner import plan_memory

    rows = []
    for name, args in README_PLANS.items():
        kwargs = plan_kwargs(args.split())
        t0 = time.perf_counter()
        plan = plan_memory(**kwargs, progress=True)
        seconds = time.perf_counter() - t0
        print(plan.table())
        print(f"{name}: {seconds:.1f} s\n")
        rows.append({"name": name, "command": f"python -m qlora_kernels plan {args}", "seconds": seconds,
                     **plan_record(plan)})
    meta = device_meta(torch.device("cpu"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / README_PLANS_FILE
    path.write_text(json.dumps({"family": "plan-readme", "meta": meta, "rows": rows}, indent=1, default=str))
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a handful of configs")
    parser.add_argument("--readme", action="store_true", help="the README's plan commands (plan-readme.json)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.readme:
        return readme_plans(Path(args.out) if args.out else RESULTS_DIR)
    import transformers

    from qlora_kernels.planner import plan_memory

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(2, 64, 160), (4, 128, 256), (6, 96, 256), (3, 192, 512)]
    tokens = [(64, 1), (128, 2), (256, 1)]
    ranks = [4, 16]
    grid = list(itertools.product(shapes, tokens, ranks, (False, True)))
    if args.quick:
        grid = grid[::7]
    rows = []
    for (layers, hidden, inter), (seq, batch), r, ckpt in grid:
        config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
        t0 = time.perf_counter()
        plan = plan_memory(config, r=r, seq_len=seq, batch_size=batch, optimizer="adamw_torch",
                           gradient_checkpointing=ckpt, compute_dtype=dtype, device=device.type)
        plan_s = time.perf_counter() - t0
        measured = measure(config, r, seq, batch, ckpt, device, dtype)
        planned = plan.tensor_bytes
        rows.append({"case": f"L{layers} h{hidden} i{inter} s{seq} b{batch} r{r} {'ckpt' if ckpt else 'full'}",
                     "planned_MiB": planned / 2**20, "measured_MiB": measured / 2**20,
                     "error_%": 100.0 * (planned / measured - 1), "plan_s": plan_s})
        print_table(rows[-1:], cols=("case", "planned_MiB", "measured_MiB", "error_%", "plan_s"))
    print()
    print_table(rows, cols=("case", "planned_MiB", "measured_MiB", "error_%", "plan_s"))
    worst = max(abs(r["error_%"]) for r in rows)
    print(f"\n{len(rows)} configs; worst |error| {worst:.3f}%")
    meta = device_meta(device)
    out_dir = Path(args.out) if args.out else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"plan-{slug(meta['device'])}.json"
    path.write_text(json.dumps({"family": "plan", "meta": meta, "rows": rows}, indent=1, default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 5))
        xs = [r["measured_MiB"] for r in rows]
        ys = [r["planned_MiB"] for r in rows]
        ax.scatter(xs, ys, s=14)
        lim = [0, max(xs + ys) * 1.05]
        ax.plot(lim, lim, "k--", lw=0.8, label="planned = measured")
        ax.plot(lim, [v * 1.05 for v in lim], ":", color="gray", lw=0.8, label="+-5%")
        ax.plot(lim, [v * 0.95 for v in lim], ":", color="gray", lw=0.8)
        ax.set_xlabel("measured peak of live tensors (MiB)")
        ax.set_ylabel("plan_memory total (MiB)")
        ax.set_title(f"planner vs measured step, {meta['device']}", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    print(f"wrote {path}")
    return 0 if worst <= 5.0 else 1


if __name__ == "__main__":
    sys.exit(main())
