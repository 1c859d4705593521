"""GPU fast paths of `harness bench`, each against its reference path (marked ``gpu``; skipped without CUDA).

* bf16 autocast vs fp32 logits, per architecture (norm-relative error within bf16 rounding);
* SDPA with the fastest backend (cuDNN first on Hopper, then flash, memory-efficient) vs the math backend,
  forward and backward, and in a whole model;
* ``torch.compile`` of the training step vs eager (loss, gradients, parameters after AdamW steps);
* mamba-ssm kernels vs the PyTorch reference scan through the bench's training step and cached decoding;
* a CUDA bench run: CUDA-event timing, max_memory_allocated, table peak, backends recorded, real OOM rows.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from harness import bench
from models import registry
from models.ops import dispatch

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")]

CUDA = torch.device("cuda")
ATTENTION_MODELS = ("tokenformer", "transformer_pp", "gpt2")
BF16_TOL = 2e-2  # norm-relative; bf16 keeps 8 bits of mantissa (2^-8 = 0.4% per rounding)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def _tokens(batch: int, seq: int, vocab: int = 512, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(CUDA)


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 references in true fp32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ---------------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("name", ATTENTION_MODELS + ("mamba",))
def test_bf16_autocast_logits_match_fp32(name):
    torch.manual_seed(0)
    model = registry.build(name, "small", device=CUDA).eval()
    x = _tokens(2, 256)
    with torch.no_grad():
        with bench.sdpa_context("math", CUDA):
            ref = model(x).float()
        with bench.sdpa_context("auto", CUDA), bench.autocast(CUDA, torch.bfloat16):
            fast = model(x)
    assert fast.dtype == torch.bfloat16
    assert _rel_err(fast, ref) < BF16_TOL


def test_bf16_autocast_training_step_matches_fp32():
    torch.manual_seed(0)
    model = registry.build("transformer_pp", "small", device=CUDA)
    x = _tokens(2, 257)
    loss_fn = bench.make_loss_fn(model)

    def grads(amp):
        model.zero_grad(set_to_none=True)
        with bench.autocast(CUDA, amp):
            loss = loss_fn(x[:, :-1], x[:, 1:])
        loss.backward()
        return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    ref_loss, ref = grads(None)
    loss, fast = grads(torch.bfloat16)
    assert abs(loss.item() - ref_loss.item()) / ref_loss.item() < 1e-2
    assert _rel_err(fast, ref) < 5e-2


# --------------------------------------------------------------------------------------------------- SDPA
def _sdpa(q, k, v):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    (out.float() ** 2).sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out.detach(), grads


def _qkv(seq=1024, heads=8, head_dim=64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, heads, seq, head_dim, generator=g).to(CUDA, torch.bfloat16).requires_grad_()
            for _ in range(3)]


def test_sdpa_auto_picks_a_fused_backend_and_matches_math():
    q, k, v = _qkv()
    with bench.sdpa_context("auto", CUDA):
        choice = int(torch._fused_sdp_choice(q, k, v, None, 0.0, True))
        out, grads = _sdpa(q, k, v)
    assert choice in (1, 2, 3), f"auto fell back to {bench._SDPA_NAMES.get(choice)}"
    with bench.sdpa_context("math", CUDA):
        ref, ref_grads = _sdpa(q, k, v)
    assert _rel_err(out, ref) < BF16_TOL
    for g, r in zip(grads, ref_grads):
        assert _rel_err(g, r) < 5e-2


@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient"])
def test_each_fused_sdpa_backend_matches_math(backend):
    q, k, v = _qkv()
    with bench.sdpa_context("math", CUDA):
        ref, ref_grads = _sdpa(q, k, v)
    try:
        with bench.sdpa_context(backend, CUDA):
            out, grads = _sdpa(q, k, v)
    except RuntimeError as e:  # this GPU / torch build has no such kernel for these inputs
        pytest.skip(f"{backend} unavailable: {str(e).splitlines()[0]}")
    assert _rel_err(out, ref) < BF16_TOL
    for g, r in zip(grads, ref_grads):
        assert _rel_err(g, r) < 5e-2


@pytest.mark.parametrize("name", ATTENTION_MODELS)
def test_model_with_fast_sdpa_matches_math(name):
    torch.manual_seed(0)
    model = registry.build(name, "small", device=CUDA).eval()
    x = _tokens(2, 256)
    with torch.no_grad(), bench.autocast(CUDA, torch.bfloat16):
        with bench.sdpa_context("auto", CUDA):
            fast = model(x)
            chosen = bench.attention_backend(model, CUDA, torch.bfloat16, 256, 256, grad=True)
        with bench.sdpa_context("math", CUDA):
            ref = model(x)
    assert chosen.startswith("sdpa-cuda(") and chosen != "sdpa-cuda(math)"
    assert _rel_err(fast, ref) < BF16_TOL


# ------------------------------------------------------------------------------------------------ compile
def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    eager_model = registry.build("transformer_pp", "tiny", device=CUDA)
    compiled_model = copy.deepcopy(eager_model)
    from harness.config import OptimConfig
    from harness.train.optim import build_optimizer
    runs = []
    for model, compile in ((eager_model, False), (compiled_model, True)):
        torch._dynamo.reset()
        opt = build_optimizer(model, OptimConfig(lr=1e-3), CUDA)
        loss_fn = bench.make_loss_fn(model, compile)
        losses = []
        for step in range(3):
            x = _tokens(4, 129, seed=step)
            losses.append(bench.train_step(model, opt, loss_fn, x[:, :-1], x[:, 1:], None).item())
        runs.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (eager_losses, eager_params), (compiled_losses, compiled_params) = runs
    for a, b in zip(compiled_losses, eager_losses):
        assert abs(a - b) / abs(b) < 1e-3
    assert _rel_err(compiled_params, eager_params) < 5e-3  # 3 AdamW steps of lr 1e-3 move weights ~10%


def test_compiled_bf16_logits_match_eager():
    torch.manual_seed(0)
    model = registry.build("tokenformer", "tiny", device=CUDA)
    x = _tokens(2, 129)
    with bench.autocast(CUDA, torch.bfloat16), bench.sdpa_context("auto", CUDA):
        eager = bench.make_loss_fn(model)(x[:, :-1], x[:, 1:])
        torch._dynamo.reset()
        compiled = bench.make_loss_fn(model, compile=True)(x[:, :-1], x[:, 1:])
    assert abs(compiled.item() - eager.item()) / eager.item() < BF16_TOL


# ------------------------------------------------------------------------------------------ mamba kernels
def _needs_mamba_kernels():
    if dispatch.scan_backend(CUDA) != dispatch.MAMBA_SSM:
        pytest.skip(f"mamba-ssm kernels unavailable: {dispatch.kernel_status()}")


def test_mamba_kernel_training_step_matches_reference():
    _needs_mamba_kernels()
    torch.manual_seed(0)
    model = registry.build("mamba", "small", device=CUDA)
    x = _tokens(2, 257)
    loss_fn = bench.make_loss_fn(model)

    def grads():
        model.zero_grad(set_to_none=True)
        with bench.autocast(CUDA, torch.bfloat16):
            loss = loss_fn(x[:, :-1], x[:, 1:])
        loss.backward()
        return loss.item(), model.last_backend, torch.cat([p.grad.flatten() for p in model.parameters()])

    loss, backend, fast = grads()
    with dispatch.use_reference():
        ref_loss, ref_backend, ref = grads()
    assert (backend, ref_backend) == (dispatch.MAMBA_SSM, dispatch.REFERENCE)
    assert abs(loss - ref_loss) / ref_loss < 1e-2
    assert _rel_err(fast, ref) < 5e-2


def test_mamba_kernel_cached_decode_matches_reference():
    _needs_mamba_kernels()
    if dispatch.kernels().selective_state_update is None:
        pytest.skip(f"selective_state_update (Triton) unavailable: {dispatch.kernels().errors}")
    torch.manual_seed(0)
    model = registry.build("mamba", "small", device=CUDA).to(torch.bfloat16).eval()
    x = _tokens(2, 160)

    def decode():
        cache = model.allocate_cache(2, 160)
        with torch.inference_mode():
            parts = [bench.prefill_step(model, x[:, :128], cache)]
            parts += [model.step(x[:, t:t + 1], cache) for t in range(128, 160)]
        return torch.cat(parts, 1), model.last_backend

    fast, backend = decode()
    with dispatch.use_reference():
        ref, ref_backend = decode()
    assert (backend, ref_backend) == (dispatch.MAMBA_SSM, dispatch.REFERENCE)
    assert _rel_err(fast, ref) < BF16_TOL


# ---------------------------------------------------------------------------------------------- bench run
def test_cuda_bench_run_records_fast_paths(tmp_path):
    spec = bench.make_spec(model="tokenformer,transformer_pp,mamba,gpt2", preset="tiny", seq_len="128",
                           batch_size="4", decode_batch="1,4", decode_tokens=8, repeats=2, warmup=1,
                           device="cuda", out=tmp_path)
    assert spec.dtype == "bf16" and spec.amp_dtype == torch.bfloat16
    result = bench.run_bench(spec, log=None)
    name = torch.cuda.get_device_name()
    for row in result.rows:
        assert row["status"] == "ok", row["errors"]
        assert row["memory_method"] == "torch.cuda.max_memory_allocated" and row["peak_memory_bytes"] > 0
        assert row["train_tokens_per_s"] > 0 and 0 < row["mfu"] < 1
        assert all(e["status"] == "ok" for e in row["decode"].values())
        if row["model"] == "mamba":
            assert row["scan_backend"] == dispatch.scan_backend(CUDA)
            assert row["decode_scan_backend"] in (dispatch.MAMBA_SSM, dispatch.REFERENCE)  # Triton state update
            assert row["cache_kind"] == "SSMCache"
        else:
            assert row["attention_backend"].startswith("sdpa-cuda(") and row["attention_backend"] != "sdpa-cuda(math)"
            # bf16 KV cache: 2 layers x (k, v) x 128 positions x 64 dims x 2 bytes
            assert row["cache_bytes_per_seq"] == 2 * 2 * 128 * 64 * 2
    if any(p in name for p, _, _ in bench.GPU_PEAK_BF16_TFLOPS):
        assert result.peak["peak_flops_source"].startswith("table:")
    assert result.ratios and (tmp_path / "bench.md").is_file()


def test_cuda_compiled_bench_row(tmp_path):
    spec = bench.make_spec(model="transformer_pp", preset="tiny", seq_len="128", batch_size="4", decode_batch="1",
                           decode_tokens=4, repeats=2, warmup=2, device="cuda", compile=True, out=tmp_path)
    (row,) = bench.run_bench(spec, log=None).rows
    assert row["status"] == "ok" and row["compile"] is True and row["train_tokens_per_s"] > 0
    assert row["train_first_step_s"] > row["train_time_s_median"]  # compilation happened in the warm-up


def test_cuda_real_oom_is_recorded_and_the_sweep_continues(tmp_path):
    # bf16 logits of 16384 x 8192 x 512 alone are 137 GB (and their fp32 copy twice that): no GPU holds them
    spec = bench.make_spec(model="gpt2", preset="tiny", seq_len="8192", batch_size="16384,2", decode_batch="1",
                           decode_tokens=4, repeats=1, warmup=0, device="cuda", out=tmp_path)
    big, small = bench.run_bench(spec, log=None).rows
    assert big["status"] == "OOM" and "train" in big["errors"] and big["errors"]["train"].startswith("OOM")
    assert big["decode"]["1"]["status"] == "ok"
    assert small["status"] == "ok" and small["train_tokens_per_s"] > 0
