"""LoRA adapters in PEFT's on-disk format: adapter_config.json + adapter_model.safetensors.

Keys are `base_model.model.<module path>.lora_A.weight` [r, K] and `...lora_B.weight` [N, r], as
`peft.PeftModel.save_pretrained` writes them, so `peft.PeftModel.from_pretrained(base, path)` loads an adapter
saved here on the same base model (unquantized or bitsandbytes-quantized), and `load_adapter` loads one PEFT
saved into a model prepared with `prepare_model`. `modules_to_save` (whole modules trained alongside, e.g. a
classification head) are stored as `base_model.model.<module path>.<param>`, as PEFT stores them.

Expert LoRA (NF4Experts of MoE models) is stored as PEFT's `target_parameters` adapters: one
`<experts path>.[base_layer.]*lora_A.weight` [r*E, in] / `lora_B.weight` [out, r*E] per adapted 3-D parameter
(PEFT nests one ParamWrapper per parameter, the first in registration order innermost), listed in
adapter_config.json's `target_parameters`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

from .experts import experts_modules, peft_param_keys
from .model import _name_matches, qlora_modules, unwrap_model
from .nn import _scaling

__all__ = ["save_adapter", "load_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
PREFIX = "base_model.model."


def _common(values: dict) -> tuple:
    """The most common value and {name: value} for the others (PEFT's rank_pattern / alpha_pattern)."""
    if not values:
        return None, {}
    common = Counter(values.values()).most_common(1)[0][0]
    return common, {k: v for k, v in values.items() if v != common}


def save_adapter(model: nn.Module, path: Union[str, os.PathLike], modules_to_save: Iterable[str] = (),
                 base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the LoRA adapters of a prepared model (and `modules_to_save`) to directory `path` in PEFT format.

    Returns the directory. Raises ValueError when the model has no QLoRALinear layer.
    """
    from safetensors.torch import save_file

    model = unwrap_model(model)  # torch.compile / DDP wrappers would prefix every path (_orig_mod., module.)
    layers = qlora_modules(model)
    experts = _adapted_experts(model)
    if not layers and not experts:
        raise ValueError(f"{type(model).__name__} has no QLoRALinear layer: call prepare_model first")
    for name, m in layers.items():
        if m.dropout != next(iter(layers.values())).dropout:
            raise ValueError(f"PEFT stores one lora_dropout for all layers; {name} has {m.dropout}")
    tensors = {}
    for name, m in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous().cpu()
    expert_settings = {}  # {"<experts path>.<param>": NF4ExpertWeight}
    for name, projs in experts.items():
        for p, prefix in peft_param_keys(name, list(projs)).items():
            tensors[f"{PREFIX}{prefix}lora_A.weight"] = projs[p].peft_lora_A().contiguous().cpu()
            tensors[f"{PREFIX}{prefix}lora_B.weight"] = projs[p].peft_lora_B().contiguous().cpu()
            expert_settings[f"{name}.{p}"] = projs[p]
    modules_to_save = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save)
    for mname in modules_to_save:
        module = model.get_submodule(mname)
        for k, v in module.state_dict().items():
            tensors[f"{PREFIX}{mname}.{k}"] = v.detach().contiguous().cpu()
    every = {**layers, **expert_settings}
    r, rank_pattern = _common({n: m.r for n, m in every.items()})
    alpha, alpha_pattern = _common({n: m.lora_alpha for n, m in every.items()})
    rslora = {m.use_rslora for m in every.values()}
    if len(rslora) > 1:
        raise ValueError("PEFT stores one use_rslora for all layers; the model's layers differ")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    as_number = lambda a: int(a) if float(a).is_integer() else a  # noqa: E731
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": as_number(alpha),
        "lora_dropout": next(iter(layers.values())).dropout if layers else 0.0,
        "target_modules": sorted(layers),
        "target_parameters": sorted(expert_settings) or None,
        "use_rslora": rslora.pop(),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {k: as_number(v) for k, v in alpha_pattern.items()},
        "use_dora": False,
        "lora_bias": False,
    }
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    return path


def _adapted_experts(model: nn.Module) -> dict:
    """{experts path: {parameter name: NF4ExpertWeight with LoRA}} in registration order (PEFT's nesting)."""
    out = {}
    for name, e in experts_modules(model).items():
        projs = {p: w for p, w in e.projections.items() if w.lora_A is not None}
        if projs:
            out[name] = projs
    return out


def _expert_target(name: str, experts: dict, target_parameters) -> Optional[tuple]:
    """(experts path, parameter name) of an adapter key's module path (`<experts path>[.base_layer]*`), by
    PEFT's nesting of the targeted parameters, or None when `name` is no experts module of the model."""
    depth = 0
    while name.endswith(".base_layer"):
        name, depth = name[: -len(".base_layer")], depth + 1
    if name not in experts:
        return None
    targets = [target_parameters] if isinstance(target_parameters, str) else list(target_parameters or [])
    adapted = [p for p in experts[name].weight_names
               if any(f"{name}.{p}" == t or f"{name}.{p}".endswith("." + t) for t in targets)]
    if depth >= len(adapted):
        raise ValueError(f"adapter key for {name!r} at nesting depth {depth} names no parameter: its "
                         f"target_parameters {targets} adapt {adapted} of that experts module")
    return name, adapted[len(adapted) - 1 - depth]


def _pattern_value(name: str, pattern: dict, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path as a regex suffix."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _read_weights(path: Path) -> dict:
    """The adapter's tensors; a file that cannot be read (truncated, not safetensors / torch) raises
    ValueError naming it."""
    file = path / WEIGHTS_NAME
    if file.exists():
        from safetensors.torch import load_file

        try:
            return load_file(str(file))
        except Exception as exc:  # safetensors raises its own SafetensorError, which names no file
            raise ValueError(f"{file}: cannot read the adapter weights ({type(exc).__name__}: {exc})") from exc
    file = path / WEIGHTS_NAME_BIN
    if file.exists():
        try:
            weights = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{file}: cannot read the adapter weights ({type(exc).__name__}: {exc})") from exc
        if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
            raise ValueError(f"{file}: expected a dict of tensors, got {type(weights).__name__}")
        return weights
    raise FileNotFoundError(f"{path} has neither {WEIGHTS_NAME} nor {WEIGHTS_NAME_BIN}")


def _read_config(cfg_path: Path) -> dict:
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_path}: cannot read the adapter config ({type(exc).__name__}: {exc})") from exc
    if not isinstance(config, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(config).__name__}")
    return config


def _not_linear(model: nn.Module, target: str) -> list:
    """Modules matching `target` (PEFT's suffix rule) that are not linear layers: '<path> (<type>)'."""
    from .nn import NF4Linear

    return [f"{n} ({type(m).__name__})" for n, m in model.named_modules()
            if n and _name_matches(n, target) and not isinstance(m, (nn.Linear, NF4Linear))]


def load_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> dict:
    """Load a PEFT LoRA adapter (saved by PEFT or by save_adapter) into a model prepared with prepare_model.

    Sets each targeted layer's A, B, scaling (lora_alpha, r, use_rslora from the config) and dropout, and
    loads `modules_to_save` weights. Returns {"loaded": [module paths], "modules_to_save": [...]}.
    Raises:
        FileNotFoundError: no adapter at path.  ValueError: a config or weights file that cannot be read
        (named), not a LoRA adapter, unsupported options (DoRA, LoRA bias), a target module missing from the
        model (or not prepared) or not a linear layer, or shapes that do not match.
    Every check runs before the first tensor is copied: an adapter that raises leaves the model unchanged.
    """
    path = Path(path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.exists():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
    config = _read_config(cfg_path)
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type must be LORA, got {config.get('peft_type')!r}")
    if config.get("use_dora"):
        raise ValueError(f"{cfg_path}: DoRA adapters (use_dora=true) are not supported")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ValueError(f"{cfg_path}: adapters with trained biases (bias={config.get('bias')!r}) are not supported")
    model = unwrap_model(model)
    layers = qlora_modules(model)
    experts = experts_modules(model)
    if not layers and not experts:
        raise ValueError(f"{type(model).__name__} has no QLoRALinear layer: call prepare_model before load_adapter")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in layers):
            raise ValueError(f"adapter target_modules regex {targets!r} matches no QLoRALinear layer of the model")
    else:
        not_linear = [d for t in targets for d in _not_linear(model, t)]
        if not_linear:
            raise ValueError(f"{cfg_path}: adapter target_modules name modules that are not linear layers: "
                             f"{not_linear[:6]} (LoRA adapts Linear layers only, as PEFT does)")
        missing = [t for t in targets if not any(_name_matches(n, t) for n in layers)]
        if missing:
            raise ValueError(
                f"adapter target modules {missing} are missing from the model (no QLoRALinear layer matches "
                f"them; prepared layers: {list(layers)[:6]}{' ...' if len(layers) > 6 else ''})"
            )
    weights = _read_weights(path)
    # Everything below is checked before the first copy: a rejected adapter leaves the model as it was.
    lora, extra = {}, {}
    for key, t in weights.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        m = re.fullmatch(r"(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight", name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = t
        elif re.search(r"\.lora_(embedding_)?[AB]\b|\.lora_magnitude_vector", name):
            raise ValueError(f"adapter key {key!r} is not a LoRA Linear weight this package supports")
        else:
            extra[name] = t
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    plan, expert_plan = [], []
    for name, ab in lora.items():
        hit = _expert_target(name, experts, config.get("target_parameters")) if name not in layers else None
        if hit is not None:  # expert LoRA (PEFT target_parameters): checked here, copied with the rest
            if set(ab) != {"lora_A", "lora_B"}:
                raise ValueError(f"adapter for {name!r} has {sorted(ab)}, needs both lora_A and lora_B")
            ename, p = hit
            proj = experts[ename].projections[p]
            if proj.lora_A is None:
                raise ValueError(f"adapter adapts {ename}.{p} but the model has no LoRA on it (prepare_model with "
                                 f"target_parameters including it first)")
            r = _pattern_value(f"{ename}.{p}", config.get("rank_pattern") or {}, r_default)
            a, b = ab["lora_A"], ab["lora_B"]
            want_a, want_b = (proj.r * proj.num_experts, proj.in_features), (proj.out_features, proj.r * proj.num_experts)
            if r != proj.r or tuple(a.shape) != want_a or tuple(b.shape) != want_b:
                raise ValueError(f"shape mismatch for {ename}.{p}: adapter r={r}, lora_A {tuple(a.shape)}, lora_B "
                                 f"{tuple(b.shape)}; the model's {proj.num_experts} experts [{proj.out_features}, "
                                 f"{proj.in_features}] at r={proj.r} need lora_A {want_a}, lora_B {want_b}")
            alpha = _pattern_value(f"{ename}.{p}", config.get("alpha_pattern") or {}, alpha_default)
            expert_plan.append((proj, a, b, float(alpha), f"{ename}.{p}"))
            continue
        if name not in layers:
            raise ValueError(
                f"adapter targets module {name!r}, which is missing from the model or is not a QLoRALinear "
                "(prepare_model with the same target modules first)"
            )
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"adapter for {name!r} has {sorted(ab)}, needs both lora_A and lora_B")
        layer, a, b = layers[name], ab["lora_A"], ab["lora_B"]
        for key, t in (("lora_A", a), ("lora_B", b)):
            if not t.is_floating_point():
                raise ValueError(f"adapter {key} for {name!r} has dtype {t.dtype}, needs a floating dtype")
        if tuple(a.shape) != tuple(layer.lora_A.weight.shape) or tuple(b.shape) != tuple(layer.lora_B.weight.shape):
            raise ValueError(
                f"shape mismatch for {name!r}: adapter lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; model "
                f"lora_A {tuple(layer.lora_A.weight.shape)}, lora_B {tuple(layer.lora_B.weight.shape)} "
                f"(layer [{layer.out_features}, {layer.in_features}], r={layer.r})"
            )
        r = _pattern_value(name, config.get("rank_pattern") or {}, r_default)
        if r != a.shape[0]:
            raise ValueError(f"adapter config says r={r} for {name!r} but its lora_A has {a.shape[0]} rows")
        alpha = _pattern_value(name, config.get("alpha_pattern") or {}, alpha_default)
        plan.append((layer, a, b, float(alpha)))
    extra_targets = []
    for mname in config.get("modules_to_save") or []:
        hits = {k: v for k, v in extra.items() if k == mname or k.startswith(mname + ".") or ("." + mname + ".") in ("." + k)}
        extra_targets.append((mname, hits))
    unused = set(extra) - {k for _, hits in extra_targets for k in hits}
    if unused:
        raise ValueError(f"adapter holds keys that are neither LoRA weights nor modules_to_save: {sorted(unused)[:5]}")
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    copies = []
    for mname, hits in extra_targets:
        for k, v in hits.items():
            dst = params.get(k, buffers.get(k))
            if dst is None:
                raise ValueError(f"modules_to_save key {k!r} is missing from the model")
            if dst.shape != v.shape:
                raise ValueError(f"shape mismatch for {k!r}: adapter {tuple(v.shape)}, model {tuple(dst.shape)}")
            if dst.is_floating_point() != v.is_floating_point():
                raise ValueError(f"dtype mismatch for {k!r}: adapter {v.dtype}, model {dst.dtype}")
            copies.append((dst, v))
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{cfg_path}: lora_dropout must be a probability in [0, 1), got {dropout!r}")
    with torch.no_grad():
        for proj, a, b, alpha, ename in expert_plan:
            proj.load_peft_lora(a, b, ename)
            proj.lora_alpha, proj.use_rslora = alpha, bool(config.get("use_rslora", False))
            proj.scaling = _scaling(alpha, proj.r, proj.use_rslora)
        for layer, a, b, alpha in plan:
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
            layer.lora_alpha, layer.use_rslora = alpha, bool(config.get("use_rslora", False))
            layer.scaling = _scaling(alpha, layer.r, layer.use_rslora)
            layer.dropout = float(dropout)
        for dst, v in copies:
            dst.copy_(v)
    return {"loaded": list(lora), "modules_to_save": [k for _, h in extra_targets for k in h]}
