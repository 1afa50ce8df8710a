"""plan_memory: what a QLoRA training step needs on one device, before any weight is loaded.

Static terms are counted from the model's real module tree built on the meta device (transformers' classes
from a config, target Linear modules swapped for QLoRALinear): NF4 weights and scales, dense modules, LoRA
weights, their gradients, optimizer states. Activations are not guessed from a per-architecture formula:
one training step (forward with labels, backward) of the same module tree runs on fake tensors (no data,
no compute) under a tracker of live tensor storages, with 2 and 3 decoder layers; the per-layer difference
extrapolates to the full depth (decoder layers are identical). The optimizer step is simulated the same way:
the optimizer the name stands for steps twice on the fake LoRA parameters and their gradients under the
tracker, which gives its states (what is left after a step) and the temporaries of a step (its peak above
that), for torch's foreach, fused and single-tensor AdamW alike. The same tracker measures real steps on the
CPU, which is how the planner is validated (tests/test_planner.py, bench/bench_plan.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .checkpoint import enable_activation_checkpointing
from .model import find_quantize_modules, find_target_modules
from .nn import NF4Linear, QLoRALinear
from .weight import NF4Weight

__all__ = ["plan_memory", "MemoryPlan", "LiveTensorTracker", "PRESETS", "OPTIMIZERS", "PLAN_DEFAULTS",
           "parse_bytes", "make_optimizer"]

GiB = 2**30

# Published dimensions (LLaMA paper table 2 / Meta's Llama 3 configs). vocab_size and the rest as released.
_LLAMA1 = dict(model_type="llama", vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-6,
               hidden_act="silu", tie_word_embeddings=False)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
               hidden_act="silu", tie_word_embeddings=False, rope_theta=500000.0, num_key_value_heads=8)
PRESETS = {
    "llama-7b": dict(_LLAMA1, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama-13b": dict(_LLAMA1, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "llama-33b": dict(_LLAMA1, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60, num_attention_heads=52),
    "llama-65b": dict(_LLAMA1, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64),
    "llama-3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "llama-3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64),
}

# Mixture-of-experts models: their published config.json values (Hugging Face hub: Qwen/Qwen3-30B-A3B,
# Qwen/Qwen3-235B-A22B, mistralai/Mixtral-8x7B-v0.1, openai/gpt-oss-20b); transformers' defaults for the rest.
# Their experts become NF4Experts (experts.py): NF4 per expert and, under "all-linear", per-expert LoRA.
_QWEN3_MOE = dict(model_type="qwen3_moe", vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6,
                  hidden_act="silu", tie_word_embeddings=False, rope_theta=1000000.0, head_dim=128,
                  num_key_value_heads=4, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                  decoder_sparse_step=1, mlp_only_layers=[])
PRESETS.update({
    "qwen3-30b-a3b": dict(_QWEN3_MOE, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32),
    "qwen3-235b-a22b": dict(_QWEN3_MOE, hidden_size=4096, intermediate_size=12288, moe_intermediate_size=1536,
                            num_hidden_layers=94, num_attention_heads=64),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5,
                         hidden_act="silu", tie_word_embeddings=False, rope_theta=1000000.0, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2),
    "gpt-oss-20b": dict(model_type="gpt_oss", vocab_size=201088, max_position_embeddings=131072, rms_norm_eps=1e-5,
                        tie_word_embeddings=False, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                        num_experts_per_tok=4, sliding_window=128, swiglu_limit=7.0, rope_theta=150000.0,
                        layer_types=["sliding_attention", "full_attention"] * 12),
})

# Optimizer states per trainable parameter (the layout `_optimizer_state_bytes` writes down; the plan itself
# simulates the step, see _simulate_optimizer). "8bit": bitsandbytes' blockwise states (blocks of 256, one float32
# absmax per block per state; tensors under 4096 elements keep float32 states). "paged": the states live in
# CUDA managed memory; they are counted on the device (where they sit when it has room).
OPTIMIZERS = {
    "adamw_torch": ("param", False), "adamw_torch_fused": ("param", False), "adamw_hf": ("param", False),
    "adamw": ("param", False), "paged_adamw_32bit": ("fp32", True), "adamw_bnb_32bit": ("fp32", False),
    "adamw_32bit": ("fp32", False), "paged_adamw_8bit": ("8bit", True), "adamw_8bit": ("8bit", False),
    "adamw_bnb_8bit": ("8bit", False), "sgd": ("none", False),
    # this package's optimizers (qlora_kernels.optim)
    "AdamW8bit": ("8bit", False), "PagedAdamW": ("fp32", True), "PagedAdamW8bit": ("8bit", True),
}

# Allowance on a CUDA device for what max_memory_allocated does not show: the CUDA context, cuBLAS and Triton
# workspaces (about 0.5-1 GiB on recent GPUs), and the caching allocator's fragmentation.
CUDA_CONTEXT_BYTES = 1 * GiB
FRAGMENTATION = 0.05


# The plan's defaults, in one place (plan_memory's keyword defaults and the `plan` command's options both read
# them; the plan's first lines print every setting): the QLoRA paper's recipe (r = 64 on every Linear but
# lm_head, seq 512 x batch 1, gradient checkpointing, paged 32-bit AdamW), bf16 compute and this package's
# float32 adapters, NF4 with blocksize 64 and double quantization, on a CUDA device.
PLAN_DEFAULTS = dict(r=64, target_modules="all-linear", quantize="all-linear", seq_len=512, batch_size=1, optimizer="paged_adamw_32bit",
                     gradient_checkpointing=True, compute_dtype=torch.bfloat16, adapter_dtype=torch.float32,
                     blocksize=64, double_quant=True, device="cuda")

_UNITS = (("TIB", 2**40), ("TB", 2**40), ("T", 2**40), ("GIB", GiB), ("GB", GiB), ("G", GiB), ("MIB", 2**20),
          ("MB", 2**20), ("M", 2**20), ("KIB", 2**10), ("KB", 2**10), ("K", 2**10), ("B", 1))


def parse_bytes(size, name: str = "device_memory") -> int:
    """A memory size in bytes, > 0. '48GB' / '48GiB' / '500MB' / '1.5T' (GB and GiB both mean 2**30, as GPU
    memory is quoted), or an int / float of bytes. A string needs its unit: '48' is refused (48 bytes or 48 GB?);
    the `plan` command reads a bare number as GB itself. Raises ValueError naming `name`."""
    if isinstance(size, bool):
        raise ValueError(f"{name}: cannot read {size!r} as a size (e.g. '48GB', '80GiB', 51539607552)")
    if isinstance(size, (int, float)):
        value = size
    else:
        s = str(size).strip().upper().replace(" ", "")
        unit = next(((u, m) for u, m in _UNITS if s.endswith(u)), None)
        try:
            value = float(s[: -len(unit[0])]) * unit[1] if unit else float(s)
        except ValueError:
            raise ValueError(f"{name}: cannot read {size!r} as a size (e.g. '48GB', '80GiB', 51539607552)") from None
        if unit is None:
            raise ValueError(f"{name}: {size!r} has no unit; write e.g. '{s}GB' (GiB) or pass an int of bytes")
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{name} must be a size > 0, got {size!r}")
    return int(value)


# ------------------------------------------------------------------------------------------- the tracker
class LiveTensorTracker(TorchDispatchMode):
    """Bytes of live tensor storages: every storage an op returns counts until it is freed.

    `track(t)` adds tensors that exist already (parameters). `current` and `peak` in bytes. Ops of
    qlora_kernels implemented in Python on this device (the dequantize-to-scratch paths) are entered, so their
    scratch buffers count too, as a device allocator would see them.
    """

    def __init__(self, descend: Iterable = ()):
        super().__init__()
        self.live: dict = {}
        self.current = 0
        self.peak = 0
        self._descend = {op: fn for op, fn in descend}

    def track(self, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        n = storage.nbytes()
        self.live[key] = n
        self.current += n
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key) -> None:
        self.current -= self.live.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = self._descend.get(func._overloadpacket) if hasattr(func, "_overloadpacket") else None
        if impl is not None:
            with self:
                out = impl(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out


def scratch_ops() -> list:
    """(op, Python implementation) of the NF4 linear ops, for LiveTensorTracker(descend=...) on devices where
    they dequantize W into a scratch buffer (every path but the fused Triton kernels)."""
    from . import _ops

    return [(torch.ops.qlora.nf4_linear, _ops.nf4_linear._init_fn),
            (torch.ops.qlora.nf4_linear_dx, _ops.nf4_linear_dx._init_fn)]


# ------------------------------------------------------------------------------------------- model trees
def _load_config(config_or_model):
    import transformers

    if isinstance(config_or_model, nn.Module):
        return config_or_model.config if hasattr(config_or_model, "config") else None, config_or_model
    if isinstance(config_or_model, transformers.PretrainedConfig):
        return config_or_model, None
    if isinstance(config_or_model, dict):
        d = dict(config_or_model)
        return transformers.AutoConfig.for_model(d.pop("model_type", "llama"), **d), None
    if isinstance(config_or_model, (str, os.PathLike)):
        key = str(config_or_model)
        if key in PRESETS:
            return _load_config(PRESETS[key])
        p = Path(key)
        if p.is_dir():
            p = p / "config.json"
        if p.is_file():
            with open(p, encoding="utf-8") as fh:
                d = json.load(fh)
            d.pop("quantization_config", None)
            return _load_config(d)
        raise ValueError(f"config_or_model: {key!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json "
                         "or model directory")
    raise TypeError(f"config_or_model must be a preset name, a path, a dict, a transformers config or a model, "
                    f"got {type(config_or_model).__name__}")


def _meta_model(config, opts, num_layers: Optional[int] = None) -> nn.Module:
    """The prepared model on the meta device (optionally cut to `num_layers` decoder layers)."""
    import transformers

    if num_layers is not None:
        config = copy.deepcopy(config)
        config.num_hidden_layers = num_layers
        for attr in ("layer_types",):  # per-layer lists (sliding / full attention) follow the depth
            if isinstance(getattr(config, attr, None), list):
                setattr(config, attr, getattr(config, attr)[:num_layers])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=opts["compute_dtype"])
    _swap_targets(model, opts)
    return model


def _swap_targets(model, opts) -> list:
    from .experts import replace_experts, select_experts

    experts = select_experts(model, opts["target_modules"], None)  # MoE: NF4Experts (NF4 buffers on meta)
    replace_experts(model, experts, experts, r=opts["r"], alpha=16, use_rslora=False, blocksize=opts["blocksize"],
                    double_quant=opts["double_quant"], adapter_dtype=opts["adapter_dtype"])
    names = find_target_modules(model, opts["target_modules"])
    # the Linears quantized apart from the LoRA targets (quantize=, as prepare_model / NF4Config): NF4, frozen
    quantized = set(find_quantize_modules(model, opts.get("quantize", PLAN_DEFAULTS["quantize"]),
                                          opts.get("skip_modules", ()), names))
    for name in names + sorted(quantized):
        lin = model.get_submodule(name)
        if isinstance(lin, QLoRALinear):
            continue
        weight = NF4Weight.empty((lin.out_features, lin.in_features), dtype=opts["compute_dtype"],
                                 blocksize=opts["blocksize"], double_quant=opts["double_quant"])
        bias = None if lin.bias is None else torch.empty_like(lin.bias, device="meta")
        lora = name not in quantized
        model.set_submodule(name, QLoRALinear(weight, bias, r=opts["r"], alpha=16,
                                              adapter_dtype=opts["adapter_dtype"]) if lora else NF4Linear(weight, bias))
    for pname, p in model.named_parameters():
        p.requires_grad_(".lora_A." in pname or ".lora_B." in pname or pname.endswith((".lora_A", ".lora_B")))
    return names


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def make_optimizer(optimizer: str, params: list, device: str = "cuda", foreach: Optional[bool] = None):
    """The optimizer a name stands for, as the plan simulates it (and as a real step can be measured against).

    transformers' torch names are torch.optim.AdamW: "adamw_torch_fused" fused, the others foreach when
    `foreach` says so (None: torch's default, foreach on a CUDA device, single-tensor on the CPU). bitsandbytes'
    names are this package's optimizers with the same state layout and one fused kernel per tensor:
    the 32-bit ones PagedAdamW (paging moves the states, it does not change their bytes), the 8-bit ones
    AdamW8bit. "sgd" is torch.optim.SGD without momentum (no state), as transformers builds it.
    """
    from . import optim as qk_optim

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    kind, _ = OPTIMIZERS[optimizer]
    if kind == "none":
        return torch.optim.SGD(params, lr=1e-3)
    if kind == "param":
        if optimizer == "adamw_torch_fused":
            return torch.optim.AdamW(params, lr=1e-3, fused=True)
        return torch.optim.AdamW(params, lr=1e-3, foreach=(device == "cuda") if foreach is None else foreach)
    return (qk_optim.AdamW8bit if kind == "8bit" else qk_optim.PagedAdamW)(params, lr=1e-3)


def _optimizer_allocates_like_params(opt) -> bool:
    """torch.optim makes its states like the parameters (zeros_like: fake when they are) and reads its step
    counters on the host (.item(): impossible on a fake tensor), so it steps with the fake mode off; this
    package's optimizers allocate with torch.zeros(device=...) and step inside it."""
    return isinstance(opt, (torch.optim.AdamW, torch.optim.SGD))


def _simulate_optimizer(params: list, opts: dict, tracker: "LiveTensorTracker", fake) -> dict:
    """Two optimizer steps over `params` (their .grad set), the second one measured: the states it keeps
    (bytes alive after a step, counters included) and the temporaries of a step (its peak above them)."""
    opt = make_optimizer(opts["optimizer"], params, opts["device"], opts.get("foreach"))
    mode = contextlib.nullcontext() if _optimizer_allocates_like_params(opt) else fake
    before = tracker.current
    with mode, tracker:
        opt.step()  # creates the states
        states = tracker.current - before
        tracker.reset_peak()
        opt.step()
    temporaries = tracker.peak - tracker.current
    del opt
    return dict(states=states, step_temporaries=temporaries)


def _optimizer_state_bytes(params: list, optimizer: str) -> int:
    kind, _ = OPTIMIZERS[optimizer]
    total = 0
    for p in params:
        n = p.numel()
        if kind == "none":
            continue
        if kind == "param":  # torch AdamW: exp_avg, exp_avg_sq like the parameter, and a float32 step
            total += 2 * _nbytes(p) + 4
            continue
        if kind == "fp32" or (kind == "8bit" and n < 4096):
            total += 8 * n
        else:
            total += 2 * n + 2 * 4 * -(-n // 256)
        total += 16  # int64 step and skipped counters (qlora_kernels.optim)
    return total


# --------------------------------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    """Bytes of one QLoRA training step. `terms` (name -> bytes) add up to `total_bytes`.

    With a device_memory: `fits`, `max_seq_len` (at the plan's batch size; None when none fits) and
    `max_batch_size` (at its sequence length). `seq_len_cap` is the model's max_position_embeddings, the
    largest sequence the search tries (a max_seq_len equal to it is that cap, not the memory's limit);
    `batch_size_cap` the largest batch it tries. `notes`: what the table says below the figures (warnings)."""

    terms: dict
    total_bytes: int
    device_memory: Optional[int] = None
    fits: Optional[bool] = None
    max_seq_len: Optional[int] = None
    max_batch_size: Optional[int] = None
    settings: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    seq_len_cap: Optional[int] = None
    batch_size_cap: Optional[int] = None
    notes: list = field(default_factory=list)

    @property
    def tensor_bytes(self) -> int:
        """The total without the device allowance: what a live-tensor tracker (or max_memory_allocated) sees."""
        return self.total_bytes - self.terms.get("CUDA context + fragmentation allowance", 0)

    def table(self) -> str:
        gib = lambda b: b / GiB  # noqa: E731
        s = self.settings
        shown = {k: s[k] for k in PLAN_DEFAULTS if k in s}
        changed = [k for k, v in shown.items() if v != PLAN_DEFAULTS[k]]
        lines = [f"QLoRA memory plan: {s.get('model')}, r={s.get('r')}, seq {s.get('seq_len')} x batch "
                 f"{s.get('batch_size')}, {s.get('optimizer')}, gradient checkpointing "
                 f"{'on' if s.get('gradient_checkpointing') else 'off'}, {str(s.get('compute_dtype'))[6:]}, "
                 f"{s.get('device')}",
                 "  settings: " + ", ".join(f"{k}={_setting(v)}" for k, v in shown.items()),
                 "  " + ("all of them the defaults" if not changed else "not the defaults: " + ", ".join(
                     f"{k} (default {_setting(PLAN_DEFAULTS[k])})" for k in changed)),
                 f"  {'term':<44}{'GiB':>10}{'share':>8}"]
        for name, b in self.terms.items():
            lines.append(f"  {name:<44}{gib(b):>10.2f}{100 * b / max(1, self.total_bytes):>7.1f}%")
        lines.append(f"  {'total':<44}{gib(self.total_bytes):>10.2f}")
        if self.device_memory is not None:
            lines.append(f"  device memory {gib(self.device_memory):.2f} GiB: {'fits' if self.fits else 'does NOT fit'}")
            seq = str(self.max_seq_len) if self.max_seq_len else "none fits"
            if self.max_seq_len and self.max_seq_len == self.seq_len_cap:
                seq += " (the model's max_position_embeddings: its cap, not the memory's limit)"
            lines.append(f"  largest seq len at batch {s.get('batch_size')}: {seq}")
            batch = str(self.max_batch_size) if self.max_batch_size else "none fits"
            if self.max_batch_size and self.max_batch_size == self.batch_size_cap:
                batch += " (the search's limit; more may fit)"
            lines.append(f"  largest batch at seq len {s.get('seq_len')}: {batch}")
        c = self.counts
        lines.append(f"  ({c.get('nf4_params', 0) / 1e9:.2f} B params in NF4 over {c.get('nf4_layers', 0)} layers, "
                     f"{c.get('dense_params', 0) / 1e9:.3f} B dense, {c.get('lora_params', 0) / 1e6:.1f} M LoRA)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _setting(v) -> str:
    if isinstance(v, torch.dtype):
        return str(v).replace("torch.", "")
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return str(v)


_D = PLAN_DEFAULTS


def plan_memory(
    config_or_model,
    *,
    r: int = _D["r"],
    target_modules: Union[str, Iterable[str]] = _D["target_modules"],
    quantize: Union[str, Iterable[str]] = _D["quantize"],
    skip_modules: Iterable[str] = (),
    seq_len: int = _D["seq_len"],
    batch_size: int = _D["batch_size"],
    optimizer: str = _D["optimizer"],
    gradient_checkpointing: bool = _D["gradient_checkpointing"],
    compute_dtype: torch.dtype = _D["compute_dtype"],
    adapter_dtype: Optional[torch.dtype] = _D["adapter_dtype"],
    blocksize: int = _D["blocksize"],
    double_quant: bool = _D["double_quant"],
    device: str = _D["device"],
    device_memory=None,
    foreach: Optional[bool] = None,
    progress: bool = False,
) -> MemoryPlan:
    """Plan the device memory of one QLoRA training step (forward with labels, backward, optimizer step).

    The defaults are PLAN_DEFAULTS (the QLoRA paper's recipe: r = 64 on every Linear but lm_head, seq 512 x
    batch 1, gradient checkpointing, paged_adamw_32bit; bf16 compute, float32 adapters, on "cuda"), the same
    as the `python -m qlora_kernels plan` command's; the plan's table prints every setting.

    Args:
        config_or_model: a preset ("llama-7b", "llama-13b", "llama-33b", "llama-65b", "llama-3-8b",
            "llama-3-70b"; MoE: "qwen3-30b-a3b", "qwen3-235b-a22b", "mixtral-8x7b", "gpt-oss-20b", their
            experts in NF4 with per-expert LoRA), a config.json path or model directory, a dict or transformers
            config, or a model.
        r, target_modules, blocksize, double_quant: as load_pretrained / prepare_model.
        quantize, skip_modules: the Linears stored in NF4 apart from the LoRA targets, as prepare_model takes
            them ("all-linear": every Linear but the output head, whatever the adapters target; "targets":
            only the LoRA targets, the rest dense).
        seq_len, batch_size: tokens per sequence and sequences per step (per micro-batch). A seq_len beyond the
            model's max_position_embeddings is planned, with a warning (and a note in the table).
        optimizer: transformers' names ("adamw_torch", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit",
            ...) or this package's ("AdamW8bit", "PagedAdamW", "PagedAdamW8bit").
        gradient_checkpointing: transformers' non-reentrant activation checkpointing per decoder layer.
        compute_dtype / adapter_dtype: activations and dense modules / LoRA weights (float32 by default, as
            prepare_model stores them; None: compute_dtype).
        device: "cuda" (fused Triton linear, no dequantize scratch; adds the context + fragmentation allowance)
            or "cpu" (the native path dequantizes W to a scratch buffer; no allowance).
        device_memory: bytes (> 0) or "48GB" (GiB; a string needs its unit): fills fits, max_seq_len (up to
            max_position_embeddings) and max_batch_size (up to 65536), each found by bisection over simulated
            steps (the fit grows with both).
        foreach: torch AdamW's implementation (None: torch's default for `device`, foreach on "cuda"; its
            temporaries hold a float32 copy of every state at once, single-tensor ones only the largest).
        progress: print each simulated step and search probe to stderr (the command line does).
    Returns:
        MemoryPlan with terms (name -> bytes) summing to total_bytes.
    """
    import sys
    import time
    import warnings

    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size), ("r", r)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    dev_mem = None if device_memory is None else parse_bytes(device_memory)
    config, model = _load_config(config_or_model)
    if config is None:
        raise ValueError("config_or_model: a model without a transformers .config cannot be planned")
    opts = dict(r=r, target_modules=target_modules, quantize=quantize, skip_modules=skip_modules,
                blocksize=blocksize, double_quant=double_quant,
                compute_dtype=compute_dtype, adapter_dtype=adapter_dtype or compute_dtype, optimizer=optimizer,
                gradient_checkpointing=gradient_checkpointing, device=device, foreach=foreach)
    start = time.perf_counter()

    def say(msg):
        if progress:
            print(f"plan: {msg} [{time.perf_counter() - start:.1f} s]", file=sys.stderr, flush=True)

    cap = getattr(config, "max_position_embeddings", None)
    notes = []
    if cap and seq_len > cap:
        notes.append(f"seq_len {seq_len} is beyond the model's max_position_embeddings {cap}: planned as asked, "
                     "but the model was not trained on positions that far")
        warnings.warn(f"plan_memory: {notes[-1]}", stacklevel=2)
    static = _static_terms(config, opts)
    sim = _Simulator(config, opts)
    depth = config.num_hidden_layers
    say(f"simulating a step at seq {seq_len} x batch {batch_size} on fake tensors "
        f"({'all ' + str(depth) if depth <= 3 else '2 and 3 of ' + str(depth)} decoder layers)")
    terms, total = _assemble(static, sim.run(seq_len, batch_size), opts)
    plan = MemoryPlan(terms=terms, total_bytes=total, device_memory=dev_mem,
                      settings=dict(model=_model_name(config_or_model, config), r=r,
                                    target_modules=target_modules if isinstance(target_modules, str)
                                    else list(target_modules),
                                    quantize=quantize if isinstance(quantize, str) else list(quantize),
                                    seq_len=seq_len, batch_size=batch_size,
                                    optimizer=optimizer, gradient_checkpointing=gradient_checkpointing,
                                    compute_dtype=compute_dtype, adapter_dtype=opts["adapter_dtype"],
                                    blocksize=blocksize, double_quant=double_quant, device=device),
                      counts=static["counts"], notes=notes)
    if dev_mem is not None:
        plan.fits = total <= dev_mem
        total_at = lambda s, b: _assemble(static, sim.run(s, b), opts)[1]  # noqa: E731
        plan.seq_len_cap = cap or 1 << 20
        plan.batch_size_cap = MAX_BATCH
        gib = dev_mem / GiB
        say(f"searching the largest seq len at batch {batch_size} (multiples of {SEQ_GRANULARITY} up to "
            f"{plan.seq_len_cap}) that fits {gib:.2f} GiB")
        plan.max_seq_len = _largest(lambda n: total_at(n, batch_size), dev_mem, plan.seq_len_cap, SEQ_GRANULARITY,
                                    lambda n, t: say(f"  seq {n} x batch {batch_size}: {t / GiB:.2f} GiB, "
                                                     f"{'fits' if t <= dev_mem else 'too big'}"))
        say(f"searching the largest batch at seq len {seq_len} (up to {MAX_BATCH})")
        plan.max_batch_size = _largest(lambda n: total_at(seq_len, n), dev_mem, MAX_BATCH, 1,
                                       lambda n, t: say(f"  seq {seq_len} x batch {n}: {t / GiB:.2f} GiB, "
                                                        f"{'fits' if t <= dev_mem else 'too big'}"))
    say("done")
    return plan


SEQ_GRANULARITY = 64  # max_seq_len is reported as a multiple of this
MAX_BATCH = 1 << 16  # the batch search's upper end


def _largest(total_at, budget: int, limit: int, step: int, probed=None) -> Optional[int]:
    """Largest multiple n of `step` in [step, limit] with total_at(n) <= budget, None when `step` does not fit.
    total_at grows with n, so this equals a scan of every multiple; it costs O(log(limit / step)) calls.

    The search keeps a bracket: the largest size known to fit and the smallest known not to. A quadratic through
    three points (activations grow linearly in tokens, attention scores quadratically in sequence length) gives
    the first guess; then each probe is where the line through the bracket's ends (before there is an upper
    end: through the two largest fitting sizes) meets the budget, which lands on or next to the answer when the
    total is near-linear, as it is in the batch. A probe that leaves more than half of the bracket is followed
    by a bisection, and after two extrapolations in a row that both fit the next probe at least doubles, so a
    total of any shape still takes O(log) probes. `probed(n, total)` is told of every call."""
    seen = {}

    def y(k):  # the total at n = k * step
        if k not in seen:
            seen[k] = total_at(k * step)
            if probed is not None:
                probed(k * step, seen[k])
        return seen[k]

    top = limit // step
    if top < 1 or y(1) > budget:
        return None
    lo, hi = 1, top + 1  # y(lo) <= budget; hi does not fit (top + 1: past the limit, never probed)

    def probe(k):
        nonlocal lo, hi
        if y(k) <= budget:
            lo = max(lo, k)
        else:
            hi = min(hi, k)

    ks = sorted({1, min(2, top), min(4, top)})
    for k in ks:
        probe(k)
    if hi - lo <= 1:
        return lo * step
    k = None
    if len(ks) == 3:  # Newton form of the quadratic through the three points
        ys = [float(seen[k]) for k in ks]
        d1 = (ys[1] - ys[0]) / (ks[1] - ks[0])
        d2 = ((ys[2] - ys[1]) / (ks[2] - ks[1]) - d1) / (ks[2] - ks[0])
        a, b, c = d2, d1 - d2 * (ks[0] + ks[1]), ys[0] - d1 * ks[0] + d2 * ks[0] * ks[1] - budget
        if abs(a) < 1e-12:
            root = -c / b if b > 0 else None
        else:
            disc = b * b - 4 * a * c
            root = (-b + math.sqrt(disc)) / (2 * a) if disc >= 0 else None
        if root is not None and math.isfinite(root):
            k = int(min(max(math.floor(root), lo + 1), hi - 1))
    fits_in_a_row = 0  # line extrapolations (no upper end yet) that fitted
    while hi - lo > 1:
        from_line = k is None
        if from_line:
            if hi <= top:  # a bracket: the line through its ends
                x0, x1 = lo, hi
            else:  # no upper end yet: the line through the two largest fitting sizes
                x0, x1 = sorted(x for x, v in seen.items() if v <= budget)[-2:]
            y0, y1 = float(seen[x0]), float(seen[x1])
            if y1 > y0:
                k = math.floor(x0 + (budget - y0) * (x1 - x0) / (y1 - y0))
            else:  # flat: the line says nothing
                k = (lo + hi) // 2 if hi <= top else 2 * lo
            if hi > top and fits_in_a_row >= 2:  # the line keeps falling short: at least double
                k = max(k, 2 * lo)
            k = min(max(k, lo + 1), hi - 1)
        width, unbracketed = hi - lo, hi > top
        probe(k)
        fits_in_a_row = fits_in_a_row + 1 if from_line and unbracketed and hi > top else 0
        k = (lo + hi) // 2 if hi <= top and 2 * (hi - lo) > width and not unbracketed else None
    return lo * step


def _model_name(arg, config) -> str:
    if isinstance(arg, str) and arg in PRESETS:
        return arg
    if isinstance(arg, (str, os.PathLike)):
        return str(arg)
    return getattr(config, "_name_or_path", None) or getattr(config, "model_type", "model")


def _static_terms(config, opts) -> dict:
    model = _meta_model(config, opts)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}  # QLoRALinear included
    from .experts import experts_modules

    expert_weights = [w for e in experts_modules(model).values() for w in e.projections.values()]
    expert_nf4 = [t for w in expert_weights for t in w.nf4_tensors() if t is not None]
    nf4 = sum(m.weight.nbytes for m in layers.values()) + sum(w.nbytes for w in expert_weights)
    lora = [p for n, p in model.named_parameters() if p.requires_grad]
    seen, dense, dense_params = set(), 0, 0
    lora_ids = {id(p) for p in lora}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen or id(t) in lora_ids:
            continue
        seen.add(id(t))
        if any(t is b for m in layers.values() for b in (m.weight_packed, m.weight_absmax,
                                                          m.weight_nested_absmax, m.weight_offset)):
            continue
        if any(t is b for b in expert_nf4):
            continue
        dense += _nbytes(t)
        dense_params += t.numel() if t.is_floating_point() else 0
    lora_bytes = sum(_nbytes(p) for p in lora)
    return dict(nf4=nf4, dense=dense, lora=lora_bytes, grads=lora_bytes,
                states=_optimizer_state_bytes(lora, opts["optimizer"]),
                largest_lora=max((_nbytes(p) for p in lora), default=0),
                counts=dict(nf4_params=sum(m.in_features * m.out_features for m in layers.values())
                            + sum(w.numel for w in expert_weights),
                            # nested scales and offsets: what FSDP2 leaves replicated (distributed.py)
                            nf4_replicated_bytes=sum(_nbytes(t) for m in layers.values()
                                                     for t in (m.weight_nested_absmax, m.weight_offset)
                                                     if t is not None),
                            nf4_layers=len(layers), dense_params=dense_params,
                            lora_params=sum(p.numel() for p in lora), num_layers=config.num_hidden_layers))


def _assemble(static, act, opts) -> tuple:
    terms = {
        "NF4 weights + scales": static["nf4"],
        "dense modules (embeddings, norms, lm_head)": static["dense"],
        "LoRA weights": static["lora"],
        "LoRA gradients": static["grads"],
        f"optimizer states ({opts['optimizer']})": act["states"],
        "saved activations" + (" (checkpointed)" if opts["gradient_checkpointing"] else ""): act["saved"],
        "logits and loss": act["logits"],
        "backward peak over the above (net)": act["transient"],
        # the step runs after backward freed the activations: it raises the peak only by what its temporaries
        # exceed the activation terms above by
        "optimizer step temporaries beyond that": max(
            0, act["step_temporaries"] - act["saved"] - act["logits"] - act["transient"]),
    }
    if opts["device"] == "cuda":
        tensors = sum(terms.values())
        terms["CUDA context + fragmentation allowance"] = CUDA_CONTEXT_BYTES + int(FRAGMENTATION * tensors)
    return terms, sum(terms.values())


class _Simulator:
    """Runs forward + backward of a cut-down model (2 and 3 decoder layers) on fake tensors under the
    tracker, and extrapolates to the full depth."""

    def __init__(self, config, opts):
        self.config, self.opts = config, opts
        self.cache = {}
        self.depth = config.num_hidden_layers

    def run(self, seq_len, batch_size) -> dict:
        key = (seq_len, batch_size)
        if key not in self.cache:
            if self.depth <= 3:
                step = self._step(self.depth, seq_len, batch_size)
                peak = step.pop("peak")
            else:  # layer 0 differs (its input needs no gradient); from 2 layers on, each adds the same
                a, b = self._step(2, seq_len, batch_size), self._step(3, seq_len, batch_size)
                step = {k: a[k] + (self.depth - 2) * (b[k] - a[k]) for k in a if k not in ("peak", "windows")}
                # The step's peak is the max over its phases, and where it falls moves with depth (e.g. LoRA
                # gradients that outgrow the checkpoints their layers' backward frees push it to the end of
                # backward): each phase's own peak is linear in depth, their max is not. A middle layer's
                # backward peak lies between the first and the last layer's (linear in its position).
                peak = max(a["windows"][w] + (self.depth - 2) * (b["windows"][w] - a["windows"][w])
                           for w in a["windows"])
            step.pop("windows", None)
            step["transient"] = peak - step["saved"] - step["logits"] - step["grads"]
            self.cache[key] = step
        return self.cache[key]

    def _step(self, layers, seq_len, batch_size) -> dict:
        from torch._subclasses.fake_tensor import FakeTensorMode

        opts = self.opts
        model = _meta_model(self.config, opts, layers)
        fake = FakeTensorMode(allow_non_fake_inputs=True)  # torch's optimizers keep step counters real
        with fake:
            for module in model.modules():
                for store in (module._parameters, module._buffers):
                    for name, t in list(store.items()):
                        if t is None:
                            continue
                        f = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
                        store[name] = nn.Parameter(f, requires_grad=t.requires_grad) if isinstance(
                            t, nn.Parameter) else f
            vocab = self.config.vocab_size
            ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="cpu")
        for m in model.modules():
            if isinstance(m, NF4Linear):
                m._weight_cache = None
        model.train()
        if opts["gradient_checkpointing"]:
            enable_activation_checkpointing(model)
        head = model.get_output_embeddings()
        tracker = LiveTensorTracker(descend=scratch_ops() if opts["device"] == "cpu" else ())
        for t in list(model.parameters()) + list(model.buffers()):
            tracker.track(t)
        base = tracker.current
        marks = {}

        def mark_head(*_):  # activations saved up to the output head; the rest of forward is logits and loss
            marks.setdefault("head", tracker.current)

        # Peaks of the step's phases, each linear in depth (_Simulator.run): the forward, backward up to the last
        # decoder layer ("head"), the last layer's backward ("first"), the first layer's ("last"), the rest
        # ("tail"). A hook on a layer's output fires when its gradient arrives: that layer's backward starts.
        order = []

        def close_window(name):
            def on_grad(grad):
                order.append((name, tracker.peak))
                tracker.reset_peak()
            return on_grad

        def watch_output(name):
            def hook(module, args, output):
                t = output[0] if isinstance(output, (tuple, list)) else output
                if isinstance(t, torch.Tensor) and t.requires_grad and torch.is_grad_enabled():
                    t.register_hook(close_window(name))
            return hook

        decoder = _decoder_layers(model)
        hooks = [head.register_forward_pre_hook(mark_head)]
        hooks += [m.register_forward_hook(watch_output(i)) for i, m in enumerate(decoder)]
        hooks.append(model.get_input_embeddings().register_forward_hook(watch_output("embed")))
        with fake, tracker, _eager_transformers():
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            forward_end = tracker.current
            forward_peak = tracker.peak
            tracker.reset_peak()
            loss.backward()
        for h in hooks:
            h.remove()
        del vocab
        grads = sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None)
        saved = marks["head"] - base
        logits = forward_end - marks["head"]
        # order: the gradient of layer i's output arrives when layer i's backward starts, closing the window
        # before it (layer i + 1's backward, or the head for the last layer). A trainable embedding's output
        # closes layer 0's; with a frozen one, backward ends with layer 0 (it is then the last window). A
        # checkpointed layer's recomputation registers hooks too, on tensors whose gradient never arrives.
        closed = dict(order)
        n = len(decoder)
        if not set(range(n)) <= set(closed):
            raise RuntimeError(f"planner: the backward pass reached decoder layers {sorted(map(str, closed))} of {n}")
        end = closed.get("embed", tracker.peak)  # layer 0's backward
        windows = {"forward": forward_peak, "head": closed[n - 1], "first": closed[n - 2] if n > 1 else end,
                   "last": end, "tail": tracker.peak}
        peak = max(forward_peak, tracker.peak, *closed.values())
        # relative to what persists (weights); the "transient" term is the peak above the other terms (net: it
        # is negative when LoRA gradients not yet allocated at the peak outweigh the transients)
        windows = {k: v - base for k, v in windows.items()}
        del loss
        step = _simulate_optimizer([p for p in model.parameters() if p.requires_grad], opts, tracker, fake)
        return dict(saved=saved, logits=logits, grads=grads, peak=peak - base, windows=windows, **step)


def _decoder_layers(model) -> list:
    """The decoder layers of a transformers causal LM, in order (the ModuleList holding most parameters)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError("planner: no decoder layer list (nn.ModuleList) in the model")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


@contextlib.contextmanager
def _eager_transformers():
    """transformers takes its tracing path for fake tensors (a materialized causal mask, KV heads repeated
    for grouped-query attention); a real eager step does not. Hide the fakeness so the simulated step is the
    eager one. The one data check left on that path (packed sequences in position_ids) is answered: none.
    No attention mask is passed."""
    from transformers import masking_utils
    from transformers.utils import import_utils

    saved = import_utils.is_fake_tensor, getattr(masking_utils, "find_packed_sequence_indices", None)
    import_utils.is_fake_tensor = lambda x: False
    if saved[1] is not None:
        masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        import_utils.is_fake_tensor = saved[0]
        if saved[1] is not None:
            masking_utils.find_packed_sequence_indices = saved[1]


def measure_step(model, input_ids, optimizer, steps: int = 2, descend: bool = True) -> int:
    """Peak bytes of live tensors during the last of `steps` real training steps (forward with labels,
    backward, optimizer.step, zero_grad) of `model` on its device, counting parameters, gradients and
    optimizer states (the ones alive across steps included). The earlier steps create the optimizer states."""
    for _ in range(steps - 1):
        model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    tracker = LiveTensorTracker(descend=scratch_ops() if descend else ())
    for t in list(model.parameters()) + list(model.buffers()):
        tracker.track(t)
    for state in optimizer.state.values():
        for t in state.values():
            tracker.track(t)
    with tracker:
        model(input_ids=input_ids, labels=input_ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return tracker.peak
