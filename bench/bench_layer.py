"""One QLoRA layer's forward + backward, and a small model's training step, side by side with
bitsandbytes Linear4bit + PEFT LoRA and with PEFT LoRA on an unquantized base; "peft on qlora_kernels" is PEFT's
own wrapper (get_peft_model) on this package's NF4Linear bases (the same fused kernels, through PEFT's layer).

Per row: median, p20 and p80 ms (harness.time_cases: the same warm-up and repetitions for every implementation,
taking turns on a CPU), bytes saved for backward (unique storages seen by torch.autograd.graph.saved_tensors_hooks
during the forward), speedup against bitsandbytes + PEFT ("within noise" when the p20-p80 ranges overlap).
Adapters are in the activation dtype in every implementation.

    python bench/bench_layer.py [--out DIR] [--dtypes float32,bfloat16] [--reps N] [--quick]

Layer: W [4096, 4096], M = 512 tokens, r = 16; x requires grad (a layer inside a network), so the backward
computes dx, dA and dB. Model: a small Llama (transformers, random init) with every Linear adapted; one step
is forward, backward and AdamW on the adapters.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

try:
    from bench.harness import device_meta, print_table, speedup, time_cases, with_rates, write_results
except ImportError:  # run as a script from bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import device_meta, print_table, speedup, time_cases, with_rates, write_results

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

from qlora_kernels.memory import saved_for_backward_bytes  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Wrap(nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def to_bnb4bit(lin: nn.Linear, dtype, device) -> nn.Module:
    import bitsandbytes as bnb

    b4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, compress_statistics=True,
                           quant_type="nf4", compute_dtype=dtype)
    b4.load_state_dict(lin.state_dict())
    b4 = b4.to(device)
    if b4.bias is not None:
        b4.bias.data = b4.bias.data.to(dtype)
    return b4


def peft_wrap(model: nn.Module, targets, r, alpha, dtype):
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    model = peft.get_peft_model(model, config, autocast_adapter_dtype=False)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(dtype)
    return model


def nf4_linears(model: nn.Module, targets=None) -> nn.Module:
    """Every nn.Linear named in `targets` (all when None) replaced by an NF4Linear (no adapters), in place."""
    from qlora_kernels import NF4Linear

    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and (targets is None or name.rsplit(".", 1)[-1] in targets):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, NF4Linear.from_linear(mod))
    return model


def adapters_to(model: nn.Module, dtype) -> nn.Module:
    """Our LoRA A and B in `dtype`, as peft_wrap puts PEFT's (whatever the package's default adapter dtype)."""
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(dtype)
    return model


# -------------------------------------------------------------------------------------------------- layer
def layer_impls(n, k, r, dtype, device):
    from qlora_kernels import QLoRALinear

    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=False, device=device)
    impls = {"qlora_kernels": adapters_to(QLoRALinear.from_linear(lin, r=r, alpha=r).to(dtype), dtype)}
    try:
        impls["bnb+peft"] = peft_wrap(Wrap(to_bnb4bit(lin, dtype, device)), ["lin"], r, r, dtype)
    except Exception as exc:  # bitsandbytes / peft missing or unsupported on this device
        print(f"  (bitsandbytes + PEFT skipped: {exc})")
    import qlora_kernels  # noqa: F401  (registers the PEFT layer for NF4Linear)
    from qlora_kernels import NF4Linear

    alone = Wrap(NF4Linear.from_linear(lin))
    alone.hf_device_map = {"": device}  # PEFT reads the device off the first parameter; this model has none
    impls["peft on qlora_kernels"] = peft_wrap(alone, ["lin"], r, r, dtype)
    dense = nn.Linear(k, n, bias=False, device=device, dtype=dtype)
    dense.weight.data.copy_(lin.weight.data)
    impls["peft lora, dense base"] = peft_wrap(Wrap(dense), ["lin"], r, r, dtype)
    return impls


def bench_layer(device, dtype, n=4096, k=4096, m=512, r=16, reps=10, warmup=2) -> list[dict]:
    rows = []
    impls = layer_impls(n, k, r, dtype, device)
    x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, device=device, dtype=dtype)
    flops = 2 * m * n * k * 2 + 2 * m * r * (n + k) * 3  # base fwd + dx; LoRA fwd, dA, dB, dx
    case = f"layer {n}x{k} M={m} r={r} {str(dtype).replace('torch.', '')}"

    def make_step(module):
        def step():
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).backward(dy)
        return step

    # the same warm-up and repetitions for every implementation, taking turns on a CPU
    timings = time_cases({name: make_step(mod) for name, mod in impls.items()}, device, warmup, reps)
    for name, module in impls.items():
        row = {"case": case, "impl": name, "dtype": str(dtype), **timings[name],
               "saved_bytes": saved_for_backward_bytes(lambda: module(x))[0]}
        rows.append(with_rates(row, flops=flops))
    del impls
    gc.collect()
    return rows


# -------------------------------------------------------------------------------------------------- model
def tiny_llama(device, dtype):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def model_impls(device, dtype, r):
    from qlora_kernels import prepare_model

    ours = tiny_llama(device, dtype)
    prepare_model(ours, target_modules=LLAMA_TARGETS, r=r, alpha=r, verbose=False)
    adapters_to(ours, dtype)
    impls = {"qlora_kernels": ours}
    try:
        bnb_model = tiny_llama(device, dtype)
        for name, mod in list(bnb_model.named_modules()):
            if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in LLAMA_TARGETS:
                parent, _, child = name.rpartition(".")
                setattr(bnb_model.get_submodule(parent), child, to_bnb4bit(mod, dtype, device))
        impls["bnb+peft"] = peft_wrap(bnb_model, LLAMA_TARGETS, r, r, dtype)
    except Exception as exc:
        print(f"  (bitsandbytes + PEFT skipped: {exc})")
    impls["peft on qlora_kernels"] = peft_wrap(nf4_linears(tiny_llama(device, dtype), LLAMA_TARGETS), LLAMA_TARGETS,
                                               r, r, dtype)
    impls["peft lora, dense base"] = peft_wrap(tiny_llama(device, dtype), LLAMA_TARGETS, r, r, dtype)
    return impls


def bench_model(device, dtype, batch=4, seq=128, r=16, reps=5, warmup=2) -> list[dict]:
    rows = []
    ids = torch.randint(0, 2048, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    case = f"llama 4x512 train step B={batch} T={seq} r={r} {str(dtype).replace('torch.', '')}"
    models = model_impls(device, dtype, r)

    def make_step(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step():
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    timings = time_cases({name: make_step(m) for name, m in models.items()}, device, warmup, reps)
    for name, model in models.items():
        t = timings[name]
        nbytes = saved_for_backward_bytes(lambda: model(input_ids=ids, labels=ids).loss)[0]
        rows.append({"case": case, "impl": name, "dtype": str(dtype), **t, "saved_bytes": nbytes,
                     "tokens/s": batch * seq / (t["median_ms"] / 1e3)})
    del models
    gc.collect()
    return rows


def add_speedups(rows: list[dict]) -> None:
    for case in {r["case"] for r in rows}:
        base = [r for r in rows if r["case"] == case and r["impl"] == "bnb+peft"]
        for r in rows:
            if r["case"] == case and base:
                # >1: this row is faster than bitsandbytes + PEFT
                r.update(speedup(r, base[0]) if r is not base[0] else {"speedup": 1.0, "speedup_verdict": "baseline"})
                r["saved_vs_bnb"] = r["saved_bytes"] / base[0]["saved_bytes"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="results directory (default bench/results)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None, help="comma list; default bfloat16 on CUDA, float32,bfloat16 on CPU")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="layer 1024x1024, M=128 (a smoke run)")
    parser.add_argument("--no-model", action="store_true", help="skip the model training step")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtypes = args.dtypes.split(",") if args.dtypes else (["bfloat16"] if device.type == "cuda" else ["float32", "bfloat16"])
    reps = args.reps or (50 if device.type == "cuda" else 7)
    import qlora_kernels

    meta = device_meta(device)
    meta["qlora_backend"] = qlora_kernels.backend_info()
    meta.update(warmup=2, layer_reps=reps, model_reps=max(5, reps // 2))
    rows = []
    for name in dtypes:
        dtype = getattr(torch, name)
        shape = dict(n=1024, k=1024, m=128) if args.quick else {}
        print(f"layer, {name} ...", flush=True)
        rows += bench_layer(device, dtype, reps=reps, **shape)
        if not args.no_model:
            print(f"model step, {name} ...", flush=True)
            rows += bench_model(device, dtype, reps=max(5, reps // 2), seq=32 if args.quick else 128)
    add_speedups(rows)
    print(f"device: {meta['device']} ({meta['cpu_model']}), SIMD path {meta.get('cpu_isa')}, threads "
          f"{meta['cpu_threads']}, load average {meta['load_avg_1_5_15']}; every implementation: warm-up 2, "
          f"reps {reps} (layer) / {meta['model_reps']} (model), taking turns")
    print_table(rows, cols=("case", "impl", "median_ms", "p20_ms", "p80_ms", "TFLOP/s", "saved_bytes", "saved_vs_bnb",
                            "tokens/s", "speedup", "speedup_verdict"))
    print("speedup = bitsandbytes + PEFT's median / this row's (>1: faster); 'within noise' when the p20-p80 "
          "ranges overlap")
    path = write_results("layer", rows, meta, Path(args.out) if args.out else None)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
