"""Plain FSDP2, as the ecosystem's launchers call it, on models loaded or prepared here (two gloo processes).

accelerate's FSDP2 plugin calls `fully_shard` on each decoder layer (transformer_based_wrap), on the input
embeddings, on [final norm, lm_head] and on the root, with its MixedPrecisionPolicy and mesh=None; it calls
nothing of ours. accelerate 1.16's `Accelerator` never selects FSDP on CPU (AcceleratorState turns an FSDP
plugin into FSDP only for MULTI_GPU / XPU / NPU / ...: with gloo it gives MULTI_CPU, i.e. DDP), so this file
runs accelerate's own `accelerate.utils.fsdp_utils.fsdp2_prepare_model` with a stand-in Accelerator that
carries the attributes that function reads, and also `fully_shard` exactly as the brief of the launchers
goes (each decoder layer, then the root, mp_policy only). The NF4 codes and scales are sharded because
NF4Linear stores them as frozen uint8 parameters by rows from the start (nn.py).

Every rank runs the same full batch, so FSDP's gradient reduce-scatter averages identical values ((g + g) / 2
is exact in float32 and in bfloat16): the losses and adapter gradients equal the single-process model's bit
for bit. Under a bf16 MixedPrecisionPolicy the single-process twin holds its floating parameters in bf16 (what
the policy casts: parameters, not buffers), and so must agree bit for bit too. (Different data per rank
changes the summation order: tests/test_fsdp.py covers that with a derived bound.)
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 128
# (how the model is made, how it is sharded, the policy's param_dtype)
CASES = [
    ("from_pretrained+peft", "fully_shard", torch.float32),
    ("from_pretrained+peft", "fully_shard", torch.bfloat16),
    ("prepare_model", "fully_shard", torch.float32),
    ("prepare_model", "fully_shard", torch.bfloat16),
    ("from_pretrained+peft", "accelerate", torch.bfloat16),
]


def tiny_config():
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def batch():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, VOCAB, (2, 12), generator=g), torch.randint(0, VOCAB, (2, 12), generator=g)


def build(how: str, ckpt: str):
    """The model, the same on every rank and in the single-process reference (seeded); nonzero B, so that
    every adapter has gradients."""
    import qlora_kernels as qk

    if how == "from_pretrained+peft":
        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, quantization_config=qk.NF4Config(),
                                                                  dtype=torch.float32)
        torch.manual_seed(1)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules="all-linear"))
    else:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(tiny_config())
        torch.manual_seed(1)
        qk.prepare_model(model, target_modules="all-linear", r=4, alpha=8, verbose=False)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.train()


def nf4_layers(model):
    from qlora_kernels.nn import NF4Linear

    return {n: m for n, m in model.named_modules() if isinstance(m, NF4Linear)}


def step(model):
    """One forward + backward on the batch: (loss, {adapter name: its gradient as float32})."""
    ids, labels = batch()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = g.float().clone()
    return out.loss.detach().float(), grads


def shard(model, how: str, param_dtype, rank: int):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype if param_dtype != torch.float32 else None)
    if how == "fully_shard":  # each decoder layer, then the root: no call of ours
        for layer in [m for m in model.modules() if type(m).__name__ == "LlamaDecoderLayer"]:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            transformer_cls_names_to_wrap=["LlamaDecoderLayer"],
                                            mixed_precision_policy=policy, cpu_ram_efficient_loading=False)
    accelerator = types.SimpleNamespace(  # what fsdp2_prepare_model reads of an Accelerator
        state=types.SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, parallelism_config=None,
        is_main_process=rank == 0, mixed_precision="bf16" if param_dtype == torch.bfloat16 else "no",
        device=torch.device("cpu"))
    return fsdp2_prepare_model(accelerator, model)


def _run_plain(rank, world, out_dir):
    import os

    from qlora_kernels import distributed as qd

    ckpt = os.path.join(out_dir, "ckpt")
    res = {}
    for how, sharding, param_dtype in CASES:
        model = build(how, ckpt)
        layers = nf4_layers(model)
        before = {n: (m.weight.packed.clone(), m.weight.absmax.clone()) for n, m in layers.items()}
        model = shard(model, sharding, param_dtype, rank)
        seen = {}

        def grab(name):
            def hook(m, args):
                packed, absmax, _, _ = getattr(m, "base_layer", m)._nf4_tensors()  # what the kernels get: the all-gathered bytes
                seen[name] = torch.equal(packed.reshape(-1, 1), before[name][0]) and torch.equal(
                    absmax.reshape(-1), before[name][1])
            return hook

        for n, m in layers.items():  # PEFT's LoRA layer calls the fused op itself: hook it, not its base_layer
            model.get_submodule(n.removesuffix(".base_layer")).register_forward_pre_hook(grab(n))
        loss, grads = step(model)
        full = qd.full_state_dict(model)  # a collective: bitsandbytes keys gathered to rank 0
        if rank == 0:
            torch.save(full, os.path.join(out_dir, f"full-{len(res)}.pt"))
        qd.save_sharded(model, os.path.join(out_dir, f"dcp-{len(res)}"))  # each rank writes its own rows
        res[(how, sharding, str(param_dtype))] = dict(
            nf4=qd.nf4_shard_bytes(model), exact=seen, n_layers=len(layers), loss=loss, grads=grads,
            sharded_params=sorted(n for n, p in model.named_parameters() if hasattr(p, "to_local")
                                  and n.rsplit(".", 1)[-1] in ("weight_packed", "weight_absmax")),
            row_bytes=sum(m.weight_packed.shape[1] + m.weight_absmax.shape[1] for m in layers.values()))
    return res


@pytest.fixture(scope="module")
def run_plain(tmp_path_factory):
    from test_fsdp import spawn

    out = tmp_path_factory.mktemp("fsdp_plain")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_config()).save_pretrained(out / "ckpt")  # the seed-0 model of build()
    return out, spawn("test_fsdp_plain:_run_plain", out)


def reference(how, param_dtype, ckpt):
    """The single-process twin: the same model unsharded; under a bf16 policy its floating parameters (only:
    FSDP's policy casts no buffer) in bf16, as the policy casts them for compute."""
    model = build(how, str(ckpt))
    if param_dtype != torch.float32:
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(param_dtype)
    return step(model)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x).replace("torch.", "") for x in c))
def test_plain_fully_shard_shards_nf4_bytes_and_trains_exactly(run_plain, case):
    out, res = run_plain
    how, sharding, param_dtype = case
    key = (how, sharding, str(param_dtype))
    r0, r1 = res[0][key], res[1][key]
    n = r0["n_layers"]
    assert n == 14  # 2 layers x (q, k, v, o, gate, up, down): lm_head stays dense
    # every NF4 code and scale tensor is a DTensor sharded by FSDP2 (with no call of ours)
    assert len(r0["sharded_params"]) == 2 * n, r0["sharded_params"]
    # per rank: half of the row-layout bytes (FSDP2 pads the last rank: at most one row per tensor more), plus
    # the replicated nested scales and offsets (one float32 per 256 blocks + one per layer)
    total = r0["nf4"]["total_unsharded"]
    sharded_total = total - r0["nf4"]["replicated"]
    assert r0["nf4"]["sharded"] + r1["nf4"]["sharded"] == sharded_total
    for r in (r0, r1):
        assert abs(r["nf4"]["sharded"] - sharded_total / 2) <= r["row_bytes"]
        assert r["nf4"]["replicated"] <= 0.01 * total
    frac = (r0["nf4"]["sharded"] + r0["nf4"]["replicated"]) / total
    print(f"{key}: rank 0 holds {frac:.3f} of the NF4 bytes ({total} B in all)")
    assert frac <= 0.5 + 0.01
    # the kernels saw the original bytes, under the bf16 policy too
    for r in (r0, r1):
        assert len(r["exact"]) == n and all(r["exact"].values()), r["exact"]
    # the full state dict gathered from the shards: the single-process model's, keys and bytes
    full = torch.load(out / f"full-{CASES.index(case)}.pt")
    want = build(how, str(out / "ckpt")).state_dict()
    assert list(full) == list(want) and any(k.endswith(".weight.quant_state.bitsandbytes__nf4") for k in full)
    for k, v in want.items():
        assert full[k].dtype == v.dtype and torch.equal(full[k], v), k
    # the DCP checkpoint the two ranks wrote loads into one process (NF4 bytes and adapters zeroed first)
    from qlora_kernels import distributed as qd

    fresh = build(how, str(out / "ckpt"))
    with torch.no_grad():
        for m in nf4_layers(fresh).values():
            m.weight_packed.zero_()
            m.weight_absmax.zero_()
        for name, p in fresh.named_parameters():
            if "lora_" in name:
                p.zero_()
    qd.load_sharded(fresh, out / f"dcp-{CASES.index(case)}")
    got = fresh.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], v) for k, v in want.items())
    # forward / backward equal to the single-process model, bit for bit (see the module docstring)
    want_loss, want_grads = reference(how, param_dtype, out / "ckpt")
    for r in (r0, r1):
        assert torch.equal(r["loss"], want_loss), (r["loss"].item(), want_loss.item())
        assert r["grads"].keys() == want_grads.keys() and len(want_grads) == 2 * n
        for name, g in want_grads.items():
            assert g.abs().max() > 0, name
            assert torch.equal(r["grads"][name], g), name


# ------------------------------------------------------------------------------------- single process
def test_frozen_uint8_parameters_are_left_alone_and_counted_as_weights(tmp_path):
    """What generic code does with the uint8 parameters: PEFT's prepare_model_for_kbit_training (freezes every
    parameter, upcasts fp16/bf16 ones) and `.to(dtype)` leave the NF4 bytes and scales as they are; optimizers
    given model.parameters() wholesale keep no state for them (no grad ever) and never write them; PEFT's and
    this package's parameter counts give W its N x K elements (not its packed bytes)."""
    import qlora_kernels as qk
    from qlora_kernels.optim import AdamW8bit, PagedAdamW

    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(tiny_config())
    dense.save_pretrained(tmp_path)
    n_dense = sum(p.numel() for p in dense.parameters())
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qk.NF4Config(),
                                                              dtype=torch.bfloat16)
    layers = nf4_layers(model)
    assert all(m.row_layout for m in layers.values())
    nf4 = {n: [t.clone() for t in (m.weight_packed, m.weight_absmax, m.weight_nested_absmax, m.weight_offset)]
           for n, m in layers.items()}

    def unchanged():
        return all(all(t.dtype == w.dtype and torch.equal(t, w) for t, w in zip(
            (m.weight_packed, m.weight_absmax, m.weight_nested_absmax, m.weight_offset), nf4[n]))
            for n, m in layers.items())

    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    assert unchanged()
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear"))
    lora = [p for n, p in pm.named_parameters() if p.requires_grad]
    assert len(lora) == 2 * len(layers) and all("lora_" in n for n, p in pm.named_parameters() if p.requires_grad)
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in lora) and total == n_dense + trainable
    assert qk.model.count_parameters(pm) == n_dense + trainable
    optimizers = [torch.optim.AdamW(pm.parameters(), lr=1e-2), AdamW8bit(pm.parameters(), lr=1e-2),
                  PagedAdamW(pm.parameters(), lr=1e-2)]
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    pm(input_ids=ids, labels=ids).loss.backward()
    for opt in optimizers:
        opt.step()
        assert {id(p) for p in opt.state} == {id(p) for p in lora}
    assert unchanged()
    pm.to(torch.float16)
    assert unchanged() and lora[0].dtype == torch.float16
