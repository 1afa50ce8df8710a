"""PEFT's own API on NF4Linear bases (qlora_kernels.integrations.peft), on a tiny random Llama.

Tolerances are derived as in test_adapters.py: an implementation's error against a float64 reference of the
same math (the same dequantized NF4 weights, the same adapters) may be at most 2x the error of PEFT's own
float32 (or bitsandbytes' bf16) computation of it, plus one rounding of the largest value in that dtype. Both
compute the same sums with roundings at the same points and in different orders, so their errors against the
exact result have the same size; 2x is the margin for the order.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

warnings.filterwarnings("ignore", message=".*native extension _C not available.*")

import qlora_kernels as qk  # noqa: E402
from qlora_kernels.checkpoint import enable_activation_checkpointing  # noqa: E402
from qlora_kernels.nn import NF4Linear, QLoRALinear  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 128
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
N_LINEAR = 14  # 2 layers x (q, k, v, o, gate, up, down)


def tiny_llama(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def nf4_llama(seed=0, dtype=torch.float32):
    """The tiny Llama with every Linear but lm_head an NF4Linear (no adapters): what PEFT is given."""
    model = tiny_llama(seed, dtype)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NF4Linear.from_linear(module))
    return model


def dense_reference(model, dtype=torch.float64):
    """A plain Llama holding `model`'s weights, NF4Linear ones dequantized, in `dtype` (no adapters)."""
    ref = tiny_llama().to(dtype)
    nf4 = {n.removesuffix(".base_layer"): m for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            owner = name.rpartition(".")[0]
            if owner in nf4:
                m = nf4[owner]
                p.copy_(m.weight.dequantize(torch.float32) if name.endswith("weight") else m.bias)
            else:  # a module PEFT wraps for modules_to_save keeps its original under original_module
                p.copy_(model.get_parameter(name) if name in dict(model.named_parameters()) else
                        model.get_parameter(name.replace(".weight", ".original_module.weight")))
    return ref


def lora_state(peft_model):
    return {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}


def peft_on(model, cfg, state=None):
    pm = peft.get_peft_model(model, copy.deepcopy(cfg))
    if state is not None:
        missing = set(state) - set(pm.state_dict())
        assert not missing, missing
        pm.load_state_dict(state, strict=False)
    return pm


def randomize(pm, seed=1, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def assert_derived(ours, other, ref64, dtype=torch.float32, what="logits"):
    floor = torch.finfo(dtype).eps * ref64.abs().max().item()
    e_ours = (ours.double() - ref64).abs().max().item()
    e_other = (other.double() - ref64).abs().max().item()
    assert e_ours <= 2 * e_other + floor, f"{what}: error {e_ours:.3g} > 2 x {e_other:.3g} + {floor:.3g}"


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


class OpCount(TorchDispatchMode):
    """Records each qlora:: op call (top-level: the ops' own insides are not seen) and whether the linear
    ops carried the LoRA term (their 9th argument, lora_u / lora_g)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith("qlora."):
            self.calls.append((name, args[8] is not None if "nf4_linear" in name else None))
        return func(*args, **(kwargs or {}))

    def count(self, op, lora=None):
        return sum(1 for n, l in self.calls if n == f"qlora.{op}.default" and (lora is None or l == lora))


CFG = dict(r=4, lora_alpha=8, lora_dropout=0.0)


# ------------------------------------------------------------------------------------------- fused path
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_get_peft_model_runs_the_fused_ops(dropout):
    pm = peft.get_peft_model(nf4_llama(), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                          target_modules="all-linear"))
    layers = [m for m in pm.modules() if type(m).__name__ == "LoraNF4Linear"]
    assert len(layers) == N_LINEAR and all(isinstance(m.base_layer, NF4Linear) for m in layers)
    assert isinstance(pm.base_model.model.lm_head, nn.Linear)  # the head stays out of all-linear, as in PEFT
    pm.train()
    with OpCount() as fwd:
        loss = pm(IDS, labels=IDS).loss
    assert fwd.count("nf4_linear", lora=True) == N_LINEAR and len(fwd.calls) == N_LINEAR  # no dense dequantize
    with OpCount() as bwd:
        loss.backward()
    # dx is wanted by every layer but layer 0's q, k, v (their input, the frozen embedding output, needs none);
    # without dropout the LoRA term rides in the dx op, with dropout it is added outside (masked x)
    assert bwd.count("nf4_linear_dx", lora=dropout == 0.0) == N_LINEAR - 3 and len(bwd.calls) == N_LINEAR - 3
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert len(trainable) == 2 * N_LINEAR and all(p.grad is not None and p.dtype == torch.float32 for p in trainable)


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], r".*mlp\.(up|down)_proj"])
def test_narrow_targets_leave_the_rest_nf4(targets):
    pm = peft.get_peft_model(nf4_llama(), peft.LoraConfig(target_modules=targets, **CFG))
    with OpCount() as ops:
        logits(pm)
    assert ops.count("nf4_linear", lora=True) == 4 and ops.count("nf4_linear", lora=False) == N_LINEAR - 4


def test_logits_and_gradients_match_float64():
    cfg = peft.LoraConfig(target_modules="all-linear", init_lora_weights=False, **CFG)
    pm = peft.get_peft_model(nf4_llama(), cfg).train()
    randomize(pm)
    state = lora_state(pm)
    ref64 = peft_on(dense_reference(pm.base_model.model).double(), cfg, state).train()
    ref32 = peft_on(dense_reference(pm.base_model.model, torch.float32), cfg, state).train()
    outs = {}
    for key, m in (("ours", pm), ("p32", ref32), ("p64", ref64)):
        out = m(IDS, labels=IDS)
        out.loss.backward()
        outs[key] = (out.logits.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert_derived(outs["ours"][0], outs["p32"][0], outs["p64"][0])
    assert set(outs["ours"][1]) == set(outs["p64"][1])
    for name, g in outs["ours"][1].items():
        assert_derived(g, outs["p32"][1][name], outs["p64"][1][name], what=name)


def test_print_trainable_parameters_counts_nf4_weights_as_elements(capsys):
    dense = tiny_llama()
    pm = peft.get_peft_model(nf4_llama(), peft.LoraConfig(target_modules="all-linear", **CFG))
    lora = sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n)
    assert lora == 2 * (4 * (64 + 64) + 4 * (64 + 32) * 2 + 4 * (64 + 64) + 3 * 4 * (64 + 128))
    assert pm.get_nb_trainable_parameters() == (lora, sum(p.numel() for p in dense.parameters()) + lora)
    pm.print_trainable_parameters()
    assert f"trainable params: {lora:,}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- saving and loading
def test_save_reload_round_trip_identical(tmp_path):
    cfg = peft.LoraConfig(target_modules=["q_proj", "down_proj"], modules_to_save=["lm_head"], **CFG)
    pm = peft.get_peft_model(nf4_llama(), cfg)
    randomize(pm)
    with torch.no_grad():
        pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert len(keys) == 8 + 1 and "base_model.model.lm_head.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    reloaded = peft.PeftModel.from_pretrained(nf4_llama(), tmp_path)
    assert type(reloaded.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "LoraNF4Linear"
    torch.testing.assert_close(logits(reloaded), logits(pm), rtol=0, atol=0)
    # and the package's own loader reads it into a QLoRALinear model: the same logits (every linear adapted,
    # so every one is NF4; the layers the adapter skips keep B = 0, which adds exact zeros)
    own = tiny_llama()
    qk.prepare_model(own, "all-linear", r=4, alpha=8, verbose=False)
    qk.load_adapter(own, tmp_path)
    torch.testing.assert_close(logits(own), logits(pm), rtol=0, atol=0)


def test_merge_and_unload_is_exact(tmp_path):
    cfg = peft.LoraConfig(target_modules="all-linear", **CFG)
    pm = peft.get_peft_model(nf4_llama(dtype=torch.bfloat16), cfg)
    randomize(pm)
    pm.save_pretrained(tmp_path)
    before = logits(pm)
    pm.merge_adapter()  # merged: a dense bf16 layer; unmerge puts the untouched NF4 base back
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q.base_layer, nn.Linear) and q.merged
    pm.unmerge_adapter()
    assert isinstance(q.base_layer, NF4Linear)
    torch.testing.assert_close(logits(pm), before, rtol=0, atol=0)
    merged = pm.merge_and_unload()
    own = tiny_llama(dtype=torch.bfloat16)
    qk.prepare_model(own, "all-linear", r=4, alpha=8, verbose=False)
    qk.load_adapter(own, tmp_path)
    qk.merge_and_unload(own)
    for name, p in own.named_parameters():
        q = merged.get_parameter(name)
        assert q.dtype == p.dtype == torch.bfloat16 and torch.equal(q, p), name


# -------------------------------------------------------------------------------- several adapters
def test_several_adapters_set_adapter_and_disable():
    cfg_a = peft.LoraConfig(target_modules=["q_proj", "v_proj", "up_proj"], **CFG)
    cfg_b = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"])
    base_logits = logits(nf4_llama())
    pm = peft.get_peft_model(nf4_llama(), cfg_a)
    pm.add_adapter("b", cfg_b)
    randomize(pm)
    states = {a: {k: v for k, v in lora_state(pm).items() if f".{a}." in k} for a in ("default", "b")}
    refs = {}
    for a, cfg in (("default", cfg_a), ("b", cfg_b)):
        st = {k.replace(f".{a}.", ".default."): v for k, v in states[a].items()}
        refs[a] = (peft_on(dense_reference(pm.base_model.model).double(), cfg, st),
                   peft_on(dense_reference(pm.base_model.model, torch.float32), cfg, st))
    for a in ("default", "b"):
        pm.set_adapter(a)
        assert_derived(logits(pm), logits(refs[a][1]), logits(refs[a][0]))
    with pm.disable_adapter():  # the NF4 base alone: what TRL's DPO uses as its reference model
        torch.testing.assert_close(logits(pm), base_logits, rtol=0, atol=0)
    with torch.no_grad():  # PEFT's mixed batch (adapter_names=): the NF4 base, then each row's adapter in torch
        mixed = pm.eval()(IDS, adapter_names=["default", "b"]).logits
    for row, a in enumerate(("default", "b")):
        assert_derived(mixed[row], logits(refs[a][1])[row], logits(refs[a][0])[row])
    # both active at once: the first runs fused, the second adds in plain torch
    pm.base_model.set_adapter(["default", "b"])
    both64 = peft_on(dense_reference(pm.base_model.model).double(), cfg_a,
                     {k: v for k, v in states["default"].items()})
    both64.add_adapter("b", cfg_b)
    both64.load_state_dict(states["b"], strict=False)
    both64.base_model.set_adapter(["default", "b"])
    both32 = copy.deepcopy(both64).float()
    with OpCount() as ops:
        ours = logits(pm)
    # q (a fused, b added), v, up (a), o (b fused): 4 adapted layers a block; k, gate, down run base-only
    assert ops.count("nf4_linear", lora=True) == 4 * 2 and ops.count("nf4_linear", lora=False) == 3 * 2
    assert_derived(ours, logits(both32), logits(both64))


# ------------------------------------------------------------------------------ PEFT's training helpers
@pytest.mark.parametrize("loaded_in_4bit", [False, True])
def test_prepare_model_for_kbit_training_leaves_nf4_untouched(loaded_in_4bit):
    """PEFT's generic path: it freezes, upcasts bf16 parameters (embeddings, norms, head: as on a bitsandbytes
    model) and never touches the NF4 codes and scales (buffers of integer / float32 dtype). Gradient
    checkpointing and input grads follow `is_loaded_in_4bit`, which NF4Config's quantizer sets (as
    bitsandbytes' does); with it, checkpointed training gives the same gradients bit for bit."""
    model = nf4_llama(dtype=torch.bfloat16)
    if loaded_in_4bit:
        model.is_loaded_in_4bit = True
    nf4 = {n: [t.clone() for t in m._nf4_tensors() if t is not None]
           for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    assert model.is_gradient_checkpointing == loaded_in_4bit
    for n, m in model.named_modules():
        if isinstance(m, NF4Linear):
            now = [t for t in m._nf4_tensors() if t is not None]
            assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(now, nf4[n])), n
            assert m.weight_dtype == torch.bfloat16
    cfg = peft.LoraConfig(target_modules="all-linear", init_lora_weights=False, **CFG)
    pm = peft.get_peft_model(model, cfg).train()
    loss = pm(IDS, labels=IDS).loss
    assert loss.requires_grad
    loss.backward()
    grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * N_LINEAR and all(g is not None for g in grads.values())
    if loaded_in_4bit:  # the same step without checkpointing
        pm.base_model.model.gradient_checkpointing_disable()
        pm.zero_grad(set_to_none=True)
        pm(IDS, labels=IDS).loss.backward()
        assert all(torch.equal(p.grad, grads[n]) for n, p in pm.named_parameters() if p.requires_grad)


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("option, match", [
    (dict(use_dora=True), "use_dora=True"),
    (dict(lora_bias=True), "lora_bias=True"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
])
def test_options_the_fused_layer_cannot_honour_raise(option, match):
    model = nf4_llama()
    with pytest.raises(ValueError, match=match):
        peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"], **CFG, **option))


def test_fan_in_fan_out_falls_back_with_a_warning():
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        pm = peft.get_peft_model(nf4_llama(), peft.LoraConfig(target_modules=["q_proj"], fan_in_fan_out=True,
                                                              **CFG))
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.fan_in_fan_out is False


def test_a_target_that_is_not_linear_raises():
    with pytest.raises(ValueError, match=r"Target module .*SiLU.* is not supported"):
        peft.get_peft_model(nf4_llama(), peft.LoraConfig(target_modules=["q_proj", "act_fn"], **CFG))


def test_qlora_linear_model_is_refused_with_directions():
    model = tiny_llama()
    qk.prepare_model(model, ["q_proj"], r=4, alpha=8, verbose=False)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QLoRALinear)
    with pytest.raises(ValueError, match=r"QLoRALinear.*own LoRA adapters.*NF4Linear"):
        peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj"], **CFG))


def test_prepare_model_refuses_a_peft_wrapped_model():
    pm = peft.get_peft_model(nf4_llama(), peft.LoraConfig(target_modules=["q_proj"], **CFG))
    dense = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], **CFG))
    for wrapped in (pm, dense):
        before = {k: v.clone() for k, v in wrapped.state_dict().items()}
        with pytest.raises(ValueError, match=r"wrapped by PEFT .*base_layer / lora_A / lora_B"):
            qk.prepare_model(wrapped, "all-linear", verbose=False)
        after = wrapped.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# -------------------------------------------------------------------------------- with bitsandbytes
def _bnb_base(path, dtype):
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    return transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=qcfg, device_map="cpu",
                                                         dtype=dtype)


def _bnb_logits(model):
    # train mode: bitsandbytes' CPU path repacks its weights in eval mode without grad (on AVX512-BF16 CPUs);
    # the tiny Llama has no dropout and the adapters none, so train mode computes the same function
    model.train()
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("direction", ["ours_to_bnb", "bnb_to_ours"])
def test_adapters_cross_with_bitsandbytes(tmp_path, direction):
    pytest.importorskip("bitsandbytes")
    dtype = torch.bfloat16
    tiny_llama(dtype=dtype).save_pretrained(tmp_path / "base")
    cfg = peft.LoraConfig(target_modules="all-linear", **CFG)
    ours = peft.get_peft_model(nf4_llama(dtype=dtype), cfg)
    bnb = peft.get_peft_model(_bnb_base(tmp_path / "base", dtype), copy.deepcopy(cfg))
    src = ours if direction == "ours_to_bnb" else bnb
    randomize(src)
    src.save_pretrained(tmp_path / "adapter")
    if direction == "ours_to_bnb":
        bnb = peft.PeftModel.from_pretrained(_bnb_base(tmp_path / "base", dtype), tmp_path / "adapter")
    else:
        ours = peft.PeftModel.from_pretrained(nf4_llama(dtype=dtype), tmp_path / "adapter")
    assert type(bnb.base_model.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert type(ours.base_model.model.model.layers[0].mlp.up_proj).__name__ == "LoraNF4Linear"
    ref64 = peft.PeftModel.from_pretrained(dense_reference(ours.base_model.model).double(), tmp_path / "adapter")
    # both hold the same NF4 bits (quantize_nf4 is bitsandbytes-identical) and run bf16 activations
    assert_derived(logits(ours.eval()), _bnb_logits(bnb), logits(ref64.eval()), dtype=dtype)
    assert_derived(_bnb_logits(bnb), logits(ours.eval()), logits(ref64.eval()), dtype=dtype)


def test_bias_all_trains_the_nf4_bias():
    """bias="all": the NF4Linear's bias becomes trainable and gets its gradient from the fused Function."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    nf4 = nn.Sequential(NF4Linear.from_linear(dense[0]), nn.GELU(), NF4Linear.from_linear(dense[2]))
    cfg = peft.LoraConfig(target_modules=["0", "2"], bias="all", init_lora_weights=False, **CFG)
    pm = peft.get_peft_model(nf4, cfg)
    ref = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).double()
    with torch.no_grad():
        for i in (0, 2):
            ref[i].weight.copy_(nf4[i].base_layer.weight.dequantize(torch.float32))
            ref[i].bias.copy_(nf4[i].base_layer.bias)
    ref64 = peft_on(ref, cfg, lora_state(pm))
    ref32 = copy.deepcopy(ref64).float()
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    grads = {}
    for key, m in (("ours", pm), ("p32", ref32), ("p64", ref64)):
        m((x.double() if key == "p64" else x)).square().sum().backward()
        grads[key] = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert sum(n.endswith("bias") for n in grads["ours"]) == 2 and grads["ours"].keys() == grads["p64"].keys()
    for n, g in grads["ours"].items():
        assert_derived(g, grads["p32"][n], grads["p64"][n], what=n)


def test_import_registers_without_importing_peft():
    """`import qlora_kernels` does not import peft (it pulls transformers: seconds); importing peft afterwards
    puts the hooks in place, so get_peft_model works with no other call."""
    import subprocess
    import sys

    code = ("import sys, torch, qlora_kernels as qk\n"
            "assert 'peft' not in sys.modules\n"
            "import peft\n"
            "m = torch.nn.Sequential(qk.NF4Linear.from_linear(torch.nn.Linear(64, 64)), torch.nn.LayerNorm(64))\n"
            "pm = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=['0']))\n"
            "print(type(pm.base_model.model[0]).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("LoraNF4Linear"), out.stderr[-2000:]


def test_from_pretrained_with_nf4config_then_peft(tmp_path):
    """The Hugging Face path: from_pretrained(quantization_config=qk.NF4Config) gives NF4Linear layers, and
    PEFT's calls on it run the fused op for the targets (the rest NF4 without adapters); the adapter reloads."""
    if not hasattr(qk, "NF4Config"):
        pytest.skip("qlora_kernels.NF4Config is not in this tree")
    tiny_llama().save_pretrained(tmp_path / "base")

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=qk.NF4Config(compute_dtype=torch.bfloat16), dtype=torch.bfloat16)

    model = peft.prepare_model_for_kbit_training(load())
    # NF4Config models do not set is_loaded_in_4bit (integrations/transformers.py says why: TRL would cast the
    # float32 adapters to bf16, transformers' num_parameters would import bitsandbytes), so PEFT's kbit
    # preparation freezes and upcasts only: checkpointing and input grads are the user's (or the trainer's
    # gradient_checkpointing=True) call, as the README's Hugging Face path does.
    model.enable_input_require_grads()
    enable_activation_checkpointing(model)
    pm = peft.get_peft_model(model, peft.LoraConfig(target_modules=["q_proj", "v_proj"], **CFG)).train()
    randomize(pm)
    with OpCount() as ops:
        loss = pm(IDS, labels=IDS).loss
    assert ops.count("nf4_linear", lora=True) == 4 and ops.count("nf4_linear", lora=False) == N_LINEAR - 4
    # checkpointing is on: backward recomputes each forward once; enable_input_require_grads makes the
    # embedding output require grad, so all 14 layers compute dx
    with OpCount() as ops:
        loss.backward()
    assert ops.count("nf4_linear", lora=True) == 4 and ops.count("nf4_linear_dx") == N_LINEAR
    pm.save_pretrained(tmp_path / "adapter")
    again = peft.PeftModel.from_pretrained(peft.prepare_model_for_kbit_training(load()), tmp_path / "adapter")
    torch.testing.assert_close(logits(again.eval()), logits(pm.eval()), rtol=0, atol=0)
