"""PEFT's LoRA on this package's NF4Linear: `peft.get_peft_model` and `PeftModel.from_pretrained` on a model
whose quantized linears are `qlora_kernels.nn.NF4Linear` give `LoraNF4Linear` layers that run the fused
autograd (`qlora::nf4_linear` with the LoRA term in its epilogue, `qlora::nf4_linear_dx` in backward).

Installed by `import qlora_kernels` (see `install`): peft is heavy to import (it pulls transformers), so the
hooks are put in place when peft itself is first imported, or at once when it already is. PEFT's custom-module
mapping (`LoraConfig._register_custom_module`) is per config and not saved with an adapter, so the layer is
dispatched from a wrapper of `LoraModel._create_new_module`, ahead of PEFT's own dispatchers.

What the hooks change in PEFT, and nothing else:
- `LoraModel._create_new_module`: an NF4Linear target gets a LoraNF4Linear; a QLoRALinear target (a model
  already carrying this package's own adapters) raises, saying how to get a PEFT-ready model.
- `LoraModel.inject_adapter`: `target_parameters` naming a weight of an NF4Experts (experts.py) raises,
  saying what to use instead (PEFT's ParamWrapper needs the dense 3-D parameter, which NF4Experts does not hold).
- `target_modules="all-linear"` also selects NF4Linear modules (PEFT's rule only knows nn.Linear / Conv1D).
- `PeftModel.get_nb_trainable_parameters` (print_trainable_parameters) counts an NF4 weight as its
  out_features * in_features logical elements, as PEFT counts bitsandbytes' Params4bit.

LoraNF4Linear keeps PEFT's layout (`base_layer`, `lora_A` / `lora_B` ModuleDicts, `scaling`, `lora_dropout`),
so saving, loading, several adapters, `set_adapter`, `disable_adapter()` and `modules_to_save` are PEFT's own
code. The first active adapter runs fused; further active adapters are added in plain torch. Merging builds
a dense nn.Linear holding deq(W) + sum s * B @ A computed in float32 and rounded once to the base's dtype (as
`qlora_kernels.merge_and_unload`); unmerging puts the untouched NF4 base back (no requantization). While
merged, the NF4 base is held aside outside the module tree: `.to()` on a merged model does not move it.

`peft.prepare_model_for_kbit_training` on a model with NF4Linear layers (tested in test_peft_integration.py):
- the NF4 codes and scales are never cast: they are uint8 / float32 tensors, and PEFT casts only float16 /
  bfloat16 parameters;
- it upcasts every other float16 / bfloat16 parameter (embeddings, norms, lm_head, NF4Linear biases) to
  float32, as on a bitsandbytes model. Activations leaving a float32 RMSNorm are float32, and the fused layer
  computes in its input's dtype (bitsandbytes casts to its compute_dtype instead), so without autocast the
  layers then run in float32: train under autocast (Trainer's bf16=True) to keep bf16 compute;
- gradient checkpointing and input grads are turned on only when `model.is_loaded_in_4bit` is set, and
  NF4Config's quantizer leaves it unset (integrations/transformers.py says why: TRL would cast the float32
  adapters to bf16, transformers' num_parameters would import bitsandbytes): pass gradient_checkpointing=True
  to the trainer, or call `model.enable_input_require_grads()` and enable checkpointing yourself.
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Optional

import torch
from torch import nn

__all__ = ["install", "register", "LoraNF4Linear"]

_INIT_OK = (True, False, "gaussian")  # initializations that touch only A and B
_registered = False


def _nf4_classes():
    from ..nn import NF4Linear, QLoRALinear

    return NF4Linear, QLoRALinear


def _check_config(config) -> None:
    """Refuse the LoraConfig options the fused layer cannot honour, naming each (before any layer changes)."""
    bad = []
    if getattr(config, "use_dora", False):
        bad.append("use_dora=True (DoRA)")
    if getattr(config, "lora_bias", False):
        bad.append("lora_bias=True")
    init = getattr(config, "init_lora_weights", True)
    if init not in _INIT_OK:
        bad.append(f"init_lora_weights={init!r} (only True, False or 'gaussian': other inits rewrite the base "
                   "weight or need it dense)")
    for f in dataclasses.fields(config):  # every LoRA variant PEFT declares (aLoRA, Arrow, VeLoRA, ...)
        if f.metadata.get("is_lora_variant") and f.name not in ("use_dora",) and getattr(config, f.name, None):
            bad.append(f"{f.name}={getattr(config, f.name)!r}")
    if bad:
        raise ValueError(
            "LoraConfig option(s) " + ", ".join(bad) + " are not supported on qlora-kernels NF4Linear layers "
            "(the fused kernel computes x @ deq(W)^T + s * dropout(x) @ A^T @ B^T + bias only)"
        )


def _dropout_p(module: nn.Module) -> float:
    """The probability of PEFT's lora_dropout module when it is active (nn.Dropout in train mode), else 0."""
    return float(module.p) if isinstance(module, nn.Dropout) and module.training else 0.0


def _build_layer_class():
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import check_adapters_to_merge

    from ..autograd import _qlora_linear

    class LoraNF4Linear(nn.Module, LoraLayer):
        """PEFT's LoRA layer on a qlora-kernels NF4Linear base: y = x @ deq(W)^T + bias + sum over the active
        adapters of s_a * dropout_a(x) @ A_a^T @ B_a^T.

        x: [..., in_features] float32/float16/bfloat16; returns [..., out_features] in x's dtype (under
        autocast: the autocast dtype). Adapters are float32 masters (PEFT's default), cast per call.
        Built by PEFT's dispatch with (base_layer, adapter_name, config, r, lora_alpha, **kwargs).
        """

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1,
                     **kwargs) -> None:
            _check_config(config)
            if getattr(config, "fan_in_fan_out", False):  # PEFT's rule for nn.Linear: warn, use [out, in]
                warnings.warn("fan_in_fan_out=True, but an NF4Linear weight is [out_features, in_features]: "
                              "setting fan_in_fan_out to False", UserWarning, stacklevel=2)
                config.fan_in_fan_out = False
            super().__init__()
            if kwargs.get("tied_adapter"):
                raise ValueError("tied LoRA adapters (an output head tied to the embeddings) are not supported "
                                 "on an NF4Linear base")
            LoraLayer.__init__(self, base_layer, **kwargs)
            self.fan_in_fan_out = False
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

        def _get_in_out_features(self, module: nn.Module):
            NF4Linear, _ = _nf4_classes()
            if isinstance(module, NF4Linear):
                return module.in_features, module.out_features
            return super()._get_in_out_features(module)

        def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
            _check_config(config)  # a second adapter (add_adapter / load_adapter) is checked too
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

        # ------------------------------------------------------------------------------------ merge
        def _nf4_base(self) -> nn.Module:
            """The NF4Linear: the base layer, or the one kept aside while a dense merged layer stands in."""
            kept = self.__dict__.get("_qk_nf4_base")
            return self.base_layer if kept is None else kept

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            """s * B @ A of `adapter` in float32, [out_features, in_features]."""
            return self.scaling[adapter] * (self.lora_B[adapter].weight.float() @ self.lora_A[adapter].weight.float())

        def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
            """Replace the base by a dense nn.Linear holding deq(W) + sum s * B @ A over the merged adapters,
            computed in float32 and rounded once to the NF4 weight's original dtype. The NF4 base is kept
            (not requantized) so `unmerge` is exact."""
            names = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_A]
            if not names:
                return
            nf4 = self._nf4_base()
            merged = list(self.merged_adapters) + names
            with torch.no_grad():
                w = nf4.weight.dequantize(torch.float32)
                for a in merged:  # the same float32 ops, in the same order, as QLoRALinear.merged_weight
                    w += self.scaling[a] * (self.lora_B[a].weight.float() @ self.lora_A[a].weight.float())
                if safe_merge and not torch.isfinite(w).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {names} seems to be broken")
                w = w.to(nf4.weight_dtype)
            dense = nn.Linear(nf4.in_features, nf4.out_features, bias=nf4.bias is not None, device=w.device,
                              dtype=w.dtype)
            dense.weight = nn.Parameter(w, requires_grad=False)
            if nf4.bias is not None:
                dense.bias = nn.Parameter(nf4.bias.detach().to(w.dtype).clone(), requires_grad=nf4.bias.requires_grad)
            dense.train(nf4.training)
            self.__dict__["_qk_nf4_base"] = nf4
            self.base_layer = dense
            self.merged_adapters.extend(names)

        def unmerge(self) -> None:
            """Put the NF4 base back (exact: it was never changed)."""
            if not self.merged:
                warnings.warn("Already unmerged. Nothing to do.")
                return
            self.base_layer = self.__dict__.pop("_qk_nf4_base")
            self.merged_adapters.clear()

        def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                               adapter_names: Optional[list[str]]) -> nn.Module:
            """What PEFT's merge_and_unload / unload put in this layer's place: the dense merged nn.Linear, or
            the base layer as it stands."""
            if merge:
                self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            return self.base_layer

        # ---------------------------------------------------------------------------------- forward
        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            self._check_forward_args(x, *args, **kwargs)
            adapter_names = kwargs.pop("adapter_names", None)
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return self.base_layer(x, *args, **kwargs)
            if adapter_names is not None:  # PEFT's mixed batch: base + plain-torch adapters per sub-batch
                return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
            active = [a for a in self.active_adapters if a in self.lora_A]
            if self.merged or not active:
                return self.base_layer(x, *args, **kwargs)
            base, first = self.base_layer, active[0]
            result = _qlora_linear(
                x, *base._nf4_tensors(), (base.out_features, base.in_features), base.blocksize,
                self.lora_A[first].weight, self.lora_B[first].weight, self.scaling[first], base.bias,
                _dropout_p(self.lora_dropout[first]), True,
            )
            for a in active[1:]:  # further adapters: PEFT's own arithmetic, added to the fused result
                lora_A, lora_B = self.lora_A[a], self.lora_B[a]
                xa = self._cast_input_dtype(x, lora_A.weight.dtype)
                result = result + (lora_B(lora_A(self.lora_dropout[a](xa))) * self.scaling[a]).to(result.dtype)
            return result

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

    LoraNF4Linear.__module__ = __name__
    LoraNF4Linear.__qualname__ = "LoraNF4Linear"
    return LoraNF4Linear


# ------------------------------------------------------------------------------------------- the hooks
def _dispatch(target, adapter_name, config, **kwargs):
    """PEFT dispatcher: a LoraNF4Linear for an NF4Linear target, None for anything else."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    NF4Linear, QLoRALinear = _nf4_classes()
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, QLoRALinear):
        raise ValueError(
            f"{kwargs.get('target_name') or type(base).__name__} is a qlora_kernels QLoRALinear, which carries "
            "qlora-kernels' own LoRA adapters (from qk.prepare_model); PEFT cannot add its adapters on top. For "
            "PEFT, start from a model whose quantized linears are NF4Linear (no adapters): "
            "from_pretrained(..., quantization_config=qk.NF4Config(...)), or train the QLoRALinear model with "
            "qk.save_adapter / qk.load_adapter, which write and read PEFT's adapter format"
        )
    if isinstance(base, NF4Linear):
        return LoraNF4Linear(target, adapter_name, config=config, **kwargs)
    return None


def _is_all_linear(config) -> bool:
    tm = getattr(config, "target_modules", None)
    return isinstance(tm, str) and tm.lower() == "all-linear"


def register() -> bool:
    """Put the hooks into PEFT (idempotent). Returns False when peft cannot be imported."""
    global _registered, LoraNF4Linear
    if _registered:
        return True
    try:
        import peft  # noqa: F401
        from peft import PeftModel
        from peft.tuners import tuners_utils
        from peft.tuners.lora.model import LoraModel
    except ImportError:
        return False
    LoraNF4Linear = _build_layer_class()

    original_create = LoraModel._create_new_module

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        new = _dispatch(target, adapter_name, lora_config, **kwargs)
        return new if new is not None else original_create(lora_config, adapter_name, target, **kwargs)

    LoraModel._create_new_module = staticmethod(_create_new_module)

    original_inject = LoraModel.inject_adapter

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        from ..experts import refuse_peft_target_parameters

        refuse_peft_target_parameters(model, self.peft_config[adapter_name])  # before any module changes
        return original_inject(self, model, adapter_name, *args, **kwargs)

    LoraModel.inject_adapter = inject_adapter

    original_all_linear = tuners_utils._maybe_include_all_linear_layers

    def _maybe_include_all_linear_layers(peft_config, model):
        all_linear = _is_all_linear(peft_config)
        peft_config = original_all_linear(peft_config, model)
        if all_linear:
            NF4Linear, _ = _nf4_classes()
            inside = {f"{p}.{s}" for p, m in model.named_modules() if isinstance(m, tuners_utils.BaseTunerLayer)
                      for s, _ in m.named_modules() if s}
            get_out = getattr(model, "get_output_embeddings", None)
            head = get_out() if callable(get_out) else None
            names = {n for n, m in model.named_modules() if isinstance(m, NF4Linear) and m is not head} - inside
            peft_config.target_modules = set(peft_config.target_modules) | names
        return peft_config

    tuners_utils._maybe_include_all_linear_layers = _maybe_include_all_linear_layers

    original_count = PeftModel.get_nb_trainable_parameters

    def get_nb_trainable_parameters(self):
        trainable, total = original_count(self)
        NF4Linear, _ = _nf4_classes()
        for m in self.modules():
            if isinstance(m, NF4Linear):  # W counts its logical elements (its codes may be buffers or uint8 params)
                counted = sum(p.numel() for n, p in m.named_parameters(recurse=False) if n != "bias")
                total += m.out_features * m.in_features - counted
        return trainable, total

    PeftModel.get_nb_trainable_parameters = get_nb_trainable_parameters
    _registered = True
    return True


class _PeftImportHook(importlib.abc.MetaPathFinder):
    """Runs `register` right after the `peft` package finishes importing (so `import qlora_kernels` does not
    import peft, and the hooks are in place before the user's first peft call)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "peft":
            return None
        # find the real spec with the other finders; stay installed until peft is executed: a bare
        # importlib.util.find_spec("peft") (transformers' is_peft_available) also lands here and imports nothing
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec("peft")
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            exec_module(module)
            try:
                register()
            except Exception as exc:  # a PEFT version whose internals moved: say so, keep peft usable
                warnings.warn(f"qlora_kernels could not hook into peft {getattr(module, '__version__', '?')}: "
                              f"{exc!r}; NF4Linear layers will not get PEFT LoRA layers", RuntimeWarning)

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    """Called by `import qlora_kernels`: register now when peft is imported, else when it is."""
    if "peft" in sys.modules:
        register()
    elif not any(isinstance(f, _PeftImportHook) for f in sys.meta_path) and importlib.util.find_spec("peft"):
        sys.meta_path.insert(0, _PeftImportHook())


def __getattr__(name):
    if name == "LoraNF4Linear":  # the class exists once peft is imported
        if not register():
            raise ImportError("LoraNF4Linear needs peft (pip install peft)")
        return globals()["LoraNF4Linear"]
    raise AttributeError(name)
