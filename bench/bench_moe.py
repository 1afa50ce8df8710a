"""One MoE layer's experts, forward + backward, three ways in the same run:

    ours                  NF4Experts: NF4 per expert (4.127 bits), grouped ops qlora::nf4_grouped_linear / _dx,
                          per-expert LoRA (GroupedQLoRAFunction)
    bf16 + peft           transformers' Qwen3MoeExperts on bf16 weights (its grouped_mm experts path) with PEFT's
                          LoRA on the fused parameters (LoraConfig(target_parameters=[gate_up_proj, down_proj]))
    dequant-all + peft    the same, after dequantizing every expert of the NF4 weights to bf16 (what a 4-bit
                          store without grouped kernels does each step)

Shape: a Qwen3-30B-A3B MoE layer (hidden 2048, moe_intermediate 768, 128 experts, top-8) scaled down for a CPU
run: hidden and intermediate halved (1024, 384), 32 experts, top-8, T = 256 tokens, r = 16; --full for the
published dims. x requires grad (a layer inside a network): the backward computes dx and the expert LoRA
gradients. Activations in --dtype (default bfloat16), LoRA masters float32 in every implementation.
Routing is fixed (random top-k, softmax weights) and the same for all.

Per row: median / p20 / p80 ms (harness.time_cases: the implementations take turns), bytes saved for backward,
and the expert weights' bytes per parameter. The speedup column is against bf16 + peft.

    python bench/bench_moe.py [--out DIR] [--dtype bfloat16] [--reps N] [--full] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

try:
    from bench.harness import device_meta, print_table, speedup, time_cases, write_results
except ImportError:  # run as a script from bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import device_meta, print_table, speedup, time_cases, write_results

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

from qlora_kernels.memory import saved_for_backward_bytes  # noqa: E402


class Block(nn.Module):
    """Holds the experts module so PEFT's target_parameters ("experts.gate_up_proj") finds it."""

    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, x, idx, w):
        return self.experts(x, idx, w)


def build(args, dtype):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.inter, num_experts=args.experts,
                         num_experts_per_tok=args.top_k)
    cfg._experts_implementation = "grouped_mm"  # transformers' default for this model
    torch.manual_seed(0)
    experts = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, 0.02)
        experts.down_proj.normal_(0, 0.02)
    return experts.to(dtype)


def routing(args, dtype):
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(args.tokens, args.experts, generator=g)
    idx = scores.topk(args.top_k, dim=-1).indices
    w = torch.softmax(torch.randn(args.tokens, args.top_k, generator=g), dim=-1).to(dtype)
    x = (torch.randn(args.tokens, args.hidden, generator=g) * 0.5).to(dtype)
    return x, idx, w


def peft_block(experts, r, ours):
    """PEFT's LoRA on the fused parameters, holding the same adapter values as `ours` (float32 masters)."""
    import peft

    block = Block(experts)
    cfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules=[],
                          target_parameters=["experts.gate_up_proj", "experts.down_proj"])
    model = peft.get_peft_model(block, cfg)
    outer = model.base_model.model.experts  # PEFT nests one wrapper per parameter, the first one innermost
    with torch.no_grad():
        for wrapper, p in ((outer, "down_proj"), (outer.base_layer, "gate_up_proj")):
            assert wrapper.parameter_name == p
            proj = getattr(ours, p)
            wrapper.lora_A["default"].weight.data = proj.peft_lora_A().float().clone()
            wrapper.lora_B["default"].weight.data = proj.peft_lora_B().float().clone()
    for n, prm in model.named_parameters():
        prm.requires_grad_("lora_" in n)
    return model


def step(fn, x, idx, w):
    def run():
        xx = x.detach().requires_grad_(True)
        fn(xx, idx, w).float().sum().backward()
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="results directory (default bench/results)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--full", action="store_true", help="published Qwen3-30B-A3B dims: 2048 / 768, 128 experts")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--r", type=int, default=16)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.hidden, args.inter, args.experts, args.top_k = (2048, 768, 128, 8) if args.full else (1024, 384, 32, 8)
    dtype = getattr(torch, args.dtype)
    import qlora_kernels as qk
    from qlora_kernels.experts import NF4Experts

    dense = build(args, dtype)
    ours = NF4Experts(copy.deepcopy(dense), "experts", r=args.r, alpha=args.r)
    for p in ("gate_up_proj", "down_proj"):
        nn.init.normal_(getattr(ours, p).lora_B, std=0.01)
    bf16_peft = peft_block(copy.deepcopy(dense), args.r, ours)

    # dequantize-all: the NF4 experts dequantized to `dtype` every step, then transformers + PEFT
    deq_peft = peft_block(copy.deepcopy(dense), args.r, ours)
    base = deq_peft.base_model.model.experts
    while hasattr(base, "base_layer"):
        base = base.base_layer

    def dequant_all(x, idx, w):
        with torch.no_grad():
            for p, proj in ours.projections.items():
                getattr(base, p).data = proj.dense(dtype)
        return deq_peft(x, idx, w)

    x, idx, w = routing(args, dtype)
    fns = {"ours": step(ours, x, idx, w), "bf16 + peft": step(bf16_peft, x, idx, w),
           "dequant-all + peft": step(dequant_all, x, idx, w)}
    with torch.no_grad():  # the same layer and adapters (ours and dequant-all on the same NF4 weights)
        check = {k: f(x, idx, w).double() for k, f in (("ours", ours), ("dequant-all + peft", dequant_all))}
    agree = (check["ours"] - check["dequant-all + peft"]).abs().max().item() / check["ours"].abs().max().item()

    saved = {}
    for name, f in (("ours", ours), ("bf16 + peft", bf16_peft), ("dequant-all + peft", dequant_all)):
        xx = x.detach().requires_grad_(True)
        saved[name], out = saved_for_backward_bytes(lambda f=f, xx=xx: f(xx, idx, w))
        del out
    n_params = sum(p.numel for p in ours.projections.values())
    nf4_bytes = sum(p.nbytes for p in ours.projections.values())
    weight_bytes = {"ours": nf4_bytes, "bf16 + peft": n_params * 2,
                    "dequant-all + peft": nf4_bytes}  # + a transient dense copy of every expert each step
    transient = {"ours": 0, "bf16 + peft": 0, "dequant-all + peft": n_params * dtype.itemsize}
    times = time_cases(fns, torch.device("cpu"), warmup=1, reps=args.reps)
    case = (f"E={args.experts} top{args.top_k} H={args.hidden} I={args.inter} T={args.tokens} r={args.r} "
            f"{args.dtype}")
    rows = []
    for name, t in times.items():
        row = {"case": case, "impl": name, **t, "saved_for_backward_MiB": saved[name] / 2**20,
               "expert_weight_bits_per_param": 8.0 * weight_bytes[name] / n_params,
               "expert_weight_MiB": weight_bytes[name] / 2**20,
               "transient_dense_experts_MiB": transient[name] / 2**20}
        row.update(speedup(t, times["bf16 + peft"]))
        rows.append(row)
    meta = device_meta("cpu")
    meta.update(shape=dict(hidden=args.hidden, moe_intermediate=args.inter, experts=args.experts, top_k=args.top_k,
                           tokens=args.tokens, r=args.r, dtype=args.dtype, full=args.full),
                max_rel_diff_ours_vs_dequant_all=agree, qlora_kernels=qk.__version__)
    print_table(rows, cols=("impl", "median_ms", "p20_ms", "p80_ms", "speedup", "speedup_verdict",
                            "saved_for_backward_MiB", "expert_weight_bits_per_param", "transient_dense_experts_MiB"))
    print(f"ours vs dequant-all + peft (same NF4 weights): max |diff| / max |y| = {agree:.2e}")
    path = write_results("moe", rows, meta, Path(args.out) if args.out else None, plot=False)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
