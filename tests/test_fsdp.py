"""FSDP2 over two CPU processes (gloo on 127.0.0.1): the NF4 weights of a prepared model sharded byte for byte.

Two spawned runs cover everything (each process: one thread, a process-group timeout, the whole run bounded):
  run A: per-rank shard shapes and bytes (uneven rows padded), exact bytes after unshard, bf16 mixed precision
         leaving the uint8 codes untouched (a float32 storage of the same bytes is corrupted), LoRA training
         equal to single-process full-batch training (reshard_after_forward True / False, activation
         checkpointing, each layer torch.compile'd), the full state dict gathered to rank 0, and a
         torch.distributed.checkpoint save.
  run B: meta-device init + load_from_rank0, and a rank hitting a bad input failing instead of hanging.
  run D: qlora_kernels.optim (AdamW8bit, PagedAdamW) stepping the DTensor adapters' local shards.
  run C: DistributedDataParallel (DDP keeps working): rank 0's NF4 buffers broadcast, LoRA gradients
         all-reduced, both ranks' adapters identical after steps on different data.
The checks on the results run here, in the single pytest process (single-process references, bitsandbytes).
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed")

WORLD = 2
STEPS, LR, BATCH = 3, 0.5, 8
RUN_TIMEOUT_S = 240  # a whole spawned run (the machine may be loaded: imports alone take seconds)
PG_TIMEOUT_S = 60  # a collective that waits longer than this raises instead of hanging


# ------------------------------------------------------------------------------------------------ the model
class Block(nn.Module):
    """up: K = 64 (rows shardable), N = 95 odd (uneven shards); down: K = 95 (blocks straddle rows: replicated)."""

    def __init__(self, d=64, h=95):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d=64):
        super().__init__()
        self.embed = nn.Linear(16, d)
        self.layers = nn.ModuleList([Block(d), Block(d)])
        self.out = nn.Linear(d, 128)  # shardable, even rows

    def forward(self, x):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


def prepare(model):
    """embed and layer 0 double-quantized, layer 1 and out without (float32 scales, sharded as their bytes)."""
    import qlora_kernels as qk

    qk.prepare_model(model, target_modules=["embed", "layers.0.up", "layers.0.down"], r=4, alpha=8, verbose=False,
                     quantize="targets")  # the rest stays dense until the second call quantizes it its own way
    qk.prepare_model(model, target_modules=["layers.1.up", "layers.1.down", "out"], r=4, alpha=8,
                     double_quant=False, verbose=False)


def make_model(seed=0):
    import qlora_kernels as qk

    torch.manual_seed(seed)
    model = Net()
    prepare(model)
    g = torch.Generator().manual_seed(seed + 1)
    for m in qk.model.qlora_modules(model).values():  # nonzero B so that A trains from the first step
        with torch.no_grad():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return model


def batch(seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 16, generator=g), torch.randn(BATCH, 128, generator=g)


def train(model, x, y, micro_batches=1):
    """STEPS of SGD on the mean loss of (x, y); micro_batches > 1 accumulates equal slices (the same sums as
    data parallelism over that many ranks)."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            (torch.nn.functional.mse_loss(model(xs), ys) / micro_batches).backward()
        opt.step()
    return model


def lora_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


# ---------------------------------------------------------------------------------------------- the harness
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, fn_name):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        if ":" in fn_name:  # "module:function" of another test file (tests/ is on the spawned path too)
            import importlib

            module, _, fn_name = fn_name.partition(":")
            result = getattr(importlib.import_module(module), fn_name)(rank, world, out_dir)
        else:
            result = globals()[fn_name](rank, world, out_dir)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        if isinstance(result, dict) and result.get("process_group_broken"):
            # the run broke the group on purpose (a rank failed mid-collective): its teardown may abort in gloo
            # ("terminate called without an active exception", seen once under load), after the result is saved
            os._exit(0)
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn_name, out_dir, world=WORLD):
    """Run globals()[fn_name](rank, world, out_dir) (or "module:function") on `world` processes; their results,
    rank by rank."""
    ctx = mp.start_processes(_entry, args=(world, _free_port(), str(out_dir), fn_name), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn_name}: the spawned run took more than {RUN_TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# ------------------------------------------------------------------------------------------------- run A
def _run_a(rank, world, out_dir):
    import qlora_kernels as qk
    from qlora_kernels import distributed as qd
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    res = {}
    x, y = batch()
    xr, yr = x.chunk(world)[rank], y.chunk(world)[rank]

    # --- shapes, bytes, exact unshard
    model = make_model()
    before = {n: (m.weight.packed.clone(), m.weight.absmax.clone()) for n, m in qk.model.qlora_modules(model).items()}
    qd.shard_model(model, verbose=False)
    res["row_layout"] = {n: m.row_layout for n, m in qk.model.qlora_modules(model).items()}
    res["local_shapes"] = {n: (tuple(m.weight_packed.to_local().shape), tuple(m.weight_absmax.to_local().shape))
                           for n, m in qk.model.qlora_modules(model).items() if m.row_layout}
    res["lora_local_shapes"] = {n: tuple(p.to_local().shape) for n, p in model.named_parameters() if "lora_" in n}
    res["bytes"] = qd.nf4_shard_bytes(model)
    exact = {}
    for layer in list(model.layers) + [model]:
        layer.unshard()
    for n, m in qk.model.qlora_modules(model).items():
        packed, absmax, _, _ = m._nf4_tensors()
        exact[n] = torch.equal(packed.reshape(-1, 1), before[n][0]) and torch.equal(absmax.reshape(-1), before[n][1])
    for layer in list(model.layers) + [model]:
        layer.reshard()
    res["exact_after_unshard"] = exact

    # --- bf16 mixed precision: what each layer's forward sees
    seen = {}

    def grab(name):
        def hook(m, args):
            packed, absmax, _, _ = m._nf4_tensors()
            seen[name] = (packed.clone(), absmax.clone(), m.lora_A.weight.dtype)
        return hook

    model = make_model()
    for n, m in qk.model.qlora_modules(model).items():
        m.register_forward_pre_hook(grab(n))
    mp_bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16)
    qd.shard_model(model, mp_policy=mp_bf16, verbose=False)
    model(xr.bfloat16()).float().sum().backward()
    res["bf16_exact"] = {n: torch.equal(s[0].reshape(-1, 1), before[n][0])
                         and torch.equal(s[1].reshape(-1), before[n][1]) for n, s in seen.items()}
    res["bf16_adapter_dtype"] = {n: s[2] for n, s in seen.items()}

    # the contrast: the same packed bytes in a float32 storage (bitsandbytes' quant_storage=float32)
    codes = before["layers.0.up"][0].reshape(-1)
    holder = nn.Module()
    holder.storage = nn.Parameter(codes[: codes.numel() // 4 * 4].clone().view(torch.float32).reshape(-1, 1),
                                  requires_grad=False)
    holder.lin = nn.Linear(4, 4)
    got = {}
    holder.forward = lambda t: holder.lin(t)
    fully_shard(holder, mp_policy=mp_bf16, mesh=qd._default_mesh(holder))
    holder.register_forward_pre_hook(lambda m, args: got.update(w=m.storage.detach().clone()))
    holder(torch.zeros(1, 4, dtype=torch.bfloat16))
    res["float_storage_seen_dtype"] = got["w"].dtype
    res["float_storage_exact"] = torch.equal(got["w"].float().view(torch.uint8).reshape(-1),
                                             codes[: codes.numel() // 4 * 4])

    # --- training: each rank its half of the batch; once with each layer torch.compile'd (fullgraph: no graph
    # break allowed; aot_eager: dynamo + AOTAutograd as inductor would see them, without its C++ build time)
    trained = {}
    for reshard, ac, compiled in ((True, False, False), (False, False, False), (True, False, True),
                                  (True, True, False)):
        model = make_model()
        qd.shard_model(model, reshard_after_forward=reshard, activation_checkpointing=ac, verbose=False,
                       compile=dict(backend="aot_eager", fullgraph=True) if compiled else False)
        torch._dynamo.utils.counters.clear()
        train(model, xr, yr)
        if compiled:
            res["compiled_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        trained[(reshard, ac, compiled)] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
                                            for k, v in model.state_dict().items() if "lora_" in k}
    res["trained"] = trained

    # --- state dicts of the last trained model
    full = qd.full_state_dict(model)
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "full.pt"))
    res["full_keys_on_rank"] = len(full)
    qd.save_sharded(model, os.path.join(out_dir, "dcp"))
    return res


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_a")
    return out, spawn("_run_a", out)


def test_each_rank_holds_its_rows_of_every_nf4_weight(run_a):
    _, res = run_a
    model = make_model()
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "weight_packed")}
    sharded = {n for n, m in layers.items() if m.in_features % m.blocksize == 0}
    assert sharded == {"layers.0.up", "layers.1.up", "out"}
    for rank, r in enumerate(res):
        assert {n for n, row in r["row_layout"].items() if row} == sharded
        for n in sharded:
            m = layers[n]
            rows = torch.arange(m.out_features).chunk(WORLD)[rank].numel()  # 95 rows: 48 + 47
            scale_bytes = m.in_features // m.blocksize * (1 if m.weight_nested_absmax is not None else 4)
            assert r["local_shapes"][n] == ((rows, m.in_features // 2), (rows, scale_bytes)), n
        for n, shape in r["lora_local_shapes"].items():  # the adapters are sharded too
            full = dict(model.named_parameters())[n].shape
            assert shape == (torch.arange(full[0]).chunk(WORLD)[rank].numel(), full[1]), n
    # per-rank bytes: total / world, plus at most one padding row per sharded tensor
    scale_bytes = {n: layers[n].weight_absmax.numel() * layers[n].weight_absmax.element_size() for n in sharded}
    row_bytes = sum(layers[n].in_features // 2 + scale_bytes[n] // layers[n].out_features for n in sharded)
    total = sum(layers[n].weight_packed.numel() + scale_bytes[n] for n in sharded)
    assert sum(r["bytes"]["sharded"] for r in res) == total
    for r in res:
        assert total / WORLD - row_bytes <= r["bytes"]["sharded"] <= total / WORLD + row_bytes
        assert r["bytes"]["total_unsharded"] == res[0]["bytes"]["total_unsharded"]


def test_unshard_gives_the_exact_nf4_bytes(run_a):
    _, res = run_a
    for r in res:
        assert r["exact_after_unshard"] and all(r["exact_after_unshard"].values()), r["exact_after_unshard"]


def test_bf16_mixed_precision_leaves_nf4_bytes_untouched(run_a):
    _, res = run_a
    for r in res:
        assert len(r["bf16_exact"]) == 6 and all(r["bf16_exact"].values()), r["bf16_exact"]
        assert all(d == torch.bfloat16 for d in r["bf16_adapter_dtype"].values())  # the policy was active
        # the same bytes in a float32 parameter are cast to bf16: what the layer would dequantize is wrong
        assert r["float_storage_seen_dtype"] == torch.bfloat16
        assert not r["float_storage_exact"]


def test_lora_training_matches_single_process_full_batch(run_a):
    _, res = run_a
    x, y = batch()
    full_batch = lora_state(train(make_model(), x, y))
    accumulated = lora_state(train(make_model(), x, y, micro_batches=WORLD))
    initial = lora_state(make_model())
    # Tolerance: data parallelism sums the same per-sample gradients in another order. The distance between
    # two single-process runs that differ only in that order (full batch vs WORLD accumulated slices) measures
    # it; allow 4x that, plus 8 float32 ulps of the values for runs where the two orders happen to agree.
    for key, want in full_batch.items():
        reorder = (want - accumulated[key]).abs().max().item()
        tol = 4 * reorder + 8 * torch.finfo(torch.float32).eps * want.abs().max().item()
        assert (want - initial[key]).abs().max() > 1e3 * tol, f"{key} did not train"
        for config, trained in res[0]["trained"].items():
            err = (trained[key] - want).abs().max().item()
            assert err <= tol, f"{key} {config}: {err:.3g} > {tol:.3g}"
            assert torch.equal(trained[key], res[1]["trained"][config][key])
    assert len(res[0]["trained"]) == 4
    for r in res:  # the compiled run did compile: one graph per layer (double quantization on / off)
        assert r["compiled_graphs"] == 2, r["compiled_graphs"]


def test_full_state_dict_loads_single_process_and_in_bitsandbytes(run_a):
    import qlora_kernels as qk

    out, res = run_a
    assert res[1]["full_keys_on_rank"] == 0
    full = torch.load(out / "full.pt")
    model = make_model(seed=5)  # other base weights and adapters: everything must come from the state dict
    ref = make_model()
    assert set(full) == set(model.state_dict())
    model.load_state_dict(full)
    for (n, m), r in zip(qk.model.qlora_modules(model).items(), qk.model.qlora_modules(ref).values()):
        w = qk.NF4Weight.from_state_dict(full, prefix=n + ".weight")
        assert torch.equal(w.packed, r.weight.packed) and torch.equal(w.absmax, r.weight.absmax), n
        assert torch.equal(m.weight_packed, r.weight_packed) and torch.equal(m.weight_absmax, r.weight_absmax), n
    trained = res[0]["trained"][(True, True, False)]
    for k, v in trained.items():
        assert torch.equal(full[k], v), k
    bnb = pytest.importorskip("bitsandbytes")
    for n, r in qk.model.qlora_modules(ref).items():
        if r.in_features % 64:  # bitsandbytes' CPU dequantize restarts blocks per row (see test_qlora_linear)
            continue
        stats = {k[len(n) + len(".weight."):]: v for k, v in full.items() if k.startswith(n + ".weight.")}
        b4 = bnb.nn.Linear4bit(r.in_features, r.out_features, bias=True, quant_type="nf4",
                               compute_dtype=torch.float32)
        b4.weight = bnb.nn.Params4bit.from_prequantized(full[n + ".weight"], stats, device="cpu", module=b4)
        theirs = bnb.functional.dequantize_4bit(b4.weight.data, b4.weight.quant_state)
        assert torch.equal(theirs, r.weight.dequantize(torch.float32)), n


def test_dcp_checkpoint_from_two_ranks_reloads_in_one_process(run_a):
    from qlora_kernels import distributed as qd

    out, _ = run_a
    full = torch.load(out / "full.pt")
    model = make_model(seed=5)
    qd.load_sharded(model, out / "dcp")
    got = model.state_dict()  # given back with its flat NF4 buffers: bitsandbytes keys again
    assert set(got) == set(full)
    for k in full:
        assert torch.equal(got[k], full[k]), k


# ------------------------------------------------------------------------------------------------- run B
def _run_b(rank, world, out_dir):
    import qlora_kernels as qk
    from qlora_kernels import distributed as qd

    res = {}
    # --- meta init: no rank ever builds the full-precision model; rank 0 streams one tensor at a time
    with torch.device("meta"):
        model = Net()
    prepare(model)
    qd.shard_model(model, verbose=False)
    model.to_empty(device="cpu")
    res["meta_params_left"] = sum(p.is_meta for p in model.parameters())
    stream = None
    if rank == 0:
        torch.manual_seed(0)
        source = Net()  # stands for a checkpoint on disk read tensor by tensor (e.g. safetensors safe_open)
        stream = ((k, v) for k, v in source.state_dict().items())
    qd.load_from_rank0(model, stream)
    full = qd.full_state_dict(model)
    if rank == 0:
        torch.save(full, os.path.join(out_dir, "meta_full.pt"))
    # a bad tensor on rank 0 fails on every rank with the same message
    try:
        qd.load_from_rank0(model, iter([("layers.0.up.weight", torch.zeros(3, 3))]) if rank == 0 else None)
        res["bad_load"] = "no error"
    except ValueError as exc:
        res["bad_load"] = str(exc)
    # --- a rank that hits a bad input: it raises its own clear error; the others fail, they do not hang
    x = torch.randn(4, 16) if rank == 0 else torch.randn(4, 15)
    t0 = time.monotonic()
    try:
        model(x).sum().backward()
        res["bad_input"] = "no error"
    except Exception as exc:  # rank 1: the ValueError; rank 0: gloo reports the peer gone (or the pg timeout)
        res["bad_input"] = f"{type(exc).__name__}: {exc}"
    res["bad_input_s"] = time.monotonic() - t0
    res["process_group_broken"] = True
    return res


def test_meta_init_load_from_rank0_and_a_failing_rank(tmp_path):
    import qlora_kernels as qk

    res = spawn("_run_b", tmp_path)
    assert all(r["meta_params_left"] == 0 for r in res)
    full = torch.load(tmp_path / "meta_full.pt")
    ref = make_model()
    want = ref.state_dict()
    for k, v in want.items():
        if "lora_" in k:
            continue  # adapters are initialised (A random, B zeros), not loaded
        assert torch.equal(full[k], v), k  # NF4 bytes identical to a single-process prepare_model
    for n, m in qk.model.qlora_modules(ref).items():
        assert torch.equal(full[n + ".lora_B.weight"], torch.zeros_like(m.lora_B.weight))
        bound = 1 / math.sqrt(m.in_features)  # kaiming_uniform(a=sqrt(5)) bound
        a = full[n + ".lora_A.weight"]
        assert a.abs().max() <= bound and a.std() > bound / 4
    assert all("layers.0.up.weight has shape [3, 3]" in r["bad_load"] for r in res), [r["bad_load"] for r in res]
    assert "ValueError" in res[1]["bad_input"] and "x has shape (4, 15)" in res[1]["bad_input"], res[1]["bad_input"]
    print("rank 0:", res[0]["bad_input"][:300], f"after {res[0]['bad_input_s']:.1f} s")
    assert res[0]["bad_input"] != "no error" and res[0]["bad_input_s"] < PG_TIMEOUT_S + 30


# ------------------------------------------------------------------------------------- single process
def test_row_layout_from_the_start_in_one_process():
    """Every shardable NF4 layer holds its codes and scales as frozen uint8 parameters by rows as soon as it is
    prepared (what plain fully_shard shards); its state dict still has the bitsandbytes keys."""
    import qlora_kernels as qk
    from qlora_kernels import distributed as qd

    model = make_model()
    x, _ = batch()
    want, sd = model(x), model.state_dict()
    assert qd.replicated_layers(model) == ["embed", "layers.0.down", "layers.1.down"]  # in_features 16, 95: straddle
    up = model.layers[1].up
    assert type(up) is qk.QLoRALinear and up.row_layout and isinstance(up.weight_packed, nn.Parameter)
    assert up.weight_packed.dtype == up.weight_absmax.dtype == torch.uint8 and not up.weight_packed.requires_grad
    assert up.weight_packed.shape == (95, 32) and up.weight_absmax.shape == (95, 4)  # float32 scale as 4 bytes
    assert not model.layers[0].down.row_layout and "weight_packed" in model.layers[0].down._buffers
    assert any(k.endswith("up.weight.absmax") for k in sd) and not any("weight_packed" in k for k in sd)
    assert torch.equal(model(x), want)
    got = model.state_dict()
    assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    packed = up.weight_packed.clone()
    model.half()  # dtype moves cast the adapters, never the integer NF4 parameters
    assert up.weight_packed.dtype == torch.uint8 and torch.equal(up.weight_packed, packed)
    assert up.lora_A.weight.dtype == torch.float16
    model.type(torch.float64)  # casts everything it is given: the NF4 tensors take only the device part
    assert up.weight_packed.dtype == torch.uint8 and torch.equal(up.weight_packed, packed)
    assert model.layers[0].up.weight_nested_absmax.dtype == torch.float32


def test_shard_model_says_what_is_missing():
    from qlora_kernels import distributed as qd

    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(RuntimeError, match="torch.distributed initialized"):
        qd.shard_model(make_model())


# ------------------------------------------------------------------------------------------------- run D
def _run_optim(rank, world, out_dir):
    """qlora_kernels.optim on FSDP2's DTensor adapters: each rank steps its local shards. Records, per step, every
    shard before the step and its gradient, and the shards and states after; then a state_dict round trip."""
    import qlora_kernels as qk
    from torch.distributed.fsdp import fully_shard

    x, y = batch()
    xr, yr = x.chunk(world)[rank], y.chunk(world)[rank]
    res = {}
    for cls_name in ("AdamW8bit", "PagedAdamW"):
        model = make_model()
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        make = lambda: getattr(qk.optim, cls_name)([p for _, p in named], lr=1e-2, min_8bit_size=16)  # noqa: E731
        opt = make()
        steps = []
        for _ in range(STEPS):
            opt.zero_grad()
            nn.functional.mse_loss(model(xr), yr).backward()
            steps.append(({n: p.to_local().detach().clone() for n, p in named},
                          {n: p.grad.to_local().clone() for n, p in named}))
            opt.step()
        after = {n: p.to_local().detach().clone() for n, p in named}
        states = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in named}
        reloaded = make()
        reloaded.load_state_dict(opt.state_dict())
        same = all(torch.equal(reloaded.state[p][k], v) for n, p in named for k, v in opt.state[p].items())
        res[cls_name] = dict(steps=steps, after=after, states=states, reload_same=same,
                             placements={n: str(p.placements) for n, p in named})
    return res


def test_optimizers_step_fsdp2_shards_like_plain_tensors(tmp_path):
    """AdamW8bit / PagedAdamW on FSDP2's DTensor adapters step each rank's local shard exactly as they step a
    plain tensor holding that shard (replayed here in one process with the recorded gradients, bit for bit),
    with 8-bit states for the shards of >= 16 values; the state dict round-trips on each rank."""
    from qlora_kernels import optim

    res = spawn("_run_optim", tmp_path)
    for cls_name in ("AdamW8bit", "PagedAdamW"):
        for rank, r in enumerate(res):
            run = r[cls_name]
            assert run["reload_same"], (cls_name, rank)
            assert all("Shard(dim=0)" in pl for pl in run["placements"].values()), run["placements"]
            first, _ = run["steps"][0]
            params = {n: torch.nn.Parameter(t.clone()) for n, t in first.items()}
            opt = getattr(optim, cls_name)(list(params.values()), lr=1e-2, min_8bit_size=16)
            for before, grads in run["steps"]:
                for n, p in params.items():
                    assert torch.equal(p.detach(), before[n]), f"{cls_name} rank {rank} {n}: diverged before a step"
                    p.grad = grads[n]
                opt.step()
            for n, p in params.items():
                assert torch.equal(p.detach(), run["after"][n]), f"{cls_name} rank {rank} {n}"
                assert not torch.equal(run["after"][n], first[n]), f"{n} did not train"
                for k, v in opt.state[p].items():
                    assert torch.equal(v, run["states"][n][k]), f"{cls_name} rank {rank} {n} {k}"
                assert ("absmax1" in opt.state[p]) == (cls_name == "AdamW8bit" and p.numel() >= 16)
        # the ranks held different rows of each adapter
        assert any(res[0][cls_name]["after"][n].shape != res[1][cls_name]["after"][n].shape
                   or not torch.equal(res[0][cls_name]["after"][n], res[1][cls_name]["after"][n])
                   for n in res[0][cls_name]["after"])


# ------------------------------------------------------------------------------------------------- run C
def _run_ddp(rank, world, out_dir):
    import qlora_kernels as qk

    torch.manual_seed(1234 + rank)  # different base weights per rank: DDP must broadcast rank 0's
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32))
    qk.prepare_model(model, target_modules=["0", "2"], r=4, alpha=8, verbose=False)
    for m in model.modules():
        if isinstance(m, qk.QLoRALinear):
            nn.init.normal_(m.lora_B.weight, std=0.02)  # nonzero B so A gets gradients too
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(rank)  # each rank its own batch
    x, target = torch.randn(8, 64, generator=g), torch.randn(8, 32, generator=g)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), target).backward()
        opt.step()
    return dict(model.state_dict())


def test_ddp_two_processes_keep_adapters_in_sync(tmp_path):
    s0, s1 = spawn("_run_ddp", tmp_path)
    assert s0.keys() == s1.keys()
    assert len([k for k in s0 if "lora_" in k]) == 4
    for k in s0:
        assert torch.equal(s0[k], s1[k]), f"{k} differs between ranks"
    assert any(k.endswith("weight.absmax") for k in s0)  # the NF4 state travelled in the state dict
