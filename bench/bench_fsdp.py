"""FSDP2 on this machine: per-rank memory and step time of a small Llama, world size 1 (no FSDP) and 2 (FSDP2).

    python bench/bench_fsdp.py [--layers 4] [--hidden 256] [--steps 6] [--out DIR] [--plain]

--plain shards with torch's `fully_shard` on each decoder layer and then the root, as accelerate's FSDP2 plugin
does, with no call of qlora_kernels (the NF4 codes are stored so that this shards them too) instead of
`qk.shard_model`.

Per rank: parameter + buffer bytes it holds (local shards), NF4 bytes (sharded codes and the replicated nested
scales), RSS before a step and the peak RSS during one (VmHWM after resetting it through /proc/self/clear_refs:
activations, gathered layers, gradients, optimizer states all included), and the step time (forward, backward,
AdamW on the adapters; median with p20-p80 over the steps after one warm-up). The global batch is the same for
both world sizes (each of 2 ranks takes half). Processes: gloo on 127.0.0.1, one thread each. On a 2-core
machine shared with other jobs, the two ranks compete with everything else: step times are noisy.
No GPU path is measured here: a 2-process run on one GPU says nothing about NCCL across GPUs. The NCCL path
is untested until 2 GPUs exist.

Then the projection (`--project-only` skips the measurement): per-rank device memory of a QLoRA step for
llama-3-70b and llama-65b on N = 1, 2, 4, 8 GPUs, from plan_memory's terms and the per-rank accounting the
measured rows follow (checked first on the measured model: its planned bytes held per rank against the
measured parameters + buffers at world 1 and 2). The assumptions are printed with the table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

try:
    from bench.harness import RESULTS_DIR, device_meta
except ImportError:  # run as a script from bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import RESULTS_DIR, device_meta

BATCH, SEQ = 4, 64


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def build(args):
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import transformers

    import qlora_kernels as qk

    torch.manual_seed(0)
    inter = args.hidden * 11 // 4 // 64 * 64  # a multiple of the blocksize: every layer's rows shard
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=args.hidden, intermediate_size=inter,
                                   num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=SEQ)
    model = transformers.LlamaForCausalLM(cfg)
    qk.prepare_model(model, r=16, alpha=32, verbose=False)
    return model


def measure(rank, world, args, out_dir):
    torch.set_num_threads(1)
    import qlora_kernels as qk
    from qlora_kernels import distributed as qd

    model = build(args)
    if world > 1 and args.plain:  # as a launcher calls it: no call of ours
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif world > 1:
        qd.shard_model(model, verbose=False)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    param_bytes = sum(local(t).numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if world > 1:
        nf4 = qd.nf4_shard_bytes(model)
        nf4_local = nf4["sharded"] + nf4["replicated"]
    else:
        nf4_local = sum(m.weight.nbytes for m in qk.model.nf4_modules(model).values())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=g).chunk(world)[rank]

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer states exist from here on
    rss_before = rss_kib("VmRSS")
    peak_ok = reset_peak_rss()
    times = []
    for _ in range(args.steps):
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = rss_kib("VmHWM") if peak_ok else -1
    times.sort()
    row = {"world": world, "rank": rank, "param_and_buffer_MiB": param_bytes / 2**20, "nf4_MiB": nf4_local / 2**20,
           "rss_before_step_MiB": rss_before / 1024, "peak_rss_in_step_MiB": peak / 1024 if peak > 0 else None,
           "step_ms_median": statistics.median(times), "step_ms_p20": times[int(0.2 * len(times))],
           "step_ms_p80": times[min(len(times) - 1, int(0.8 * len(times)))]}
    with open(os.path.join(out_dir, f"w{world}r{rank}.json"), "w") as f:
        json.dump(row, f)


def _entry(rank, world, port, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        measure(rank, world, args, out_dir)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ the projection
PROJECT_MODELS = ("llama-3-70b", "llama-65b")
PROJECT_WORLDS = (1, 2, 4, 8)
PROJECT = dict(r=64, seq_len=512, batch_size=1, optimizer="paged_adamw_32bit", gradient_checkpointing=True)
GATHERED_LAYERS = 2  # FSDP2 holds the current decoder layer unsharded and prefetches the next

ASSUMPTIONS = [
    "plan_memory's terms for one GPU (r=64 on every Linear but lm_head, float32 adapters, bf16 compute, seq 512, "
    "batch 1 per rank, gradient checkpointing, paged_adamw_32bit, CUDA context + 5% fragmentation allowance)",
    "sharded over N ranks (FSDP2 on each decoder layer and the root, as qk.shard_model): NF4 codes and scale codes, "
    "dense modules (embeddings, norms, lm_head), LoRA weights, their gradients and optimizer states: 1/N each; "
    "nested scales and offsets replicated (the accounting of the measured rows: params + buffers held per rank)",
    f"gathered during the step, on top: the root's dense modules in full (embeddings and lm_head are all-gathered "
    f"around the root's forward and backward) and {GATHERED_LAYERS} decoder layers' NF4 + LoRA weights (the current "
    "one and the prefetched next), plus one layer's LoRA gradients before their reduce-scatter: the (N-1)/N not held",
    "activations, logits and the backward / optimizer transients: each rank runs its own batch-1 micro-batch, as "
    "on one GPU (not divided by N); the plan's net backward-peak row counted at no less than zero (an upper bound)",
    "NOT measured: no run on GPUs; the NCCL path is untested until 2 GPUs exist",
]


def held_bytes(plan, world: int) -> float:
    """Parameters + buffers a rank holds between steps (what the measured rows report)."""
    t, c = plan.terms, plan.counts
    repl = c["nf4_replicated_bytes"]
    return (t["NF4 weights + scales"] - repl + t["dense modules (embeddings, norms, lm_head)"]
            + t["LoRA weights"]) / world + repl


def project(plan, world: int) -> dict:
    t, c = plan.terms, plan.counts
    layers = c["num_layers"]
    repl = c["nf4_replicated_bytes"]
    states = next(v for k, v in t.items() if k.startswith("optimizer states"))
    held = held_bytes(plan, world)
    train = (t["LoRA gradients"] + states) / world
    layer = (t["NF4 weights + scales"] - repl + t["LoRA weights"]) / layers
    gathered = (t["dense modules (embeddings, norms, lm_head)"] + GATHERED_LAYERS * layer
                + t["LoRA gradients"] / layers) * (1 - 1 / world)
    # the plan's backward-peak row is net of the LoRA gradients not yet made at that peak (all of them, on one
    # GPU); sharded, those are 1/N: count the row at no less than zero (an upper bound)
    act = sum(max(0, v) if k.startswith("backward peak") else v for k, v in t.items()
              if k.startswith(("saved activations", "logits", "backward peak", "optimizer step temporaries")))
    tensors = held + train + gathered + act
    from qlora_kernels.planner import CUDA_CONTEXT_BYTES, FRAGMENTATION

    total = tensors + CUDA_CONTEXT_BYTES + FRAGMENTATION * tensors
    gib = 2**30
    return {"world": world, "held_GiB": held / gib, "grads_states_GiB": train / gib, "gathered_GiB": gathered / gib,
            "activations_GiB": act / gib, "total_GiB": total / gib}


def projection(measured_rows: list, small_args) -> dict:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import transformers

    from qlora_kernels.planner import plan_memory

    inter = small_args.hidden * 11 // 4 // 64 * 64
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=small_args.hidden, intermediate_size=inter,
                                   num_hidden_layers=small_args.layers, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=SEQ)
    small = plan_memory(cfg, r=16, seq_len=SEQ, batch_size=BATCH, compute_dtype=torch.float32, device="cpu")
    check = []
    for r in measured_rows:
        planned = held_bytes(small, r["world"]) / 2**20
        check.append({"world": r["world"], "rank": r["rank"], "planned_held_MiB": planned,
                      "measured_param_and_buffer_MiB": r["param_and_buffer_MiB"]})
    rows = []
    for name in PROJECT_MODELS:
        plan = plan_memory(name, device="cuda", **PROJECT)
        for w in PROJECT_WORLDS:
            rows.append({"model": name, **project(plan, w)})
    return {"assumptions": ASSUMPTIONS, "settings": PROJECT, "check_on_measured_model": check, "rows": rows}


def print_projection(proj: dict) -> None:
    print("\nper-rank accounting on the measured model (held = parameters + buffers):")
    for c in proj["check_on_measured_model"]:
        print(f"  world {c['world']} rank {c['rank']}: planned {c['planned_held_MiB']:.2f} MiB, "
              f"measured {c['measured_param_and_buffer_MiB']:.2f} MiB")
    print("\nprojection, per rank, GiB (assumptions below):")
    print("model | N | held | grads + states | gathered in step | activations | total")
    for r in proj["rows"]:
        print(f"{r['model']} | {r['world']} | {r['held_GiB']:.2f} | {r['grads_states_GiB']:.2f} | "
              f"{r['gathered_GiB']:.2f} | {r['activations_GiB']:.2f} | {r['total_GiB']:.2f}")
    for a in proj["assumptions"]:
        print(f"  - {a}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    ap.add_argument("--plain", action="store_true",
                    help="shard with fully_shard on each decoder layer and the root (as accelerate), not shard_model")
    ap.add_argument("--project-only", action="store_true",
                    help="keep the measured rows of the existing fsdp-cpu.json, recompute the projection")
    args = ap.parse_args()
    out = Path(args.out)
    if args.project_only:
        data = json.loads((out / "fsdp-cpu.json").read_text())
        data["projection"] = projection(data["rows"], argparse.Namespace(**data["args"]))
        data["settings"] = dict(batch=BATCH, seq=SEQ)
        print_projection(data["projection"])
        (out / "fsdp-cpu.json").write_text(json.dumps(data, indent=2))
        print(f"wrote {out / 'fsdp-cpu.json'}")
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.get_context("spawn")
        p = ctx.Process(target=measure, args=(0, 1, args, tmp))  # world 1 in its own process: same baseline RSS
        p.start()
        p.join(600)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_entry, args=(2, port, args, tmp), nprocs=2, start_method="spawn")
        rows = [json.load(open(os.path.join(tmp, f))) for f in sorted(os.listdir(tmp))]
    cols = ["world", "rank", "param_and_buffer_MiB", "nf4_MiB", "rss_before_step_MiB", "peak_rss_in_step_MiB",
            "step_ms_median", "step_ms_p20", "step_ms_p80"]
    print(f"small Llama: {args.layers} layers, hidden {args.hidden}, vocab 2048, every Linear but lm_head in NF4 "
          f"(r=16); global batch {BATCH} x {SEQ} tokens; {args.steps} timed steps"
          + ("; sharded by plain fully_shard" if args.plain else ""))
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    out.mkdir(parents=True, exist_ok=True)
    meta = device_meta("cpu")
    proj = projection(rows, args)
    print_projection(proj)
    path = out / "fsdp-cpu.json"
    args_d = {k: v for k, v in vars(args).items() if k != "project_only"}
    path.write_text(json.dumps({"meta": meta, "args": args_d, "settings": dict(batch=BATCH, seq=SEQ), "rows": rows,
                                "projection": proj}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
