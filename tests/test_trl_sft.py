"""TRL's SFTTrainer on an NF4Config model (issue 19 item 3): a tiny Llama built from a config, a tiny word-level
tokenizer built here (no hub), PEFT LoRA on the NF4Linear layers, gradient checkpointing, this package's
PagedAdamW8bit; it trains, writes checkpoints, and a run resumed from checkpoint-2 repeats the uninterrupted
run's losses of steps 3 and 4 bit for bit. (The model is not flagged is_loaded_in_4bit, so TRL keeps PEFT's
float32 adapters: with the flag TRL casts them to bf16 and PEFT re-loads them as float32 on resume, and the
runs diverged at step 4.)"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*native extension _C not available.*")

import qlora_kernels as qk  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

WORDS = [f"w{i}" for i in range(120)]


def tiny_tokenizer():
    # the chat roles last: the ids of the words are those the resume test was written with
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + WORDS + ["user", "assistant"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    text = [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (int(n),), generator=g).tolist())
            for n in torch.randint(6, 20, (16,), generator=g)]
    return root, datasets.Dataset.from_dict({"text": text})


def run(root, data, out, max_steps, resume=None):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            root / "base", quantization_config=qk.NF4Config(compute_dtype=torch.bfloat16), dtype=torch.bfloat16)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))
        opt = qk.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        args = trl.SFTConfig(output_dir=str(out), max_steps=max_steps, save_steps=2, logging_steps=1,
                             per_device_train_batch_size=4, gradient_checkpointing=True, report_to=[],
                             use_cpu=True, seed=0, data_seed=0, max_length=32, bf16=False,
                             lr_scheduler_type="constant", save_only_model=False)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer(),
                                 optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=resume)
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_sft_trains_checkpoints_and_resumes(setup, tmp_path):
    root, data = setup
    trainer, losses = run(root, data, tmp_path / "full", 4)
    model = trainer.model
    fused = [n for n, m in model.named_modules() if type(m).__name__ == "LoraNF4Linear"]
    assert len(fused) == 14  # every NF4Linear got PEFT's LoRA layer of this package
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "optimizer.pt").is_file()
    _, resumed = run(root, data, tmp_path / "full", 4, resume=str(ckpt))
    assert resumed[-2:] == losses[-2:], (losses, resumed)  # bit-identical continuation
    # the adapters moved, the NF4 base did not
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)


# ------------------------------------------------------------------ the same run on transformers + bitsandbytes
# Why the curves agree to float32 rounding, and the bound:
# - the weights: both stacks quantize the same float32 checkpoint to the same NF4 bytes (asserted below: codes,
#   8-bit scales, their float32 scales and offset). Every in_features is a multiple of the blocksize and >= 128,
#   so no block straddles two rows: bitsandbytes' CPU dequantize, wrong for such blocks on AVX-512 CPUs, then
#   follows the format on every CPU. Training runs in train mode, where its AVX512-BF16 eval-mode repack never
#   triggers.
# - the compute: float32 everywhere (compute dtype, activations, adapters), so the stacks differ only in
#   float32 rounding order: the package's op adds s * U @ B^T into the base product (addmm with alpha); PEFT's
#   bnb layer adds (U @ B^T) * s to bitsandbytes' dequantize + matmul; the dx sums differ likewise.
# - dropout: p = 0.1, so a wrong dropout (none, or no 1/(1-p)) shows. The fused op draws its mask as
#   torch.rand(x.shape) >= p, PEFT's nn.Dropout with bernoulli_: the reference's dropout is swapped for the
#   same inverted dropout drawing as the op does, so both runs drop the same elements (gradient checkpointing
#   replays the draws on both sides).
# - TRL casts the trainable parameters of a model flagged is_loaded_in_4bit (bitsandbytes) to bf16, but not of
#   an NF4Config model (see the module docstring); the reference's float32 adapters are put back after
#   SFTTrainer's init, or the comparison would measure bf16 adapters (measured: |loss diff| up to 5.3e-4 by
#   step 20 with them, 1 ulp without).
# - the optimizer: torch.optim.AdamW on both. The two 8-bit AdamWs quantize their states differently
#   (bitsandbytes also keeps tensors under 4096 elements, every LoRA matrix here, in 32-bit states), so their
#   difference would measure the optimizers, not the layers.
# Bound at step k: (log2(N) + k) ulps of the loss, N = 128 = batch * seq tokens: the loss is a float32 mean of
# up to N token losses whose own rounding differences reach it as about log2(N) ulps (a cascaded float32 sum), and
# Adam's update m / sqrt(v) is scale-free, so a rounding-sized gradient difference moves the parameters by a
# rounding-sized step and adds about one more ulp per step, not a growing multiple. Measured here (AMD EPYC,
# AVX-512, torch 2.13, bitsandbytes 0.50.2): at most 1 ulp (4.8e-7) over the 20 steps, 2 with dropout 0; with
# the package's reference backend also 1 ulp. Broken on purpose (the fused op's scaling or dropout changed in
# a temporary shim), the first step over the bound: scaling x1.001 step 9 (2.9e-5), dropout off (p = 0)
# step 2 (3.5e-4), no 1/(1-p) rescale step 2 (2.5e-5), alpha/sqrt(r) for alpha/r step 2 (4.1e-4).
CURVE_STEPS = 20
TOKENS = 4 * 32


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("curve")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                                   tie_word_embeddings=False, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "base")  # float32
    g = torch.Generator().manual_seed(1)
    text = [" ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (int(n),), generator=g).tolist())
            for n in torch.randint(12, 40, (32,), generator=g)]  # some over max_length: truncation runs too
    return root / "base", datasets.Dataset.from_dict({"text": text})


class SameDrawDropout(nn.Module):
    """Inverted dropout drawing its mask as the fused op does (torch.rand(x.shape) >= p, float32)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape, device=x.device, dtype=torch.float32) >= self.p
        return x.masked_fill(~keep, 0).mul_(1.0 / (1.0 - self.p))


def sft_curve(path, data, out, stack):
    """SFTTrainer losses of CURVE_STEPS steps on `stack` ("qk" or "bnb"); returns (model, losses, initial
    trainable parameters)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if stack == "qk":
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, quantization_config=qk.NF4Config(compute_dtype=torch.float32), dtype=torch.float32)
        else:
            qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.float32)
            model = transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg,
                                                                      dtype=torch.float32, device_map="cpu")
        torch.manual_seed(0)
        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                           target_modules="all-linear", task_type="CAUSAL_LM"))
        if stack == "bnb":
            for m in model.modules():
                drop = getattr(m, "lora_dropout", None)
                if isinstance(drop, nn.ModuleDict):
                    for k in list(drop.keys()):
                        drop[k] = SameDrawDropout(drop[k].p)
        init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        args = trl.SFTConfig(output_dir=str(out), max_steps=CURVE_STEPS, save_strategy="no", logging_steps=1,
                             per_device_train_batch_size=4, gradient_checkpointing=True, report_to=[],
                             use_cpu=True, seed=0, data_seed=0, max_length=32, bf16=False,
                             lr_scheduler_type="constant")
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer(),
                                 optimizers=(opt, None))
        with torch.no_grad():  # undo TRL's bf16 cast of a bitsandbytes model's adapters (same Parameter objects)
            for n, p in model.named_parameters():
                if n in init:
                    p.data = init[n].clone()
        trainer.train()
    return model, [h["loss"] for h in trainer.state.log_history if "loss" in h], init


def ulp32(x: float) -> float:
    """The float32 spacing at |x| (x normal)."""
    return 2.0 ** (math.frexp(abs(x))[1] - 24)


def test_sft_loss_curve_matches_bitsandbytes_peft(wide, tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    path, data = wide
    ours, ours_losses, ours_init = sft_curve(path, data, tmp_path / "qk", "qk")
    theirs, ref_losses, ref_init = sft_curve(path, data, tmp_path / "bnb", "bnb")
    # the premises: the same NF4 bytes, the same initial adapters, float32 adapters, the two layer kinds
    lora_bnb = peft.tuners.lora.bnb.Linear4bit
    nf4 = [(n, m.base_layer) for n, m in ours.named_modules() if type(m).__name__ == "LoraNF4Linear"]
    assert len(nf4) == 14
    for n, base in nf4:
        layer = theirs.get_submodule(n)
        assert isinstance(layer, lora_bnb) and isinstance(layer.base_layer, bnb.nn.Linear4bit), n
        w, qs = base.weight, layer.base_layer.weight.quant_state
        assert torch.equal(layer.base_layer.weight.data.view(torch.uint8).view(-1), w.packed.view(-1)), n
        assert torch.equal(qs.absmax, w.absmax) and torch.equal(qs.state2.absmax, w.nested_absmax), n
        assert torch.equal(qs.offset.reshape(-1), w.offset.reshape(-1)), n
    assert ours_init.keys() == ref_init.keys() and all(torch.equal(ours_init[k], ref_init[k]) for k in ours_init)
    assert {p.dtype for p in theirs.parameters() if p.requires_grad} == {torch.float32}
    assert len(ours_losses) == len(ref_losses) == CURVE_STEPS
    ulps = [abs(a - b) / ulp32(b) for a, b in zip(ours_losses, ref_losses)]
    bound = [math.log2(TOKENS) + k for k in range(1, CURVE_STEPS + 1)]
    assert all(u <= b for u, b in zip(ulps, bound)), list(zip(ours_losses, ref_losses, ulps))
    assert ref_losses[-1] < ref_losses[0]  # it trained


# ------------------------------------------------------------------------------------- chat, packed
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"


@pytest.mark.parametrize("fmt", ["chat", "text"])
def test_sft_packing_chat_and_text(setup, tmp_path, fmt):
    """Packed SFT (TRL's bfd packing, padding-free batches with position_ids) on from_pretrained + NF4Config +
    get_peft_model: a "messages" dataset through the tokenizer's chat template, and plain text."""
    root, _ = setup
    g = torch.Generator().manual_seed(2)

    def words(n):
        return " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (n,), generator=g).tolist())

    convs = [[{"role": "user", "content": words(3 + i % 5)}, {"role": "assistant", "content": words(2 + i % 4)}]
             for i in range(24)]
    tok = tiny_tokenizer()
    if fmt == "chat":
        tok.chat_template = CHAT_TEMPLATE
        rows = {"messages": convs}
    else:
        rows = {"text": [c[0]["content"] + " " + c[1]["content"] for c in convs]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(
            root / "base", quantization_config=qk.NF4Config(compute_dtype=torch.bfloat16), dtype=torch.bfloat16)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                           task_type="CAUSAL_LM"))
        args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=3, save_strategy="no", logging_steps=1,
                             per_device_train_batch_size=2, gradient_checkpointing=True, report_to=[],
                             use_cpu=True, seed=0, max_length=32, bf16=False, packing=True)
        opt = qk.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict(rows),
                                 processing_class=tok, optimizers=(opt, None))
        packed = trainer.train_dataset
        # packed: fewer rows than examples, none over max_length; chat: the template's role words in them
        assert len(packed) < len(convs) and max(len(r) for r in packed["input_ids"]) <= 32
        first = tok.convert_ids_to_tokens(packed[0]["input_ids"])
        assert "<unk>" not in first and (fmt == "text" or ("user" in first and "assistant" in first)), first
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert sum(type(m).__name__ == "LoraNF4Linear" for m in model.modules()) == 14
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
