"""torch.compile(fullgraph=True) of a small transformer block made of QLoRALinear layers: one graph, no break,
and the same outputs and gradients as eager."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

warnings.filterwarnings("ignore", message=".*native extension _C not available.*")

from qlora_kernels import QLoRALinear, prepare_model  # noqa: E402


class Block(nn.Module):
    def __init__(self, d=64, heads=4, ff=128):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=i % 2 == 0) for i in range(4))
        self.up, self.down = nn.Linear(d, ff), nn.Linear(ff, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.norm1(x)
        split = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        att = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), is_causal=True)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Tiny(nn.Module):
    def __init__(self, vocab=50, d=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        return self.head(self.blocks(self.emb(ids)))


def make_model(dropout=0.0):
    torch.manual_seed(0)
    model = Tiny()
    prepare_model(model, target_modules=["q", "k", "v", "o", "up", "down"], r=4, alpha=8, dropout=dropout,
                  verbose=False)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, QLoRALinear):
            with torch.no_grad():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return model


def step(model, ids):
    loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_compile_fullgraph_matches_eager():
    model = make_model()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(2))
    loss_e, grads_e = step(model, ids)
    graphs = []

    def count_backend(gm, example_inputs):
        graphs.append(gm)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=count_backend)
    loss_c, grads_c = step(compiled, ids)
    loss_c2, _ = step(compiled, ids)  # second call: no recompile
    assert len(graphs) == 1
    assert len(grads_c) == 24  # A and B of 12 layers; nothing else trains
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_c2, loss_e, rtol=1e-5, atol=1e-5)
    for name, g in grads_e.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_compile_autocast_dropout_no_graph_break(dtype):
    # dropout draws random numbers inside the Function and autocast casts A and B: still one graph.
    model = make_model(dropout=0.1).train()
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=dtype):
        torch.manual_seed(5)
        loss_c, grads_c = step(compiled, ids)
        torch.manual_seed(5)
        loss_e, grads_e = step(model, ids)
    # aot_eager runs the traced ops eagerly in the same order: the same random masks, the same numbers
    torch.testing.assert_close(loss_c, loss_e)
    for name, g in grads_e.items():
        assert g.dtype == torch.float32
        torch.testing.assert_close(grads_c[name], g, msg=name)
