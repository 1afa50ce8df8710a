"""transformers' quantization_config for this package: `NF4Config` and its HfQuantizer (quant_method "qlora_kernels").

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qk.NF4Config(compute_dtype=torch.bfloat16),
                                                 dtype=torch.bfloat16)

Before any weight exists (the model is on the meta device) every nn.Linear but the skipped ones becomes an
`NF4Linear` skeleton; each weight is quantized as transformers streams it in (one full-precision tensor in
memory at a time: transformers loads sequentially when a quantizer quantizes on load), with the bytes of
`quantize_nf4` of that tensor in the load dtype. `save_pretrained` writes the NF4 tensors under bitsandbytes'
Linear4bit keys and config.json's quantization_config; `from_pretrained` of that directory rebuilds the same
model (no config passed: it is read from config.json, with `import qlora_kernels` done), and
`qlora_kernels.load_pretrained` reads it too. `NF4Config(serialize_as="bitsandbytes")` writes config.json as a
bitsandbytes 4-bit nf4 config instead, which transformers + bitsandbytes load (the tensors are the same).

Mixture-of-experts models: the fused experts modules (Qwen3MoeExperts, MixtralExperts, GptOssExperts: 3-D
gate_up_proj / down_proj) become `NF4Experts` too, each expert quantized exactly as `quantize_nf4` of its
[out, in] matrix; the router stays dense. transformers' weight conversion assembles each fused parameter from
the checkpoint's per-expert keys first (one fused full-precision parameter in memory at a time, not one expert
matrix as qlora_kernels.load_pretrained), then NF4Quantize quantizes it; the module is swapped after loading.
They save fused under `<param>.weight*` keys and reload as such; serialize_as="bitsandbytes" refuses them.

What trainers read, and what they then do:
- `model.is_quantized` True, `model.quantization_method` "qlora_kernels", `config.quantization_config`.
- `model.is_loaded_in_4bit` is NOT set, by choice. Where trainers test it, they then treat the model as a
  float model with a frozen base, which is right here: TRL keeps the trainable parameters as they are (PEFT's
  float32 adapter masters) instead of casting them to bf16, so a resumed run is bit-identical (with the flag,
  TRL's bf16 cast and PEFT's float32 re-load of the adapters on resume made a 4-step SFTTrainer run diverge at
  step 4: loss 4.86308 vs 4.86355, tests/test_trl_sft.py); transformers' `num_parameters()` (Trainer's FLOP
  count, every step) does not import bitsandbytes, which it does whenever the flag is set.
  Where this does not do what a bitsandbytes user expects: PEFT's `prepare_model_for_kbit_training` only
  freezes and upcasts (it enables gradient checkpointing and input grads only for is_loaded_in_4bit/8bit or
  methods it knows): pass `gradient_checkpointing=True` to the trainer (TRL then enables input grads for a PEFT
  model itself) or call `model.gradient_checkpointing_enable()` and `model.enable_input_require_grads()`; and
  Trainer may wrap the model in DataParallel on several GPUs, as for any unquantized model.
- `prepare_model_for_kbit_training` upcasts float16/bfloat16 *parameters* to float32; the NF4 codes and scales
  are buffers (uint8 codes, float32 scales), so they are never cast. It does upcast the NF4 layers' biases,
  norms, embeddings and lm_head, as it does for bitsandbytes.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .._format import FLOAT_DTYPES
from ..functional import quantize_nf4
from ..experts import (EXPERTS_QUANT_STATE_KEY, NF4Experts, NF4ExpertWeight, check_experts_layout,
                       find_experts_modules)
from ..nn import NF4Linear
from ..weight import QUANT_STATE_KEY

__all__ = ["NF4Config", "QUANT_METHOD", "register"]

QUANT_METHOD = "qlora_kernels"
MIN_TRANSFORMERS = (5, 0)
_SERIALIZED = ["weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
               f"weight.{QUANT_STATE_KEY}", "weight.offset", f"weight.{EXPERTS_QUANT_STATE_KEY}"]
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _transformers_version() -> tuple:
    try:
        import transformers
    except ImportError:
        raise ImportError("qlora_kernels.NF4Config needs transformers >= 5.0 (pip install 'transformers>=5'); "
                          "without it use qlora_kernels.load_pretrained") from None
    parts = []
    for p in transformers.__version__.split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts), transformers.__version__


def _require_transformers():
    version, text = _transformers_version()
    if version < MIN_TRANSFORMERS:
        raise ImportError(f"qlora_kernels.NF4Config needs transformers >= 5.0 (its quantizer API: weight "
                          f"conversion ops, get_load_operations); found transformers {text}. Upgrade transformers, "
                          f"or load with qlora_kernels.load_pretrained(path), which works with transformers 4.")


_require_transformers()

from transformers.utils.quantization_config import QuantizationConfigMixin  # noqa: E402


def _as_dtype(value, name: str) -> Optional[torch.dtype]:
    if value is None:
        return None
    if isinstance(value, str):
        key = value.replace("torch.", "")
        value = getattr(torch, key, None) if key in ("float32", "float16", "bfloat16") else value
    if value not in FLOAT_DTYPES:
        raise ValueError(f"NF4Config: {name} must be torch.float32, torch.float16 or torch.bfloat16 (or its name), "
                         f"got {value!r}")
    return value


class NF4Config(QuantizationConfigMixin):
    """transformers' `quantization_config` for NF4 weights run by this package's kernels.

    Args:
        blocksize: NF4 block size (64, the bitsandbytes default and what QLoRA used; 32 ... 4096, a power of two).
        double_quant: quantize the block scales too (8-bit codes + one float32 per 256 blocks: ~0.127 bit/param
            instead of 0.5).
        compute_dtype: the dtype the model's activations and unquantized parameters use (None: from_pretrained's
            `dtype`). When both are given they must agree: the NF4 layers compute in their input's dtype.
        quant_storage: the packed codes' storage dtype; torch.uint8 only (the codes are bytes: the kernels, the
            checkpoints and qlora_kernels' FSDP2 sharding read them as such).
        modules_to_not_convert: modules kept dense, matched as transformers matches bitsandbytes'
            llm_int8_skip_modules: a path prefix up to a module boundary ("model.layers.1" and its children), a
            regex from the start with the same boundary, or a suffix ("lm_head", "mlp.down_proj"). None: transformers' default for quantizers, the output
            embeddings (lm_head), tied weights and the last module. A list replaces that default, as in
            BitsAndBytesConfig. After loading, the list actually used is stored here (so a saved model reloads
            with the same modules dense).
        serialize_as: "qlora_kernels" (config.json names this package's method: `import qlora_kernels` before
            from_pretrained) or "bitsandbytes" (config.json is a bitsandbytes 4-bit nf4 config, which
            transformers + bitsandbytes load without this package; the tensors are the same).
    Raises:
        ValueError naming the option for a bad value; ImportError for transformers < 5.
    """

    def __init__(self, blocksize: int = 64, double_quant: bool = True, compute_dtype=None,
                 quant_storage=torch.uint8, modules_to_not_convert=None, serialize_as: str = QUANT_METHOD,
                 **kwargs):
        quant_method = kwargs.pop("quant_method", QUANT_METHOD)
        if quant_method != QUANT_METHOD:
            raise ValueError(f"NF4Config: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if kwargs:
            raise ValueError(f"NF4Config: unknown option(s) {sorted(kwargs)} (known: blocksize, double_quant, "
                             f"compute_dtype, quant_storage, modules_to_not_convert, serialize_as)")
        self.quant_method = QUANT_METHOD
        if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not (
                32 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0):
            raise ValueError(f"NF4Config: blocksize must be a power of two in [32, 4096], got {blocksize!r}")
        if not isinstance(double_quant, bool):
            raise ValueError(f"NF4Config: double_quant must be True or False, got {double_quant!r}")
        if isinstance(quant_storage, str):
            quant_storage = getattr(torch, quant_storage.replace("torch.", ""), quant_storage)
        if quant_storage != torch.uint8:
            raise ValueError(f"NF4Config: quant_storage must be torch.uint8, got {quant_storage!r} (the packed codes "
                             "are bytes; a float storage dtype, bitsandbytes' FSDP1 device, is not supported)")
        if modules_to_not_convert is not None:
            if isinstance(modules_to_not_convert, str) or not all(
                    isinstance(m, str) and m for m in modules_to_not_convert):
                raise ValueError(f"NF4Config: modules_to_not_convert must be a list of module names or None, got "
                                 f"{modules_to_not_convert!r}")
            modules_to_not_convert = list(modules_to_not_convert)
        if serialize_as not in (QUANT_METHOD, "bitsandbytes"):
            raise ValueError(f"NF4Config: serialize_as must be {QUANT_METHOD!r} or 'bitsandbytes', got {serialize_as!r}")
        self.blocksize = blocksize
        self.double_quant = double_quant
        self.compute_dtype = _as_dtype(compute_dtype, "compute_dtype")
        self.quant_storage = torch.uint8
        self.modules_to_not_convert = modules_to_not_convert
        self.serialize_as = serialize_as

    def to_dict(self) -> dict:
        """What config.json's quantization_config holds (dtypes by name)."""
        if self.serialize_as == "bitsandbytes":
            return self._bnb_dict()
        return {
            "quant_method": QUANT_METHOD,
            "blocksize": self.blocksize,
            "double_quant": self.double_quant,
            "compute_dtype": None if self.compute_dtype is None else _DTYPE_NAMES[self.compute_dtype],
            "quant_storage": "uint8",
            "modules_to_not_convert": self.modules_to_not_convert,
            "serialize_as": self.serialize_as,
        }

    def _bnb_dict(self) -> dict:
        # transformers' BitsAndBytesConfig(load_in_4bit=True, nf4).to_dict() fields: its quantizer reads these
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": _DTYPE_NAMES[self.compute_dtype or torch.float32],
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": self.modules_to_not_convert,
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
        }

    def to_diff_dict(self) -> dict:
        return self.to_dict()


# ------------------------------------------------------------------------------------------------ quantizer
def _module_of(model, tensor_name: str):
    module_name, _, attr = tensor_name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


def _loaded(missing_keys, weight_key: str) -> None:
    """Tell transformers' loader that the NF4 layer owning `weight_key` ("<module>.weight") has its weight: every
    key of the module but its bias leaves the missing set (else the loader re-creates them empty afterwards)."""
    if missing_keys is None:
        return
    prefix = weight_key[: -len("weight")]
    for key in [k for k in missing_keys if k.startswith(prefix) and k != prefix + "bias"]:
        missing_keys.discard(key)


def _build_classes():
    """The HfQuantizer and its two conversion ops (transformers.quantizers imports every quantizer: ~8 s, so
    these classes are made on registration, not on `import qlora_kernels`)."""
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    class NF4Quantize(ConversionOps):
        """A full-precision weight as it streams in -> the NF4 bytes of quantize_nf4, set into the skeleton."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer

        def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
            cfg = self.hf_quantizer.quantization_config
            for name, value in input_dict.items():
                value = value[0] if isinstance(value, list) else value
                module, attr = _module_of(model, name)
                if not isinstance(module, NF4Linear):
                    # a fused 3-D expert parameter, assembled by the model's conversion (per-expert keys merged):
                    # quantized expert by expert; the NF4Experts replaces the module after loading
                    layout = self.hf_quantizer._experts[name.rpartition(".")[0]]
                    module.__dict__.setdefault("_qk_nf4_parts", {})[attr] = NF4ExpertWeight.quantize(
                        value, transposed=layout["transposed"], blocksize=cfg.blocksize,
                        double_quant=cfg.double_quant, name=name)
                    if missing_keys is not None:
                        missing_keys.discard(name)
                    continue
                module.set_weight(quantize_nf4(value, blocksize=cfg.blocksize, double_quant=cfg.double_quant))
                module._is_hf_initialized = True
                _loaded(missing_keys, name)
            return {}  # set above: the NF4 layer has no `weight` parameter to assign

    class NF4Deserialize(ConversionOps):
        """The Linear4bit keys of one layer (weight, weight.absmax, ...) -> its NF4 weight, bytes as stored."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer

        def convert(self, input_dict, full_layer_name=None, model=None, missing_keys=None, **kwargs):
            module, _ = _module_of(model, full_layer_name)
            sd = {k: (v[0] if isinstance(v, list) else v) for k, v in input_dict.items()}
            if isinstance(module, NF4ExpertWeight):  # one projection of an NF4Experts: stacked bytes as stored
                module._load_nf4(sd, "weight")
                module._is_hf_initialized = True
                _loaded(missing_keys, full_layer_name)
                return {}
            if not isinstance(module, NF4Linear):
                return input_dict  # a norm's or an embedding's `weight` (the pattern matches every weight)
            # a float weight alone is quantized like the layer; NF4 keys are taken as stored (checked)
            module._load_weight(sd, "weight")
            module._is_hf_initialized = True
            _loaded(missing_keys, full_layer_name)
            return {}

    class NF4HfQuantizer(HfQuantizer):
        """Swaps nn.Linear for NF4Linear on the meta device, quantizes each weight as it loads (or takes the
        stored NF4 bytes of a saved model), and marks the model as the trainers expect (see the module doc)."""

        requires_calibration = False
        serialized_names = {"weight": list(_SERIALIZED)}

        @property
        def quantized_element_size(self) -> float:
            return 0.5

        def validate_environment(self, *args, **kwargs):
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and "disk" in device_map.values():
                raise ValueError("NF4Config: device_map puts modules on 'disk'; NF4 layers are not disk-offloaded "
                                 "(keep the model on one device, or shard it with qlora_kernels.shard_model)")

        def update_dtype(self, dtype):
            # compute_dtype is the model's dtype (the NF4 layers compute in their input's dtype): it wins over
            # from_pretrained's dtype, which defaults to the checkpoint's or float32 when not given
            cdt = self.quantization_config.compute_dtype
            if cdt is None:
                return dtype
            if isinstance(dtype, torch.dtype) and dtype != cdt:
                warnings.warn(f"NF4Config(compute_dtype={cdt}) sets the model's dtype; from_pretrained's dtype "
                              f"{dtype} is not used")
            return cdt

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            module_name, _, attr = param_name.rpartition(".")
            layout = getattr(self, "_experts", {}).get(module_name)
            if layout is not None:  # a fused 3-D expert weight, once the model's conversion has assembled it
                return attr in layout["weights"]
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                return False
            return isinstance(module, NF4Linear) and attr == "weight"

        def _process_model_before_weight_loading(self, model, device_map=None, **kwargs):
            cfg = self.quantization_config
            skip = self.get_modules_to_not_convert(model, cfg.modules_to_not_convert,
                                                   getattr(model, "_keep_in_fp32_modules", None))
            self.modules_to_not_convert = sorted(skip)
            for name, module in list(model.named_modules()):
                if type(module) is not nn.Linear or not should_convert_module(name, skip):
                    continue
                new = NF4Linear.empty(module.in_features, module.out_features, bias=module.bias is not None,
                                      blocksize=cfg.blocksize, double_quant=cfg.double_quant,
                                      dtype=module.weight.dtype, device="meta")
                new.source_cls = type(module)
                new.train(module.training)
                parent, child = _module_of(model, name)
                parent._modules[child] = new
            # MoE: fused experts modules (3-D gate_up_proj / down_proj, not nn.Linear) are quantized too. A saved
            # NF4 model gets NF4Experts skeletons now (its keys are theirs); on the fly, the module stays as it is
            # while loading (the model's conversion assembles its fused parameters under their own names) and
            # NF4Quantize quantizes each assembled parameter; _process_model_after_weight_loading swaps it.
            self._experts = {}
            for name in find_experts_modules(model):
                if not should_convert_module(name, skip):
                    continue
                module = model.get_submodule(name)
                layout = check_experts_layout(name, module)  # an unknown layout raises, naming the module
                if cfg.serialize_as == "bitsandbytes":
                    raise ValueError(
                        f"NF4Config(serialize_as='bitsandbytes'): {name} ({type(module).__name__}) holds fused "
                        "experts, which this package quantizes per expert in its own format; bitsandbytes has no "
                        "format for them, so the saved config would not describe the model. Use "
                        "serialize_as='qlora_kernels', or keep the experts dense with "
                        f"modules_to_not_convert=[..., {name.rpartition('.')[2]!r}]")
                if self.pre_quantized:
                    parent, child = _module_of(model, name)
                    parent._modules[child] = NF4Experts(module, name, targets=(), blocksize=cfg.blocksize,
                                                        double_quant=cfg.double_quant)
                else:
                    self._experts[name] = layout
            _hide_nf4_buffers(model)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            model.__dict__.pop("named_non_persistent_buffers", None)  # _hide_nf4_buffers' override
            cfg = self.quantization_config
            unloaded = []
            for name, layout in getattr(self, "_experts", {}).items():
                module = model.get_submodule(name)
                parts = module.__dict__.pop("_qk_nf4_parts", {})
                if set(parts) != set(layout["weights"]):
                    unloaded.append(name)
                    continue
                new = NF4Experts(module, name, targets=(), blocksize=cfg.blocksize, double_quant=cfg.double_quant)
                for p, w in parts.items():  # the meta skeletons NF4Experts made -> the quantized projections
                    new._modules[p] = w
                parent, child = _module_of(model, name)
                parent._modules[child] = new
            self._experts = {}
            _keep_nf4_experts_keys(model)
            unloaded += [n for n, m in model.named_modules()
                         if isinstance(m, (NF4Linear, NF4ExpertWeight)) and m.weight_packed.device.type == "meta"]
            if unloaded:
                raise ValueError(
                    f"NF4Config: {len(unloaded)} quantized layer(s) got no weight from the checkpoint (first: "
                    f"{unloaded[:3]}); the checkpoint lacks them or their NF4 tensors did not load (see the "
                    "loading report above for conversion errors)")
            for m in model.modules():
                if isinstance(m, NF4Linear) and m.bias is not None:
                    m.bias.requires_grad_(False)  # the quantized layer is frozen as a whole, as NF4Linear's own
            # the modules actually kept dense: a saved model reloads with exactly these
            self.quantization_config.modules_to_not_convert = list(self.modules_to_not_convert)
            return model

        def is_serializable(self):
            return True

        @property
        def is_trainable(self) -> bool:
            return True

        def _dequantize(self, model, dtype=None):
            for name, module in list(model.named_modules()):
                if isinstance(module, NF4Experts):
                    parent, child = _module_of(model, name)
                    parent._modules[child] = module.unquantized(dtype, merge=False)
                    continue
                if isinstance(module, NF4Linear):
                    out_dtype = dtype or module.weight_dtype
                    lin = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                    device=module.weight_packed.device, dtype=out_dtype)
                    with torch.no_grad():
                        lin.weight.copy_(module.weight.dequantize(out_dtype))
                        if module.bias is not None:
                            lin.bias.copy_(module.bias)
                    parent, child = _module_of(model, name)
                    parent._modules[child] = lin
            return model

        def get_quantize_ops(self):
            return NF4Quantize(self)

        def get_load_operations(self):
            return {"deserialize": NF4Deserialize}

    return NF4HfQuantizer


def _keep_nf4_experts_keys(model) -> None:
    """Drop from `model._weight_conversions` the model's converters whose reverse would take the NF4 experts'
    keys (`...experts.gate_up_proj.weight`, `.weight.absmax`, ...) for the dense fused parameter on
    save_pretrained and split them per expert ("Undefined Operation encountered!"): the NF4 experts are saved
    fused, under their own keys, and reload as such. Renamings (Mixtral's block_sparse_moe <-> mlp) are kept."""
    from transformers.core_model_loading import WeightConverter, apply_converters

    conversions = getattr(model, "_weight_conversions", None)
    keys = [f"{n}.{p}.weight" for n, m in model.named_modules() if isinstance(m, NF4Experts) for p in m.weight_names]
    if not conversions or not keys:
        return

    def takes_nf4_keys(c):
        if not isinstance(c, WeightConverter):
            return False
        try:
            rev = [c.reverse_transform()]
        except NotImplementedError:  # an op without a reverse (the quantizer's own NF4Deserialize): not the model's
            return False
        return any(apply_converters(k, rev)[1] is not None for k in keys)

    model._weight_conversions = [c for c in conversions if not takes_nf4_keys(c)]


def _hide_nf4_buffers(model) -> None:
    """Keep the NF4 layers' tensors out of `model.named_non_persistent_buffers()` until loading ends.

    After the weights are loaded, transformers (5.x `_move_missing_keys_from_meta_to_device`) replaces every
    non-persistent buffer by `torch.empty_like` (they hold no checkpoint values, e.g. rotary tables, and are
    recomputed by `_init_weights`). The NF4 codes and scales are non-persistent buffers (their state-dict keys
    are bitsandbytes', written by NF4Linear itself) that the load has just filled, so they must be skipped. An
    instance attribute shadows the method for the load only (removed in `_process_model_after_weight_loading`).
    """
    from ..nn import _NF4_BUFFERS

    method = type(model).named_non_persistent_buffers

    def named_non_persistent_buffers(*args, **kwargs):
        for name, buf in method(model, *args, **kwargs):
            owner, _, attr = name.rpartition(".")
            if attr in _NF4_BUFFERS and isinstance(model.get_submodule(owner), (NF4Linear, NF4ExpertWeight)):
                continue
            yield name, buf

    model.named_non_persistent_buffers = named_non_persistent_buffers


_QUANTIZER = None


def register() -> bool:
    """Register NF4Config / its quantizer under quant_method "qlora_kernels" (idempotent)."""
    global _QUANTIZER
    from transformers.quantizers import auto

    if auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is NF4Config and QUANT_METHOD in auto.AUTO_QUANTIZER_MAPPING:
        return True
    if _QUANTIZER is None:
        _QUANTIZER = _build_classes()
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)  # a reload of this module re-registers
    auto.AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
    auto.register_quantization_config(QUANT_METHOD)(NF4Config)
    auto.register_quantizer(QUANT_METHOD)(_QUANTIZER)
    return True


def quantizer_class():
    """The registered HfQuantizer subclass (registers first)."""
    register()
    return _QUANTIZER
