"""load_pretrained / save_pretrained on tiny Llama checkpoints written here (plain, sharded, bitsandbytes-4bit).

References: quantize_nf4 of the stored tensors (bit-exact NF4 bytes and scale codes) and transformers +
bitsandbytes (CPU backend) loading the same directory (identical logits).
"""

import json
import shutil
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import qlora_kernels as qk  # noqa: E402
from qlora_kernels import CheckpointError, QLoRALinear, load_pretrained, quantize_nf4, save_pretrained  # noqa: E402
from qlora_kernels.model import model_memory, qlora_modules  # noqa: E402
from bnb_oracle import dense_copy, dequantize_bnb  # noqa: E402
from host_memory import HAVE_PROC, peak_above_baseline  # noqa: E402

VOCAB = 256


def tiny_config(**kw):
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False)
    base.update(kw)
    return transformers.LlamaConfig(**base)


def write_plain(path, dtype=torch.float32, max_shard_size=None, seed=0, **kw):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(**kw), dtype=dtype)
    extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **extra)
    return model


def load_bnb(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kw)


def stored_tensors(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def load(path, **kw):
    kw.setdefault("compute_dtype", torch.float32)
    kw.setdefault("r", 4)
    return load_pretrained(path, device="cpu", verbose=False, progress=False, **kw)


def tokens(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 7), generator=g)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    dirs = {"plain": root / "plain", "sharded": root / "sharded", "tied": root / "tied"}
    write_plain(dirs["plain"])
    write_plain(dirs["sharded"], dtype=torch.bfloat16, max_shard_size="60KB", seed=1)
    write_plain(dirs["tied"], tie_word_embeddings=True, seed=2)
    assert (dirs["sharded"] / "model.safetensors.index.json").is_file()
    bnb = pytest.importorskip("transformers").BitsAndBytesConfig
    pytest.importorskip("bitsandbytes")
    for dq in (True, False):
        for storage in (torch.uint8, torch.bfloat16):
            name = f"bnb-{'dq' if dq else 'nodq'}-{str(storage)[6:]}"
            q = load_bnb(dirs["plain"], dtype=torch.float32, quantization_config=bnb(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=dq,
                bnb_4bit_quant_storage=storage, bnb_4bit_compute_dtype=torch.float32))
            q.save_pretrained(root / name)
            dirs[name] = root / name
    return dirs


# ------------------------------------------------------------------------------------------ plain checkpoints
@pytest.mark.parametrize("which", ["plain", "sharded"])
def test_plain_checkpoint_is_quantized_bit_exact(ckpts, which):
    path = ckpts[which]
    model = load(path)
    stored = stored_tensors(path)
    layers = qlora_modules(model)
    assert len(layers) == 2 * 7 and "lm_head" not in layers
    for name, layer in layers.items():
        ref = quantize_nf4(stored[name + ".weight"], blocksize=64, double_quant=True)
        for got, want in zip(layer.weight.tensors(), ref.tensors()):
            assert torch.equal(got, want), name
        assert layer.lora_A.weight.requires_grad and not layer.weight_packed.requires_grad
    dense = {k: v for k, v in model.state_dict().items() if not k.split(".weight")[0] in layers
             and ".lora_" not in k}
    assert set(dense) == {k for k in stored if k.rpartition(".")[0] not in layers}
    for key, t in dense.items():
        assert t.dtype == torch.float32 and torch.equal(t, stored[key].float()), key
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    assert model.qlora_report.quantized_params == sum(m.in_features * m.out_features for m in layers.values())


def test_plain_checkpoint_logits_match_prepare_model(ckpts):
    path = ckpts["plain"]
    ours = load(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    qk.prepare_model(ref, r=4, verbose=False)
    with torch.no_grad():
        assert torch.equal(ours(tokens()).logits, ref(tokens()).logits)


def test_tied_embeddings_stay_tied(ckpts):
    model = load(ckpts["tied"], compute_dtype=torch.bfloat16)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.dtype == torch.bfloat16 and not model.lm_head.weight.is_meta
    with pytest.raises(ValueError, match="tied"):
        load(ckpts["tied"], target_modules=["q_proj", "lm_head"])


def test_options_and_report(ckpts):
    model, report = load(ckpts["plain"], target_modules=["q_proj", "v_proj"], r=2, alpha=8, blocksize=128,
                         double_quant=False, compute_dtype=torch.bfloat16, return_report=True,
                         quantize="targets")  # the other Linear layers dense, in the compute dtype
    layers = qlora_modules(model)
    assert sorted(layers) == sorted(report.replaced) and len(layers) == 4
    for layer in layers.values():
        assert layer.r == 2 and layer.scaling == 4 and layer.blocksize == 128 and not layer.weight.double_quant
        assert layer.lora_A.weight.dtype == torch.float32  # float32 masters by default, as prepare_model
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert report.bytes_after == model_memory(model)
    with torch.no_grad():
        assert model(tokens()).logits.dtype == torch.bfloat16
    same = load(ckpts["plain"], target_modules=["q_proj"], compute_dtype=torch.bfloat16, adapter_dtype=None)
    assert all(m.lora_B.weight.dtype == torch.bfloat16 for m in qlora_modules(same).values())


# ----------------------------------------------------------------------------------- bitsandbytes checkpoints
@pytest.mark.parametrize("name", ["bnb-dq-uint8", "bnb-dq-bfloat16", "bnb-nodq-uint8", "bnb-nodq-bfloat16"])
def test_bnb_checkpoint_matches_transformers_bitsandbytes(ckpts, name):
    path = ckpts[name]
    ours = load(path)
    ref = load_bnb(path, dtype=torch.float32)
    stored = stored_tensors(path)
    layers = qlora_modules(ours)
    assert len(layers) == 14
    for lname, layer in layers.items():  # the NF4 bytes and scale codes as stored, nothing requantized
        assert torch.equal(layer.weight_packed.view(-1), stored[lname + ".weight"].view(torch.uint8).view(-1))
        assert torch.equal(layer.weight.absmax, stored[lname + ".weight.absmax"])  # flat view of the stored rows
        # the format's definition from bitsandbytes' quant state, not its CPU dequantize: that one is wrong for
        # blocks straddling rows (down_proj, in_features 96) on AVX-512 CPUs (tests/bnb_oracle.py)
        assert torch.equal(layer.weight.dequantize(torch.float32), dequantize_bnb(ref.get_submodule(lname)))
    assert type(ours.lm_head) is torch.nn.Linear  # dense in the file, dense here
    with torch.no_grad():  # bitsandbytes' model by the definition: its eval forward repacks on AVX512-BF16 CPUs
        assert torch.equal(ours(tokens()).logits, dense_copy(ref)(tokens()).logits)


def test_save_roundtrip_bnb_and_load_pretrained(ckpts, tmp_path):
    model = load(ckpts["plain"], compute_dtype=torch.float32)
    torch.manual_seed(3)
    for layer in qlora_modules(model).values():  # trained-looking adapters: the base is what gets saved
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    out = tmp_path / "saved"
    save_pretrained(model, out)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["quantization_config"]["llm_int8_skip_modules"] == ["lm_head"]
    assert not any(".lora_" in k for k in stored_tensors(out))
    back = load(out)
    sd, sd_back = model.state_dict(), back.state_dict()
    base_keys = [k for k in sd if ".lora_" not in k]
    assert base_keys == [k for k in sd_back if ".lora_" not in k]
    for k in base_keys:
        assert torch.equal(sd[k], sd_back[k]), k
    # transformers + bitsandbytes see the base model; so does ours with B = 0 (bitsandbytes' model by the
    # format's definition, as above: its CPU kernels depart from it on AVX-512 / AVX512-BF16 CPUs)
    ref = dense_copy(load_bnb(out, dtype=torch.float32))
    for layer in qlora_modules(model).values():
        torch.nn.init.zeros_(layer.lora_B.weight)
    with torch.no_grad():
        assert torch.equal(ref(tokens()).logits, model(tokens()).logits)


def test_save_over_the_loaded_checkpoint(ckpts, tmp_path):
    """The loaded model owns its memory: rewriting the files it came from leaves it intact."""
    path = _copy(ckpts["bnb-nodq-bfloat16"], tmp_path / "c")
    model = load(path)
    with torch.no_grad():
        before = model(tokens()).logits
    save_pretrained(model, path)
    with torch.no_grad():
        assert torch.equal(model(tokens()).logits, before)
        assert torch.equal(load(path)(tokens()).logits, before)


def test_save_sharded_roundtrip(ckpts, tmp_path):
    model = load(ckpts["tied"], compute_dtype=torch.float32)
    save_pretrained(model, tmp_path / "s", max_shard_size="40KB")
    assert (tmp_path / "s" / "model.safetensors.index.json").is_file()
    back = load(tmp_path / "s")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(back(tokens()).logits, model(tokens()).logits)


def test_save_merged_dense_loads_in_plain_transformers(ckpts, tmp_path):
    model = load(ckpts["plain"], compute_dtype=torch.float32)
    torch.manual_seed(4)
    for layer in qlora_modules(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    out = tmp_path / "merged"
    save_pretrained(model, out, merge_adapters=True, dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    stored = stored_tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    assert not any(".lora_" in k or ".absmax" in k for k in stored)
    dense = transformers.AutoModelForCausalLM.from_pretrained(out)  # a plain model: no qlora_kernels module in it
    assert not any(isinstance(m, QLoRALinear) for m in dense.modules())
    assert dense.dtype == torch.bfloat16
    for name, layer in qlora_modules(model).items():
        assert torch.equal(dense.get_submodule(name).weight, layer.merged_weight(torch.bfloat16))
    with torch.no_grad():
        want = model(tokens()).logits
        got = dense(tokens()).logits.float()
        # the same merged model in float32 shows the error is bf16 rounding of weights and activations
        exact = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        for name, layer in qlora_modules(model).items():
            exact.get_submodule(name).weight.copy_(layer.merged_weight(torch.float32))
        for k, t in model.state_dict().items():
            if ".lora_" not in k and ".weight." not in k and k.rpartition(".")[0] not in qlora_modules(model):
                exact.state_dict()[k].copy_(t)
        torch.testing.assert_close(exact(tokens()).logits, want, rtol=1e-4, atol=1e-4)
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


# ---------------------------------------------------------------------------------------------- bad input
def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["quantization_config"].update(bnb_4bit_quant_type="fp4"), "bnb_4bit_quant_type='fp4'"),
    (lambda c: c["quantization_config"].update(load_in_4bit=False, _load_in_4bit=False, load_in_8bit=True),
     "8-bit"),
    (lambda c: c["quantization_config"].update(quant_method="gptq"), "quant_method='gptq'"),
    (lambda c: c.update(intermediate_size=128), "down_proj.weight.*quantized shape"),
])
def test_bad_bnb_config(ckpts, tmp_path, edit, match):
    path = _copy(ckpts["bnb-dq-uint8"], tmp_path / "c")
    _edit_config(path, edit)
    with pytest.raises(CheckpointError, match=match) as info:
        load(path)
    assert str(path) in str(info.value)


def test_fp4_tensor_in_file(ckpts, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _copy(ckpts["bnb-dq-uint8"], tmp_path / "c")
    sd = load_file(str(path / "model.safetensors"))
    key = "model.layers.1.self_attn.k_proj.weight.quant_state.bitsandbytes__nf4"
    sd[key.replace("nf4", "fp4")] = sd.pop(key)
    save_file(sd, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="k_proj.weight.quant_state.bitsandbytes__fp4.*only nf4"):
        load(path)


def test_shape_disagreeing_with_config(ckpts, tmp_path):
    path = _copy(ckpts["plain"], tmp_path / "c")
    _edit_config(path, lambda c: c.update(intermediate_size=128))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'model.layers.0.mlp.\w+_proj.weight' has "
                                              r"shape \[\d+, \d+\] but config.json gives"):
        load(path)
    path = _copy(ckpts["plain"], tmp_path / "d")
    _edit_config(path, lambda c: c.update(vocab_size=300))
    with pytest.raises(CheckpointError, match=r"'(model.embed_tokens|lm_head).weight' has shape \[256, 64\] but config.json "
                                              r"gives \[300, 64\]"):
        load(path)


def test_missing_shard_truncated_file_missing_tensor(ckpts, tmp_path):
    path = _copy(ckpts["sharded"], tmp_path / "a")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shard '{shard.name}'.*is missing"):
        load(path)
    path = _copy(ckpts["plain"], tmp_path / "b")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors file.*truncated"):
        load(path)
    from safetensors.torch import load_file, save_file

    path = _copy(ckpts["plain"], tmp_path / "c")
    sd = load_file(str(path / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no tensor for \\['model.norm.weight'\\]"):
        load(path)
    path = _copy(ckpts["plain"], tmp_path / "d")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        load(path)
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(path)
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load(tmp_path / "nowhere")


def test_save_rejects_unprepared_model():
    model = transformers.AutoModelForCausalLM.from_config(tiny_config())
    with pytest.raises(ValueError, match="no QLoRALinear"):
        save_pretrained(model, "/nonexistent/never-written")


# ------------------------------------------------------------------------------------------- host memory

@pytest.mark.skipif(not HAVE_PROC, reason="needs /proc (Linux)")
def test_host_memory_bound(tmp_path):
    """Peak anonymous memory during the load <= 1.15 x (final model bytes + largest checkpoint tensor).

    The baseline is taken after transformers imported the Llama classes (a one-time ~130 MB of code and
    import state, the same for any model size)."""
    import gc

    path = tmp_path / "mid"
    cfg = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
               num_key_value_heads=6, vocab_size=1024)
    write_plain(path, **cfg)
    largest = 384 * 1024 * 4
    assert sum(f.stat().st_size for f in path.glob("*.safetensors")) > 20e6
    transformers.AutoModelForCausalLM.from_config(tiny_config())  # imports the Llama classes
    gc.collect()
    model, above = peak_above_baseline(lambda: load(path, compute_dtype=torch.bfloat16, r=8))
    bound = 1.15 * (model_memory(model) + largest)
    assert above <= bound, f"peak {above} bytes above baseline, bound {bound:.0f}"


# ------------------------------------------------------------------------------------ activation checkpointing
def test_gradient_checkpointing_same_gradients_less_memory(ckpts):
    from qlora_kernels.planner import LiveTensorTracker, scratch_ops

    grads, peaks = [], []
    ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(5))
    for checkpointing in (False, True):
        torch.manual_seed(6)  # the same adapters (A is drawn at load time) in both models
        model = load(ckpts["plain"], gradient_checkpointing=checkpointing)
        for layer in qlora_modules(model).values():  # B != 0 so A gets a gradient too
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
        model.train()
        assert model.is_gradient_checkpointing == checkpointing
        tracker = LiveTensorTracker(descend=scratch_ops())
        for t in list(model.parameters()) + list(model.buffers()):
            tracker.track(t)
        with tracker:
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        peaks.append(tracker.peak)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    assert peaks[1] < peaks[0]


# ------------------------------------------------------------------------------------------------ generation
def _dense_twin(model, path):
    """The same model in eager dense form: each NF4 weight dequantized into a plain nn.Linear."""
    dense = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(model.device)
    with torch.no_grad():
        for name, layer in qlora_modules(model).items():
            dense.get_submodule(name).weight.copy_(layer.merged_weight(torch.float32))
    return dense


def test_greedy_generation_matches_dense_dequantized(ckpts):
    model = load(ckpts["plain"])
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = model.generate(ids, max_new_tokens=8, do_sample=False)
        dense = _dense_twin(model, ckpts["plain"]).generate(ids, max_new_tokens=8, do_sample=False)
    assert ours.shape == (2, 13) and torch.equal(ours, dense)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="transformers' offloaded cache needs CUDA")
def test_generation_with_offloaded_cache_on_gpu(ckpts):
    model = load_pretrained(ckpts["plain"], device="cuda", compute_dtype=torch.bfloat16, r=4, verbose=False,
                            progress=False)
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0)).cuda()
    default = model.generate(ids, max_new_tokens=12, do_sample=False)
    offloaded = model.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation="offloaded")
    assert torch.equal(default, offloaded)


# ------------------------------------------------------------------ float64 checkpoints, transformers' arguments
def _write_float64(src, dst):
    """The checkpoint in `src` with every float tensor upcast to float64 (exact), config.json as it is."""
    from safetensors.torch import save_file

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    save_file({k: (v.double() if v.is_floating_point() else v).contiguous() for k, v in stored_tensors(src).items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_float64_checkpoint_loads_as_its_float32_twin(tmp_path, compute_dtype):
    """A float64 checkpoint (was: a TypeError from quantize_nf4 naming neither file nor tensor) loads; its
    weights (and a target's bias) are read as float32, the other tensors cast to the compute dtype, so the model
    equals the one loaded from the float32 checkpoint it was upcast from, byte for byte (state dict and logits)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(attention_bias=True), dtype=torch.float32)
    with torch.no_grad():  # biases too (nonzero): a target's bias is read apart from its weight
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_()
    model.save_pretrained(tmp_path / "fp32")
    _write_float64(tmp_path / "fp32", tmp_path / "fp64")
    assert {v.dtype for v in stored_tensors(tmp_path / "fp64").values()} == {torch.float64}
    torch.manual_seed(0)  # the adapters' A init
    a = load(tmp_path / "fp32", compute_dtype=compute_dtype)
    torch.manual_seed(0)
    b = load(tmp_path / "fp64", compute_dtype=compute_dtype)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and len(qlora_modules(b)) == 14
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
        else:
            assert sa[k] == sb[k], k
    with torch.no_grad():
        assert torch.equal(a(tokens()).logits, b(tokens()).logits)


def test_transformers_loading_arguments(tmp_path):
    """from_pretrained's arguments that a local load can honour are honoured; the others raise naming
    themselves."""
    write_plain(tmp_path / "m")
    path = tmp_path / "m"
    kw = dict(r=4, verbose=False, progress=False)
    for impl in ("eager", "sdpa"):
        assert load(path, attn_implementation=impl).config._attn_implementation == impl
    # dtype / torch_dtype: aliases of compute_dtype (a dtype, its name, or "auto": config.json's)
    embed = lambda m: m.get_input_embeddings().weight.dtype  # noqa: E731
    assert embed(load_pretrained(path, device="cpu", dtype=torch.bfloat16, **kw)) == torch.bfloat16
    assert embed(load_pretrained(path, device="cpu", torch_dtype="float16", **kw)) == torch.float16
    assert embed(load_pretrained(path, device="cpu", torch_dtype="auto", **kw)) == torch.float32  # as saved
    assert embed(load_pretrained(path, device="cpu", **kw)) == torch.bfloat16  # the default compute dtype
    with pytest.raises(ValueError, match="disagree: compute_dtype=torch.float32, dtype=torch.bfloat16"):
        load_pretrained(path, device="cpu", compute_dtype=torch.float32, dtype=torch.bfloat16, **kw)
    with pytest.raises(ValueError, match="torch_dtype must be torch.float32, torch.float16 or torch.bfloat16"):
        load_pretrained(path, device="cpu", torch_dtype=torch.float64, **kw)
    # device_map: one device, or {"": device}
    for dm in ("cpu", torch.device("cpu"), {"": "cpu"}):
        m = load_pretrained(path, device_map=dm, **kw)
        assert {p.device.type for p in m.parameters()} == {"cpu"}
    for dm in ("auto", {"model.layers.0": "cpu", "lm_head": "cpu"}):
        with pytest.raises(NotImplementedError, match=r"device_map=.*(auto|model\.layers\.0)"):
            load_pretrained(path, device_map=dm, **kw)
    with pytest.raises(ValueError, match="device_map='tpu9': not a device"):
        load_pretrained(path, device_map="tpu9", **kw)
    with pytest.raises(ValueError, match="device='cpu' and device_map='meta' disagree"):
        load_pretrained(path, device="cpu", device_map="meta", **kw)
    # revision: a local directory has none
    load_pretrained(path, device="cpu", revision="main", **kw)
    with pytest.raises(ValueError, match="revision='v1.0': .* is a local directory, which has no revisions"):
        load_pretrained(path, device="cpu", revision="v1.0", **kw)


def test_no_future_warning_from_load_with_checkpointing(tmp_path):
    """transformers 5 deprecates gradient_checkpointing_enable / is_gradient_checkpointing (a FutureWarning on
    every call): load_pretrained(gradient_checkpointing=True) uses activation_checkpointing_enable."""
    write_plain(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = load(tmp_path / "m", gradient_checkpointing=True)
        model.train()
        model(tokens(), labels=tokens()).loss.backward()
    assert model.is_activation_checkpointing
