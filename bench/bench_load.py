"""Loading a checkpoint into NF4: load_pretrained vs transformers + bitsandbytes vs bf16 load + prepare_model.

    python bench/bench_load.py [--layers 7] [--keep DIR] [--out DIR] [--skip bnb,dense]

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
"""

from __future__ import annotations

import argparse
import json
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
from qlora_kernels.model import model_memory
qk.quantize_nf4(torch.randn(64, 64))  # load the native kernels before the baseline
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
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    qk.prepare_model(model, verbose=False)
if device == "cuda":
    torch.cuda.synchronize()
seconds = time.perf_counter() - t0
stop.set(); th.join(); peak[0] = max(peak[0], rss())
print("RESULT " + json.dumps({"seconds": seconds, "peak_anon": peak[0] - base, "model_bytes": model_memory(model),
                              "gpu_peak": torch.cuda.max_memory_allocated() if device == "cuda" else None}))
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=7, help="decoder layers (7: about 3.3 GB bf16)")
    parser.add_argument("--keep", default=None, help="write the checkpoint here and keep it")
    parser.add_argument("--skip", default="", help="comma-separated: bnb, dense")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    skip = set(filter(None, args.skip.split(",")))
    methods = ["load_pretrained"] + [m for m, k in (("transformers+bnb", "bnb"), ("bf16 load + prepare_model", "dense"))
                                     if k not in skip]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.keep) if args.keep else Path(tmp) / "ckpt"
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        largest = write_checkpoint(root, args.layers)
        size = sum(f.stat().st_size for f in root.glob("*.safetensors"))
        print(f"checkpoint: {args.layers} layers, {size / 1e9:.2f} GB bf16, written in {time.perf_counter() - t0:.1f} s")
        rows = []
        for method in methods:
            res = run_child(method, root, device)
            row = {"case": f"{args.layers}L {size / 1e9:.2f}GB", "impl": method}
            if "error" in res:
                row["error"] = res["error"]
            else:
                bound = 1.15 * (res["model_bytes"] + largest)
                row.update(seconds=res["seconds"], peak_anon_MB=res["peak_anon"] / 1e6,
                           model_MB=res["model_bytes"] / 1e6, bound_MB=bound / 1e6,
                           within_bound=res["peak_anon"] <= bound)
                if res.get("gpu_peak"):
                    row["gpu_peak_MB"] = res["gpu_peak"] / 1e6
            rows.append(row)
            print_table(rows[-1:], cols=("impl", "seconds", "peak_anon_MB", "model_MB", "bound_MB", "within_bound",
                                         "gpu_peak_MB", "error"))
    print()
    print_table(rows, cols=("case", "impl", "seconds", "peak_anon_MB", "model_MB", "bound_MB", "within_bound",
                            "gpu_peak_MB", "error"))
    meta = device_meta(torch.device(device))
    out_dir = Path(args.out) if args.out else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"load-{slug(meta['device'])}.json"
    path.write_text(json.dumps({"family": "load", "meta": meta, "rows": rows}, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
