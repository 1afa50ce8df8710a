"""plan_memory against measured training steps: the planner's total vs the measured peak, one row per config.

    python bench/bench_plan.py [--quick] [--out DIR]

Each config is a small Llama (transformers, random init) prepared with every Linear but lm_head adapted.
Measured (CPU): peak bytes of live tensor storages over a second full training step (forward with labels,
backward, AdamW step, zero_grad), tracked by qlora_kernels.planner.LiveTensorTracker (a TorchDispatchMode that
also enters the NF4 linear ops, so their dequantize scratch counts); parameters, gradients and optimizer
states included. On a GPU: torch.cuda.max_memory_allocated over the same step, against the plan's
tensor_bytes (the total without the context/fragmentation allowance).
Output: a table, bench/results/plan-<device>.json and a planned-vs-measured scatter plot (.png).
"""

from __future__ import annotations

import argparse
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
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a handful of configs")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
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
