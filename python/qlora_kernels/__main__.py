"""Command line: `python -m qlora_kernels demo | info`."""

from __future__ import annotations

import argparse
import json
import sys

USAGE = """usage: python -m qlora_kernels <command> [options]

commands:
  demo    quantize all-MiniLM-L6-v2 to NF4, fine-tune LoRA adapters on a small task, save and reload them
          (offline; about a minute on a laptop CPU). Options: --steps N --batch-size B --r R --alpha A --lr LR
          --out DIR (keep the adapter) --device cpu|cuda --seed S
          --fsdp: shard over the processes of `torchrun --nproc-per-node N -m qlora_kernels demo --fsdp`
  info    print which backends are live (native CPU / CUDA kernels, Triton, reference) and versions
"""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "info":
        import warnings

        warnings.filterwarnings("ignore", message=".*native extension _C not available.*")
        from . import backend_info

        print(json.dumps(backend_info(), indent=2))
        return 0
    if command == "demo":
        parser = argparse.ArgumentParser(prog="python -m qlora_kernels demo")
        parser.add_argument("--steps", type=int, default=30)
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--r", type=int, default=8)
        parser.add_argument("--alpha", type=float, default=16)
        parser.add_argument("--lr", type=float, default=3e-3)
        parser.add_argument("--out", default=None, help="directory to keep the saved adapter in")
        parser.add_argument("--device", default=None)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--fsdp", action="store_true", help="FSDP2 over the processes of a torchrun job")
        args = parser.parse_args(rest)
        from .demo import run

        result = run(steps=args.steps, batch_size=args.batch_size, r=args.r, alpha=args.alpha, lr=args.lr,
                     out=args.out, device=args.device, seed=args.seed, fsdp=args.fsdp)
        return 0 if result["reload_max_diff"] == 0.0 else 1
    print(f"unknown command {command!r}\n", file=sys.stderr)
    print(USAGE, end="", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
