"""plan_memory against measured training steps of tiny Llama models on this CPU, presets, the plan command.

The measurement: peak bytes of live tensor storages (a TorchDispatchMode tracker, entering the NF4 linear ops
so their dequantize scratch counts) over a full second training step (forward with labels, backward,
AdamW step), parameters, gradients and optimizer states included. The full sweep is bench/bench_plan.py.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import qlora_kernels as qk  # noqa: E402
from qlora_kernels.checkpoint import enable_activation_checkpointing  # noqa: E402
from qlora_kernels.planner import (  # noqa: E402
    OPTIMIZERS, PLAN_DEFAULTS, PRESETS, LiveTensorTracker, _optimizer_state_bytes, _simulate_optimizer, _static_terms,
    make_optimizer, measure_step, parse_bytes, plan_memory,
)


def tiny(layers, hidden, inter, heads=4, kv=2, vocab=512):
    return transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                    num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab)


def measured_peak(config, r, seq, batch, checkpointing, foreach=None):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    qk.prepare_model(model, r=r, verbose=False)
    model.train()
    if checkpointing:
        enable_activation_checkpointing(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, foreach=foreach)
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    return measure_step(model, ids, opt)


@pytest.mark.parametrize("layers, hidden, inter, seq, batch, r, checkpointing", [
    (2, 128, 256, 64, 2, 8, False),   # simulated at full depth
    (5, 64, 160, 96, 1, 16, True),    # extrapolated from 2 and 3 layers
])
def test_plan_within_5_percent_of_measured_step(layers, hidden, inter, seq, batch, r, checkpointing):
    config = tiny(layers, hidden, inter)
    plan = plan_memory(config, r=r, seq_len=seq, batch_size=batch, optimizer="adamw_torch",
                       gradient_checkpointing=checkpointing, compute_dtype=torch.float32, device="cpu")
    assert sum(plan.terms.values()) == plan.total_bytes == plan.tensor_bytes  # no allowance on the CPU
    measured = measured_peak(config, r, seq, batch, checkpointing)
    assert abs(plan.total_bytes / measured - 1) <= 0.05, (plan.total_bytes, measured, plan.terms)


def test_plan_covers_a_peak_that_moves_with_depth():
    """bench/bench_plan.py's full sweep (48 configs) found one config planned at 3.939 MiB for a measured 4.141 MiB
    peak (-4.9%) when the planner extrapolated the step's peak itself from 2 and 3 layers. Checkpointed, short
    sequence, r = 16: each layer's LoRA gradients outgrow the checkpoint input its backward frees, so the peak
    moves from the start of backward (2-3 layers) towards its end at 6 layers; a max of lines in the depth is
    not a line. The planner now extrapolates each phase's peak and takes the max: equal to the byte here."""
    config = transformers.LlamaConfig(hidden_size=96, intermediate_size=256, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
    plan = plan_memory(config, r=16, seq_len=64, batch_size=1, optimizer="adamw_torch",
                       gradient_checkpointing=True, compute_dtype=torch.float32, device="cpu")
    assert plan.total_bytes == measured_peak(config, 16, 64, 1, True), plan.terms


def test_plan_counts_the_optimizer_step_temporaries():
    # r = 64 on a tiny model with 8 tokens: the adapters outweigh the activations, and torch's foreach AdamW
    # (its default on a GPU) holds a float32 temporary per state at once: the step, not backward, is the peak
    config = tiny(2, 128, 256)
    plan = plan_memory(config, r=64, seq_len=8, batch_size=1, optimizer="adamw_torch", compute_dtype=torch.float32,
                       device="cpu", foreach=True, gradient_checkpointing=False)
    extra = plan.terms["optimizer step temporaries beyond that"]
    assert extra > 0.05 * plan.total_bytes, plan.terms  # a plan without this term would miss by more than 5%
    measured = measured_peak(config, 64, 8, 1, False, foreach=True)
    assert abs(plan.total_bytes / measured - 1) <= 0.05, (plan.total_bytes, measured, plan.terms)
    single = plan_memory(config, r=64, seq_len=8, batch_size=1, optimizer="adamw_torch", compute_dtype=torch.float32,
                         device="cpu", gradient_checkpointing=False)  # torch's CPU default: single-tensor, one tensor's temporaries at a time
    assert single.terms["optimizer step temporaries beyond that"] < extra  # (measured in the 5% tests above)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_optimizer_step_simulated_on_fake_tensors_equals_a_real_step(optimizer, device):
    """The plan's optimizer terms come from the optimizer's own step on fake tensors; the same step on real
    tensors (this CPU; device only picks torch's foreach default) under the same tracker gives the same bytes,
    and the states equal the layout written down in _optimizer_state_bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes = [(8, 64), (96, 8), (64, 128), (33, 7)]  # one tensor >= 4096 elements: 8-bit states there only

    def step_bytes(params, fake=None):
        for p in params:
            p.grad = torch.ones_like(p)
        tracker = LiveTensorTracker()
        for p in params:
            tracker.track(p)
            tracker.track(p.grad)
        if fake is not None:
            return _simulate_optimizer(params, dict(optimizer=optimizer, device=device), tracker, fake)
        opt = make_optimizer(optimizer, params, device)
        before = tracker.current
        with tracker:
            opt.step()
            states = tracker.current - before
            tracker.reset_peak()
            opt.step()
        return dict(states=states, step_temporaries=tracker.peak - tracker.current)

    real = step_bytes([torch.nn.Parameter(torch.randn(s)) for s in shapes])
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        params = [torch.nn.Parameter(torch.empty(s)) for s in shapes]
    assert step_bytes(params, fake) == real
    assert real["states"] == _optimizer_state_bytes(params, optimizer)
    if optimizer.startswith("adamw_torch") and optimizer != "adamw_torch_fused":
        assert real["step_temporaries"] > 0  # torch's unfused AdamW makes temporaries; the test can see them


def test_static_counts_from_the_module_tree():
    opts = dict(r=64, target_modules="all-linear", blocksize=64, double_quant=True, compute_dtype=torch.bfloat16,
                adapter_dtype=torch.bfloat16, optimizer="paged_adamw_32bit")
    config = transformers.AutoConfig.for_model(**PRESETS["llama-7b"])
    static = _static_terms(config, opts)
    h, i, layers = 4096, 11008, 32
    assert static["counts"]["nf4_params"] == layers * (4 * h * h + 3 * h * i)
    assert static["counts"]["lora_params"] == layers * 64 * (4 * 2 * h + 3 * (h + i))
    # paged 32-bit AdamW: two float32 states, and int64 step / skipped counters per tensor
    assert static["states"] == 8 * static["counts"]["lora_params"] + 16 * layers * 7 * 2
    assert static["nf4"] == pytest.approx(static["counts"]["nf4_params"] * 4.127 / 8, rel=1e-3)


def test_quantize_apart_from_lora_targets():
    """Narrow LoRA targets: every other Linear but lm_head is still NF4 (quantize='all-linear', as prepare_model
    and NF4Config do); quantize='targets' keeps them dense. The plan follows a real prepare_model step."""
    config = tiny(2, 128, 256)
    h, i, kv = 128, 256, 64  # kv: 2 of 4 heads of 32
    per_layer_all = 2 * h * h + 2 * h * kv + 3 * h * i
    narrow = dict(r=8, target_modules=["q_proj", "v_proj"], compute_dtype=torch.float32, device="cpu",
                  optimizer="adamw_torch", gradient_checkpointing=False, seq_len=32, batch_size=2)
    plan_all = plan_memory(config, **narrow)
    plan_targets = plan_memory(config, quantize="targets", **narrow)
    assert plan_all.counts["nf4_params"] == 2 * per_layer_all
    assert plan_targets.counts["nf4_params"] == 2 * (h * h + h * kv)
    assert plan_all.counts["lora_params"] == plan_targets.counts["lora_params"]
    assert plan_all.total_bytes < plan_targets.total_bytes
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    qk.prepare_model(model, ["q_proj", "v_proj"], r=8, verbose=False)  # quantize="all-linear" by default
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    measured = measure_step(model, torch.randint(0, config.vocab_size, (2, 32)), opt)
    assert abs(plan_all.total_bytes / measured - 1) <= 0.05, (plan_all.total_bytes, measured, plan_all.terms)


def test_device_memory_search():
    from qlora_kernels.planner import _largest

    calls = []

    def total_at(n):  # a quadratic with a linear part, as attention makes activations in sequence length
        calls.append(n)
        return 1000 + 37 * n + n * n // 50

    for budget in (5000, 123456, 10**7):
        best = _largest(total_at, budget, 4096, 64)
        assert total_at(best) <= budget and (best == 4096 or total_at(best + 64) > budget)
    assert _largest(total_at, 1000, 4096, 64) is None
    assert len(calls) < 40  # fitted, then confirmed: not a scan
    config = tiny(2, 64, 128, vocab=256)
    base = plan_memory(config, r=4, seq_len=64, batch_size=1, compute_dtype=torch.float32, device="cpu")
    tight = plan_memory(config, r=4, seq_len=64, batch_size=1, compute_dtype=torch.float32, device="cpu",
                        device_memory=base.total_bytes // 2)
    assert tight.fits is False and tight.max_seq_len is None and "does NOT fit" in tight.table()


def test_bad_arguments():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        plan_memory("llama-7b", optimizer="adam_typo")
    with pytest.raises(ValueError, match="seq_len must be an int >= 1"):
        plan_memory("llama-7b", seq_len=0)
    with pytest.raises(ValueError, match="neither a preset"):
        plan_memory("llama-8b")
    with pytest.raises(ValueError, match="device must be"):
        plan_memory("llama-7b", device="tpu")
    with pytest.raises(ValueError, match="device_memory: cannot read"):
        parse_bytes("lots")
    assert parse_bytes("48GB") == 48 * 2**30 == parse_bytes("48 GiB") == parse_bytes("48g")
    assert parse_bytes("1.5T") == int(1.5 * 2**40) and parse_bytes(12345) == 12345
    for bad in ("0GB", "-48GB", 0, -1, float("nan"), float("inf"), "0.1B"):
        with pytest.raises(ValueError, match="device_memory must be a size > 0"):
            parse_bytes(bad)
    with pytest.raises(ValueError, match="has no unit"):  # 48 bytes or 48 GB? the API refuses to guess
        parse_bytes("48")
    with pytest.raises(ValueError, match="device_memory must be a size > 0"):
        plan_memory("llama-7b", device_memory="-48GB")  # before any simulation


def test_plan_command(tmp_path, capsys):
    from qlora_kernels.__main__ import main

    tiny(1, 64, 128).save_pretrained(tmp_path)
    assert main(["plan", str(tmp_path), "--seq", "64", "--batch", "2", "--r", "8", "--gpu", "2GB"]) == 0
    out = capsys.readouterr().out
    for row in ("NF4 weights + scales", "LoRA gradients", "optimizer states (paged_adamw_32bit)",
                "saved activations (checkpointed)", "logits and loss", "CUDA context", "total", "fits",
                "largest seq len at batch 2", "largest batch at seq len 64"):
        assert row in out
    assert main(["plan", "llama-8b"]) == 2
    fits = [line for line in out.splitlines() if "largest" in line]
    assert all(line.split(":")[1].split()[0].isdigit() for line in fits), fits
    assert "seq len at batch 2: 2048 (the model's max_position_embeddings: its cap, not the memory's limit)" in out


def test_plan_command_passes_foreach(monkeypatch):
    """--foreach on/off/default reaches plan_memory as True/False/None (torch AdamW's implementation)."""
    import qlora_kernels.planner as planner
    from qlora_kernels.__main__ import main

    seen = []

    def fake_plan(*args, **kwargs):
        seen.append(kwargs["foreach"])
        raise ValueError("stop here")

    monkeypatch.setattr(planner, "plan_memory", fake_plan)
    for flag, expected in (("on", True), ("off", False), ("default", None)):
        assert main(["plan", "llama-7b", "--optimizer", "adamw_torch", "--foreach", flag]) == 2
        assert seen[-1] is expected


@pytest.mark.parametrize("step, limit", [(1, 1 << 16), (64, 2048), (64, 130), (1, 1), (64, 64)])
def test_largest_equals_a_linear_scan(step, limit):
    """The bisecting search gives what a scan of every multiple of `step` gives, for totals that grow with n
    (linear, quadratic, flat stretches, far from the quadratic guess), in O(log) calls."""
    from qlora_kernels.planner import _largest

    shapes = [lambda n: 1000 + 37 * n, lambda n: 1000 + 37 * n + n * n // 50, lambda n: 5000 + (n // 300) * 9000,
              lambda n: 10 ** 6 if n > 777 else 10, lambda n: 2 ** min(n, 60)]
    for total_at in shapes:
        for budget in (999, 1037, 5000, 123456, 10 ** 7, 10 ** 12):
            calls = []

            def counted(n):
                calls.append(n)
                return total_at(n)

            got = _largest(counted, budget, limit, step)
            scan = None
            for n in range(step, limit // step * step + 1, step):
                if total_at(n) > budget:
                    break
                scan = n
            assert got == scan, (budget, got, scan)
            assert len(calls) <= 8 + 3 * max(1, (limit // step).bit_length()), len(calls)
            assert all(n % step == 0 and step <= n <= limit for n in calls)


def test_plan_search_equals_the_linear_search_on_a_tiny_model():
    """On a tiny model where a scan is cheap: max_seq_len and max_batch_size from plan_memory's search equal
    scanning seq len (multiples of 64) and batch (one at a time) with separate plans of each size."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=512)
    kw = dict(r=4, compute_dtype=torch.float32, device="cpu", optimizer="adamw_torch", gradient_checkpointing=False)
    total = lambda s, b: plan_memory(config, seq_len=s, batch_size=b, **kw).total_bytes  # noqa: E731
    budget = (total(320, 1) + total(384, 1)) // 2
    plan = plan_memory(config, seq_len=64, batch_size=1, device_memory=budget, **kw)
    seq = [n for n in range(64, 513, 64) if total(n, 1) <= budget]
    assert seq == list(range(64, seq[-1] + 1, 64))  # grows with n: a scan stops at the first miss
    batch = 1
    while total(64, batch + 1) <= budget:
        batch += 1
    assert (plan.max_seq_len, plan.max_batch_size) == (seq[-1], batch) == (320, batch)
    assert batch > 2


def test_plan_says_when_the_position_cap_is_the_limit(capsys):
    config = tiny(2, 64, 128, vocab=256)
    config.max_position_embeddings = 256
    plan = plan_memory(config, r=4, seq_len=64, batch_size=1, compute_dtype=torch.float32, device="cpu",
                       device_memory="8GB", progress=True)
    assert plan.max_seq_len == plan.seq_len_cap == 256
    assert "largest seq len at batch 1: 256 (the model's max_position_embeddings: its cap" in plan.table()
    err = capsys.readouterr().err  # progress: each simulated probe, on stderr
    assert "plan: searching the largest seq len" in err and "seq 256 x batch 1:" in err and "fits" in err
    with pytest.warns(UserWarning, match="seq_len 512 is beyond the model's max_position_embeddings 256"):
        beyond = plan_memory(config, r=4, seq_len=512, batch_size=1, compute_dtype=torch.float32, device="cpu")
    assert "note: seq_len 512 is beyond" in beyond.table()


def test_one_set_of_defaults(monkeypatch):
    """plan_memory's keyword defaults and the plan command's option defaults are PLAN_DEFAULTS, and the table
    prints them."""
    import inspect

    import qlora_kernels.planner as planner
    from qlora_kernels.__main__ import main

    sig = inspect.signature(plan_memory).parameters
    assert {k: sig[k].default for k in PLAN_DEFAULTS} == PLAN_DEFAULTS
    seen = {}

    def fake_plan(config, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(planner, "plan_memory", fake_plan)
    assert main(["plan", "llama-7b", "--quiet"]) == 2
    assert {k: seen[k] for k in PLAN_DEFAULTS} == PLAN_DEFAULTS
    monkeypatch.undo()
    table = plan_memory(tiny(1, 64, 128, vocab=256)).table()
    for k, v in PLAN_DEFAULTS.items():
        shown = str(v).replace("torch.", "") if not isinstance(v, bool) else ("on" if v else "off")
        assert f"{k}={shown}" in table
    assert "all of them the defaults" in table
    assert "not the defaults: r (default 64)" in plan_memory(tiny(1, 64, 128, vocab=256), seq_len=64, r=8).table()


def test_plan_command_gpu_sizes(capsys):
    from qlora_kernels.__main__ import main

    for bad in ("0GB", "-48GB", "0", "-3", "lots"):
        with pytest.raises(SystemExit) as exc:
            main(["plan", "llama-7b", "--gpu", bad])
        assert exc.value.code == 2
        assert "--gpu" in capsys.readouterr().err
    from qlora_kernels.__main__ import _gpu_size

    assert _gpu_size("48") == 48 * 2**30 == _gpu_size("48GB")  # a bare number is GB, as --help says
    assert _gpu_size("0.5") == 2**29 and _gpu_size("500MB") == 500 * 2**20


def test_no_future_warning_from_our_calls():
    """transformers 5 deprecates gradient_checkpointing_enable (a FutureWarning on every call): a checkpointed
    plan uses activation_checkpointing_enable."""
    import warnings

    config = tiny(2, 64, 128, vocab=256)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        plan_memory(config, r=4, seq_len=64, batch_size=1, compute_dtype=torch.float32, device="cpu",
                    gradient_checkpointing=True)
