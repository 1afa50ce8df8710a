"""torch.distributed: a prepared model trains under DistributedDataParallel (2 CPU processes, gloo, loopback).

DDP broadcasts the NF4 buffers (uint8 codes, float32 scales) from rank 0 and all-reduces only the LoRA
gradients; after a step on different data both ranks must hold identical adapters.
"""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import qlora_kernels as qk

        torch.manual_seed(1234 + rank)  # different base weights per rank: DDP must broadcast rank 0's
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32))
        qk.prepare_model(model, target_modules=["0", "2"], r=4, alpha=8, verbose=False)
        for m in model.modules():
            if isinstance(m, qk.QLoRALinear):
                torch.nn.init.normal_(m.lora_B.weight, std=0.02)  # nonzero B so A gets gradients too
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
        g = torch.Generator().manual_seed(rank)  # each rank its own batch
        x, target = torch.randn(8, 64, generator=g), torch.randn(8, 32, generator=g)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.mse_loss(ddp(x), target).backward()
            opt.step()
        state = {k: v for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_keep_adapters_in_sync(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    s0 = torch.load(tmp_path / "rank0.pt")
    s1 = torch.load(tmp_path / "rank1.pt")
    assert s0.keys() == s1.keys()
    lora_keys = [k for k in s0 if "lora_" in k]
    assert len(lora_keys) == 4
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
    assert any(k.endswith("weight.absmax") for k in s0)  # the NF4 state travelled in the state dict
