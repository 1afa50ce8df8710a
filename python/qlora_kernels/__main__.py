"""Command line: `python -m qlora_kernels demo | info`."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

USAGE = """usage: python -m qlora_kernels <command> [options]

commands:
  demo    quantize all-MiniLM-L6-v2 to NF4, fine-tune LoRA adapters on a small task, save and reload them
          (offline; about a minute on a laptop CPU). Options: --steps N --batch-size B --r R --alpha A --lr LR
          --out DIR (keep the adapter) --device cpu|cuda --seed S
          --fsdp: shard over the processes of `torchrun --nproc-per-node N -m qlora_kernels demo --fsdp`
  info    print what is compiled and what is usable here (CPU SIMD path, CUDA kernels, Triton) and versions
  plan    CONFIG [--gpu SIZE] [--seq N] [--batch N] [--r R] [--optimizer NAME] [--no-gradient-checkpointing]
          [--dtype D] [--adapter-dtype D] [--device cuda|cpu] [--quiet]
          the memory of one QLoRA training step, term by term, and what fits the GPU (--gpu: GB = GiB; a
          bare number is GB). CONFIG: a preset (llama-7b, llama-13b, llama-33b, llama-65b, llama-3-8b,
          llama-3-70b), config.json or a model directory. Defaults: qlora_kernels.planner.PLAN_DEFAULTS
          (the QLoRA paper's recipe), printed with the plan; `plan --help` lists every option
"""


def _positive(kind, name):
    """argparse type: a number of `kind` > 0, with an error naming the option."""
    what = "an integer" if kind is int else "a finite number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{name} must be {what} > 0, got {text!r}")
        return value
    return parse


def _device(text):
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"--device must be cpu or cuda[:N], got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"--device must be cpu or cuda[:N], got {text!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"--device {text}: no CUDA device is visible to torch {torch.__version__}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return str(device)


def _out_dir(text):
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"--out {text!r} exists and is not a directory")
    return text


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
        parser.add_argument("--steps", type=_positive(int, "--steps"), default=30)
        parser.add_argument("--batch-size", type=_positive(int, "--batch-size"), default=32)
        parser.add_argument("--r", type=_positive(int, "--r"), default=8)
        parser.add_argument("--alpha", type=_positive(float, "--alpha"), default=16)
        parser.add_argument("--lr", type=_positive(float, "--lr"), default=3e-3)
        parser.add_argument("--out", type=_out_dir, default=None, help="directory to keep the saved adapter in")
        parser.add_argument("--device", type=_device, default=None)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--fsdp", action="store_true", help="FSDP2 over the processes of a torchrun job")
        args = parser.parse_args(rest)
        from .demo import run

        result = run(steps=args.steps, batch_size=args.batch_size, r=args.r, alpha=args.alpha, lr=args.lr,
                     out=args.out, device=args.device, seed=args.seed, fsdp=args.fsdp)
        return 0 if result["reload_max_diff"] == 0.0 else 1
    if command == "plan":
        return _plan(rest)
    print(f"unknown command {command!r}\n", file=sys.stderr)
    print(USAGE, end="", file=sys.stderr)
    return 2


def _gpu_size(text):
    """--gpu: '48GB' / '80GiB' / '500MB', or a bare number read as GB (GiB); > 0."""
    from .planner import parse_bytes

    try:
        bare = float(text)
    except ValueError:
        bare = None
    try:
        return parse_bytes(f"{text}GB" if bare is not None else text, name="--gpu")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _plan(rest) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*native extension _C not available.*")
    import torch

    from .planner import PLAN_DEFAULTS as D

    dtypes = ["bfloat16", "float16", "float32"]
    name = lambda dt: str(dt).replace("torch.", "")  # noqa: E731
    parser = argparse.ArgumentParser(
        prog="python -m qlora_kernels plan",
        description="The device memory of one QLoRA training step, term by term, and what fits --gpu. Defaults: "
                    "qlora_kernels.planner.PLAN_DEFAULTS (plan_memory's too), printed with the plan. Progress "
                    "goes to stderr.")
    parser.add_argument("config", help="preset name, config.json or model directory")
    parser.add_argument("--seq", type=_positive(int, "--seq"), default=D["seq_len"],
                        help="sequence length (tokens; default %(default)s)")
    parser.add_argument("--batch", type=_positive(int, "--batch"), default=D["batch_size"],
                        help="sequences per micro-batch (default %(default)s)")
    parser.add_argument("--r", type=_positive(int, "--r"), default=D["r"], help="LoRA rank (default %(default)s)")
    parser.add_argument("--gpu", type=_gpu_size, default=None,
                        help="device memory: 48GB, 80GiB, 500MB (GB = GiB); a bare number is GB (48 = 48 GiB)")
    parser.add_argument("--optimizer", default=D["optimizer"], help="default %(default)s")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        default=D["gradient_checkpointing"], help="non-reentrant, per decoder layer")
    parser.add_argument("--dtype", default=name(D["compute_dtype"]), choices=dtypes,
                        help="compute dtype (default %(default)s)")
    parser.add_argument("--adapter-dtype", default=name(D["adapter_dtype"]), choices=dtypes,
                        help="LoRA weights' dtype (default %(default)s)")
    parser.add_argument("--target-modules", default=D["target_modules"],
                        help="all-linear, or comma-separated names (default %(default)s)")
    parser.add_argument("--quantize", default=D["quantize"],
                        help="the Linears stored in NF4 apart from the LoRA targets: all-linear (default: every "
                             "Linear but lm_head, whatever the adapters target), targets, or comma-separated names")
    parser.add_argument("--blocksize", type=_positive(int, "--blocksize"), default=D["blocksize"],
                        help="NF4 block size (default %(default)s)")
    parser.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=D["double_quant"],
                        help="quantize the NF4 scales too")
    parser.add_argument("--device", default=D["device"], choices=["cuda", "cpu"])
    parser.add_argument("--foreach", default="default", choices=["default", "on", "off"],
                        help="torch AdamW's multi-tensor implementation for torch's optimizer names (default: "
                             "torch's own choice for --device, foreach on cuda)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(rest)

    from . import planner

    targets = args.target_modules if args.target_modules == "all-linear" else args.target_modules.split(",")
    try:
        quantize = args.quantize if args.quantize in ("all-linear", "targets") else args.quantize.split(",")
        plan = planner.plan_memory(args.config, r=args.r, target_modules=targets, quantize=quantize, seq_len=args.seq,
                                   batch_size=args.batch, optimizer=args.optimizer,
                                   gradient_checkpointing=args.gradient_checkpointing,
                                   compute_dtype=getattr(torch, args.dtype),
                                   adapter_dtype=getattr(torch, args.adapter_dtype),
                                   blocksize=args.blocksize, double_quant=args.double_quant,
                                   device=args.device, device_memory=args.gpu,
                                   foreach={"default": None, "on": True, "off": False}[args.foreach],
                                   progress=not args.quiet)
    except (ValueError, TypeError) as exc:
        print(f"plan: {exc}", file=sys.stderr)
        return 2
    print(plan.table())
    return 0 if plan.fits in (None, True) else 1


if __name__ == "__main__":
    sys.exit(main())
