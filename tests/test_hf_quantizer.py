"""NF4Linear (a frozen NF4 linear without adapters) and the transformers integration (qlora_kernels.NF4Config):
from_pretrained streams a plain checkpoint into NF4 (the bytes of quantize_nf4), save_pretrained / reload
without the config, qk.load_pretrained of that checkpoint, what trainers read, bad options."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*native extension _C not available.*")

import qlora_kernels as qk  # noqa: E402
from qlora_kernels import NF4Linear, QLoRALinear, quantize_nf4  # noqa: E402
from host_memory import HAVE_PROC, peak_above_baseline  # noqa: E402


# ============================================================================================ NF4Linear
def _linear(n=48, k=192, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


def test_nf4linear_matches_qlora_linear_with_zero_adapters():
    """NF4Linear is QLoRALinear's base: with B = 0 the fused layer adds exact zeros, so y, dx and dbias agree bit
    for bit; both hold the same NF4 bytes (quantize_nf4's)."""
    lin = _linear(dtype=torch.bfloat16)
    base, lora = NF4Linear.from_linear(lin), QLoRALinear.from_linear(lin)
    assert not isinstance(base, QLoRALinear) and isinstance(lora, NF4Linear)
    ref = quantize_nf4(lin.weight.detach())
    for a, b in zip(base.weight.tensors(), ref.tensors()):
        assert torch.equal(a, b)
    # the codes and scales are frozen uint8 parameters by rows (what FSDP2's fully_shard shards), then the bias
    assert [n for n, _ in base.named_parameters()] == ["weight_packed", "weight_absmax", "bias"]
    assert not any(p.requires_grad for p in base.parameters())
    base.bias.requires_grad_(True)
    lora.bias.requires_grad_(True)
    x = torch.randn(3, 5, 192, dtype=torch.bfloat16)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = base(xa), lora(xb)
    assert torch.equal(ya, yb)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    assert torch.equal(xa.grad, xb.grad) and torch.equal(base.bias.grad, lora.bias.grad)


def test_nf4linear_against_dense_float32():
    """x @ deq(W)^T + b against float64 on the same dequantized W, within 2x PyTorch's own float32 error."""
    from accuracy import assert_close_derived

    lin = _linear()
    layer = NF4Linear.from_linear(lin, blocksize=128, double_quant=False)
    w = layer.weight.dequantize(torch.float32)
    x = torch.randn(7, 192, requires_grad=True)
    y = layer(x)
    exact = x.detach().double() @ w.double().t() + lin.bias.detach().double()
    assert_close_derived(y.detach(), exact, torch.nn.functional.linear(x.detach(), w, lin.bias.detach()), "y")
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close_derived(x.grad, dy.double() @ w.double(), dy @ w, "dx")


def test_nf4linear_saves_nothing_for_backward():
    """The backward recomputes dx through the NF4 op: nothing (no x, no deq(W)) is kept between the passes."""
    layer = NF4Linear.from_linear(_linear())
    x = torch.randn(4, 192, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert saved == []
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_nf4linear_state_dict_to_and_errors():
    lin = _linear(bias=False)
    layer = NF4Linear.from_linear(lin)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    other = NF4Linear.empty(192, 48, dtype=torch.float32, device="cpu")
    other.load_state_dict(sd)
    for a, b in zip(other.weight.tensors(), layer.weight.tensors()):
        assert torch.equal(a, b)
    other.to(torch.bfloat16)  # the codes and scales keep their dtypes
    assert other.weight_absmax.dtype == torch.uint8 and other.weight_nested_absmax.dtype == torch.float32
    skeleton = NF4Linear.empty(192, 48, bias=True, dtype=torch.bfloat16)
    assert skeleton.weight_packed.is_meta and set(skeleton.state_dict()) == {"weight", "bias"}
    skeleton.set_weight(quantize_nf4(lin.weight.detach()))  # a meta layer takes the weight's device
    assert skeleton.weight_packed.device.type == "cpu"
    with pytest.raises(TypeError, match="weight must be an NF4Weight"):
        NF4Linear(lin.weight)
    with pytest.raises(ValueError, match="x has shape"):
        layer(torch.randn(2, 100))
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        NF4Linear.from_linear(layer)
    with pytest.raises(ValueError, match="weight has shape"):
        layer.set_weight(quantize_nf4(torch.randn(8, 64)))


# ================================================================================ transformers: NF4Config
transformers = pytest.importorskip("transformers")
VOCAB = 128
# every nn.Linear of the tiny Llama but lm_head (the output embeddings: skipped by default)
LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def tiny_config():
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                    tie_word_embeddings=False)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A tiny Llama saved in bfloat16 (so transformers' load dtype and the stored dtype agree: the bytes of
    quantize_nf4 of the stored tensor), and that model."""
    path = tmp_path_factory.mktemp("hfq") / "dense"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config()).to(torch.bfloat16)
    model.save_pretrained(path)
    return path, model


def from_pretrained(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, **kw)


def nf4(path, dtype=torch.bfloat16, **cfg):
    return from_pretrained(path, quantization_config=qk.NF4Config(compute_dtype=dtype, **cfg), dtype=dtype)


def tokens(seed=0):
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


def same_nf4(a, b) -> bool:
    return a.shape == b.shape and a.blocksize == b.blocksize and all(
        (x is None and y is None) or torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))


def test_from_pretrained_quantizes_every_linear_bit_exact(dense):
    path, ref = dense
    model = nf4(path)
    swapped = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert swapped == set(LINEARS)
    assert not any(isinstance(m, QLoRALinear) for m in model.modules())
    assert type(model.lm_head) is nn.Linear and torch.equal(model.lm_head.weight, ref.lm_head.weight)
    for name in LINEARS:
        layer = model.get_submodule(name)
        assert same_nf4(layer.weight, quantize_nf4(ref.get_submodule(name).weight.detach())), name
        assert layer.weight.dtype == torch.bfloat16 and layer.weight.double_quant
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert torch.equal(model.model.norm.weight, ref.model.norm.weight)
    # what trainers read
    assert model.is_quantized and model.quantization_method == "qlora_kernels"
    assert not getattr(model, "is_loaded_in_4bit", False)  # by choice: see integrations/transformers.py
    assert model.hf_quantizer.is_trainable and model.hf_quantizer.is_serializable()
    assert model.config.quantization_config.modules_to_not_convert == ["lm_head"]
    assert "named_non_persistent_buffers" not in model.__dict__  # the load-time override is gone


def test_logits_match_the_dense_model_with_dequantized_weights(dense):
    """The NF4 model computes the dense model with deq(W) in place of W: against that model in float64, its
    float32 logits hold the project's derived bound (2x / 4x PyTorch's own float32 error, tests/accuracy.py)."""
    from accuracy import assert_close_derived

    path, ref = dense
    model = nf4(path, dtype=torch.float32)
    twin = transformers.LlamaForCausalLM(tiny_config())
    twin.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    with torch.no_grad():
        for name in LINEARS:
            twin.get_submodule(name).weight.copy_(model.get_submodule(name).weight.dequantize(torch.float32))
    ids = tokens()
    with torch.no_grad():
        out = model(ids).logits
        plain = twin(ids).logits
        exact = twin.double()(ids).logits
    assert_close_derived(out, exact, plain, "logits")


def test_save_and_reload_without_the_config(dense, tmp_path):
    path, _ = dense
    model = nf4(path)
    ids = tokens(1)
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path / "nf4")
    import json

    qc = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "qlora_kernels" and qc["blocksize"] == 64 and qc["double_quant"] is True
    again = from_pretrained(tmp_path / "nf4")  # the config comes from config.json
    assert isinstance(again.config.quantization_config, qk.NF4Config) and again.dtype == torch.bfloat16
    for name in LINEARS:
        assert same_nf4(again.get_submodule(name).weight, model.get_submodule(name).weight), name
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
    # the checkpoint holds bitsandbytes' Linear4bit keys
    from safetensors import safe_open

    with safe_open(str(tmp_path / "nf4" / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert {f"{LINEARS[0]}.weight.absmax", f"{LINEARS[0]}.weight.quant_state.bitsandbytes__nf4"} <= keys
    # qlora_kernels' own loader reads it too: the same bytes under QLoRALinear (B = 0 adds exact zeros)
    ours = qk.load_pretrained(tmp_path / "nf4", device="cpu", compute_dtype=torch.bfloat16, verbose=False,
                              progress=False)
    for name in LINEARS:
        assert same_nf4(ours.get_submodule(name).weight, model.get_submodule(name).weight), name
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, logits)


def test_bitsandbytes_format_loads_in_transformers_bitsandbytes(dense, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    path, _ = dense
    model = nf4(path, serialize_as="bitsandbytes")
    model.save_pretrained(tmp_path / "bnb")
    import json

    qc = json.loads((tmp_path / "bnb" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_quant_type"] == "nf4"
    theirs = from_pretrained(tmp_path / "bnb", device_map="cpu")
    for name in LINEARS:
        layer = theirs.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear4bit), name
        ours = model.get_submodule(name).weight
        assert torch.equal(layer.weight.data.view(torch.uint8).view(-1), ours.packed.view(-1))
        assert torch.equal(layer.weight.quant_state.absmax, ours.absmax)
    assert type(theirs.lm_head) is nn.Linear


def test_modules_to_not_convert_replaces_the_default(dense, tmp_path):
    """As in BitsAndBytesConfig, a list replaces the default skips (lm_head is then quantized too); names match
    transformers' way (a path prefix, a regex from the start, or a suffix)."""
    path, ref = dense
    model = nf4(path, modules_to_not_convert=[r"model\.layers\.\d+\.mlp"])
    swapped = {n for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    assert swapped == {n for n in LINEARS if ".mlp." not in n} | {"lm_head"}
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear
    model.save_pretrained(tmp_path / "skip")
    again = from_pretrained(tmp_path / "skip")
    assert {n for n, m in again.named_modules() if isinstance(m, NF4Linear)} == swapped


def test_dequantize_gives_dense_linears(dense):
    path, _ = dense
    model = nf4(path)
    deq = {n: model.get_submodule(n).weight.dequantize() for n in LINEARS}
    model.dequantize()
    for name in LINEARS:
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, deq[name])
    assert not getattr(model, "is_quantized", False)


def test_prepare_model_for_kbit_training_leaves_nf4_untouched(dense):
    peft = pytest.importorskip("peft")
    path, _ = dense
    model = nf4(path)
    before = {n: [t.clone() for t in model.get_submodule(n).weight.tensors()] for n in LINEARS}
    ptrs = {n: [t.data_ptr() for t in model.get_submodule(n).weight.tensors()] for n in LINEARS}
    model = peft.prepare_model_for_kbit_training(model)
    for name in LINEARS:
        w = model.get_submodule(name).weight
        assert [t.data_ptr() for t in w.tensors()] == ptrs[name], name
        assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(w.tensors(), before[name])), name
    assert not any(p.requires_grad for p in model.parameters())
    # not flagged is_loaded_in_4bit (see integrations/transformers.py): PEFT leaves checkpointing to the trainer
    assert not model.is_activation_checkpointing


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="blocksize"):
        qk.NF4Config(blocksize=100)
    with pytest.raises(ValueError, match="quant_storage"):
        qk.NF4Config(quant_storage=torch.bfloat16)
    with pytest.raises(ValueError, match="compute_dtype"):
        qk.NF4Config(compute_dtype=torch.int8)
    with pytest.raises(ValueError, match="double_quant"):
        qk.NF4Config(double_quant="yes")
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        qk.NF4Config(modules_to_not_convert="lm_head")
    with pytest.raises(ValueError, match="serialize_as"):
        qk.NF4Config(serialize_as="gguf")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['block_size'\]"):
        qk.NF4Config.from_dict({"quant_method": "qlora_kernels", "block_size": 64})
    cfg = qk.NF4Config.from_dict(qk.NF4Config(blocksize=128, compute_dtype=torch.float16).to_dict())
    assert cfg.blocksize == 128 and cfg.compute_dtype == torch.float16


def test_unknown_quant_method_in_a_checkpoint(dense, tmp_path):
    import json
    import shutil

    path, _ = dense
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "qlora_kernels_v9", "blocksize": 64}
    (bad / "config.json").write_text(json.dumps(cfg))
    # (transformers itself only warns about an unknown method and loads the model unquantized: its choice)
    with pytest.raises(qk.CheckpointError, match=r"config.json.*qlora_kernels_v9"):
        qk.load_pretrained(bad, device="cpu", verbose=False, progress=False)


def test_old_transformers_gets_a_clear_error(monkeypatch):
    from qlora_kernels.integrations import transformers as integration

    import sys

    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    with pytest.raises(ImportError, match=r"transformers >= 5.0.*found transformers 4.57.1"):
        integration._require_transformers()


def test_import_registers_without_importing_transformers(dense):
    """`import qlora_kernels` does not import transformers (~8 s for its quantizer registry); the config is
    registered when transformers loads it, so from_pretrained of a saved NF4 model needs no config."""
    import subprocess
    import sys

    path, _ = dense
    code = (
        "import sys, qlora_kernels\n"
        "assert 'transformers.quantizers.auto' not in sys.modules, 'imported by qlora_kernels'\n"
        "import transformers, warnings\n"
        "warnings.simplefilter('ignore')\n"
        "from qlora_kernels.integrations.transformers import NF4Config\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(path)!r},\n"
        "    quantization_config=NF4Config(), dtype='auto')\n"
        "print(type(m.model.layers[0].mlp.up_proj).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "NF4Linear"


@pytest.mark.skipif(not HAVE_PROC, reason="needs /proc (Linux)")
def test_host_memory_bound(tmp_path):
    """As qk.load_pretrained (tests/test_checkpoint.py): peak anonymous memory during from_pretrained <= 1.15 x
    (final model bytes + the largest checkpoint tensor), i.e. one full-precision tensor at a time. The baseline
    is taken after a first load of a tiny model (transformers' one-time imports and loader state)."""
    import gc

    from qlora_kernels.model import model_memory

    path = tmp_path / "mid"
    torch.manual_seed(0)
    cfg = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
               num_key_value_heads=6, vocab_size=1024, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).save_pretrained(path)  # float32
    largest = 384 * 1024 * 4
    assert sum(f.stat().st_size for f in path.glob("*.safetensors")) > 20e6
    small = tmp_path / "small"
    transformers.LlamaForCausalLM(tiny_config()).save_pretrained(small)
    nf4(small)  # transformers' loader imports and caches, once
    gc.collect()
    model, above = peak_above_baseline(lambda: nf4(path))
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 28
    bound = 1.15 * (model_memory(model) + largest)
    assert above <= bound, f"peak {above} bytes above baseline, bound {bound:.0f}"


# ==================================================== quantization targets apart from the LoRA targets (item 5)
def kinds(model, layer=0):
    return {n.rsplit(".", 1)[1]: type(m).__name__ for n, m in model.named_modules()
            if n.startswith(f"model.layers.{layer}.") and n.endswith("_proj")}


ALL_NF4 = {"q_proj": "QLoRALinear", "k_proj": "NF4Linear", "v_proj": "NF4Linear", "o_proj": "NF4Linear",
           "gate_proj": "NF4Linear", "up_proj": "NF4Linear", "down_proj": "NF4Linear"}


def test_prepare_model_quantizes_every_linear_whatever_the_targets(dense):
    path, ref = dense
    model = transformers.LlamaForCausalLM(tiny_config())
    model.load_state_dict(ref.state_dict())
    report = qk.prepare_model(model, ["q_proj"], r=4, verbose=False)
    assert kinds(model) == ALL_NF4 and type(model.lm_head) is nn.Linear
    assert len(report.quantized) == 12 and "quantized:  12 more Linear layers -> NF4Linear" in str(report)
    assert report.quantized_params == sum(m.in_features * m.out_features for m in qk.model.nf4_modules(model).values())
    up = model.model.layers[1].mlp.up_proj
    assert same_nf4(up.weight, quantize_nf4(ref.model.layers[1].mlp.up_proj.weight.detach().float()))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        f"model.layers.{i}.self_attn.q_proj.lora_{ab}.weight" for i in range(2) for ab in "AB"]
    # quantize="targets": only the adapted layers are NF4 (the former behaviour); skip_modules stay dense
    old = transformers.LlamaForCausalLM(tiny_config())
    qk.prepare_model(old, ["q_proj"], r=4, verbose=False, quantize="targets")
    assert set(kinds(old).values()) == {"QLoRALinear", "Linear"}
    skip = transformers.LlamaForCausalLM(tiny_config())
    qk.prepare_model(skip, ["q_proj"], r=4, verbose=False, skip_modules=["down_proj"])
    assert kinds(skip) == {**ALL_NF4, "down_proj": "Linear"}
    with pytest.raises(ValueError, match=r"skip_modules keeps .*q_proj.* but target_modules adapts"):
        qk.prepare_model(transformers.LlamaForCausalLM(tiny_config()), ["q_proj"], skip_modules=["q_proj"],
                         verbose=False)
    with pytest.raises(ValueError, match="quantize"):
        qk.prepare_model(transformers.LlamaForCausalLM(tiny_config()), ["q_proj"], quantize=[], verbose=False)
    # merging gives a dense model (deq(W) for the layers without adapters)
    ids = tokens()
    with torch.no_grad():
        before = model(ids).logits
    qk.merge_and_unload(model)
    assert not qk.model.nf4_modules(model) and getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)  # B = 0, float32: exact


def test_prepare_model_on_an_nf4config_model_adds_adapters_in_place(dense):
    path, _ = dense
    model = nf4(path)
    bytes_before = model.model.layers[0].self_attn.q_proj.weight.packed.data_ptr()
    qk.prepare_model(model, ["q_proj"], r=4, verbose=False)
    assert kinds(model) == ALL_NF4
    assert model.model.layers[0].self_attn.q_proj.weight.packed.data_ptr() == bytes_before  # not requantized


def test_load_pretrained_keeps_a_4bit_checkpoint_4bit_with_narrow_targets(dense, tmp_path):
    """A bitsandbytes-format checkpoint (NF4Config(serialize_as='bitsandbytes')) loaded with LoRA on q_proj only:
    every 4-bit module stays 4-bit, bytes as stored (it was dequantized to a dense Linear before)."""
    path, _ = dense
    src = nf4(path, serialize_as="bitsandbytes")
    src.save_pretrained(tmp_path / "bnb")
    model = qk.load_pretrained(tmp_path / "bnb", target_modules=["q_proj"], device="cpu", verbose=False,
                               progress=False, compute_dtype=torch.bfloat16)
    assert kinds(model) == ALL_NF4 and kinds(model, 1) == ALL_NF4
    for name in LINEARS:
        assert same_nf4(model.get_submodule(name).weight, src.get_submodule(name).weight), name
    assert len(model.qlora_report.quantized) == 12
    old = qk.load_pretrained(tmp_path / "bnb", target_modules=["q_proj"], device="cpu", verbose=False,
                             progress=False, quantize="targets")
    assert set(kinds(old).values()) == {"QLoRALinear", "Linear"}
    # a plain checkpoint: the non-targets are quantized as they stream in (quantize_nf4's bytes)
    plain = qk.load_pretrained(path, target_modules=["q_proj"], device="cpu", verbose=False, progress=False,
                               compute_dtype=torch.bfloat16, skip_modules=["o_proj"])
    assert kinds(plain) == {**ALL_NF4, "o_proj": "Linear"}
    for name in LINEARS:
        if not name.endswith("o_proj"):
            assert same_nf4(plain.get_submodule(name).weight, src.get_submodule(name).weight), name


def test_a_trainer_checkpoint_loads_as_an_nf4_model(dense, tmp_path):
    """qk.load_pretrained marks the model's config with an NF4Config, so a Trainer checkpoint-N (the model's
    save_pretrained) reloads through from_pretrained as an NF4 model with the same bytes."""
    path, _ = dense
    model = qk.load_pretrained(path, target_modules=["q_proj", "v_proj"], device="cpu", verbose=False,
                               progress=False, compute_dtype=torch.float32)
    qc = model.config.quantization_config
    assert isinstance(qc, qk.NF4Config) and qc.modules_to_not_convert == ["lm_head"]
    data = [{"input_ids": torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(i)),
             "labels": torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(i + 9))}
            for i in range(4)]
    args = transformers.TrainingArguments(str(tmp_path / "run"), max_steps=1, save_steps=1, report_to=[],
                                          per_device_train_batch_size=2, use_cpu=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.Trainer(model=model, args=args, train_dataset=data).train()
    again = from_pretrained(tmp_path / "run" / "checkpoint-1")
    assert again.quantization_method == "qlora_kernels"
    for name in LINEARS:
        assert isinstance(again.get_submodule(name), NF4Linear)
        assert same_nf4(again.get_submodule(name).weight, model.get_submodule(name).weight), name
