"""prepare_model: turn the Linear layers of any nn.Module (Hugging Face models included) into QLoRALinear."""

from __future__ import annotations

import math
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .nn import QLoRALinear

__all__ = ["prepare_model", "PrepareReport", "find_target_modules", "qlora_modules", "model_memory", "count_parameters"]


def _is_bnb_4bit(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "LinearNF4") and type(module).__module__.startswith("bitsandbytes")


def _is_other_bnb(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and not _is_bnb_4bit(module)


def _name_matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of names: the full module path, or a suffix after a dot."""
    return name == target or name.endswith("." + target)


def qlora_modules(model: nn.Module) -> dict[str, QLoRALinear]:
    """{module path: QLoRALinear} of a prepared model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}


def find_target_modules(model: nn.Module, target_modules: Union[str, Iterable[str]] = "all-linear",
                        exclude_modules: Iterable[str] = ()) -> list[str]:
    """Paths of the nn.Linear / bitsandbytes Linear4bit modules that prepare_model would replace.

    target_modules: "all-linear" (every Linear except the output head: `model.get_output_embeddings()` and
        modules named lm_head), another str (a regex the full path must match, as in PEFT), or names (a module
        matches one when its path equals it or ends with "." + it).
    exclude_modules: names (same suffix rule) never replaced.
    """
    exclude = [exclude_modules] if isinstance(exclude_modules, str) else list(exclude_modules)
    all_linear = target_modules == "all-linear"
    if isinstance(target_modules, str) and not all_linear:
        pattern = re.compile(target_modules)
        match = lambda name: pattern.fullmatch(name) is not None  # noqa: E731
    elif all_linear:
        match = lambda name: True  # noqa: E731
    else:
        targets = list(target_modules)
        if not targets:
            raise ValueError("target_modules is empty")
        match = lambda name: any(_name_matches(name, t) for t in targets)  # noqa: E731
    head = None
    if all_linear:
        exclude.append("lm_head")
        get_out = getattr(model, "get_output_embeddings", None)
        if callable(get_out):
            try:
                head = get_out()
            except Exception:  # some HF models raise NotImplementedError
                head = None
    found, linear_names = [], []
    parents_mha = {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                   for c, _ in m.named_children()}
    for name, module in model.named_modules():
        if isinstance(module, QLoRALinear) or not name:
            continue
        is_4bit = _is_bnb_4bit(module)
        if not (is_4bit or isinstance(module, nn.Linear)) or (_is_other_bnb(module) and not is_4bit):
            continue
        linear_names.append(name)
        if name in parents_mha:  # nn.MultiheadAttention reads out_proj.weight directly: it must stay dense
            continue
        if module is head or any(_name_matches(name, e) for e in exclude):
            continue
        if match(name):
            found.append(name)
    if not found:
        shown = ", ".join(linear_names[:12]) + (" ..." if len(linear_names) > 12 else "")
        raise ValueError(
            f"target_modules={target_modules!r} matched no nn.Linear / Linear4bit module of "
            f"{type(model).__name__}; its Linear modules are: {shown or 'none'}"
        )
    return found


def _quant_state_tensors(model: nn.Module) -> list:
    """The scale tensors of bitsandbytes 4-bit weights (held in quant_state, not as parameters or buffers)."""
    out = []
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            out += [t for t in (qs.absmax, getattr(qs, "offset", None), getattr(getattr(qs, "state2", None), "absmax", None))
                    if isinstance(t, torch.Tensor)]
    return out


def count_parameters(model: nn.Module) -> int:
    """Parameter count; a bitsandbytes 4-bit weight counts its logical elements, not its packed bytes."""
    total = 0
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        total += math.prod(qs.shape) if qs is not None else p.numel()
    return total + sum(m.in_features * m.out_features for m in qlora_modules(model).values())


def model_memory(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (each storage counted once; bitsandbytes scales too)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()) + _quant_state_tensors(model):
        if t.device.type == "meta":
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


@dataclass
class PrepareReport:
    """What prepare_model did. Parameter counts include the NF4 base weights (one per element)."""

    replaced: list = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    trainable_params: int = 0
    quantized_params: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    bits_per_param: float = 0.0
    r: int = 0
    alpha: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    def __getitem__(self, key):
        return getattr(self, key)

    def __str__(self) -> str:
        mib = lambda b: b / 2**20  # noqa: E731
        return (
            f"prepare_model: {len(self.replaced)} Linear layers -> QLoRALinear (NF4 {self.bits_per_param:.3f} "
            f"bits/param, r={self.r}, alpha={self.alpha:g})\n"
            f"  parameters: {self.params_before:,} before, {self.params_after:,} after "
            f"({self.quantized_params:,} in NF4; trainable {self.trainable_params:,} = "
            f"{100.0 * self.trainable_params / max(1, self.params_after):.2f}%)\n"
            f"  memory:     {mib(self.bytes_before):.2f} MiB before, {mib(self.bytes_after):.2f} MiB after "
            f"({self.bytes_before / max(1, self.bytes_after):.2f}x smaller)"
        )


def prepare_model(
    model: nn.Module,
    target_modules: Union[str, Iterable[str]] = "all-linear",
    r: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
    blocksize: int = 64,
    double_quant: bool = True,
    exclude_modules: Iterable[str] = (),
    train_bias: bool = False,
    verbose: bool = True,
    progress: Optional[bool] = None,
) -> PrepareReport:
    """Replace matching nn.Linear (and bitsandbytes Linear4bit) modules of `model` with QLoRALinear, in place.

    Every parameter is frozen except the LoRA adapters (and the replaced layers' biases when `train_bias`).
    The base weights are quantized to NF4 on their current device (bitsandbytes Linear4bit weights are taken
    over as they are). Target matching: see `find_target_modules`.

    Args:
        r, alpha, dropout, use_rslora: the adapters (scaling alpha / r, or alpha / sqrt(r) with rsLoRA).
        blocksize, double_quant: the NF4 format (64 and True: 4.127 bits per parameter).
        verbose: print the report. progress: tqdm bar while quantizing (default: when verbose).
    Returns:
        PrepareReport: replaced module paths, parameters and memory before / after.
    """
    names = find_target_modules(model, target_modules, exclude_modules)
    report = PrepareReport(r=r, alpha=float(alpha))
    report.params_before = count_parameters(model)
    report.bytes_before = model_memory(model)
    for p in model.parameters():
        p.requires_grad_(False)
    from tqdm.auto import tqdm

    show = verbose if progress is None else progress
    bar = tqdm(names, desc="quantizing to NF4", unit="layer", disable=not show, file=sys.stderr)
    for name in bar:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if _is_bnb_4bit(old):
            new = QLoRALinear.from_bnb(old, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
        else:
            new = QLoRALinear.from_linear(old, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                          blocksize=blocksize, double_quant=double_quant)
        new.train(old.training)
        if new.bias is not None:
            new.bias.requires_grad_(train_bias)
        setattr(parent, child, new)
        del old
    bar.close()
    layers = qlora_modules(model)
    for m in layers.values():  # adapters of layers prepared earlier were frozen above too
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    nf4_elems = sum(m.in_features * m.out_features for m in layers.values())
    nf4_bytes = sum(m.weight.nbytes for m in layers.values())
    report.replaced = names
    report.quantized_params = nf4_elems
    report.params_after = count_parameters(model)
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.bytes_after = model_memory(model)
    report.bits_per_param = 8.0 * nf4_bytes / max(1, nf4_elems)
    if verbose:
        print(report)
    return report
