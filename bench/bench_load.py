"""Loading a checkpoint into NF4: load_pretrained vs transformers + bitsandbytes vs bf16 load + prepare_model.

    python bench/bench_load.py [--layers 7] [--repeats 3] [--bnb-repeats 1] [--keep DIR] [--out DIR]
                               [--skip bnb,dense,floor]

Writes a synthetic Llama checkpoint with Llama-7B layer dimensions (hidden 4096, MLP 11008, vocab 32000,
bf16, random normal * 0.02, one safetensors shard per layer + index) into a temporary directory (7 layers:
about 3.3 GB), then loads it three ways, each in a fresh Python process on this machine's device:
  - qlora_kernels.load_pretrained(path)  (streams tensors, quantizes each as it arrives)
  - transformers AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(
    load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)), bnb_4bit_compute_dtype bf16
  - transformers from_pretrained(path, dtype=bfloat16) then qlora_kernels.prepare_model
Per row: wall seconds of the load call, peak anonymous memory (RssAnon of /proc/self/status, sampled every
millisecond by a thread; the checkpoint's page cache is not counted) above the process's baseline taken after
transformers imported the Llama classes (a one-time ~130 MB of code, the same for every model size), the
final model's bytes, and the bound of issue 10: 1.15 x (model bytes + largest tensor of the checkpoint).
A fourth row, "bf16 mmap load + quantize only", is the floor of the work: transformers' memory-mapped bf16
load, then quantize_nf4 of every target weight and nothing else (no modules swapped, no checks, no copies).

Fairness: the checkpoint is written, os.sync()'d (a first reader of a just-written checkpoint otherwise
competes with the writeback of its dirty pages: 5.2 s instead of 2.7-3.9 s for load_pretrained at 1.33 GB
here), and read once into the page cache before every run, so every method starts from the same warm cache.
Methods take turns for --repeats rounds (the starting method rotates); a row gives the median, min and max
seconds, the largest peak, the load average before its runs, and, for load_pretrained and the bf16 path,
where the time went (quantize calls, the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    from bench.harness import RESULTS_DIR, device_meta, print_table, slug
except ImportError:  # run as a script from bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from harness import RESULTS_DIR, device_meta, print_table, slug

HIDDEN, INTER, VOCAB, HEADS = 4096, 11008, 32000, 32

_CHILD = r"""
import json, sys, threading, time, warnings
warnings.filterwarnings("ignore")
import torch, transformers
from transformers import LlamaConfig, LlamaForCausalLM
LlamaForCausalLM(LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                             vocab_size=8))  # import the model classes before the baseline
import qlora_kernels as qk
from qlora_kernels import checkpoint as ck, nn as qnn
from qlora_kernels.model import model_memory
qk.quantize_nf4(torch.randn(64, 64))  # load the native kernels before the baseline
spent = {"quantize_s": 0.0}
def timed(f):
    def g(*a, **k):
        t = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            spent["quantize_s"] += time.perf_counter() - t
    return g
ck.quantize_nf4 = timed(ck.quantize_nf4)    # load_pretrained's quantize calls
qnn.quantize_nf4 = timed(qnn.quantize_nf4)  # prepare_model's (QLoRALinear.from_linear)
def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
import gc; gc.collect()
method, path, device = sys.argv[1], sys.argv[2], sys.argv[3]
base, peak, stop = rss(), [0], threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], rss()); time.sleep(0.001)
th = threading.Thread(target=sample, daemon=True); th.start()
t0 = time.perf_counter()
if method == "load_pretrained":
    model = qk.load_pretrained(path, device=device, verbose=False, progress=False)
elif method == "transformers+bnb":
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.bfloat16,
                                                              device_map=device)
elif method == "bf16 mmap load + quantize only":
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    spent["hf_load_s"] = time.perf_counter() - t0
    nf4 = [ck.quantize_nf4(model.get_submodule(name).weight.detach(), blocksize=64, double_quant=True)
           for name in qk.model.find_target_modules(model, "all-linear")]  # kept: the peak counts them
    model = None  # not a usable model: no model bytes, no bound
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    spent["hf_load_s"] = time.perf_counter() - t0
    qk.prepare_model(model, verbose=False)
if device == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
stop.set(); th.join(); peak[0] = max(peak[0], rss())
print("RESULT " + json.dumps({"seconds": seconds, "peak_anon": peak[0] - base,
                              "model_bytes": model_memory(model) if model is not None else None,
                              "gpu_peak": torch.cuda.max_memory_allocated() if device == "cuda" else None,
                              **{k: v for k, v in spent.items() if v}}))
"""


def write_checkpoint(root: Path, layers: int) -> int:
    """Synthetic Llama-7B-shaped bf16 checkpoint, one shard per layer; returns the largest tensor's bytes."""
    import transformers
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                                      num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
                                      tie_word_embeddings=False, dtype="bfloat16")
    config.save_pretrained(root)
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
    shards = [{"model.embed_tokens.weight": rand(VOCAB, HIDDEN)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shards.append({
            p + "self_attn.q_proj.weight": rand(HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": rand(HIDDEN, HIDDEN),
            p + "self_attn.v_proj.weight": rand(HIDDEN, HIDDEN), p + "self_attn.o_proj.weight": rand(HIDDEN, HIDDEN),
            p + "mlp.gate_proj.weight": rand(INTER, HIDDEN), p + "mlp.up_proj.weight": rand(INTER, HIDDEN),
            p + "mlp.down_proj.weight": rand(HIDDEN, INTER),
            p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        })
    shards.append({"model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16), "lm_head.weight": rand(VOCAB, HIDDEN)})
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(root / name), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * 2
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    return VOCAB * HIDDEN * 2


def run_child(method: str, path: Path, device: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, method, str(path), device], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}


def warm_page_cache(root: Path) -> float:
    """Read every shard once (the same warm page cache for every run); returns the seconds it took."""
    t0 = time.perf_counter()
    for f in sorted(root.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.read(1 << 24):
                pass
    return time.perf_counter() - t0


METHODS = (("load_pretrained", None), ("transformers+bnb", "bnb"), ("bf16 load + prepare_model", "dense"),
           ("bf16 mmap load + quantize only", "floor"))


def summarize(case: str, method: str, runs: list, largest: int) -> dict:
    row = {"case": case, "impl": method, "runs": len(runs)}
    ok = [r for r in runs if "error" not in r]
    if not ok:
        row["error"] = runs[-1]["error"]
        return row
    secs = sorted(r["seconds"] for r in ok)
    peak = max(r["peak_anon"] for r in ok)
    row.update(seconds=statistics.median(secs), seconds_min=secs[0], seconds_max=secs[-1],
               peak_anon_MB=peak / 1e6, load_avg_1min=[round(r["load_avg_1min"], 2) for r in ok])
    for key in ("quantize_s", "hf_load_s"):
        if any(key in r for r in ok):
            row[key] = statistics.median(r.get(key, 0.0) for r in ok)
    if ok[0].get("model_bytes") is not None:
        bound = 1.15 * (ok[0]["model_bytes"] + largest)
        row.update(model_MB=ok[0]["model_bytes"] / 1e6, bound_MB=bound / 1e6, within_bound=peak <= bound)
    if ok[0].get("gpu_peak"):
        row["gpu_peak_MB"] = max(r["gpu_peak"] for r in ok) / 1e6
    return row


COLS = ("case", "impl", "runs", "seconds", "seconds_min", "seconds_max", "quantize_s", "hf_load_s", "peak_anon_MB",
        "model_MB", "bound_MB", "within_bound", "gpu_peak_MB", "error")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=7, help="decoder layers (7: about 3.3 GB bf16)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the methods take turns in each")
    parser.add_argument("--bnb-repeats", type=int, default=1, help="rounds that include transformers+bnb (slow)")
    parser.add_argument("--keep", default=None, help="write the checkpoint here and keep it")
    parser.add_argument("--skip", default="", help="comma-separated: bnb, dense, floor")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    skip = set(filter(None, args.skip.split(",")))
    methods = [m for m, k in METHODS if k not in skip]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp) / "ckpt"
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        largest = write_checkpoint(root, args.layers)
        os.sync()  # no dirty pages of the checkpoint left to compete with the first reader
        size = sum(f.stat().st_size for f in root.glob("*.safetensors"))
        print(f"checkpoint: {args.layers} layers, {size / 1e9:.2f} GB bf16, written and synced in "
              f"{time.perf_counter() - t0:.1f} s")
        case = f"{args.layers}L {size / 1e9:.2f}GB"
        runs = {m: [] for m in methods}
        for round_ in range(args.repeats):
            turn = [m for m in methods if m != "transformers+bnb" or round_ < args.bnb_repeats]
            turn = turn[round_ % len(turn):] + turn[: round_ % len(turn)]  # rotate who goes first
            for method in turn:
                warm = warm_page_cache(root)
                load = os.getloadavg()[0]
                res = run_child(method, root, device)
                res["load_avg_1min"] = load
                runs[method].append(res)
                shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}
                print(f"round {round_ + 1}: {method}: {shown} (cache warmed in {warm:.1f} s)", flush=True)
        rows = [summarize(case, m, runs[m], largest) for m in methods]
    print()
    print_table(rows, cols=COLS)
    meta = device_meta(torch.device(device))
    meta.update(repeats=args.repeats, bnb_repeats=args.bnb_repeats, layers=args.layers,
                checkpoint_bytes=size, largest_tensor_bytes=largest)
    out_dir = Path(args.out) if args.out else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"load-{slug(meta['device'])}.json"
    path.write_text(json.dumps({"family": "load", "meta": meta, "rows": rows}, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
