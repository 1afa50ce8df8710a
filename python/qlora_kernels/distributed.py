"""FSDP2 for prepared models: the NF4 weights sharded byte for byte, full and sharded state dicts, meta init.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards parameters on dim 0 and leaves buffers replicated; a
MixedPrecisionPolicy casts floating parameters but never integer ones, and its all-gather moves mixed dtypes
as raw bytes. So every NF4Linear / QLoRALinear stores its NF4 weight by rows as frozen uint8 parameters from
the moment it is built (nn.py; one storage, whoever built the model: prepare_model, load_pretrained,
from_pretrained(quantization_config=NF4Config), PEFT on top of them):

    weight_packed   uint8 [N, K / 2]             the packed codes of row i are bytes [i K/2, (i+1) K/2)
    weight_absmax   uint8 [N, K / blocksize]     double-quantized scale codes (row i owns its K / blocksize blocks)
                    uint8 [N, 4 K / blocksize]   without double quantization: the float32 scales' bytes
    weight_nested_absmax, weight_offset          float32 buffers (one per 256 blocks: small), replicated

A launcher that calls `fully_shard` on each decoder layer and the root itself (accelerate's FSDP2 plugin,
torchtitan, torchtune) therefore shards them with no call of ours: each rank holds ceil(N / world) rows of
every NF4 weight (FSDP2 pads the last rank), the all-gather before a layer's forward and backward rebuilds
the exact bytes, and no cast can touch them. This needs blocks that do not straddle rows (in_features %
blocksize == 0, true of every real model); other layers keep flat buffers, replicated on every rank.
`shard_model` is the convenience that makes those calls (and says which layers stay replicated).

State dicts of a sharded model use the attribute names above (DTensors for the sharded ones): that is what
torch.distributed.checkpoint saves (`save_sharded`) and reloads on any world size (`load_sharded`, also into
a single-process model). `full_state_dict` gathers the bitsandbytes Linear4bit keys to rank 0.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Iterable, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .model import nf4_modules, qlora_modules
from .nn import _NF4_BUFFERS, NF4Linear, _is_dtensor
from .weight import NF4Weight

__all__ = [
    "replicated_layers",
    "find_layers",
    "shard_model",
    "nf4_shard_bytes",
    "full_state_dict",
    "save_sharded",
    "load_sharded",
    "load_from_rank0",
]

_REPLICATED = ("weight_nested_absmax", "weight_offset")

def replicated_layers(model: nn.Module) -> list[str]:
    """The paths of the NF4 layers whose weights FSDP2 cannot shard (in_features % blocksize != 0: their blocks
    straddle rows, so their flat NF4 buffers stay replicated). Every other NF4 layer is stored by rows from the
    start (nn.py), which FSDP2 shards on dim 0."""
    return [name for name, m in nf4_modules(model).items() if not m.row_layout]


def find_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks to shard one by one: the children of every outermost nn.ModuleList holding an
    NF4Linear / QLoRALinear (decoder layers of Hugging Face models: model.layers, encoder.layer, ...)."""
    found, taken = [], []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or any(name.startswith(t + ".") for t in taken):
            continue
        kids = [c for c in m if any(isinstance(s, NF4Linear) for s in c.modules())]
        if kids:
            found += kids
            taken.append(name)
    return found


def _default_mesh(model: nn.Module):
    from torch.distributed.device_mesh import init_device_mesh

    dev = next((t.device for t in model.parameters() if t.device.type != "meta"), torch.device("cpu"))
    return init_device_mesh(dev.type, (dist.get_world_size(),))


def shard_model(model: nn.Module, mesh=None, *, layers: Optional[Iterable[nn.Module]] = None, mp_policy=None,
                reshard_after_forward: bool = True, activation_checkpointing: bool = False,
                compile: Union[bool, dict] = False, verbose: bool = True) -> nn.Module:
    """Shard a prepared model with FSDP2: `fully_shard` on each layer, then on the root. In place.

    The NF4 weights are stored so that plain `fully_shard` shards them (see the module docstring): this
    function is the convenience that finds the layers, warns about replicated ones and adds the options below.

    Args:
        model: a model after `prepare_model` (on its device, or on meta: see `load_from_rank0`).
        mesh: a 1-D DeviceMesh (default: every process of the default group, on the parameters' device type;
            on CPU that needs the gloo backend).
        layers: modules to shard one by one (default: `find_layers(model)`, e.g. the decoder layers).
        mp_policy: a `torch.distributed.fsdp.MixedPrecisionPolicy` (e.g. param_dtype=torch.bfloat16): it casts
            the adapters and dense parameters, never the uint8 NF4 codes.
        reshard_after_forward: free each layer's gathered parameters after its forward (re-gather in backward).
        activation_checkpointing: recompute each layer's activations in backward (composable checkpoint; keeps
            the parameter names).
        compile: torch.compile each layer after fully_shard (`layer.compile(**compile)`; True: torch.compile's
            defaults), as torchtitan does per transformer block. Dynamo skips FSDP2's hooks
            (torch._dynamo.config.skip_fsdp_hooks): the all-gathers run eagerly around each compiled layer,
            whose graph sees the gathered uint8 codes as plain tensors and the NF4 ops through their fake
            implementations. tests/test_fsdp.py trains with fullgraph=True (no graph break), backend
            aot_eager, on two gloo processes; the inductor backend gave the same adapters (checked by hand).
        verbose: say once (rank 0) which layers stay replicated.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_model needs torch.distributed initialized (torchrun, or dist.init_process_group)")
    if not nf4_modules(model):
        raise ValueError(f"{type(model).__name__} has no NF4Linear / QLoRALinear: call prepare_model(model) "
                         "before shard_model")
    if not isinstance(reshard_after_forward, bool):
        raise TypeError(f"reshard_after_forward must be a bool, got {reshard_after_forward!r}")
    if not isinstance(compile, (bool, dict)):
        raise TypeError(f"compile must be a bool or a dict of torch.compile options, got {compile!r}")
    mesh = _default_mesh(model) if mesh is None else mesh
    replicated = replicated_layers(model)
    if replicated and verbose and dist.get_rank() == 0:
        shown = ", ".join(replicated[:6]) + (" ..." if len(replicated) > 6 else "")
        warnings.warn(f"{len(replicated)} NF4 layer(s) have in_features % blocksize != 0 (NF4 blocks "
                      f"straddle rows): their NF4 weights stay replicated on every rank: {shown}", stacklevel=2)
    layers = find_layers(model) if layers is None else list(layers)
    kwargs = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                  mp_policy=MixedPrecisionPolicy() if mp_policy is None else mp_policy)
    for layer in layers:
        if layer is model:
            raise ValueError("layers must not contain the model itself (it is sharded last, as the root)")
        if activation_checkpointing:
            from torch.distributed._composable import checkpoint

            checkpoint(layer)
        fully_shard(layer, **kwargs)
        if compile is not False:
            layer.compile(**({} if compile is True else compile))
    fully_shard(model, **kwargs)
    return model


def nf4_shard_bytes(model: nn.Module) -> dict:
    """Bytes of NF4 storage of `model` on this rank: {"sharded": local bytes of the row-layout codes,
    "replicated": nested scales, offsets and straddling layers' buffers, "total_unsharded": the whole weights}."""
    sharded = replicated = total = 0
    for m in nf4_modules(model).values():
        for name in _NF4_BUFFERS:
            t = getattr(m, name)
            if t is None:
                continue
            full = t.numel() * t.element_size()
            total += full
            if _is_dtensor(t):
                local = t.to_local()
                sharded += local.numel() * local.element_size()
            else:
                replicated += full
    return {"sharded": sharded, "replicated": replicated, "total_unsharded": total}


# ------------------------------------------------------------------------------------------------ state dicts
def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def full_state_dict(model: nn.Module, rank0_only: bool = True) -> dict:
    """The whole model's state dict on CPU, with bitsandbytes Linear4bit keys for every NF4 layer (what a
    single-process prepared model's `state_dict()` holds; loads with `load_state_dict` / NF4Weight.from_state_dict).

    A collective: call it on every rank. Sharded tensors are all-gathered one at a time; with rank0_only the
    other ranks drop them and get {}.
    """
    keep = _rank() == 0 or not rank0_only
    out = {}
    for key, t in model.state_dict().items():  # the same keys in the same order on every rank
        if _is_dtensor(t):
            t = t.full_tensor()
        if keep:
            out[key] = t.detach().cpu()
    if not keep:
        return {}
    for name, m in nf4_modules(model).items():
        p = name + "." if name else ""
        if p + "weight_packed" not in out:  # not sharded: its state dict has the bitsandbytes keys already
            continue
        packed, absmax = out[p + "weight_packed"], out[p + "weight_absmax"]
        nested, offset = out.get(p + "weight_nested_absmax"), out.get(p + "weight_offset")
        if nested is None:
            absmax = absmax.contiguous().view(torch.float32)
        w = NF4Weight(packed.reshape(-1, 1), absmax.reshape(-1), shape=(m.out_features, m.in_features),
                      dtype=m.weight_dtype, blocksize=m.blocksize, nested_absmax=nested, offset=offset)
        bnb = w.state_dict(p + "weight")
        rebuilt = {}
        for key, t in out.items():  # keep the module's key order: bnb keys where weight_packed was
            if key == p + "weight_packed":
                rebuilt.update(bnb)
            elif key not in (p + "weight_absmax", p + "weight_nested_absmax", p + "weight_offset"):
                rebuilt[key] = t
        out = rebuilt
    return out


def _checkpoint_state(model: nn.Module) -> dict:
    """model.state_dict() with every NF4 layer's tensors under their attribute names (the replicated layers'
    flat buffers included: their bitsandbytes quant-state bytes vary in length, which DCP cannot reload in
    place; an unsharded model's row-layout tensors too). Every tensor aliases the module's storage, so DCP
    loads in place."""
    state = model.state_dict()
    for path, m in nf4_modules(model).items():
        p = path + "." if path else ""
        for key in [k for k in state if k == p + "weight" or k.startswith(p + "weight.")]:
            del state[key]
        for name in _NF4_BUFFERS:
            t = getattr(m, name)
            if t is not None:
                state[p + name] = t.detach()
    return state


def save_sharded(model: nn.Module, path) -> None:
    """Save a (sharded) model with torch.distributed.checkpoint: each rank writes its own shards. Collective."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_checkpoint_state(model), checkpoint_id=os.fspath(path))


def load_sharded(model: nn.Module, path) -> nn.Module:
    """Load a `save_sharded` checkpoint into `model`, sharded on any world size or in a single process
    (the model must be prepared like the saved one). Collective when distributed."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # one process without a process group is a use this function supports
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(_checkpoint_state(model), checkpoint_id=os.fspath(path))  # in place, into the model's tensors
    for m in nf4_modules(model).values():
        m._weight_cache = None
    return model


def load_from_rank0(model: nn.Module, tensors: Optional[Iterable] = None, init_adapters: bool = True) -> nn.Module:
    """Fill a sharded model (e.g. built on the meta device, then `shard_model`, then `to_empty`) from
    full-precision tensors that only rank 0 reads, one at a time. Collective: call it on every rank.

    tensors: on rank 0, an iterable of (name, tensor) under the unprepared model's state-dict names
        (`layers.0.q.weight` for a QLoRALinear's base weight, `layers.0.q.bias`, `embed.weight`, ...), e.g.
        streamed from safetensors' safe_open; ignored on the other ranks. A QLoRALinear's weight is quantized on
        rank 0 (so double quantization sees the whole weight, bit-identical to a single-process prepare_model)
        and its NF4 bytes are broadcast; every rank keeps its rows. Rank 0 never holds more than one
        full-precision tensor. Names the model does not know, wrong shapes, and tensors of the model that the
        stream left out raise the same error on every rank.
    init_adapters: initialise every LoRA A (kaiming-uniform, drawn on rank 0) and B (zeros), as prepare_model
        does, since after `to_empty` they hold garbage.
    Non-persistent buffers (not in any state dict, e.g. rotary tables) are the caller's to recompute.
    """
    from .functional import quantize_nf4

    rank = _rank()
    layers = nf4_modules(model)  # NF4Linear and QLoRALinear: the base weights
    own = model.state_dict(keep_vars=True)
    device = next((t.device for t in own.values() if t.device.type != "meta"), torch.device("cpu"))
    comm_device = device if dist.get_backend() != "gloo" else torch.device("cpu")
    it = iter(tensors) if rank == 0 else None
    expected = {k for k in own if "lora_" not in k}
    for path, m in layers.items():
        p = path + "." if path else ""
        expected = {k for k in expected if not (k.startswith(p + "weight_") or k.startswith(p + "weight."))}
        expected.add(p + "weight")
    loaded = set()
    while True:
        header = [None]
        if rank == 0:
            try:
                item = next(it)
                name, t = item
                header = [(name, tuple(t.shape), t.dtype, None)]
            except StopIteration:
                header = [None]
            except Exception as exc:  # a bad item on rank 0 must not hang the others
                header = [("", (), None, f"{type(exc).__name__}: {exc}")]
        dist.broadcast_object_list(header, src=0)
        if header[0] is None:
            break
        name, shape, dtype, error = header[0]
        if error is not None:
            raise ValueError(f"load_from_rank0: rank 0 failed to read a tensor: {error}")
        loaded.add(name)
        module_path, _, leaf = name.rpartition(".")
        m = layers.get(module_path)
        if m is not None and leaf == "weight":
            if tuple(shape) != (m.out_features, m.in_features):
                raise ValueError(f"load_from_rank0: {name} has shape {list(shape)}, the layer is "
                                 f"[{m.out_features}, {m.in_features}]")
            double = m.weight_nested_absmax is not None
            if rank == 0:
                w = quantize_nf4(t.to(comm_device), blocksize=m.blocksize, double_quant=double)
                parts = [w.packed.reshape(-1), w.absmax.reshape(-1).view(torch.uint8)]
                if double:
                    parts += [w.nested_absmax, w.offset.reshape(1)]
            else:
                nb = m.out_features * m.in_features // m.blocksize if m.row_layout else \
                    -(-m.out_features * m.in_features // m.blocksize)
                parts = [torch.empty((m.out_features * m.in_features + 1) // 2, dtype=torch.uint8, device=comm_device),
                         torch.empty(nb * (1 if double else 4), dtype=torch.uint8, device=comm_device)]
                if double:
                    parts += [torch.empty(-(-nb // 256), dtype=torch.float32, device=comm_device),
                              torch.empty(1, dtype=torch.float32, device=comm_device)]
            for p in parts:
                dist.broadcast(p, src=0)
            _copy_nf4_into(m, parts)
            continue
        target = own.get(name)
        if target is None:
            raise KeyError(f"load_from_rank0: {name!r} is not in the model (known: {', '.join(list(own)[:8])} ...)")
        if tuple(shape) != tuple(target.shape):
            raise ValueError(f"load_from_rank0: {name} has shape {list(shape)}, the model's is {list(target.shape)}")
        full = t.to(comm_device, target.dtype) if rank == 0 else torch.empty(shape, dtype=target.dtype,
                                                                           device=comm_device)
        dist.broadcast(full, src=0)
        _copy_rows_into(target, full)
    missing = sorted(expected - loaded)
    if missing:
        raise KeyError(f"load_from_rank0: the stream left out {len(missing)} tensor(s) of the model: "
                       f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if init_adapters:
        for m in qlora_modules(model).values():
            for lin, init in ((m.lora_A, "kaiming"), (m.lora_B, "zeros")):
                w = lin.weight
                full = torch.zeros(w.shape, dtype=w.dtype, device=comm_device)
                if init == "kaiming" and rank == 0:
                    nn.init.kaiming_uniform_(full, a=math.sqrt(5))
                dist.broadcast(full, src=0)
                _copy_rows_into(w, full)
    return model


def _copy_rows_into(target: Tensor, full: Tensor) -> None:
    """Copy this rank's part of `full` (the whole tensor) into `target` (a DTensor shard or a plain tensor)."""
    with torch.no_grad():
        if _is_dtensor(target):
            from torch.distributed.tensor import distribute_tensor

            local = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
            target.to_local().copy_(local)
        else:
            target.copy_(full)


def _copy_nf4_into(m: NF4Linear, parts: list) -> None:
    n, k = m.out_features, m.in_features
    packed, absmax_bytes = parts[0], parts[1]
    with torch.no_grad():
        if m.row_layout:
            _copy_rows_into(m.weight_packed, packed.view(n, k // 2))
            _copy_rows_into(m.weight_absmax, absmax_bytes.view(n, -1))
        else:
            m.weight_packed.view(-1).copy_(packed)
            m.weight_absmax.view(-1).copy_(absmax_bytes if m.weight_nested_absmax is not None
                                           else absmax_bytes.view(torch.float32))
        if m.weight_nested_absmax is not None:
            m.weight_nested_absmax.copy_(parts[2])
            m.weight_offset.copy_(parts[3].reshape(()))
    m._weight_cache = None
