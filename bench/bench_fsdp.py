"""FSDP2 on this machine: per-rank memory and step time of a small Llama, world size 1 (no FSDP) and 2 (FSDP2).

    python bench/bench_fsdp.py [--layers 4] [--hidden 256] [--steps 6] [--out DIR]

Per rank: parameter + buffer bytes it holds (local shards), NF4 bytes (sharded codes and the replicated nested
scales), RSS before a step and the peak RSS during one (VmHWM after resetting it through /proc/self/clear_refs:
activations, gathered layers, gradients, optimizer states all included), and the step time (forward, backward,
AdamW on the adapters; median with p20-p80 over the steps after one warm-up). The global batch is the same for
both world sizes (each of 2 ranks takes half). Processes: gloo on 127.0.0.1, one thread each. On a 2-core
machine shared with other jobs, the two ranks compete with everything else: step times are noisy.
No GPU path is measured here: a 2-process run on one GPU says nothing about NCCL across GPUs (untested).
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
    if world > 1:
        qd.shard_model(model, verbose=False)
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    param_bytes = sum(local(t).numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    if world > 1:
        nf4 = qd.nf4_shard_bytes(model)
        nf4_local = nf4["sharded"] + nf4["replicated"]
    else:
        nf4_local = sum(m.weight.nbytes for m in qk.model.qlora_modules(model).values())
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args()
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
          f"(r=16); global batch {BATCH} x {SEQ} tokens; {args.steps} timed steps")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = device_meta("cpu")
    path = out / "fsdp-cpu.json"
    path.write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
