"""prepare_model: turn the Linear layers of any nn.Module (Hugging Face models included) into QLoRALinear."""

from __future__ import annotations

import math
import re
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Union

import torch
from torch import nn

from ._format import FLOAT_DTYPES, all_finite, check_blocksize
from .nn import QLoRALinear, check_bnb_layer, check_lora_args

from .nn import NF4Linear  # noqa: E402  (the quantized linears without adapters: quantize= below)

__all__ = ["prepare_model", "PrepareReport", "find_target_modules", "qlora_modules", "model_memory",
           "count_parameters", "merge_and_unload", "unwrap_model", "nf4_modules", "find_quantize_modules"]


def _is_bnb_4bit(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "LinearNF4") and type(module).__module__.startswith("bitsandbytes")


def _is_other_bnb(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and not _is_bnb_4bit(module)


def _name_matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of names: the full module path, or a suffix after a dot."""
    return name == target or name.endswith("." + target)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under torch.compile's OptimizedModule and DistributedDataParallel wrappers, whose module
    paths are the model's own (what PEFT and saved adapters name)."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # torch.compile(model)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def module_path(name: str) -> str:
    """`name` without the `_orig_mod` segments that compiling a submodule in place of itself inserts."""
    return ".".join(p for p in name.split(".") if p != "_orig_mod")


def qlora_modules(model: nn.Module) -> dict[str, QLoRALinear]:
    """{module path: QLoRALinear} of a prepared model, in module order. Paths are those of the model under
    any torch.compile / DDP wrapper (no `_orig_mod.` or `module.` prefix)."""
    model = unwrap_model(model)
    return {module_path(name): m for name, m in model.named_modules() if isinstance(m, QLoRALinear)}


def nf4_modules(model: nn.Module) -> dict[str, NF4Linear]:
    """{module path: NF4Linear} (QLoRALinear included: every linear whose weight is NF4), in module order."""
    model = unwrap_model(model)
    return {module_path(name): m for name, m in model.named_modules() if isinstance(m, NF4Linear)}


def find_quantize_modules(model: nn.Module, quantize: Union[str, Iterable[str]] = "all-linear",
                          skip_modules: Iterable[str] = (), lora_targets: Iterable[str] = ()) -> list[str]:
    """Paths of the Linear / Linear4bit modules that become NF4Linear (quantized, no adapters) beside the LoRA
    targets (which become QLoRALinear, always NF4).

    quantize: "all-linear" (every Linear but the output head, as find_target_modules), "targets" (only the
        LoRA targets: every other Linear stays dense), or a regex / names matched as target_modules are.
    skip_modules: kept dense (names by the suffix rule, or a regex over the full path, as exclude_modules).
        A LoRA target cannot be skipped: ValueError naming it.
    """
    lora_targets = list(lora_targets)
    if isinstance(skip_modules, str):
        import re as _re

        skip_pattern, skip = _re.compile(skip_modules), []
    else:
        skip_pattern, skip = None, list(skip_modules)
    if any(not isinstance(s, str) or not s for s in skip):
        raise ValueError(f"skip_modules must be module names or a regex, got {skip_modules!r}")
    skipped_targets = [t for t in lora_targets if any(_name_matches(t, s) for s in skip)
                       or (skip_pattern is not None and skip_pattern.fullmatch(t))]
    if skipped_targets:
        raise ValueError(f"skip_modules keeps {skipped_targets[:3]} dense, but target_modules adapts them "
                         "(a LoRA target's base weight is always NF4): drop them from one of the two")
    if isinstance(quantize, str) and quantize == "targets":
        return []
    if quantize is None or (not isinstance(quantize, str) and not list(quantize)):
        raise ValueError(f"quantize must be 'all-linear', 'targets', a regex or module names, got {quantize!r}")
    try:
        found = find_target_modules(model, quantize, skip_modules)
    except ValueError:
        if quantize == "all-linear":
            return []  # a model with no Linear but its head
        raise ValueError(f"quantize={quantize!r} matched no nn.Linear / Linear4bit module of "
                         f"{type(unwrap_model(model)).__name__}") from None
    taken = set(lora_targets)
    model = unwrap_model(model)
    return [n for n in found if n not in taken and not isinstance(model.get_submodule(n), NF4Linear)]


def mark_quantization_config(model: nn.Module, blocksize: int, double_quant: bool) -> None:
    """Give a transformers model prepared here `config.quantization_config = NF4Config(...)` (quant_method
    "qlora_kernels"), so its `save_pretrained` (a Trainer `checkpoint-N` included) writes a config.json that
    `from_pretrained` reloads as an NF4 model. Nothing for a model that is not a transformers one, that already
    has a quantization_config (a bitsandbytes one keeps its own: the tensors are the same), or without
    transformers >= 5. The dense Linear modules are its modules_to_not_convert."""
    config = getattr(unwrap_model(model), "config", None)
    if config is None or not hasattr(config, "to_dict") or getattr(config, "quantization_config", None) is not None:
        return
    try:
        from .integrations.transformers import NF4Config
    except ImportError:
        return
    nf4 = set(nf4_modules(model))
    dense = [n for n, m in unwrap_model(model).named_modules()
             if type(m) is nn.Linear and n.rpartition(".")[0] not in nf4]  # not a QLoRALinear's lora_A / lora_B
    config.quantization_config = NF4Config(blocksize=blocksize, double_quant=double_quant,
                                           modules_to_not_convert=dense)


def _unmark_quantization_config(model: nn.Module) -> None:
    """After merge_and_unload nothing is NF4: an NF4Config would make the saved model reload as NF4."""
    config = getattr(model, "config", None)
    qc = getattr(config, "quantization_config", None)
    if qc is not None and getattr(qc, "quant_method", None) == "qlora_kernels" and not nf4_modules(model):
        del config.quantization_config


def _to_nf4linear(model: nn.Module, names: Iterable[str], blocksize: int, double_quant: bool) -> None:
    """Replace each Linear / Linear4bit `name` by an NF4Linear (frozen; a Linear4bit's bytes taken as they are)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = NF4Linear.from_bnb(old) if _is_bnb_4bit(old) else NF4Linear.from_linear(
            old, blocksize=blocksize, double_quant=double_quant)
        new.train(old.training)
        if new.bias is not None:
            new.bias.requires_grad_(False)
        setattr(parent, child, new)
        del old


def find_target_modules(model: nn.Module, target_modules: Union[str, Iterable[str]] = "all-linear",
                        exclude_modules: Iterable[str] = ()) -> list[str]:
    """Paths of the nn.Linear / bitsandbytes Linear4bit modules that prepare_model would replace.

    target_modules: "all-linear" (every Linear except the output head: `model.get_output_embeddings()` and
        modules named lm_head), another str (a regex the full path must match, as in PEFT), or names (a module
        matches one when its path equals it or ends with "." + it).
    exclude_modules: modules never replaced: a str is a regex the full path must match, names follow the
        suffix rule (both as in PEFT's LoraConfig.exclude_modules).
    Layers that are QLoRALinear already (a second prepare_model call) are never returned, nor their adapters'
    own lora_A / lora_B; when they are all that matches, the result is empty instead of an error.
    """
    model = unwrap_model(model)
    if isinstance(exclude_modules, str):  # PEFT: a str is a regex over the full path, not a name
        exclude_pattern = re.compile(exclude_modules)
        exclude: list = []
    else:
        exclude_pattern, exclude = None, list(exclude_modules)

    def excluded(name: str) -> bool:
        return any(_name_matches(name, e) for e in exclude) or (
            exclude_pattern is not None and exclude_pattern.fullmatch(name) is not None)
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
    found, linear_names, prepared_matches = [], [], []
    parents_mha = {f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
                   for c, _ in m.named_children()}
    prepared = [n for n, m in model.named_modules() if isinstance(m, QLoRALinear)]
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, QLoRALinear):  # prepared already: left alone, but it counts as a match
            if match(name) and not excluded(name):
                prepared_matches.append(name)
            continue
        if any(name.startswith(p + ".") for p in prepared):  # the adapters' own lora_A / lora_B
            continue
        is_4bit = _is_bnb_4bit(module)
        is_nf4 = isinstance(module, NF4Linear)  # quantized already (NF4Config, quantize=): a target gets adapters
        if not (is_4bit or is_nf4 or isinstance(module, nn.Linear)) or (_is_other_bnb(module) and not is_4bit):
            continue
        linear_names.append(name)
        if name in parents_mha:  # nn.MultiheadAttention reads out_proj.weight directly: it must stay dense
            continue
        if module is head or excluded(name):
            continue
        if match(name):
            found.append(name)
    if not found and not prepared_matches:
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
    codes = {id(t) for m in nf4_modules(model).values() for t in (m.weight_packed, m.weight_absmax)}
    for p in model.parameters():
        if id(p) in codes:  # an NF4Linear's uint8 codes / scales (parameters by rows): counted as W below
            continue
        qs = getattr(p, "quant_state", None)
        total += math.prod(qs.shape) if qs is not None else p.numel()
    return total + sum(m.in_features * m.out_features for m in nf4_modules(model).values()) + sum(
        w.numel for e in _experts(model).values() for w in e.projections.values())


def _experts(model: nn.Module) -> dict:
    from .experts import experts_modules  # experts.py builds on nn.py and this module's helpers

    return experts_modules(model)


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
    adapter_dtype: str = "float32"
    already_prepared: list = field(default_factory=list)  # QLoRALinear layers left as they were
    quantized: list = field(default_factory=list)  # Linear layers -> NF4Linear (quantized, no adapters)

    def as_dict(self) -> dict:
        return asdict(self)

    def __getitem__(self, key):
        return getattr(self, key)

    def __str__(self) -> str:
        mib = lambda b: b / 2**20  # noqa: E731
        if not self.replaced and self.already_prepared:
            return (f"prepare_model: the model is already prepared ({len(self.already_prepared)} QLoRALinear "
                    f"layers, left as they are); no new target to adapt")
        return (
            f"prepare_model: {len(self.replaced)} Linear layers -> QLoRALinear (NF4 {self.bits_per_param:.3f} "
            f"bits/param, r={self.r}, alpha={self.alpha:g}, {self.adapter_dtype} adapters)\n"
            f"  parameters: {self.params_before:,} before, {self.params_after:,} after "
            f"({self.quantized_params:,} in NF4; trainable {self.trainable_params:,} = "
            f"{100.0 * self.trainable_params / max(1, self.params_after):.2f}%)\n"
            f"  memory:     {mib(self.bytes_before):.2f} MiB before, {mib(self.bytes_after):.2f} MiB after "
            f"({self.bytes_before / max(1, self.bytes_after):.2f}x smaller)"
        ) + (f"\n  quantized:  {len(self.quantized)} more Linear layers -> NF4Linear (NF4, no adapters)"
             if self.quantized else "")


def _check_target(name: str, module: nn.Module) -> None:
    """Refuse a target whose weight cannot become NF4, before prepare_model changes anything."""
    if isinstance(module, NF4Linear):
        return  # NF4 already
    if _is_bnb_4bit(module):
        qs = getattr(module.weight, "quant_state", None)
        qtype = qs.quant_type if qs is not None else getattr(module.weight, "quant_type", "nf4")
        if qtype != "nf4":
            raise ValueError(f"{name}: only nf4 Linear4bit layers are supported, got quant_type={qtype!r}")
        check_bnb_layer(module, name)  # repacked by bitsandbytes for its CPU kernel: refused before any change
        return
    w = module.weight
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}.weight must be float32, float16 or bfloat16 to quantize, got {w.dtype}")
    # a meta weight (meta init, filled later by distributed.load_from_rank0) has no values to check
    if w.device.type != "meta" and not all_finite(w):
        raise ValueError(f"{name}.weight has non-finite values (NaN or inf): NF4 cannot represent them")


def _refuse_peft_wrapped(model: nn.Module) -> None:
    """A model wrapped by peft.get_peft_model already has its adapters: replacing its Linear modules would put
    adapters on PEFT's base_layer, lora_A and lora_B. Refused before anything changes."""
    lora = [n for n, m in model.named_modules()
            if type(m).__module__.startswith("peft.") or type(m).__name__ == "LoraNF4Linear"
            if hasattr(m, "base_layer") and hasattr(m, "lora_A")]
    if lora:
        raise ValueError(
            f"prepare_model: {type(model).__name__} is wrapped by PEFT ({len(lora)} LoRA layers, e.g. {lora[0]!r}); "
            "it would put adapters on PEFT's base_layer / lora_A / lora_B. Quantize before get_peft_model "
            "(NF4Linear bases: PEFT's LoRA layers on them run the fused kernels), or call merge_and_unload() / "
            "unload() on the PEFT model first"
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
    adapter_dtype: Optional[torch.dtype] = torch.float32,
    verbose: bool = True,
    progress: Optional[bool] = None,
    target_parameters: Optional[Iterable[str]] = None,
    quantize: Union[str, Iterable[str]] = "all-linear",
    skip_modules: Iterable[str] = (),
) -> PrepareReport:
    """Replace matching nn.Linear (and bitsandbytes Linear4bit) modules of `model` with QLoRALinear, in place.

    Mixture-of-experts models: fused 3-D expert weights (transformers' `*Experts` modules) become NF4Experts
    (experts.py: NF4 per expert, per-expert LoRA in PEFT's ParamWrapper layout) when "all-linear" is asked
    (they are the big matmuls), when a name / regex in target_modules matches the experts module, or when
    `target_parameters` names them as PEFT's LoraConfig does ("mlp.experts.gate_up_proj": a full
    "<module path>.<parameter>" or its suffix after a dot; target_modules=[] then adapts no Linear).

    Every parameter is frozen except the LoRA adapters (and the replaced layers' biases when `train_bias`).
    The base weights are quantized to NF4 on their current device (bitsandbytes Linear4bit weights are taken
    over as they are). Target matching: see `find_target_modules`.

    Every argument and every target weight is checked before the model is touched: a rejected call leaves
    the model as it was. A second call leaves layers prepared earlier as they are (their adapters, settings
    and trainability) and adapts only new targets; it says so when there is nothing new to adapt.

    Args:
        r, alpha, dropout, use_rslora: the adapters (scaling alpha / r, or alpha / sqrt(r) with rsLoRA).
        blocksize, double_quant: the NF4 format (64 and True: 4.127 bits per parameter).
        adapter_dtype: the adapters' storage dtype: float32 (default, as PEFT: a bf16 adapter loses most small
            updates), or None for each base weight's dtype. The adapter math runs in the activation dtype.
        verbose: print the report. progress: tqdm bar while quantizing (default: when verbose).
        quantize: which Linear weights are NF4 apart from the LoRA targets, as BitsAndBytesConfig is apart
            from LoraConfig: "all-linear" (default: every Linear but the output head; those not adapted become
            NF4Linear, frozen), "targets" (only the adapted ones; the rest stay dense), or a regex / names.
        skip_modules: Linear modules kept dense whatever `quantize` says (not a LoRA target: ValueError).
    Returns:
        PrepareReport: replaced module paths, parameters and memory before / after.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    model = unwrap_model(model)  # module paths as PEFT names them, also under torch.compile / DDP
    _refuse_peft_wrapped(model)
    check_lora_args(r, alpha, dropout, adapter_dtype)
    check_blocksize(blocksize)
    for name, flag in (("double_quant", double_quant), ("use_rslora", use_rslora), ("train_bias", train_bias)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    from .experts import check_experts, replace_experts, select_experts

    expert_targets = select_experts(model, target_modules, target_parameters, exclude_modules)
    if target_parameters is not None and not isinstance(target_modules, str) and not list(target_modules):
        names = []  # PEFT's target_modules=[] with target_parameters: experts only
    else:
        try:
            names = find_target_modules(model, target_modules, exclude_modules)
        except ValueError:
            if not expert_targets:
                raise
            names = []  # the target matched experts modules only
    for name in names:
        _check_target(name, model.get_submodule(name))
    quant_only = find_quantize_modules(model, quantize, skip_modules, names)
    for name in quant_only:
        _check_target(name, model.get_submodule(name))
    for name in expert_targets:
        check_experts(name, model.get_submodule(name))
    if dropout and expert_targets:  # as PEFT's ParamWrapper, which refuses lora_dropout on 3-D parameters
        warnings.warn(f"prepare_model: dropout={dropout} applies to the Linear adapters only; the expert LoRA of "
                      f"{len(expert_targets)} experts modules runs without dropout (PEFT's target_parameters "
                      "LoRA has none either)", UserWarning, stacklevel=2)
    earlier = qlora_modules(model)
    if earlier:
        kept = {(m.r, m.lora_alpha, m.use_rslora) for m in earlier.values()}
        if kept != {(r, float(alpha), use_rslora)}:
            warnings.warn(
                f"prepare_model: the model already has {len(earlier)} QLoRALinear layers (r, alpha, use_rslora in "
                f"{sorted(kept)}); they keep their adapters and settings, only new targets get r={r}, "
                f"alpha={alpha:g}. Start from the unprepared model to change them.",
                UserWarning, stacklevel=2,
            )
    report = PrepareReport(r=r, alpha=float(alpha),
                           adapter_dtype=str(adapter_dtype).replace("torch.", "") if adapter_dtype else "base-dtype",
                           already_prepared=list(earlier))
    report.params_before = count_parameters(model)
    report.bytes_before = model_memory(model)
    earlier_bias = {n: m.bias.requires_grad for n, m in earlier.items() if m.bias is not None}
    for p in model.parameters():
        p.requires_grad_(False)
    from tqdm.auto import tqdm

    show = verbose if progress is None else progress
    bar = tqdm(names, desc="quantizing to NF4", unit="layer", disable=not show or not names, file=sys.stderr)
    for name in bar:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if _is_bnb_4bit(old):
            new = QLoRALinear.from_bnb(old, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                       adapter_dtype=adapter_dtype)
        elif isinstance(old, NF4Linear):  # its NF4 bytes as they are, adapters added
            new = QLoRALinear(old.weight, old.bias, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                              adapter_dtype=adapter_dtype)
        else:
            new = QLoRALinear.from_linear(old, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                                          blocksize=blocksize, double_quant=double_quant, adapter_dtype=adapter_dtype)
        new.train(old.training)
        if new.bias is not None:
            new.bias.requires_grad_(train_bias)
        setattr(parent, child, new)
        del old
    bar.close()
    _to_nf4linear(model, quant_only, blocksize, double_quant)
    replace_experts(model, expert_targets, expert_targets, r=r, alpha=alpha, use_rslora=use_rslora,
                    blocksize=blocksize, double_quant=double_quant, adapter_dtype=adapter_dtype)
    layers = qlora_modules(model)
    for name, m in layers.items():  # the freeze above covered adapters of layers prepared earlier too
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
        if name in earlier_bias:
            m.bias.requires_grad_(earlier_bias[name])
    expert_weights = [w for e in _experts(model).values() for w in e.projections.values()]
    for w in expert_weights:
        if w.lora_A is not None:
            w.lora_A.requires_grad_(True)
            w.lora_B.requires_grad_(True)
    nf4_elems = sum(m.in_features * m.out_features for m in layers.values()) + sum(w.numel for w in expert_weights)
    nf4_bytes = sum(m.weight.nbytes for m in layers.values()) + sum(w.nbytes for w in expert_weights)
    report.replaced = names + list(expert_targets)
    report.quantized_params = nf4_elems
    report.params_after = count_parameters(model)
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.bytes_after = model_memory(model)
    plain = [model.get_submodule(n) for n in quant_only]  # NF4Linear, no adapters
    nf4_elems += sum(m.in_features * m.out_features for m in plain)
    nf4_bytes += sum(m.weight.nbytes for m in plain)
    report.quantized = list(quant_only)
    mark_quantization_config(model, blocksize, double_quant)
    report.quantized_params = nf4_elems
    report.bits_per_param = 8.0 * nf4_bytes / max(1, nf4_elems)
    if verbose:
        print(report)
    return report


def merge_and_unload(model: nn.Module, dtype: Optional[torch.dtype] = None, progress: bool = False) -> nn.Module:
    """Replace every QLoRALinear of `model` (in place) by a dense nn.Linear holding deq(W) + s * B @ A.

    The merged weight is computed in float32 and rounded once to `dtype` (default: each layer's original
    base dtype), so the merged model's outputs equal the adapted model's within that dtype's rounding. The
    new Linear weights are frozen (requires_grad False); a bias keeps its trainability and is cast to `dtype`.
    This is the deployment path after training (like PEFT's merge_and_unload); it materializes every weight
    in `dtype`. Returns the model (the unwrapped module under torch.compile / DDP wrappers).
    NF4Experts become the model's own experts class again, with deq(W_e) + s * B_e @ A_e per expert.
    """
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be torch.float32, float16, bfloat16 or None, got {dtype!r}")
    model = unwrap_model(model)
    names = [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]  # NF4Linear: deq(W) alone
    experts = _experts(model)
    for name, module in experts.items():  # NF4Experts -> the model's own experts class, dense
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.unquantized(dtype))
    if not names and not experts:
        raise ValueError(f"{type(model).__name__} has no QLoRALinear layer to merge")
    from tqdm.auto import tqdm

    for name in tqdm(names, desc="merging adapters", unit="layer", disable=not progress, file=sys.stderr):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        weight = layer.merged_weight(dtype)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=weight.device, dtype=weight.dtype)
        dense.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            dense.bias = nn.Parameter(layer.bias.detach().to(weight.dtype).clone(),
                                      requires_grad=layer.bias.requires_grad)
        dense.train(layer.training)
        setattr(parent, child, dense)
    _unmark_quantization_config(model)
    return model
