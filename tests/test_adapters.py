"""save_adapter / load_adapter against PEFT, both directions, on a tiny random Llama.

Tolerances are derived: our fp32 logits' error against float64 PEFT logits (same dequantized base, same
adapters) is at most 2x the error of PEFT's own fp32 logits, plus one rounding of the largest logit.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*native extension _C not available.*")

from qlora_kernels import load_adapter, prepare_model, save_adapter  # noqa: E402
from qlora_kernels.model import nf4_modules, qlora_modules  # noqa: E402
from bnb_oracle import assert_not_repacked  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def prepared(targets="all-linear", r=4, alpha=8, seed=0, **kw):
    model = tiny_llama(seed)
    prepare_model(model, target_modules=targets, r=r, alpha=alpha, verbose=False, **kw)
    return model


def dequantized_base(model):
    """A plain Llama whose Linear weights are exactly our dequantized NF4 weights (for exact comparisons)."""
    base = tiny_llama()
    with torch.no_grad():
        nf4 = nf4_modules(model)  # with adapters or without (quantize="all-linear": every Linear but the head)
        for name, p in base.named_parameters():
            if not any(name.startswith(n + ".") for n in nf4):
                p.copy_(model.get_parameter(name))
        for name, m in nf4.items():
            base.get_submodule(name).weight.copy_(m.weight.dequantize(torch.float32))
            if m.bias is not None:
                base.get_submodule(name).bias.copy_(m.bias)
    return base


def randomize_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in qlora_modules(model).values():
            m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.1)
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(5))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def assert_derived(ours, peft32, peft64):
    floor = torch.finfo(torch.float32).eps * peft64.abs().max().item()
    e_ours = (ours.double() - peft64).abs().max().item()
    e_peft = (peft32.double() - peft64).abs().max().item()
    assert e_ours <= 2 * e_peft + floor, f"error {e_ours:.3g} > 2 x PEFT's {e_peft:.3g} + {floor:.3g}"


def test_ours_to_peft(tmp_path):
    model = prepared(["q_proj", "v_proj", "down_proj"])
    randomize_adapters(model)
    with torch.no_grad():  # a head trained alongside, saved as PEFT modules_to_save
        model.lm_head.weight.add_(0.5)
    save_adapter(model, tmp_path, modules_to_save=["lm_head"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    from safetensors.torch import load_file

    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert "base_model.model.lm_head.weight" in keys and len(keys) == 13
    base = dequantized_base(model)
    with torch.no_grad():
        base.lm_head.weight.sub_(0.5)  # the original head: PEFT must load the saved one
    peft32 = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    peft64 = peft.PeftModel.from_pretrained(copy.deepcopy(base).double(), tmp_path).eval()
    assert_derived(logits(model), logits(peft32), logits(peft64))


def test_ours_to_peft_on_bitsandbytes_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    float_model = tiny_llama()
    float_model.save_pretrained(tmp_path / "base")
    model = prepared()
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    bnb_base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=qcfg,
                                                             device_map="cpu", dtype=torch.float32)
    # train mode keeps bitsandbytes on its standard path (dequantize + torch's linear in float32): in eval its
    # forward repacks to a bf16 kernel on AVX512-BF16 CPUs. in_features 64 and 128 are whole blocks, where its
    # AVX-512 and scalar dequantize both follow the format (tests/bnb_oracle.py); dropout is 0, so no randomness
    peft_bnb = peft.PeftModel.from_pretrained(bnb_base, tmp_path / "adapter").train()
    peft64 = peft.PeftModel.from_pretrained(dequantized_base(model).double(), tmp_path / "adapter").eval()
    assert_derived(logits(model), logits(peft_bnb), logits(peft64))
    assert_not_repacked(peft_bnb)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_to_ours(tmp_path, rslora):
    targets = ["q_proj", "k_proj", "o_proj", "up_proj"]
    model = prepared(targets, r=4, alpha=16)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=rslora,
                          init_lora_weights=False, lora_dropout=0.1)  # random B: a non-trivial adapter
    torch.manual_seed(3)
    peft32 = peft.get_peft_model(dequantized_base(model), cfg).eval()
    peft32.save_pretrained(tmp_path)
    info = load_adapter(model, tmp_path)
    assert len(info["loaded"]) == 8
    q = model.model.layers[0].self_attn.q_proj
    assert q.scaling == pytest.approx(8 / 2 if rslora else 8 / 4) and q.dropout == 0.1  # taken from the config
    peft64 = peft.PeftModel.from_pretrained(dequantized_base(model).double(), tmp_path).eval()
    assert_derived(logits(model), logits(peft32), logits(peft64))


def test_save_load_roundtrip_identical(tmp_path):
    model = prepared()
    randomize_adapters(model)
    save_adapter(model, tmp_path)
    fresh = prepared()
    load_adapter(fresh, tmp_path)
    torch.testing.assert_close(logits(fresh), logits(model), rtol=0, atol=0)


def test_load_adapter_errors(tmp_path):
    model = prepared(["q_proj", "v_proj"], r=4)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"])
    peft.get_peft_model(tiny_llama(), cfg).save_pretrained(tmp_path / "gate")
    with pytest.raises(ValueError, match=r"adapter target modules \['gate_proj'\] are missing from the model"):
        load_adapter(model, tmp_path / "gate")
    cfg = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    peft.get_peft_model(tiny_llama(), cfg).save_pretrained(tmp_path / "r8")
    with pytest.raises(ValueError, match=r"shape mismatch for 'model.layers.0.self_attn.q_proj'.*\(8, 64\)"):
        load_adapter(model, tmp_path / "r8")
    with pytest.raises(ValueError, match=r"has no QLoRALinear layer: call prepare_model before load_adapter"):
        load_adapter(tiny_llama(), tmp_path / "r8")
    with pytest.raises(FileNotFoundError, match=r"no adapter_config.json"):
        load_adapter(model, tmp_path / "nowhere")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    peft.get_peft_model(tiny_llama(), cfg).save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match=r"DoRA adapters"):
        load_adapter(model, tmp_path / "dora")
    with pytest.raises(ValueError, match=r"has no QLoRALinear layer: call prepare_model first"):
        save_adapter(nn.Linear(2, 2), tmp_path / "x")


def peft_layers(peft_model) -> dict:
    """{module path: PEFT LoraLayer} of a PeftModel (paths relative to the wrapped model)."""
    return {n: m for n, m in peft_model.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def assert_same_layers_and_scalings(model, peft_model):
    ours, theirs = qlora_modules(model), peft_layers(peft_model)
    assert sorted(ours) == sorted(theirs)
    for name, m in ours.items():
        assert (m.r, m.scaling) == (theirs[name].r["default"], theirs[name].scaling["default"]), name


def test_rank_and_alpha_patterns_peft_to_ours(tmp_path):
    """rank_pattern / alpha_pattern (PEFT's regex-suffix keys, the first match wins) give each layer the r and
    the scaling PEFT gives it when the same adapter is loaded by PEFT."""
    model = tiny_llama()
    prepare_model(model, ["q_proj"], r=8, verbose=False)
    prepare_model(model, ["model.layers.1.mlp.down_proj"], r=2, verbose=False)
    prepare_model(model, ["v_proj", "down_proj"], r=4, verbose=False)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          rank_pattern={"q_proj": 8, "layers.1.mlp.down_proj": 2},
                          alpha_pattern={"layers\\.0\\.self_attn\\.v_proj": 32, "down_proj": 3, "q_proj": 5},
                          init_lora_weights=False)
    torch.manual_seed(3)
    peft32 = peft.get_peft_model(dequantized_base(model), cfg).eval()
    peft32.save_pretrained(tmp_path)
    load_adapter(model, tmp_path)
    assert_same_layers_and_scalings(model, peft32)
    assert len({m.scaling for m in qlora_modules(model).values()}) == 5  # the patterns are exercised
    peft64 = peft.PeftModel.from_pretrained(dequantized_base(model).double(), tmp_path).eval()
    assert_derived(logits(model), logits(peft32), logits(peft64))


def test_rank_and_alpha_patterns_ours_to_peft(tmp_path):
    model = tiny_llama()
    prepare_model(model, ["q_proj", "k_proj", "v_proj"], r=4, alpha=8, verbose=False)
    prepare_model(model, ["model.layers.0.mlp.up_proj"], r=2, alpha=8, verbose=False)
    prepare_model(model, ["model.layers.1.mlp.up_proj"], r=4, alpha=16, verbose=False)
    randomize_adapters(model)
    save_adapter(model, tmp_path)
    peft32 = peft.PeftModel.from_pretrained(dequantized_base(model), tmp_path).eval()
    assert_same_layers_and_scalings(model, peft32)
    peft64 = peft.PeftModel.from_pretrained(dequantized_base(model).double(), tmp_path).eval()
    assert_derived(logits(model), logits(peft32), logits(peft64))


# ------------------------------------------------------------------------- load_adapter's own checks
import re  # noqa: E402


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_load_adapter_checks_everything_before_copying(tmp_path):
    """A modules_to_save tensor of the wrong shape (read last) raises with every LoRA tensor still as it was."""
    from safetensors.torch import load_file, save_file

    donor = prepared(r=4)
    randomize_adapters(donor, seed=7)
    save_adapter(donor, tmp_path, modules_to_save=["lm_head"])
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    assert sum(".lora_" in k for k in tensors) == 28
    tensors["base_model.model.lm_head.weight"] = tensors["base_model.model.lm_head.weight"][:, :10].contiguous()
    save_file(tensors, file)
    model = prepared(r=4)
    randomize_adapters(model)
    before = _state(model)
    with pytest.raises(ValueError, match=r"shape mismatch for 'lm_head.weight'"):
        load_adapter(model, tmp_path)
    _assert_unchanged(model, before)


def test_load_adapter_file_errors_name_the_file(tmp_path):
    model = prepared(["q_proj", "v_proj"], r=4)
    save_adapter(model, tmp_path)
    before = _state(model)
    file = tmp_path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # truncated: safetensors' own error names no file
    with pytest.raises(ValueError, match=re.escape(str(file)) + r": cannot read the adapter weights"):
        load_adapter(model, tmp_path)
    file.write_bytes(data)
    config = tmp_path / "adapter_config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=re.escape(str(config)) + r": cannot read the adapter config"):
        load_adapter(model, tmp_path)
    _assert_unchanged(model, before)


def test_load_adapter_target_that_is_not_linear_raises(tmp_path):
    """target_modules=["q_proj", "act_fn"]: PEFT raises on act_fn (not a Linear); so does load_adapter."""
    model = prepared(["q_proj"], r=4)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "act_fn"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    before = _state(model)
    with pytest.raises(ValueError, match=r"not linear layers: \['model.layers.0.mlp.act_fn \("):
        load_adapter(model, tmp_path)
    _assert_unchanged(model, before)
