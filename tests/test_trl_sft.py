"""TRL's SFTTrainer on an NF4Config model (issue 19 item 3): a tiny Llama built from a config, a tiny word-level
tokenizer built here (no hub), PEFT LoRA on the NF4Linear layers, gradient checkpointing, this package's
PagedAdamW8bit; it trains, writes checkpoints, and a run resumed from checkpoint-2 repeats the uninterrupted
run's losses of steps 3 and 4 bit for bit. (The model is not flagged is_loaded_in_4bit, so TRL keeps PEFT's
float32 adapters: with the flag TRL casts them to bf16 and PEFT re-loads them as float32 on resume, and the
runs diverged at step 4.)"""

from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=".*native extension _C not available.*")

import qlora_kernels as qk  # noqa: E402

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

WORDS = [f"w{i}" for i in range(120)]


def tiny_tokenizer():
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + WORDS)}
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
