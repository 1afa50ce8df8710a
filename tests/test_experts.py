"""NF4 experts of mixture-of-experts models (experts.py): bytes, numerics, training, PEFT interop, checkpoints.

Tiny Qwen3-MoE, Mixtral and GptOss models built from configs. GptOss matters apart: its experts are stored
the other way round ([E, in, out]) with biases, and its gate interleaves gate / up.
"""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import qlora_kernels as qk  # noqa: E402
from qlora_kernels.experts import NF4Experts, experts_modules  # noqa: E402
from qlora_kernels.model import model_memory  # noqa: E402
from accuracy import assert_close_derived  # noqa: E402
from host_memory import HAVE_PROC, peak_above_baseline  # noqa: E402

R, ALPHA = 4, 8


def make_model(kind: str, seed: int = 0, **kw) -> nn.Module:
    """A tiny float32 MoE causal LM with random expert weights (and biases for GptOss)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2)
    if kind in ("qwen", "qwen_odd"):
        hidden, inter = (40, 18) if kind == "qwen_odd" else (64, 32)  # odd: N*K % 64 != 0 (partial last block)
        cfg = transformers.Qwen3MoeConfig(hidden_size=hidden, intermediate_size=2 * inter, moe_intermediate_size=inter,
                                          head_dim=hidden // 4, num_experts=5, norm_topk_prob=True,
                                          **{**common, **kw})
        model = transformers.Qwen3MoeForCausalLM(cfg)
    elif kind == "mixtral":
        cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=32, head_dim=16, num_local_experts=4,
                                         **{**common, **kw})
        model = transformers.MixtralForCausalLM(cfg)
    else:
        cfg = transformers.GptOssConfig(hidden_size=64, intermediate_size=32, head_dim=16, num_local_experts=4,
                                        layer_types=["full_attention"] * 2, **{**common, **kw})
        model = transformers.GptOssForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.normal_(0, 0.1 if p.dim() == 3 else 0.05)
    return model.float().eval()


def expert_params(model) -> list:
    return sorted({f"{n}.{p}" for n, m in model.named_modules() if n.endswith("experts")
                   for p in ("gate_up_proj", "down_proj")})


def randomize_lora(model, seed=1):
    """Non-zero B everywhere (B = 0 would make every adapter test pass trivially)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ------------------------------------------------------------------------------------------- bytes
@pytest.mark.parametrize("kind", ["qwen", "mixtral", "gptoss", "qwen_odd"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_expert_bytes_bit_exact_per_slice(kind, double_quant):
    """Expert e's packed bytes and scales equal quantize_nf4 of its [out, in] matrix (both orientations;
    a partial last block when N*K % blocksize != 0, as for a Linear weight)."""
    model = make_model(kind)
    dense = {n: m for n, m in model.named_modules() if n.endswith("mlp.experts")}
    originals = {n: {p: m._parameters[p].detach().clone() for p in ("gate_up_proj", "down_proj")}
                 for n, m in dense.items()}
    qk.prepare_model(model, r=R, alpha=ALPHA, double_quant=double_quant, verbose=False)
    experts = experts_modules(model)
    assert set(experts) == set(dense)
    for name, module in experts.items():
        assert not module.is_transposed == (kind != "gptoss")
        for p, w in module.projections.items():
            for e in range(module.num_experts):
                W = originals[name][p][e]
                ref = qk.quantize_nf4((W.t() if w.transposed else W).contiguous(), double_quant=double_quant)
                assert (w.out_features, w.in_features) == tuple(ref.shape)
                assert torch.equal(w.weight_packed[e], ref.packed.view(-1)), (name, p, e)
                assert torch.equal(w.weight_absmax[e], ref.absmax), (name, p, e)
                if double_quant:
                    assert torch.equal(w.weight_nested_absmax[e], ref.nested_absmax)
                    assert torch.equal(w.weight_offset[e], ref.offset.reshape(()))
                else:
                    assert w.weight_nested_absmax is None and w.weight_offset is None
            n = w.out_features * w.in_features
            nb = -(-n // 64)  # per expert: codes, scales, and with double quant 4-byte nested scales + offset
            per = (n + 1) // 2 + (nb + 4 * -(-nb // 256) + 4 if double_quant else 4 * nb)
            assert w.nbytes == module.num_experts * per


# ------------------------------------------------------------------------------------------- numerics
class _Delta(nn.Module):
    """The reference expert weight: deq(W_e) + s * B_e @ A_e, in the model's orientation, A and B leaves."""

    def __init__(self, deq, a, b, scaling, transposed):
        super().__init__()
        self.register_buffer("deq", deq)
        self.A, self.B = nn.Parameter(a), nn.Parameter(b)
        self.scaling, self.transposed = scaling, transposed

    def forward(self, _):
        w = self.deq + self.scaling * (self.B @ self.A)  # [E, out, in]
        return w.transpose(1, 2) if self.transposed else w


def reference(original, prepared, dtype):
    """`original` with every experts module computing deq(W_e) + s B_e A_e through the model's own eager
    forward (same router, same gate), in `dtype`; {param path: _Delta} for the gradients."""
    from torch.nn.utils import parametrize

    ref = copy.deepcopy(original).to(dtype)
    deltas = {}
    for name, module in experts_modules(prepared).items():
        dense = ref.get_submodule(name)
        dense.config._experts_implementation = "eager"  # the per-expert loop: any dtype, float64 included
        for p, w in module.projections.items():
            deq = torch.stack([w.expert_weight(e).dequantize(torch.float32) for e in range(w.num_experts)])
            delta = _Delta(deq.to(dtype), w.lora_A.detach().to(dtype), w.lora_B.detach().to(dtype), w.scaling,
                           w.transposed)
            parametrize.register_parametrization(dense, p, delta, unsafe=True)
            deltas[f"{name}.{p}"] = delta
    return ref


@pytest.mark.parametrize("kind", ["qwen", "mixtral", "gptoss", "qwen_odd"])
def test_logits_and_gradients_vs_float64(kind):
    """Logits, the expert LoRA gradients and the input-embedding gradient (dx through both projections) vs
    a float64 reference with the dequantized experts, same routing; tolerance: 2x / 4x float32 PyTorch's."""
    model = make_model(kind)
    qk.prepare_model(model, target_modules=[], target_parameters=expert_params(model), r=R, alpha=ALPHA,
                     verbose=False)
    randomize_lora(model)
    model.get_input_embeddings().weight.requires_grad_(True)  # its gradient is dx through every layer
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(3))
    probe = torch.randn(2, 11, 96, generator=torch.Generator().manual_seed(4))
    base = dense_base(model)  # the prepared model's own weights, dense (Linear layers NF4 or not)
    refs = {dt: reference(base, model, dt) for dt in (torch.float64, torch.float32)}
    out = model(ids).logits
    (out.double() * probe).sum().backward()
    res = {}
    for dt, ref in refs.items():
        logits = ref(ids).logits
        (logits * probe.to(dt)).sum().backward()
        res[dt] = (logits, ref)
    assert_close_derived(out, res[torch.float64][0], res[torch.float32][0], f"{kind} logits")
    emb = lambda m: m.get_input_embeddings().weight.grad  # noqa: E731
    assert_close_derived(emb(model), emb(res[torch.float64][1]), emb(res[torch.float32][1]), f"{kind} dx")
    for name, module in experts_modules(model).items():
        for p, w in module.projections.items():
            key = f"{name.replace('.experts', '.experts.parametrizations')}.{p}.0."
            for attr in ("A", "B"):
                got = getattr(w, f"lora_{attr}").grad
                ex, pl = (dict(r.named_parameters())[key + attr].grad for _, r in (res[torch.float64],
                                                                                    res[torch.float32]))
                assert got.abs().sum() > 0
                assert_close_derived(got, ex, pl, f"{kind} {name}.{p} d{attr}")
    for n, p in model.named_parameters():  # nothing else gets a gradient
        assert (p.grad is not None) == ("lora_" in n or "embed_tokens" in n), n


def _experts_ref(module, x, idx, weights, dtype):
    """The experts forward token by token with deq(W_e) + s B_e A_e in `dtype` (the module's own gate)."""
    mats = {}
    for p, w in module.projections.items():
        mats[p] = [(w.expert_weight(e).dequantize(torch.float32).to(dtype)
                    + w.scaling * (w.lora_B[e].detach().to(dtype) @ w.lora_A[e].detach().to(dtype)))
                   for e in range(w.num_experts)]
    first, down = module.weight_names
    out = torch.zeros(x.shape, dtype=dtype)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            h = x[t].to(dtype) @ mats[first][e].t()
            if module.has_bias:
                h = h + getattr(module, first + "_bias")[e].to(dtype)
            y = module._gate(h) @ mats[down][e].t()
            if module.has_bias:
                y = y + getattr(module, down + "_bias")[e].to(dtype)
            out[t] += weights[t, j].to(dtype) * y
    return out


@pytest.mark.parametrize("kind", ["qwen", "gptoss"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_experts_module_given_routing(kind, dtype):
    """One experts module with the routing given (ragged groups, an expert with no token): its output in
    bf16 / float32 vs the float64 token-by-token reference, tolerance derived from the same reference run in
    `dtype`; the float32 LoRA masters are cast per call and keep their dtype."""
    model = make_model(kind)
    qk.prepare_model(model, r=R, alpha=ALPHA, verbose=False)
    randomize_lora(model)
    module = model.model.layers[0].mlp.experts  # float32 masters, activations in dtype
    g = torch.Generator().manual_seed(5)
    x = torch.randn(13, 64, generator=g).to(dtype)
    idx = torch.randint(0, module.num_experts - 1, (13, 2), generator=g)  # the last expert gets no token
    idx[:, 1] = (idx[:, 0] + 1) % (module.num_experts - 1)
    weights = torch.rand(13, 2, generator=g).to(dtype)
    out = module(x, idx, weights)
    assert out.dtype == dtype and module.gate_up_proj.lora_A.dtype == torch.float32
    assert module.gate_up_proj.weight_nested_absmax.dtype == torch.float32
    exact = _experts_ref(module, x, idx, weights, torch.float64)
    plain = _experts_ref(module, x, idx, weights, dtype)
    assert_close_derived(out.detach(), exact, plain, f"{kind} {dtype} experts")
    out.float().sum().backward()
    assert torch.isfinite(module.gate_up_proj.lora_A.grad).all()
    assert module.down_proj.lora_B.grad[module.num_experts - 1].abs().sum() == 0  # no token, no gradient


# ------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("kind", ["gptoss"])
def test_training_lowers_loss_and_touches_only_adapters(kind):
    model = make_model(kind)
    report = qk.prepare_model(model, r=R, alpha=ALPHA, verbose=False)
    assert [n for n in report.replaced if n.endswith("experts")] == [f"model.layers.{i}.mlp.experts" for i in (0, 1)]
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    nf4 = {n: b.clone() for n, b in model.named_buffers()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if "lora_" in n}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    for n, b in model.named_buffers():
        assert torch.equal(b, nf4[n]), n
    w = model.model.layers[0].mlp.experts.gate_up_proj
    assert w.lora_B.abs().sum() > 0


def test_merge_and_unload_restores_the_model_class():
    model = make_model("gptoss")
    qk.prepare_model(model, r=R, alpha=ALPHA, verbose=False)
    randomize_lora(model)
    ids = torch.randint(0, 96, (2, 9))
    out = model(ids).logits
    merged = qk.merge_and_unload(copy.deepcopy(model), dtype=torch.float32)
    experts = merged.model.layers[0].mlp.experts
    assert type(experts).__name__ == "GptOssExperts" and experts.gate_up_proj.shape == (4, 64, 64)
    assert experts.gate_up_proj_bias.shape == (4, 64) and not experts.gate_up_proj.requires_grad
    diff = (merged(ids).logits - out).abs().max().item()
    assert diff < 1e-4 * out.abs().max().item(), diff  # float32 rounding of the merged weights only


# ------------------------------------------------------------------------------------------- PEFT
def eager(model):
    """transformers' eager experts loop (its grouped_mm path takes no float64)."""
    for m in model.modules():
        if hasattr(m, "gate_up_proj") and hasattr(m, "config"):
            m.config._experts_implementation = "eager"
    return model


def dense_base(prepared):
    """The prepared model's base as a plain transformers model: every NF4 weight dequantized (B = 0 first,
    so merging adds exactly nothing)."""
    base = copy.deepcopy(prepared)
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "lora_B" in n:
                p.zero_()
    return qk.merge_and_unload(base, dtype=torch.float32)


@pytest.mark.parametrize("kind", ["qwen", "gptoss"])
def test_adapter_loads_in_peft_with_matching_logits(kind, tmp_path):
    peft = pytest.importorskip("peft")
    model = make_model(kind)
    qk.prepare_model(model, r=R, alpha=ALPHA, verbose=False)
    randomize_lora(model)
    base = dense_base(model)
    qk.save_adapter(model, tmp_path)
    ids = torch.randint(0, 96, (2, 9))
    out = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
        exact = peft.PeftModel.from_pretrained(eager(copy.deepcopy(base).double()), tmp_path).eval()
    assert sorted(plain.peft_config["default"].target_parameters) == expert_params(model)
    with torch.no_grad():
        assert_close_derived(out.detach(), exact(ids).logits, plain(ids).logits, f"{kind} PEFT logits")


@pytest.mark.parametrize("kind", ["qwen", "mixtral"])
@pytest.mark.parametrize("which", [["gate_up_proj", "down_proj"], ["down_proj"]])
def test_peft_adapter_loads_here_with_matching_logits(kind, which, tmp_path):
    peft = pytest.importorskip("peft")
    model = make_model(kind)
    targets = [t for t in expert_params(model) if t.rpartition(".")[2] in which]
    qk.prepare_model(model, target_modules=[], target_parameters=targets, r=R, alpha=ALPHA, verbose=False)
    base = dense_base(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=[], target_parameters=[f"mlp.experts.{p}" for p in which]))
    randomize_lora(pm, seed=7)
    pm.save_pretrained(tmp_path)
    got = qk.load_adapter(model, tmp_path)
    assert len(got["loaded"]) == 2 * len(which)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = pm.eval()(ids).logits
        exact = peft.PeftModel.from_pretrained(eager(copy.deepcopy(base).double()), tmp_path).eval()(ids).logits
        assert_close_derived(model(ids).logits, exact, plain, f"{kind} {which} logits")


def test_load_adapter_refuses_a_wrong_rank(tmp_path):
    model = make_model("qwen")
    qk.prepare_model(model, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"], r=R, verbose=False)
    other = make_model("qwen")
    qk.prepare_model(other, target_modules=[], target_parameters=["mlp.experts.gate_up_proj"], r=2 * R,
                     verbose=False)
    qk.save_adapter(other, tmp_path)
    before = model.model.layers[0].mlp.experts.gate_up_proj.lora_A.clone()
    with pytest.raises(ValueError, match="gate_up_proj.*r=8"):
        qk.load_adapter(model, tmp_path)
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj.lora_A, before)


# ------------------------------------------------------------------------------------------- checkpoints
def _same_nf4(a, b):
    for (name, ea), eb in zip(experts_modules(a).items(), experts_modules(b).values()):
        for (p, wa), wb in zip(ea.projections.items(), eb.projections.values()):
            for ta, tb in zip(wa.nf4_tensors(), wb.nf4_tensors()):
                assert (ta is None and tb is None) or torch.equal(ta, tb), (name, p)


@pytest.mark.parametrize("kind", ["qwen", "mixtral", "gptoss"])
def test_load_pretrained_save_pretrained_round_trips(kind, tmp_path):
    """transformers' checkpoint (per-expert keys for Qwen3-MoE / Mixtral, fused for GptOss) streams into the
    same NF4 bytes as prepare_model; the package format reloads bit for bit; the merged checkpoint loads in
    plain transformers with the adapted model's outputs."""
    model = make_model(kind)
    model.save_pretrained(tmp_path / "dense")
    prepared = copy.deepcopy(model)
    qk.prepare_model(prepared, r=R, alpha=ALPHA, verbose=False)
    loaded = qk.load_pretrained(tmp_path / "dense", device="cpu", compute_dtype=torch.float32, r=R, alpha=ALPHA,
                                verbose=False)
    assert [n for n in loaded.qlora_report.replaced if n.endswith("experts")] == list(experts_modules(prepared))
    _same_nf4(prepared, loaded)
    ids = torch.randint(0, 96, (2, 9))
    assert torch.equal(prepared(ids).logits, loaded(ids).logits)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
        {n for n, p in prepared.named_parameters() if p.requires_grad}

    qk.save_pretrained(loaded, tmp_path / "nf4")
    again = qk.load_pretrained(tmp_path / "nf4", device="cpu", compute_dtype=torch.float32, r=R, verbose=False)
    _same_nf4(loaded, again)

    randomize_lora(loaded)
    qk.save_pretrained(loaded, tmp_path / "merged", merge_adapters=True, dtype=torch.float32)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ref = qk.merge_and_unload(copy.deepcopy(loaded), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, ref(ids).logits)


@pytest.mark.skipif(not HAVE_PROC, reason="needs /proc (Linux)")
def test_streaming_load_host_memory_bound(tmp_path):
    """A checkpoint with fused 3-D expert tensors (16 MiB each) loads within 1.15 x (final model + the largest
    expert matrix): the 3-D tensors are read one expert slice at a time, never whole."""
    from safetensors.torch import save_file

    big = transformers.Qwen3MoeConfig(hidden_size=256, moe_intermediate_size=512, intermediate_size=512,
                                      num_experts=16, num_experts_per_tok=2, num_hidden_layers=2, vocab_size=256,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(big).float()
    path = tmp_path / "fused"
    path.mkdir()
    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    stacked = 16 * 1024 * 256 * 4
    largest_expert = 1024 * 256 * 4
    del model
    transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=32,
                                                                 num_hidden_layers=1, vocab_size=8, num_experts=2,
                                                                 num_attention_heads=2, num_key_value_heads=2))
    gc.collect()
    loaded, above = peak_above_baseline(lambda: qk.load_pretrained(path, device="cpu", compute_dtype=torch.bfloat16, r=R, verbose=False))
    final = model_memory(loaded)
    bound = 1.15 * (final + largest_expert)
    assert final < stacked  # a whole 3-D tensor would break the bound on its own
    assert above <= bound, f"peak {above} bytes above baseline, bound {bound:.0f}"


# ------------------------------------------------------------------------------------------- bad inputs
class _OddExperts(nn.Module):
    def __init__(self, down_shape, post_norm=False):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(2, 16, 8))
        self.down_proj = nn.Parameter(torch.randn(*down_shape))
        self.act_fn = nn.SiLU()
        self.has_post_expert_norm = post_norm


class _Wrap(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.experts = experts


@pytest.mark.parametrize("down_shape, post_norm, match", [
    ((2, 8, 9), False, r"experts \(_OddExperts\): unsupported experts layout.*\(expected gate_up_proj \[2, 18, 8\]"),
    ((2, 8), False, r"experts \(_OddExperts\): unsupported experts layout: expected 3-D parameters"),
    ((3, 8, 8), False, r"experts \(_OddExperts\): gate_up_proj has 2 experts but down_proj 3"),
    ((2, 8, 8), True, r"experts \(_OddExperts\): unsupported experts layout: has_post_expert_norm"),
])
def test_unsupported_layouts_raise_naming_the_module(down_shape, post_norm, match):
    model = _Wrap(_OddExperts(down_shape, post_norm))
    with pytest.raises(ValueError, match=match):
        qk.prepare_model(model, verbose=False)
    assert isinstance(model.proj, nn.Linear) and isinstance(model.experts, _OddExperts)  # untouched


def test_bad_expert_inputs_raise():
    model = make_model("qwen")
    with pytest.raises(ValueError, match=r"target_parameters \['mlp.experts.nope'\] match no fused expert weight"):
        qk.prepare_model(model, target_modules=[], target_parameters=["mlp.experts.nope"], verbose=False)
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[3, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.experts.down_proj\[3\] has non-finite values"):
        qk.prepare_model(model, verbose=False)
    assert not experts_modules(model) and isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)


def test_untargeted_projection_is_quantized_without_adapter():
    model = make_model("mixtral")
    qk.prepare_model(model, target_modules=[], target_parameters=["mlp.experts.down_proj"], r=R, verbose=False)
    e = model.model.layers[0].mlp.experts
    assert isinstance(e, NF4Experts) and e.gate_up_proj.lora_A is None and e.down_proj.lora_A is not None
    model(torch.randint(0, 96, (1, 5))).logits.sum().backward()
    assert e.down_proj.lora_A.grad is not None


# ------------------------------------------------------------------------------------------- planner
def test_planner_counts_nf4_experts_and_their_lora():
    """plan_memory on a MoE config: its NF4 term and LoRA count equal those of the same model prepared for
    real (experts in NF4 per expert, per-expert LoRA), and the simulated step runs through NF4Experts."""
    from qlora_kernels.planner import plan_memory

    cfg = dict(model_type="qwen3_moe", vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=5,
               num_experts_per_tok=2, max_position_embeddings=256)
    plan = plan_memory(cfg, r=R, seq_len=32, batch_size=2, device="cpu", optimizer="adamw_torch")
    real = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg))
    qk.prepare_model(real, r=R, verbose=False)
    experts = [w for e in experts_modules(real).values() for w in e.projections.values()]
    linears = [m for m in real.modules() if isinstance(m, qk.QLoRALinear)]
    assert plan.terms["NF4 weights + scales"] == sum(m.weight.nbytes for m in linears) + sum(w.nbytes for w in experts)
    assert plan.counts["nf4_params"] == sum(m.in_features * m.out_features for m in linears) + sum(
        w.numel for w in experts)
    assert plan.counts["lora_params"] == sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert plan.terms["saved activations (checkpointed)"] > 0


def test_dropout_warns_that_expert_lora_has_none():
    model = make_model("mixtral")
    with pytest.warns(UserWarning, match="expert LoRA of 2 experts modules runs without dropout"):
        qk.prepare_model(model, r=R, dropout=0.1, verbose=False)
    assert isinstance(model.model.layers[0].mlp.experts, NF4Experts)


# ------------------------------------------------------------------------------------ Hugging Face path
@pytest.mark.parametrize("kind", ["qwen", "mixtral", "gptoss"])
def test_nf4config_from_pretrained_quantizes_experts(kind, tmp_path):
    """from_pretrained(quantization_config=NF4Config) of a per-expert checkpoint (Qwen3-MoE, Mixtral: merged by
    transformers' conversion) or a fused one (GptOss, [E, in, out] with biases): NF4Experts whose bytes are
    quantize_nf4 of each expert's slice, the router dense, logits equal to prepare_model's on the same weights
    (its LoRA B = 0), and save_pretrained -> from_pretrained without the config gives the same bytes and logits."""
    model = make_model(kind)
    model.save_pretrained(tmp_path / "dense")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=qk.NF4Config(compute_dtype=torch.float32)).eval()
    dense = {n: m for n, m in model.named_modules() if n.endswith("mlp.experts")}
    experts = experts_modules(hf)
    assert set(experts) == set(dense)
    for name, module in experts.items():
        assert isinstance(module, NF4Experts)
        router = name.rpartition(".")[0] + (".router" if kind == "gptoss" else ".gate")
        assert isinstance(hf.get_submodule(router).weight, nn.Parameter)
        assert torch.equal(hf.get_submodule(router).weight, model.get_submodule(router).weight)  # dense, as loaded
        for p, w in module.projections.items():
            assert w.r == 0  # the HF path quantizes; PEFT adds the adapters
            for e in range(module.num_experts):
                W = dense[name]._parameters[p][e].detach()
                ref = qk.quantize_nf4((W.t() if w.transposed else W).contiguous())
                assert torch.equal(w.weight_packed[e], ref.packed.view(-1)), (name, p, e)
                assert torch.equal(w.weight_absmax[e], ref.absmax), (name, p, e)
                assert torch.equal(w.weight_nested_absmax[e], ref.nested_absmax), (name, p, e)
                assert torch.equal(w.weight_offset[e], ref.offset.reshape(())), (name, p, e)
    prepared = copy.deepcopy(model)
    qk.prepare_model(prepared, r=R, alpha=ALPHA, verbose=False)
    _same_nf4(prepared, hf)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        logits = hf(ids).logits
        assert torch.equal(logits, prepared(ids).logits)

    hf.save_pretrained(tmp_path / "nf4")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4").eval()
    assert set(experts_modules(again)) == set(dense)
    _same_nf4(hf, again)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)


def test_nf4config_bitsandbytes_serialization_refuses_experts(tmp_path):
    """serialize_as='bitsandbytes' cannot describe NF4 experts: a clear error naming the module, not a config
    that bitsandbytes would misread."""
    make_model("qwen").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts \(Qwen3MoeExperts\).*serialize_as"):
        transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, quantization_config=qk.NF4Config(serialize_as="bitsandbytes"))


@pytest.mark.parametrize("target_modules", [[], "all-linear"])
def test_load_pretrained_target_parameters_as_prepare_model(target_modules, tmp_path):
    """load_pretrained(target_parameters=...) adapts what prepare_model(target_parameters=...) adapts: the same
    trainable parameters (LoRA on gate_up_proj only; down_proj NF4 without adapter), the same NF4 bytes and
    logits; a name matching no expert weight raises naming target_parameters."""
    model = make_model("qwen")
    model.save_pretrained(tmp_path)
    tp = ["mlp.experts.gate_up_proj"]
    prepared = copy.deepcopy(model)
    qk.prepare_model(prepared, target_modules=target_modules, target_parameters=tp, r=R, alpha=ALPHA, verbose=False)
    loaded = qk.load_pretrained(tmp_path, device="cpu", compute_dtype=torch.float32, target_modules=target_modules,
                                target_parameters=tp, r=R, alpha=ALPHA, verbose=False)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in prepared.named_parameters() if p.requires_grad}
    assert any(".experts.gate_up_proj.lora_A" in n for n in trainable)
    assert not any(".experts.down_proj.lora" in n for n in trainable)
    assert any("self_attn" in n for n in trainable) == (target_modules == "all-linear")
    _same_nf4(prepared, loaded)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(prepared(ids).logits, loaded(ids).logits)
    with pytest.raises(ValueError, match=r"target_parameters \['mlp\.experts\.w9'\] match no fused expert"):
        qk.load_pretrained(tmp_path, device="cpu", target_modules=[], target_parameters=["mlp.experts.w9"],
                           verbose=False)


def test_peft_target_parameters_on_nf4_experts_raise_with_directions(tmp_path):
    """get_peft_model(LoraConfig(target_parameters=...)) on a model whose experts are NF4Experts (NF4Config's
    from_pretrained) refuses before touching the model, naming the weight and what to use instead (PEFT alone
    would say only that no target_parameters were found)."""
    peft = pytest.importorskip("peft")
    make_model("qwen").save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=qk.NF4Config(compute_dtype=torch.float32))
    before = {n: type(m) for n, m in hf.named_modules()}
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.down_proj is a weight of an NF4Experts "
                                         r".*prepare_model\(model, .*target_parameters.*save_adapter"):
        peft.get_peft_model(hf, peft.LoraConfig(r=R, target_modules=["q_proj"],
                                                target_parameters=["mlp.experts.down_proj"]))
    assert {n: type(m) for n, m in hf.named_modules()} == before
    # without target_parameters PEFT adapts the NF4 linears and leaves the NF4 experts frozen, as asked
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=R, target_modules=["q_proj"]))
    assert all(not p.requires_grad for n, p in pm.named_parameters() if ".experts." in n)
    assert any(p.requires_grad for n, p in pm.named_parameters() if "q_proj.lora_A" in n)


def test_prepare_model_adds_expert_lora_to_nf4config_experts(tmp_path):
    """prepare_model(target_parameters=...) on NF4Config's model gives its NF4Experts LoRA (bytes kept): the
    same trainable parameters and, with the same adapters, the same logits as prepare_model on the dense model;
    the loss's gradient reaches the expert adapters."""
    model = make_model("qwen")
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=qk.NF4Config(compute_dtype=torch.float32)).eval()
    nf4_before = {n: b.clone() for n, b in hf.named_buffers() if ".experts." in n}
    tp = ["mlp.experts.gate_up_proj"]
    prepared = copy.deepcopy(model)
    qk.prepare_model(prepared, target_modules=[], target_parameters=tp, r=R, alpha=ALPHA, verbose=False)
    report = qk.prepare_model(hf, target_modules=[], target_parameters=tp, r=R, alpha=ALPHA, verbose=False)
    assert report.replaced == list(experts_modules(prepared))
    assert all(torch.equal(b, nf4_before[n]) for n, b in hf.named_buffers() if ".experts." in n)
    trainable = {n for n, p in hf.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in prepared.named_parameters() if p.requires_grad}
    assert trainable and all(".experts.gate_up_proj.lora_" in n for n in trainable)
    randomize_lora(prepared)
    hf.load_state_dict({n: p for n, p in prepared.state_dict().items() if "lora_" in n}, strict=False)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, prepared(ids).logits)
    hf(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in hf.named_parameters() if p.requires_grad)


def test_peft_hooks_survive_a_bare_find_spec():
    """transformers' is_peft_available() (importlib.util.find_spec("peft"), e.g. in from_pretrained) before
    the first `import peft` must not cost the PEFT hooks (they dispatch NF4Linear and refuse target_parameters
    on NF4Experts): the import hook stays installed until peft actually executes."""
    import subprocess
    import sys

    code = ("import importlib.util, qlora_kernels\n"
            "from qlora_kernels.integrations import peft as qp\n"
            "assert importlib.util.find_spec('peft') is not None and not qp._registered\n"
            "import peft\n"
            "assert qp._registered\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_nf4config_experts_dequantize_and_modules_to_not_convert(tmp_path):
    """model.dequantize() puts the model's experts class back with deq(W_e) per expert (bit-equal to
    NF4ExpertWeight.dense); modules_to_not_convert=[..., "experts"] keeps the experts dense as loaded."""
    model = make_model("qwen")
    model.save_pretrained(tmp_path)
    cfg = dict(compute_dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=qk.NF4Config(**cfg))
    want = {n: {p: w.dense() for p, w in m.projections.items()} for n, m in experts_modules(hf).items()}
    hf.dequantize()
    for n, ps in want.items():
        module = hf.get_submodule(n)
        assert type(module).__name__ == "Qwen3MoeExperts"
        for p, t in ps.items():
            assert torch.equal(module._parameters[p], t), (n, p)
    kept = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=qk.NF4Config(modules_to_not_convert=["lm_head", "experts"], **cfg))
    assert not experts_modules(kept)
    assert isinstance(kept.model.layers[0].self_attn.q_proj, qk.NF4Linear)
    for n, m in model.named_modules():
        if n.endswith("mlp.experts"):
            assert torch.equal(kept.get_submodule(n).gate_up_proj, m.gate_up_proj)
