"""Big models: stream a Hugging Face checkpoint straight into NF4, and write NF4 (or merged dense) checkpoints.

`load_pretrained` builds the model's module tree with its parameters on the meta device (transformers'
classes from config.json), swaps the target Linear modules for QLoRALinear before any weight exists, then
reads the safetensors files one tensor at a time: each target weight is quantized on the target device as it
arrives (or, for a bitsandbytes-4bit checkpoint, its NF4 bytes are taken as they are), every other tensor is
cast to the compute dtype. Host memory holds at most one full-precision tensor beside the growing NF4 model.

`save_pretrained` writes the inverse: a bitsandbytes-4bit checkpoint (transformers + bitsandbytes load it;
so does `load_pretrained`, bit for bit), or with `merge_adapters=True` a plain dense checkpoint with
deq(W) + s * B @ A folded in, which transformers loads without this package.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import nn

from ._format import DTYPE_NAMES
from .functional import quantize_nf4
from .model import PrepareReport, count_parameters, find_target_modules, model_memory, qlora_modules
from .model import find_quantize_modules, nf4_modules
from .nn import NF4Linear, QLoRALinear
from .weight import QUANT_STATE_KEY, NF4Weight

__all__ = ["load_pretrained", "save_pretrained", "CheckpointError"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_QUANT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", "." + QUANT_STATE_KEY)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint this loader cannot read; the message names the file (and tensor) at fault."""


# --------------------------------------------------------------------------------------------- reading files
def _read_json(file: Path) -> dict:
    try:
        with open(file, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None


def _quant_config(config_file: Path, config: dict) -> Optional[dict]:
    """The NF4 quantization_config of config.json (bitsandbytes 4-bit nf4, or qlora_kernels' NF4Config: both
    store the Linear4bit keys), None for a plain checkpoint."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method == "qlora_kernels":  # NF4Config's save_pretrained: the tensors say the rest (quant state per layer)
        return qc
    if method != "bitsandbytes":
        raise CheckpointError(
            f"{config_file}: quantization_config.quant_method={method!r} is not supported "
            "(only 'bitsandbytes' 4-bit nf4 or 'qlora_kernels' checkpoints, or plain unquantized ones)"
        )
    if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
        raise CheckpointError(f"{config_file}: a bitsandbytes 8-bit (LLM.int8) checkpoint is not supported, only 4-bit nf4")
    if not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise CheckpointError(f"{config_file}: quantization_config has neither load_in_4bit nor load_in_8bit set")
    quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # transformers' default is fp4
    if quant_type != "nf4":
        raise CheckpointError(f"{config_file}: bnb_4bit_quant_type={quant_type!r} is not supported, only 'nf4'")
    return qc


def _checkpoint_files(root: Path) -> dict:
    """{tensor key: safetensors file} from model.safetensors.index.json, or the single model.safetensors."""
    from safetensors import safe_open

    index = root / INDEX_NAME
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no weight_map")
        files = {}
        for key, name in weight_map.items():
            file = root / name
            if name not in files and not file.is_file():
                raise CheckpointError(f"{index}: shard {name!r} (holding tensor {key!r}) is missing from {root}")
            files[name] = file
        return {key: files[name] for key, name in weight_map.items()}
    single = root / SINGLE_NAME
    if not single.is_file():
        found = sorted(p.name for p in root.iterdir())
        raise CheckpointError(f"{root}: no {SINGLE_NAME} or {INDEX_NAME} (found {found[:10]})")
    with _open(single, safe_open) as fh:
        return {key: single for key in fh.keys()}


@contextlib.contextmanager
def _open(file: Path, safe_open):
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises SafetensorError for a truncated or corrupt file
        raise CheckpointError(f"{file}: cannot read safetensors file ({exc}); truncated or corrupt?") from None
    with handle as fh:
        yield fh


class _Reader:
    """Open safetensors handles (memory-mapped: their pages are page cache, not this process's memory)."""

    def __init__(self, key_files: dict):
        from safetensors import safe_open

        self.key_files = key_files
        self._stack = contextlib.ExitStack()
        self._handles = {}
        for file in dict.fromkeys(key_files.values()):
            self._handles[file] = self._stack.enter_context(_open(file, safe_open))
        for key, file in key_files.items():
            if key not in self._handles[file].keys():
                raise CheckpointError(f"{file}: the index lists tensor {key!r} in this file but it is not there")

    def info(self, key: str) -> tuple:
        sl = self._handles[self.key_files[key]].get_slice(key)
        return tuple(sl.get_shape()), _SAFETENSORS_DTYPES.get(sl.get_dtype())

    def nbytes(self, key: str) -> int:
        shape, dtype = self.info(key)
        return math.prod(shape) * (torch.empty((), dtype=dtype).element_size() if dtype is not None else 1)

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handles[self.key_files[key]].get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{self.key_files[key]}: cannot read tensor {key!r} ({exc})") from None

    def close(self):
        self._stack.close()


# ------------------------------------------------------------------------------------------ the meta skeleton
@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters are created on the meta device; buffers (rotary inv_freq, ...) stay real, since checkpoints
    do not hold the non-persistent ones. The CPU tensor a module's __init__ makes is empty (never touched),
    and its init runs on meta."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _build_skeleton(root: Path, compute_dtype, auto_class, trust_remote_code, attn_implementation=None):
    try:
        import transformers
    except ImportError:
        raise ImportError("load_pretrained needs transformers (pip install transformers)") from None
    config = transformers.AutoConfig.from_pretrained(str(root), trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):  # the loaded model is ours, not a bitsandbytes one
        del config.quantization_config
    auto = auto_class or transformers.AutoModelForCausalLM
    extra = {} if attn_implementation is None else dict(attn_implementation=attn_implementation)
    with _parameters_on_meta():
        model = auto.from_config(config, dtype=compute_dtype, trust_remote_code=trust_remote_code, **extra)
    return model


def enable_activation_checkpointing(model) -> None:
    """transformers' non-reentrant activation checkpointing on every decoder layer of `model`.

    transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable (the old name warns
    with a FutureWarning on every call); older versions have only the old name."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _loader_dtype(compute_dtype, dtype, torch_dtype, config_file: Path) -> torch.dtype:
    """compute_dtype, or its transformers-style aliases dtype / torch_dtype (a torch.dtype, its name, or
    "auto": config.json's dtype); bfloat16 when none is given."""
    given = {k: v for k, v in (("compute_dtype", compute_dtype), ("dtype", dtype), ("torch_dtype", torch_dtype))
             if v is not None}
    resolved = {}
    for name, v in given.items():
        if isinstance(v, str):
            if v == "auto":
                cfg = _read_json(config_file)
                v = cfg.get("dtype") or cfg.get("torch_dtype")
                if v is None:
                    raise ValueError(f"{name}='auto': {config_file} names no dtype (dtype / torch_dtype); pass one")
            v = getattr(torch, str(v).replace("torch.", ""), v)
        if v not in DTYPE_NAMES:
            raise ValueError(f"{name} must be torch.float32, torch.float16 or torch.bfloat16 (the compute dtype), "
                             f"got {given[name]!r}")
        resolved[name] = v
    if len(set(resolved.values())) > 1:
        raise ValueError("compute_dtype, dtype and torch_dtype are one setting (the compute dtype) and disagree: "
                         + ", ".join(f"{k}={v}" for k, v in resolved.items()))
    return next(iter(resolved.values()), torch.bfloat16)


def _loader_device(device, device_map):
    """`device`, or a transformers-style device_map that puts the whole model on one device."""
    if device_map is None:
        return _resolve_device(device)
    one = device_map
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise NotImplementedError(
                f"device_map={device_map!r}: load_pretrained puts the whole model on one device; only "
                "{'': device} is supported (several devices: qk.shard_model over processes)")
        one = device_map[""]
    if isinstance(one, str) and one in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise NotImplementedError(
            f"device_map={device_map!r}: load_pretrained does not split a model over devices; pass one device "
            "(device='cuda:0' or device_map='cuda:0'), or shard it over processes with qk.shard_model")
    try:
        resolved = torch.device(one) if not isinstance(one, int) else torch.device("cuda", one)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map={device_map!r}: not a device "
                         "(e.g. 'cuda:0', 'cpu', 0, {'': 'cuda:0'})") from None
    if device is not None and torch.device(device) != resolved:
        raise ValueError(f"device={device!r} and device_map={device_map!r} disagree; pass one of them")
    return resolved


def _param_slots(model: nn.Module) -> dict:
    """{"module.path.name": [(module, attr), ...]}: every place a parameter or buffer lives (tied ones share)."""
    by_id, names = {}, {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for store in (module._parameters, module._buffers):
            for attr, t in store.items():
                if t is None:
                    continue
                key = f"{mod_name}.{attr}" if mod_name else attr
                by_id.setdefault(id(t), []).append((module, attr))
                names.setdefault(id(t), []).append(key)
    slots = {}
    for tid, places in by_id.items():
        for key in names[tid]:
            slots[key] = places
    return slots


def _set_tensor(slots: dict, key: str, value: torch.Tensor, file: Path) -> None:
    places = slots[key]
    module, attr = places[0]
    old = module._parameters.get(attr) if attr in module._parameters else module._buffers.get(attr)
    if tuple(old.shape) != tuple(value.shape):
        raise CheckpointError(
            f"{file}: tensor {key!r} has shape {list(value.shape)} but config.json gives {list(old.shape)}"
        )
    new = nn.Parameter(value, requires_grad=False) if attr in module._parameters else value
    for module, attr in places:  # tied weights stay tied: every alias gets the same new tensor
        if attr in module._parameters:
            module._parameters[attr] = new
        else:
            module._buffers[attr] = new


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------------------------------------- the loader
def load_pretrained(
    path: Union[str, os.PathLike],
    *,
    target_modules: Union[str, Iterable[str]] = "all-linear",
    exclude_modules: Iterable[str] = (),
    r: int = 16,
    alpha: float = 16,
    dropout: float = 0.0,
    use_rslora: bool = False,
    blocksize: int = 64,
    double_quant: bool = True,
    compute_dtype: Optional[torch.dtype] = None,
    adapter_dtype: Optional[torch.dtype] = torch.float32,
    device=None,
    gradient_checkpointing: bool = False,
    auto_class=None,
    trust_remote_code: bool = False,
    verbose: bool = True,
    progress: Optional[bool] = None,
    return_report: bool = False,
    quantize: Union[str, Iterable[str]] = "all-linear",
    skip_modules: Iterable[str] = (),
    attn_implementation: Optional[str] = None,
    dtype=None,
    torch_dtype=None,
    device_map=None,
    revision: Optional[str] = None,
    target_parameters: Optional[Iterable[str]] = None,
):
    """Load a Hugging Face model directory straight into a QLoRA-prepared model, one tensor at a time.

    `path` holds config.json and model.safetensors (or shards listed in model.safetensors.index.json). A plain
    checkpoint's target Linear weights are quantized to NF4 (`blocksize`, `double_quant`) on `device` as they
    are read, bit-identical to `quantize_nf4` of the stored tensor; a bitsandbytes-4bit nf4 checkpoint
    (config.json quantization_config) keeps its NF4 bytes and scales as stored (any quant_storage dtype), its
    dense modules (llm_int8_skip_modules) stay dense, and `blocksize` / `double_quant` are ignored.
    Every other tensor is cast to `compute_dtype`; tied weights stay tied. A float64 weight is quantized from
    float32 (the quantizer's widest input; exact for values an fp32 checkpoint held). Target matching is prepare_model's
    (`find_target_modules`).

    Quantization targets are apart from the LoRA targets (as BitsAndBytesConfig and LoraConfig are):
    quantize="all-linear" (default) stores every other Linear but the output head in NF4 too, as a frozen
    NF4Linear (no adapters); in a bitsandbytes / qlora_kernels checkpoint every 4-bit module stays 4-bit
    (NF4Linear, bytes as stored) whatever the LoRA targets. quantize="targets": only the LoRA targets are NF4
    (a quantized module of the file that is not a target is dequantized to a dense Linear); a regex or names
    select them as target_modules does. skip_modules: Linear modules kept dense (a LoRA target cannot be).

    Args:
        r, alpha, dropout, use_rslora: the LoRA adapters (B = 0: the model starts as the base model).
        compute_dtype: activations and dense modules: float32, float16 or bfloat16 (default). `dtype` and
            `torch_dtype` (transformers' names) are aliases: a torch.dtype, its name, or "auto" (config.json's).
        adapter_dtype: the adapters' storage dtype: float32 (default, as prepare_model) or None for
            compute_dtype; their math runs in the activation dtype.
        device: where the model lives (default: cuda when available, else cpu). `device_map` (transformers'
            name) may give it instead: one device (str, int, torch.device) or {"": device}; a map over several
            devices ("auto", per-module) raises NotImplementedError.
        attn_implementation: passed to the model's construction ("eager", "sdpa", ...), as from_pretrained.
        revision: None or "main" only: `path` is a local directory, which has no revisions.
        target_parameters: mixture-of-experts models: the fused expert weights that get LoRA, as prepare_model
            and PEFT's LoraConfig name them ("mlp.experts.gate_up_proj": a full "<module path>.<parameter>" or
            its suffix after a dot); their experts modules become NF4Experts (every projection NF4, LoRA on the
            named ones only). target_modules=[] then adapts no Linear. None: "all-linear" takes every experts
            module (LoRA on each projection).
        gradient_checkpointing: switch on transformers' non-reentrant activation checkpointing.
        auto_class: transformers auto class building the skeleton (default AutoModelForCausalLM).
        verbose / progress: print the report / show a progress bar (tensors and bytes).
        return_report: return (model, PrepareReport) instead of the model.
    Returns:
        the model in eval mode, only the adapters trainable; its PrepareReport is `model.qlora_report`.
    Raises:
        CheckpointError (a ValueError) naming the file and tensor: missing or truncated file, missing shard,
        fp4 / 8-bit / unknown quantization, a shape that disagrees with config.json, a missing tensor.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"path {str(path)!r} is not a model directory")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{root}: no config.json")
    if revision not in (None, "main"):
        raise ValueError(f"revision={revision!r}: {str(path)!r} is a local directory, which has no revisions; "
                         "check that revision out there (e.g. huggingface_hub.snapshot_download(repo, "
                         "revision=...)) and pass its directory")
    quant_config = _quant_config(config_file, _read_json(config_file))
    compute_dtype = _loader_dtype(compute_dtype, dtype, torch_dtype, config_file)
    device = _loader_device(device, device_map)
    adapter_dtype = adapter_dtype or compute_dtype
    key_files = _checkpoint_files(root)
    reader = _Reader(key_files)
    try:
        model = _build_skeleton(root, compute_dtype, auto_class, trust_remote_code, attn_implementation)
        report = _stream_into(model, reader, quant_config, device, dict(
            target_modules=target_modules, exclude_modules=exclude_modules, r=r, alpha=alpha, dropout=dropout,
            use_rslora=use_rslora, blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
            adapter_dtype=adapter_dtype, quantize=quantize, skip_modules=skip_modules,
            target_parameters=target_parameters),
            verbose if progress is None else progress)
    finally:
        reader.close()
    model.eval()
    from .model import mark_quantization_config

    mark_quantization_config(model, blocksize, double_quant)  # save_pretrained / Trainer checkpoints reload as NF4
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    model.qlora_report = report
    if verbose:
        print(report)
    return (model, report) if return_report else model


def _stream_into(model, reader: _Reader, quant_config, device, opts, show_progress) -> PrepareReport:
    keys = list(reader.key_files)
    from .experts import experts_modules, load_experts, replace_for_loading, source_keys

    try:  # MoE: target experts modules become NF4Experts, filled one expert matrix at a time below
        expert_sources = replace_for_loading(model, keys, opts, device)
    except ValueError as exc:
        raise CheckpointError(f"{sorted({str(f) for f in reader.key_files.values()})[:2]}: {exc}") from None
    slots = _param_slots(model)
    modules = dict(model.named_modules())
    quantized_in_file = {k[: -len(".weight." + QUANT_STATE_KEY)] for k in keys
                         if k.endswith(".weight." + QUANT_STATE_KEY)}
    fp4_in_file = [k for k in keys if k.endswith(".weight.quant_state.bitsandbytes__fp4")]
    if fp4_in_file:
        k = fp4_in_file[0]
        raise CheckpointError(f"{reader.key_files[k]}: tensor {k!r} is an fp4 weight; only nf4 is supported")
    if quantized_in_file and quant_config is None:
        name = sorted(quantized_in_file)[0]
        raise CheckpointError(f"{reader.key_files[name + '.weight']}: tensor {name + '.weight'!r} is NF4-quantized "
                              "but config.json has no bitsandbytes quantization_config")
    tm = opts["target_modules"]
    if opts.get("target_parameters") is not None and not isinstance(tm, str) and not list(tm):
        targets = set()  # PEFT's target_modules=[] with target_parameters: experts only (as prepare_model)
    else:
        try:
            targets = set(find_target_modules(model, tm, opts["exclude_modules"]))
        except ValueError:
            if not expert_sources:
                raise
            targets = set()  # the target matched experts modules only
    if quant_config is not None:  # the file decides what is quantized; skip modules stay dense
        targets &= quantized_in_file
    # NF4 without adapters (NF4Linear): with quantize="all-linear", every other Linear of a plain checkpoint, or
    # every other 4-bit module of a quantized one (kept as stored, whatever the targets); skip_modules stay dense
    if quant_config is None:
        quant_only = set(find_quantize_modules(model, opts["quantize"], opts["skip_modules"], targets))
    elif opts["quantize"] == "targets" or not quantized_in_file - targets:
        find_quantize_modules(model, "targets", opts["skip_modules"], targets)  # checks skip vs targets
        quant_only = set()
    else:
        quant_only = set(find_quantize_modules(model, sorted(quantized_in_file - targets), opts["skip_modules"],
                                               targets))
    opts["quant_only"] = quant_only
    for name in sorted(quantized_in_file - set(modules)):
        raise CheckpointError(f"{reader.key_files[name + '.weight']}: quantized tensor {name + '.weight'!r} "
                              "belongs to no module of the model config.json describes")
    for name in targets:
        wkey = name + ".weight"
        if len(slots.get(wkey, ())) > 1:
            raise ValueError(f"target_modules: {name!r} shares its weight with another module (tied); "
                             "exclude it (exclude_modules) so the tie stays intact")

    # Group the keys: one item per Linear whose weight is quantized here or in the file, one per other tensor;
    # items in the order of their first key in the files, so the reads stream through each file.
    linear_names = quantized_in_file | targets | quant_only
    owner = {}
    for key in keys:
        name = _linear_of(key)
        if name in linear_names:
            owner[key] = name
    for path, sources in expert_sources.items():
        for key in source_keys(sources):
            owner[key] = path
    items = {}
    for key in sorted(keys, key=lambda k: (str(reader.key_files[k]), k)):
        items.setdefault(owner.get(key, key), []).append(key)

    # Mixtral checkpoints name the MoE block block_sparse_moe (transformers renames it to mlp on load)
    renamed = {k: k.replace(".block_sparse_moe.", ".mlp.") for k in keys
               if ".block_sparse_moe." in k and k not in slots and k.replace(".block_sparse_moe.", ".mlp.") in slots}
    unexpected = [k for k in keys if k not in owner and k not in slots and k not in renamed]
    if unexpected:
        import warnings

        warnings.warn(f"load_pretrained: {len(unexpected)} checkpoint tensors belong to no parameter or buffer of "
                      f"the model and were skipped: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}",
                      stacklevel=3)
    from tqdm.auto import tqdm

    total_bytes = sum(reader.nbytes(k) for k in keys)
    bar = tqdm(total=total_bytes, desc="loading", unit="B", unit_scale=True, disable=not show_progress,
               file=sys.stderr)
    replaced, done = [], 0
    for item, item_keys in items.items():
        if item in quantized_in_file or item in targets or item in quant_only:
            _load_linear(model, modules, slots, reader, item, item_keys, item in targets, device, opts)
            if item in targets:
                replaced.append(item)
        elif item in expert_sources:
            try:
                load_experts(model.get_submodule(item), item, expert_sources[item], reader.get,
                             lambda k, e: reader._handles[reader.key_files[k]].get_slice(k)[e], device,
                             opts["blocksize"], opts["double_quant"])
            except ValueError as exc:
                raise CheckpointError(f"{reader.key_files[item_keys[0]]}: {exc}") from None
            replaced.append(item)
        elif item in slots or item in renamed:
            t = reader.get(item)
            # copy=True: safetensors may hand out tensors over its memory map of the file; the model must own
            # its memory (the file may be overwritten later, e.g. by save_pretrained to the same directory)
            t = t.to(device=device, dtype=opts["compute_dtype"] if t.is_floating_point() else t.dtype, copy=True)
            _set_tensor(slots, renamed.get(item, item), t, reader.key_files[item])
            del t
        for k in item_keys:
            bar.update(reader.nbytes(k))
        done += len(item_keys)
        bar.set_postfix(tensors=f"{done}/{len(keys)}", refresh=False)
    bar.close()

    missing = [k for k, places in slots.items()
               if getattr(places[0][0], places[0][1]) is not None and getattr(places[0][0], places[0][1]).is_meta]
    if missing:
        files = sorted({str(f) for f in reader.key_files.values()})
        raise CheckpointError(f"{files}: the checkpoint has no tensor for {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''} that config.json's model needs")
    for module in model.modules():  # buffers the skeleton computed (rotary inv_freq) move to the device
        for name, b in module._buffers.items():
            if b is not None and b.device != device:
                module._buffers[name] = b.to(device)

    layers = qlora_modules(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in layers.values():
        m.lora_A.weight.requires_grad_(True)
        m.lora_B.weight.requires_grad_(True)
    expert_weights = [w for e in experts_modules(model).values() for w in e.projections.values()]
    for w in expert_weights:
        if w.lora_A is not None:
            w.lora_A.requires_grad_(True)
            w.lora_B.requires_grad_(True)
    report = PrepareReport(r=opts["r"], alpha=float(opts["alpha"]))
    nf4_elems = sum(m.in_features * m.out_features for m in layers.values()) + sum(w.numel for w in expert_weights)
    report.replaced = [n for n in find_order(model) if n in set(replaced)]
    report.quantized_params = nf4_elems
    report.quantized = [n for n, m in nf4_modules(model).items() if not isinstance(m, QLoRALinear)]
    report.quantized_params += sum(m.in_features * m.out_features for n, m in nf4_modules(model).items()
                                   if not isinstance(m, QLoRALinear))
    report.params_after = count_parameters(model)
    report.params_before = report.params_after - sum(
        m.lora_A.weight.numel() + m.lora_B.weight.numel() for m in layers.values()) - sum(
        w.lora_A.numel() + w.lora_B.numel() for w in expert_weights if w.lora_A is not None)
    report.bytes_before = report.params_before * torch.empty((), dtype=opts["compute_dtype"]).element_size()
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    report.bytes_after = model_memory(model)
    report.bits_per_param = 8.0 * (sum(m.weight.nbytes for m in layers.values())
                                   + sum(w.nbytes for w in expert_weights)) / max(1, nf4_elems)
    return report


def find_order(model) -> list:
    return [n for n, _ in model.named_modules()]


def _linear_of(key: str) -> Optional[str]:
    """The module path a Linear's tensor key belongs to: X.weight, X.bias, X.weight.<quant state key>."""
    for suffix in (".weight", ".bias"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    for suffix in _QUANT_SUFFIXES:
        if key.endswith(".weight" + suffix):
            return key[: -len(".weight" + suffix)]
    return None


def _load_linear(model, modules, slots, reader, name, keys, is_target, device, opts) -> None:
    """Build the QLoRALinear (target) or dense Linear (a quantized module that is not a target) `name`."""
    linear = modules.get(name)
    wkey = name + ".weight"
    file = reader.key_files.get(wkey)
    if not isinstance(linear, nn.Linear):
        raise CheckpointError(f"{file}: tensor {wkey!r}: module {name!r} of the model is "
                              f"{type(linear).__name__}, not a Linear")
    if wkey not in reader.key_files:
        other = reader.key_files[keys[0]]
        raise CheckpointError(f"{other}: the checkpoint has {keys[0]!r} but no tensor {wkey!r}")
    shape = (linear.out_features, linear.in_features)
    bias = None
    if name + ".bias" in keys:
        bias = reader.get(name + ".bias")
        if tuple(bias.shape) != (shape[0],):
            raise CheckpointError(f"{reader.key_files[name + '.bias']}: tensor {name + '.bias'!r} has shape "
                                  f"{list(bias.shape)} but config.json gives [{shape[0]}]")
        if not bias.is_floating_point():
            raise CheckpointError(f"{reader.key_files[name + '.bias']}: tensor {name + '.bias'!r} is {bias.dtype}, "
                                  "expected a float bias")
        if bias.dtype not in DTYPE_NAMES:  # float64: float32, as the weight (the bias keeps its own precision)
            bias = bias.to(torch.float32)
    elif linear.bias is not None:
        raise CheckpointError(f"{file}: the checkpoint has no tensor {name + '.bias'!r} that config.json's model needs")
    if name + ".weight." + QUANT_STATE_KEY in keys:
        weight = _prequantized_weight(reader, name, keys, shape, device)
    else:
        w = reader.get(wkey)
        if tuple(w.shape) != shape:
            raise CheckpointError(f"{file}: tensor {wkey!r} has shape {list(w.shape)} but config.json gives {list(shape)}")
        if not w.is_floating_point():
            raise CheckpointError(f"{file}: tensor {wkey!r} is {w.dtype}, expected a float weight")
        # float64 (or another float the quantizer does not take): from float32, its widest input
        wdtype = w.dtype if w.dtype in DTYPE_NAMES else torch.float32
        try:
            weight = quantize_nf4(w.to(device=device, dtype=wdtype), blocksize=opts["blocksize"],
                                  double_quant=opts["double_quant"])
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{file}: tensor {wkey!r}: {exc}") from None
        del w
    if not is_target and name in opts.get("quant_only", ()):
        new = NF4Linear(weight, bias)  # NF4 without adapters (quantize=), frozen
    elif is_target:
        new = QLoRALinear(weight, bias, r=opts["r"], alpha=opts["alpha"], dropout=opts["dropout"],
                          use_rslora=opts["use_rslora"], adapter_dtype=opts["adapter_dtype"])
    else:
        new = nn.Linear(shape[1], shape[0], bias=bias is not None, device="meta")
        new.weight = nn.Parameter(weight.dequantize(opts["compute_dtype"]), requires_grad=False)
        if bias is not None:
            new.bias = nn.Parameter(bias.to(device=device, dtype=opts["compute_dtype"]), requires_grad=False)
    new.train(linear.training)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    modules[name] = new
    for key in [k for k in slots if k.startswith(name + ".")]:  # the old meta parameters are gone
        del slots[key]


def _prequantized_weight(reader, name, keys, shape, device) -> NF4Weight:
    wkey = name + ".weight"
    file = reader.key_files[wkey]
    sd = {}
    for key in keys:
        if key.startswith(wkey):
            sd["weight" + key[len(wkey):]] = reader.get(key)
    packed = sd["weight"]
    if packed.dtype != torch.uint8:  # bnb_4bit_quant_storage: the packed bytes stored as another dtype
        packed = packed.contiguous().view(torch.uint8)
    sd["weight"] = packed.reshape(-1, 1)
    try:
        weight = NF4Weight.from_state_dict(sd, prefix="weight", strict=True)
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{file}: tensor {wkey!r}: {exc}") from None
    if tuple(weight.shape) != shape:
        raise CheckpointError(f"{file}: tensor {wkey!r} has quantized shape {list(weight.shape)} but config.json "
                              f"gives {list(shape)}")
    n = math.prod(shape)
    if packed.numel() != (n + 1) // 2:
        raise CheckpointError(f"{file}: tensor {wkey!r} holds {packed.numel()} packed bytes, {(n + 1) // 2} "
                              f"expected for shape {list(shape)}")
    if weight.device == torch.device(device):  # own the bytes: see the copy=True of dense tensors
        return NF4Weight(*(t.clone() for t in weight.tensors()[:2]), shape=weight.shape, dtype=weight.dtype,
                         blocksize=weight.blocksize,
                         nested_absmax=None if weight.nested_absmax is None else weight.nested_absmax.clone(),
                         offset=None if weight.offset is None else weight.offset.clone())
    return weight.to(device)


# ---------------------------------------------------------------------------------------------- the writer
def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    s = str(size).strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                       ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _config_dict(model) -> dict:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"model must be a transformers PreTrainedModel (with .config), got {type(model).__name__}")
    d = config.to_dict()
    d.pop("quantization_config", None)
    return d


def _write_shards(groups: list, root: Path, max_shard_size: int) -> None:
    """groups: lists of (key, tensor producer) kept in one shard; writes model.safetensors or shards + index."""
    from safetensors.torch import save_file

    shards, current, size = [], [], 0
    for group in groups:
        gsize = sum(nbytes for _, _, nbytes in group)
        if current and size + gsize > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current += group
        size += gsize
    if current or not shards:
        shards.append(current)
    names = ([SINGLE_NAME] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, total = {}, 0
    for shard, fname in zip(shards, names):
        tensors = {}
        for key, make, nbytes in shard:
            t = make()
            tensors[key] = t.detach().to("cpu").contiguous().clone()  # own storage: safetensors rejects sharing
            weight_map[key] = fname
            total += nbytes
        save_file(tensors, str(root / fname), metadata={"format": "pt"})
        del tensors
    for stale in [SINGLE_NAME, INDEX_NAME]:
        if stale not in names and (root / stale).exists():
            (root / stale).unlink()
    if len(shards) > 1:
        with open(root / INDEX_NAME, "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)


def save_pretrained(
    model: nn.Module,
    path: Union[str, os.PathLike],
    *,
    merge_adapters: bool = False,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: Union[int, str] = "5GB",
) -> None:
    """Write a prepared model's base as a Hugging Face checkpoint directory.

    merge_adapters=False: a bitsandbytes-4bit checkpoint: config.json with a bitsandbytes quantization_config,
        safetensors with each QLoRALinear's NF4 weight under bitsandbytes' keys (quant_storage uint8) and its
        bias, every other tensor in its own dtype (dense Linear modules listed in llm_int8_skip_modules).
        transformers + bitsandbytes load it with identical outputs; `load_pretrained` loads it bit for bit.
        The adapters are not written: save them with `save_adapter` (PEFT format).
    merge_adapters=True: a plain dense checkpoint with W = deq(W) + s * B @ A per QLoRALinear, every float
        tensor in `dtype` (default bfloat16); transformers loads it without this package.
    max_shard_size: bytes (or "5GB", "500MB") per safetensors shard; more than one writes an index.
    """
    root = Path(path)
    config = _config_dict(model)
    layers = nf4_modules(model)  # with adapters (QLoRALinear) or without (NF4Linear)
    from .experts import experts_modules

    experts = experts_modules(model)
    if merge_adapters:
        dtype = dtype or torch.bfloat16
    if not layers and not experts and not merge_adapters:
        raise ValueError("model has no QLoRALinear layers: prepare it (prepare_model / load_pretrained) first")
    groups, seen, dense_linear = [], {}, []
    double = {m.weight.double_quant for m in layers.values()} | {
        w.weight_nested_absmax is not None for e in experts.values() for w in e.projections.values()}
    if len(double) > 1:
        raise ValueError("save_pretrained: some layers are double-quantized and some not; bitsandbytes' "
                         "quantization_config holds one bnb_4bit_use_double_quant for all")
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, NF4Linear):
            if merge_adapters:
                group = [(prefix + "weight", lambda m=module: m.merged_weight(dtype),
                          module.in_features * module.out_features * dtype.itemsize)]
            else:
                wsd = module.weight.state_dict(prefix + "weight")
                group = [(k, lambda t=t: t, t.numel() * t.element_size()) for k, t in wsd.items()]
            if module.bias is not None:
                b = module.bias
                group.append((prefix + "bias", (lambda b=b: b.to(dtype)) if merge_adapters else (lambda b=b: b),
                              b.numel() * (dtype.itemsize if merge_adapters else b.element_size())))
            groups.append(group)
            continue
        if name in experts:  # MoE: the model's fused 3-D keys (merged, dense) or NF4 per expert (package format)
            for p, w in module.projections.items():
                if merge_adapters:
                    groups.append([(prefix + p, lambda w=w: w.dense(dtype, merge=True), w.numel * dtype.itemsize)])
                else:
                    groups.append([(k, lambda t=t: t, t.numel() * t.element_size())
                                   for k, t in w.nf4_state_dict(prefix + p + ".").items()])
                if module.has_bias:
                    b = getattr(module, p + "_bias")
                    groups.append([(prefix + p + "_bias", (lambda b=b: b.to(dtype)) if merge_adapters else (lambda b=b: b),
                                    b.numel() * (dtype.itemsize if merge_adapters else b.element_size()))])
            continue
        if _inside_qlora(name, layers) or _inside_qlora(name, experts):
            continue
        if isinstance(module, nn.Linear):
            dense_linear.append(name)
        persistent = [n for n in module._buffers if n not in module._non_persistent_buffers_set]
        own = [(n, p) for n, p in module._parameters.items() if p is not None]
        own += [(n, module._buffers[n]) for n in persistent if module._buffers[n] is not None]
        for attr, t in own:
            key = prefix + attr
            sid = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if sid in seen:  # a tied weight: written once, as transformers does
                continue
            seen[sid] = key
            cast = merge_adapters and t.is_floating_point()
            groups.append([(key, (lambda t=t: t.to(dtype)) if cast else (lambda t=t: t),
                            t.numel() * (dtype.itemsize if cast else t.element_size()))])
    root.mkdir(parents=True, exist_ok=True)
    if merge_adapters:
        config.update(dtype=str(dtype).replace("torch.", ""))
        config.pop("torch_dtype", None)
    else:
        compute = _dense_dtype(model, layers)
        config["quantization_config"] = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": bool(double.pop()),
            "bnb_4bit_compute_dtype": DTYPE_NAMES[compute],
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": dense_linear or None,
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
        }
        config["dtype"] = DTYPE_NAMES[compute]
        config.pop("torch_dtype", None)
    _write_shards(groups, root, _parse_size(max_shard_size))
    with open(root / "config.json", "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)


def _inside_qlora(name: str, layers: dict) -> bool:
    """True for submodules of a QLoRALinear (its lora_A / lora_B): the adapters are saved apart."""
    parent = name
    while "." in parent:
        parent = parent.rpartition(".")[0]
        if parent in layers:
            return True
    return False


def _dense_dtype(model, layers) -> torch.dtype:
    """The float dtype of the model's dense parameters (the compute dtype), float32 when there is none."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and ".lora_" not in name:
            return p.dtype
    return torch.float32
