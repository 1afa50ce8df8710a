"""qlora-kernels: NF4 (bitsandbytes-compatible) quantization kernels and fused QLoRA layers."""

from ._backend import backend_info, get_backend, set_backend
from ._format import DYNAMIC_MAP, NF4_TABLE
from .functional import (
    dequantize_nf4,
    double_dequantize,
    double_quantize,
    pack_nf4,
    quantize_nf4,
    unpack_nf4,
)
from .weight import NF4Weight

__version__ = "0.1.0"

__all__ = [
    "NF4_TABLE",
    "DYNAMIC_MAP",
    "NF4Weight",
    "quantize_nf4",
    "dequantize_nf4",
    "pack_nf4",
    "unpack_nf4",
    "double_quantize",
    "double_dequantize",
    "backend_info",
    "get_backend",
    "set_backend",
]

# --- training layer (autograd, nn modules, model preparation, adapters) ---
from .autograd import NF4LinearFunction, QLoRALinearFunction, qlora_linear  # noqa: E402
from .nn import BnbRepackedError, NF4Linear, QLoRALinear  # noqa: E402
from .model import PrepareReport, merge_and_unload, prepare_model  # noqa: E402
from .adapters import load_adapter, save_adapter  # noqa: E402
from .experts import GroupedQLoRAFunction, NF4Experts  # noqa: E402  (MoE experts: __all__ below)

__all__ += ["QLoRALinearFunction", "NF4LinearFunction", "qlora_linear", "NF4Linear", "QLoRALinear", "prepare_model",
            "PrepareReport", "merge_and_unload", "save_adapter", "load_adapter"]
__all__ += ["BnbRepackedError"]  # a bitsandbytes layer repacked by bitsandbytes for its CPU kernel: see nn.py
__all__ += ["NF4Experts", "GroupedQLoRAFunction"]

# --- big models: streaming load / save of Hugging Face checkpoints, memory planner ---
from .checkpoint import CheckpointError, load_pretrained, save_pretrained  # noqa: E402
from .planner import MemoryPlan, plan_memory  # noqa: E402

__all__ += ["load_pretrained", "save_pretrained", "CheckpointError", "plan_memory", "MemoryPlan"]

# --- optimizers (8-bit and paged AdamW) ---
from . import optim  # noqa: E402
from .optim import AdamW8bit, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit  # noqa: E402

__all__ += ["optim", "AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit"]

# --- several processes: FSDP2 sharding of the NF4 weights, state dicts, meta init (distributed.py) ---
from .distributed import full_state_dict, load_from_rank0, load_sharded, save_sharded, shard_model  # noqa: E402

__all__ += ["shard_model", "full_state_dict", "save_sharded", "load_sharded", "load_from_rank0"]

# --- the Hugging Face stack: PEFT's LoRA on NF4Linear, hooked in when peft is imported (integrations/) ---
from .integrations import peft as _peft_integration  # noqa: E402

_peft_integration.install()

# --- transformers: NF4Config (quant_method "qlora_kernels"), registered when transformers' quantizers load ---
from .integrations import install_transformers_hook as _install_transformers_hook  # noqa: E402

_install_transformers_hook()  # NF4Config stays out of __all__: `import *` must not need transformers


def __getattr__(name):
    if name == "NF4Config":  # needs transformers >= 5: imported on first use (ImportError saying so otherwise)
        from .integrations.transformers import NF4Config, register

        register()
        return NF4Config
    raise AttributeError(f"module 'qlora_kernels' has no attribute {name!r}")
