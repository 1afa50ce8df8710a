"""prepare_model on a tiny random Llama (transformers) and on plain modules: replacement, freezing, report,
training, state dicts, bitsandbytes-quantized models."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*native extension _C not available.*")

from qlora_kernels import PrepareReport, QLoRALinear, prepare_model  # noqa: E402
from qlora_kernels.model import find_target_modules, qlora_modules  # noqa: E402

transformers = pytest.importorskip("transformers")

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_prepare_tiny_llama_report_and_freezing(capsys):
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    report = prepare_model(model, r=8, alpha=16, verbose=True, progress=False)
    printed = capsys.readouterr().out
    assert "prepare_model: 14 Linear layers -> QLoRALinear" in printed and "MiB before" in printed
    assert isinstance(report, PrepareReport) and report["r"] == 8
    assert len(report.replaced) == 14 and all(n.rsplit(".", 1)[-1] in LLAMA_LINEARS for n in report.replaced)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QLoRALinear)  # head kept
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.params_before == report.params_after - report.trainable_params
    assert 4.12 < report.bits_per_param < 4.2
    assert report.bytes_after < report.bytes_before
    d = report.as_dict()
    assert set(d) >= {"params_before", "params_after", "bytes_before", "bytes_after", "trainable_params"}
    # B = 0: the prepared model computes the original one with each weight replaced by deq(W)
    reference = tiny_llama()
    with torch.no_grad():
        for name, m in qlora_modules(model).items():
            reference.get_submodule(name).weight.copy_(m.weight.dequantize(torch.float32))
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_tiny_llama_trains():
    model = tiny_llama()
    prepare_model(model, r=8, alpha=16, dropout=0.05, verbose=False)
    model.train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 64, (4, 16), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(50):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * losses[0], losses[::10]
    for m in qlora_modules(model).values():
        assert torch.count_nonzero(m.lora_B.weight) > 0  # every adapter trained


def test_whole_model_state_dict_roundtrip():
    model = tiny_llama()
    prepare_model(model, r=4, verbose=False)
    for m in qlora_modules(model).values():
        nn.init.normal_(m.lora_B.weight, std=0.05)
    sd = model.state_dict()
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in sd
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in sd
    other = tiny_llama(seed=7)
    prepare_model(other, r=4, verbose=False)
    result = other.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(other(ids).logits, model(ids).logits, rtol=0, atol=0)
    # the prepared model moves and casts like any module; the NF4 scales stay float32
    other = other.to(torch.bfloat16)
    q = other.model.layers[0].self_attn.q_proj
    assert q.lora_A.weight.dtype == torch.bfloat16 and q.weight_offset.dtype == torch.float32
    with torch.no_grad():
        assert other(ids).logits.dtype == torch.bfloat16


def test_target_modules_matching():
    model = tiny_llama()
    report = prepare_model(model, target_modules=["q_proj", "v_proj"], r=4, verbose=False)
    assert len(report.replaced) == 4
    assert isinstance(model.model.layers[1].self_attn.v_proj, QLoRALinear)
    assert not isinstance(model.model.layers[1].self_attn.k_proj, QLoRALinear)
    model = tiny_llama()
    report = prepare_model(model, target_modules=r".*layers\.1\.mlp\..*", r=4, verbose=False)
    assert report.replaced == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                               "model.layers.1.mlp.down_proj"]
    model = tiny_llama()
    report = prepare_model(model, exclude_modules=["down_proj"], r=4, verbose=False)
    assert len(report.replaced) == 12
    with pytest.raises(ValueError, match=r"matched no nn.Linear / Linear4bit module of LlamaForCausalLM"):
        prepare_model(tiny_llama(), target_modules=["query"], verbose=False)


def test_plain_module_with_multihead_attention():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.TransformerEncoderLayer(32, 4, 64, batch_first=True))
    report = prepare_model(model, r=2, verbose=False)
    # MultiheadAttention reads out_proj.weight directly: that Linear stays dense
    assert "2.self_attn.out_proj" not in report.replaced and "0" in report.replaced
    assert set(report.replaced) == {"0", "2.linear1", "2.linear2"}
    y = model(torch.randn(2, 5, 16))
    y.sum().backward()
    assert model[0].lora_A.weight.grad is not None


def test_prepare_bitsandbytes_quantized_model(tmp_path):
    pytest.importorskip("bitsandbytes")
    base = tiny_llama()
    base.save_pretrained(tmp_path)
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    bnb_model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=qcfg, device_map="cpu",
                                                              dtype=torch.float32)
    packed = bnb_model.model.layers[0].mlp.up_proj.weight.data
    ours = tiny_llama()
    prepare_model(ours, r=4, verbose=False)
    report = prepare_model(bnb_model, r=4, verbose=False)
    assert len(report.replaced) == 14
    q = bnb_model.model.layers[0].mlp.up_proj
    assert isinstance(q, QLoRALinear) and q.weight_packed.data_ptr() == packed.data_ptr()  # taken over as is
    assert report.params_before == report.params_after - report.trainable_params
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(bnb_model(ids).logits, ours(ids).logits, rtol=0, atol=0)


def _bnb_llama(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path)
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM.from_pretrained(tmp_path, quantization_config=qcfg, device_map="cpu",
                                                             dtype=torch.float32)


def _snapshot(model):
    return {n: (type(m), m.training, [(k, p.requires_grad, p.data_ptr()) for k, p in m.named_parameters(recurse=False)])
            for n, m in model.named_modules()}


def test_prepare_refuses_a_layer_bitsandbytes_repacked_and_changes_nothing(tmp_path):
    """One layer repacked as Linear4bit.forward does on an AVX512-BF16 CPU (here on any CPU: the conversion is
    pure torch), the last target prepare_model reaches: it raises naming that layer, before any change."""
    bnb = pytest.importorskip("bitsandbytes")
    from bnb_oracle import repack_like_bnb_forward

    from qlora_kernels import BnbRepackedError

    bnb_model = _bnb_llama(tmp_path)
    repack_like_bnb_forward(bnb_model.model.layers[1].mlp.down_proj)
    before = _snapshot(bnb_model)
    with pytest.raises(BnbRepackedError, match=r"model\.layers\.1\.mlp\.down_proj: bitsandbytes repacked this layer "
                       r"for its CPU kernel during an inference forward.*qlora_kernels\.load_pretrained.*train mode"):
        prepare_model(bnb_model, r=4, verbose=False)
    assert _snapshot(bnb_model) == before
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in bnb_model.modules()) == 14
    # the others are intact (skip_modules: down_proj is not taken over as NF4Linear either, it stays as it is)
    prepare_model(bnb_model, r=4, verbose=False, exclude_modules=["down_proj"], skip_modules=["down_proj"])
    assert len(qlora_modules(bnb_model)) == 12


def _bnb_repacks_here() -> bool:
    """bitsandbytes 0.50.2's Linear4bit.forward repacks in eval mode without grad where this is true (cpuid)."""
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


@pytest.mark.skipif(not _bnb_repacks_here(), reason="bitsandbytes repacks in Linear4bit.forward only on CPUs with "
                    "AVX512-BF16 (test_prepare_refuses_a_layer_bitsandbytes_repacked covers it on every CPU)")
def test_prepare_after_a_real_bitsandbytes_eval_forward(tmp_path):
    """The user's path on an AVX512-BF16 CPU: an eval forward without grad repacks every layer (refused); the way
    out the error names, a train-mode forward before prepare_model, keeps the layers and prepares them."""
    from qlora_kernels import BnbRepackedError

    ids = torch.randint(0, 64, (2, 8))
    bnb_model = _bnb_llama(tmp_path / "a")
    with torch.no_grad():
        bnb_model.eval()(ids)
    with pytest.raises(BnbRepackedError, match=r"model\.layers\.0\.self_attn\.q_proj: bitsandbytes repacked"):
        prepare_model(bnb_model, r=4, verbose=False)
    bnb_model = _bnb_llama(tmp_path / "b")
    with torch.no_grad():
        bnb_model.train()(ids)
    assert len(prepare_model(bnb_model, r=4, verbose=False).replaced) == 14


def test_command_line_usage_and_info(capsys):
    from qlora_kernels.__main__ import main

    assert main([]) == 2
    assert "usage: python -m qlora_kernels <command>" in capsys.readouterr().out
    assert main(["info"]) == 0
    assert '"native_cpu"' in capsys.readouterr().out
    assert main(["nonsense"]) == 2
    assert "unknown command 'nonsense'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ target selection vs PEFT
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.out_proj, self.proj = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)


class _Tricky(nn.Module):
    """Names where PEFT's rules matter: "proj" is a suffix of "q_proj" without being a dotted suffix, and a
    regex that matches part of a path (re.search) but not all of it (re.fullmatch)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj, self.q_proj = nn.Linear(8, 8), nn.Linear(8, 8)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(8, 8)


def _peft_selection(model, target_modules, exclude_modules=None):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=2, target_modules=target_modules, exclude_modules=exclude_modules)
    wrapped = peft.get_peft_model(model, cfg)
    return sorted(n for n, m in wrapped.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))


@pytest.mark.parametrize("targets, exclude", [
    (["proj"], None),                                       # dotted suffix only: not q_proj / out_proj
    (["q_proj", "blocks.1.out_proj"], ["blocks.0.q_proj"]),  # full paths, suffixes and an exclusion
    ("q_proj|blocks\\.1\\..*proj", None),                   # fullmatch: the top-level q_proj, not blocks.0.q_proj
    (".*\\.(q|out)_proj", ["1.out_proj"]),
    (["q_proj", "out_proj"], "blocks\\.0\\..*"),                # a str exclude is a regex (PEFT), not a name
    (["q_proj", "out_proj"], "q_proj"),                         # fullmatch: only the top-level q_proj
], ids=["suffix", "paths-exclude", "regex-fullmatch", "regex-exclude", "exclude-regex", "exclude-regex-fullmatch"])
def test_target_selection_is_peft_selection(targets, exclude):
    ours = sorted(find_target_modules(_Tricky(), targets, exclude or ()))
    assert ours == _peft_selection(_Tricky(), targets, exclude)
    model = _Tricky()
    assert sorted(prepare_model(model, target_modules=targets, exclude_modules=exclude or (), r=2,
                                verbose=False).replaced) == ours


def test_all_linear_is_peft_all_linear():
    assert sorted(find_target_modules(tiny_llama())) == _peft_selection(tiny_llama(), "all-linear")
