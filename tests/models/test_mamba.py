"""Mamba-specific tests (the registry-wide conformance suite covers shapes, causality, training, counts,
FLOPs, cached decoding and safetensors for every entry; nothing here repeats those).

1. the chunked reference scans (Mamba-1 selective scan, Mamba-2 SSD) against naive per-position loops in fp64;
2. the state_dict layout, written out from mamba-ssm's MambaLMHeadModel, and the init scheme;
3. parity with mamba-ssm's own python reference code (selective_scan_ref, mamba_inner_ref, ssd_minimal and the
   whole MambaLMHeadModel, whose state_dict loads into ours), imported on CPU with its CUDA / Triton modules
   stubbed out, and our kernel-dispatch path run on CPU with mamba-ssm's reference functions standing in for
   its kernels -- skipped when mamba-ssm is not installed (CPU install: ``_MAMBA_SSM_CPU_INSTALL`` below);
4. kernel-vs-reference parity on CUDA (bf16 tolerances), skipped without a GPU and mamba-ssm;
5. cached decoding across chunk boundaries; FLOPs vs FlopCounterMode at lengths the conformance suite skips.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from models.mamba import ARCH, MambaConfig, MambaLM
from models.mamba2 import MAMBA2_ARCH, Mamba2Config, Mamba2LM
from models.ops import dispatch, selective_scan, ssd
from tests.models.test_published_counts import mamba1_inventory, mamba2_inventory, shapes

# python files only, never another torch (--no-deps); FORCE_BUILD skips its attempt to download a CUDA wheel
_MAMBA_SSM_CPU_INSTALL = (
    "pip install --no-deps einops wheel packaging && MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "
    "pip install --no-deps --no-build-isolation mamba-ssm==2.2.6.post3"
)
HAS_MAMBA_SSM = importlib.util.find_spec("mamba_ssm") is not None and importlib.util.find_spec("einops") is not None
HAS_CUDA = torch.cuda.is_available()


# ==========================================================================================================
# naive sequential references (fp64, one position at a time: the definition, nothing clever)
# ==========================================================================================================
def naive_selective_scan(u, delta, A, B, C, D, z, delta_bias, h0):
    """u, delta, z (b, d, l); A (d, n); B, C (b, n, l); D, delta_bias (d,); h0 (b, d, n)."""
    delta = F.softplus(delta + delta_bias[:, None])
    h, ys = h0.clone(), []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1) + D[:, None] * u
    return y * F.silu(z), h


def naive_ssd(x, dt, A, B, C, D, dt_bias, h0):
    """x (b, l, h, p); dt (b, l, h); A, D, dt_bias (h,); B, C (b, l, g, n); h0 (b, h, p, n)."""
    nh, g = x.shape[2], B.shape[2]
    B, C = B.repeat_interleave(nh // g, dim=2), C.repeat_interleave(nh // g, dim=2)  # (b, l, h, n)
    dt = F.softplus(dt + dt_bias)
    s, ys = h0.clone(), []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[..., None, None]  # (b, h, 1, 1)
        s = decay * s + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((s * C[:, t, :, None, :]).sum(-1))  # (b, h, p)
    return torch.stack(ys, dim=1) + D[:, None] * x, s


def _scan_inputs(b, d, n, L, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    u, delta, z = r(b, d, L), r(b, d, L) - 1.0, r(b, d, L)
    A = -torch.exp(r(d, n) * 0.5)
    B, C, D, delta_bias = r(b, n, L), r(b, n, L), r(d), r(d) * 0.5
    h0 = r(b, d, n)
    return u, delta, A, B, C, D, z, delta_bias, h0


# ---- 1. chunked scans vs the sequential definition -------------------------------------------------------
@pytest.mark.parametrize("L,chunk", [(1, 64), (5, 64), (64, 64), (100, 64), (100, 16), (37, 8), (50, 7), (33, 1)])
def test_selective_scan_ref_matches_sequential_loop(L, chunk):
    u, delta, A, B, C, D, z, delta_bias, h0 = _scan_inputs(2, 6, 5, L, seed=L)
    want_y, want_h = naive_selective_scan(u, delta, A, B, C, D, z, delta_bias, h0)
    # the reference computes in fp32 whatever the inputs: compare an fp32 run loosely...
    y, h = selective_scan.selective_scan_ref(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True,
                                             initial_state=h0, return_last_state=True, chunk_size=chunk)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), want_h, rtol=1e-4, atol=1e-4)
    # ...and the same algorithm in fp64 tightly (the scan's own error, not fp32 rounding)
    y64, h64 = _selective_scan_fp64(u, delta, A, B, C, D, z, delta_bias, h0, chunk)
    torch.testing.assert_close(y64, want_y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h64, want_h, rtol=1e-10, atol=1e-10)


def _selective_scan_fp64(u, delta, A, B, C, D, z, delta_bias, h0, chunk):
    """models.ops.selective_scan's per-chunk scan driven in fp64 (the public function computes in fp32)."""
    delta = F.softplus(delta + delta_bias[:, None])
    h, ys = h0, []
    for s in range(0, u.shape[-1], chunk):
        e = min(s + chunk, u.shape[-1])
        y_c, h = selective_scan._scan_chunk(delta[:, :, s:e], (delta * u)[:, :, s:e], A, B[:, :, s:e], C[:, :, s:e], h)
        ys.append(y_c)
    return (torch.cat(ys, -1) + D[:, None] * u) * F.silu(z), h


def test_scan_gradients_match_sequential_loop():
    u, delta, A, B, C, D, z, delta_bias, h0 = _scan_inputs(1, 4, 3, 21, seed=9)
    leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias, h0)]
    y, h = naive_selective_scan(*leaves)
    want = torch.autograd.grad((y.sum() + h.sum()), leaves)
    y, h = selective_scan.selective_scan_ref(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7],
                                             delta_softplus=True, initial_state=leaves[8], return_last_state=True,
                                             chunk_size=8)
    got = torch.autograd.grad((y.sum() + h.sum()), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", list(range(1, 34)))
def test_odd_even_scans_match_sequential_recurrences(n):
    g = torch.Generator().manual_seed(n)
    a = torch.rand(n, 3, 2, generator=g, dtype=torch.float64)
    b = torch.randn(n, 3, 2, generator=g, dtype=torch.float64)
    h, want = b[0], [b[0]]
    for t in range(1, n):  # h_t = a_t h_{t-1} + b_t, h_0 = b_0
        h = a[t] * h + b[t]
        want.append(h)
    for scratch in (None, torch.full((n // 2 + 1, 3, 2), float("nan"), dtype=torch.float64)):
        got, a_in = b.clone(), a.clone()
        selective_scan._scan_(a_in, got, scratch)
        torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=1e-12)
        if scratch is not None:  # a left intact (and the never-read slot 0 of scratch really is never read)
            assert torch.equal(a_in, a)
    G, want = b[-1], [b[-1]]
    for t in range(n - 2, -1, -1):  # G_t = m_t G_{t+1} + g_t
        G = a[t] * G + b[t]
        want.insert(0, G)
    got = b.clone()
    selective_scan._rscan_(a[:n - 1].clone(), got)
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=1e-12)


def _scan_fn(chunk):
    """_SelectiveScanFn on the caller's layouts: delta, du (b, d, l); A (d, n); B, C (b, l, n); h0 (b, d, n)."""
    def f(delta, du, A, Bt, Ct, h0):
        y, h = selective_scan._SelectiveScanFn.apply(delta.permute(2, 0, 1), du.permute(2, 0, 1), A, Bt.transpose(0, 1),
                                                     Ct.transpose(0, 1), h0, chunk)
        return y.permute(1, 2, 0), h
    return f


# tile sizes (elements of a (chunk, tile, N) buffer): 1 = one channel per tile, 20 = rows split into channel
# tiles, 200 = tiles of whole batch rows, 2^18 = one tile
@pytest.mark.parametrize("L,chunk,tile", [(1, 1, 1 << 18), (2, 2, 1), (7, 7, 20), (9, 4, 200), (13, 5, 1 << 18),
                                          (17, 8, 20), (6, 1, 200)])
def test_scan_backward_passes_gradcheck(monkeypatch, L, chunk, tile):
    """The hand-written backward against finite differences in fp64: odd lengths, a short last chunk, tiles."""
    monkeypatch.setattr(selective_scan, "_TILE_ELEMS", tile)
    g = torch.Generator().manual_seed(L * 100 + chunk)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    b, d, n = 3, 4, 3
    delta = F.softplus(r(b, d, L) - 1.0)
    inputs = [delta, r(b, d, L), -torch.exp(r(d, n) * 0.5), r(b, L, n), r(b, L, n), r(b, d, n)]
    inputs = [t.requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(_scan_fn(chunk), inputs, fast_mode=True)


def test_scan_tiles_do_not_change_results(monkeypatch):
    u, delta, A, B, C, D, z, delta_bias, h0 = _scan_inputs(3, 6, 4, 37, seed=4, dtype=torch.float32)

    def run():
        leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias, h0)]
        y, h = selective_scan.selective_scan_ref(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7],
                                                 delta_softplus=True, initial_state=leaves[8], return_last_state=True,
                                                 chunk_size=8)
        (y.square().sum() + h.sum()).backward()
        return [y, h] + [t.grad for t in leaves]

    want = run()
    for tile in (1, 50, 400):  # channel tiles, tiles of one row, tiles of 2-3 rows
        monkeypatch.setattr(selective_scan, "_TILE_ELEMS", tile)
        for got, w in zip(run(), want):
            torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-6)


def test_scan_is_stable_under_strong_decay():
    """Decays that underflow to 0 within a chunk (delta A down to -700 per step): the scan multiplies decays
    and never divides by them or exponentiates a cumulative sum, so nothing overflows and the result is exact."""
    u, delta, A, B, C, D, z, delta_bias, h0 = _scan_inputs(2, 4, 3, 70, seed=2)
    delta = delta * 20  # softplus(delta) up to ~70, A down to ~ -10
    want_y, want_h = naive_selective_scan(u, delta, A, B, C, D, z, delta_bias, h0)
    leaves = [t.clone().requires_grad_() for t in (u, delta, A, B, C, D, z, delta_bias, h0)]
    y, h = selective_scan.selective_scan_ref(*leaves[:5], D=leaves[5], z=leaves[6], delta_bias=leaves[7],
                                             delta_softplus=True, initial_state=leaves[8], return_last_state=True,
                                             chunk_size=64)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), want_h, rtol=1e-4, atol=1e-4)
    (y.sum() + h.sum()).backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_scan_keeps_nothing_of_size_state_times_length_for_backward():
    """Under autograd the scan keeps its inputs and one (B, D, N) state per chunk, never (B, D, L, N)."""
    b, d, n, L, chunk = 2, 8, 16, 256, 64
    u, delta, A, B, C, D, z, delta_bias, _ = _scan_inputs(b, d, n, L, seed=1, dtype=torch.float32)
    leaves = [t.requires_grad_() for t in (u, delta, A, B, C)]
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = selective_scan.selective_scan_ref(*leaves, delta_softplus=True, chunk_size=chunk)
    # the largest things saved: (B, D, L) / (B, N, L) inputs, or the (L / chunk, B, D, N) chunk-entry states
    assert max(saved) <= max(b * d * L, b * n * L, (L // chunk) * b * d * n) < b * d * L * n
    y.sum().backward()


@pytest.mark.parametrize("L,chunk,ngroups", [(1, 16, 1), (16, 16, 1), (40, 16, 1), (45, 8, 2), (7, 32, 1), (30, 1, 1)])
def test_ssd_ref_matches_sequential_loop(L, chunk, ngroups):
    g = torch.Generator().manual_seed(L)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    b, nh, p, n = 2, 4, 3, 5
    x, dt, A = r(b, L, nh, p), r(b, L, nh) - 1.0, -torch.exp(r(nh) * 0.5)
    B, C, D, dt_bias, h0 = r(b, L, ngroups, n), r(b, L, ngroups, n), r(nh), r(nh) * 0.5, r(b, nh, p, n)
    want_y, want_s = naive_ssd(x, dt, A, B, C, D, dt_bias, h0)
    y, s = ssd.ssd_chunked_ref(x, dt, A, B, C, chunk, D=D, dt_bias=dt_bias, dt_softplus=True,
                               initial_states=h0, return_final_states=True)
    torch.testing.assert_close(y.double(), want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s.double(), want_s, rtol=1e-4, atol=1e-4)


def test_segsum_is_stable_and_exact():
    a = -torch.rand(3, 50, dtype=torch.float64) * 30  # large cumulative sums: the naive difference cancels
    seg = ssd.segsum(a)
    i, j = 41, 7
    assert seg[1, i, j].item() == pytest.approx(a[1, j + 1:i + 1].sum().item(), rel=1e-12)
    assert seg[1, j, i] == float("-inf") and seg[1, i, i] == 0


def test_scan_chunk_size_does_not_change_the_model():
    torch.manual_seed(0)
    a = MambaLM(ARCH.config("tiny", scan_chunk_size=64)).eval()
    b = MambaLM(ARCH.config("tiny", scan_chunk_size=5)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 512, (2, 70))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


# ==========================================================================================================
# 2. layout and init
# ==========================================================================================================
def test_mamba1_state_dict_layout_is_mamba_ssm():
    model = MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=500))
    expected = mamba1_inventory(64, 2, vocab=500, pad=8)  # 500 padded to 504
    assert shapes(model) == expected
    assert list(model.state_dict()) == list(expected)  # same order too
    assert model.lm_head.weight is model.backbone.embedding.weight  # tied
    assert model.embedding_parameters() == [model.backbone.embedding.weight]
    assert model(torch.randint(0, 500, (1, 9))).shape == (1, 9, 500)  # padding rows are never scored


def test_mamba2_state_dict_layout_is_mamba_ssm():
    model = Mamba2LM(Mamba2Config(d_model=64, n_layer=2, vocab_size=500, d_state=16, headdim=16, chunk_size=8))
    expected = mamba2_inventory(64, 2, vocab=500, pad=16, d_state=16, headdim=16)  # 500 padded to 512
    assert shapes(model) == expected
    assert list(model.state_dict()) == list(expected)
    assert model.lm_head.weight is model.backbone.embedding.weight


def test_published_mamba_130m_count_by_hand():
    # d=768, E=1536, R=48, N=16: in_proj 2,359,296 + conv 7,680 + x_proj 122,880 + dt_proj 75,264
    # + A_log 24,576 + D 1,536 + out_proj 1,179,648 + norm 768 = 3,771,648 per layer
    per_layer = 2_359_296 + 7_680 + 122_880 + 75_264 + 24_576 + 1_536 + 1_179_648 + 768
    cfg = ARCH.config("130m")
    assert cfg.padded_vocab_size == 50280 and cfg.layer_params() == per_layer == 3_771_648
    assert cfg.num_params() == 50280 * 768 + 24 * per_layer + 768 == 129_135_360 == ARCH.published["130m"]
    assert MAMBA2_ARCH.config("130m").padded_vocab_size == 50288


@pytest.mark.parametrize("arch", [ARCH, MAMBA2_ARCH])
@pytest.mark.parametrize("seq_len", [1, 33, 100])  # one chunk, just over one chunk, a padded last chunk
def test_flops_match_the_counter_at_any_length(arch, seq_len):
    from torch.utils.flop_counter import FlopCounterMode

    model = arch.model_cls(arch.config("tiny"))
    x = torch.randint(0, 512, (2, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    counted = counter.get_total_flops() + 3 * model.config.uncounted_flops_per_token(seq_len) * x.numel()
    assert counted == pytest.approx(model.flops_per_token(seq_len) * x.numel(), rel=1e-9)


def test_init_follows_mamba_ssm():
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=128, n_layer=4, vocab_size=256)
    m = MambaLM(cfg)
    mix = m.backbone.layers[1].mixer
    e, n, r = cfg.d_inner, cfg.d_state, cfg.time_step_rank
    torch.testing.assert_close(mix.A_log, torch.log(torch.arange(1, n + 1).float()).expand(e, n))
    assert torch.equal(mix.D, torch.ones(e))
    dt = F.softplus(mix.dt_proj.bias.detach())
    assert dt.min() >= cfg.dt_min * 0.999 and dt.max() <= cfg.dt_max * 1.001
    assert math.log(dt.max() / dt.min()) > 0.8 * math.log(cfg.dt_max / cfg.dt_min)  # log-uniform spread
    assert mix.dt_proj.weight.abs().max() <= r ** -0.5
    bound = 1 / math.sqrt(e) / math.sqrt(cfg.n_layer)  # kaiming_uniform(a=sqrt 5) bound, rescaled by 1/sqrt(L)
    assert mix.out_proj.weight.abs().max() <= bound and mix.out_proj.weight.abs().max() > 0.9 * bound
    assert abs(m.backbone.embedding.weight.std().item() - 0.02) < 0.002
    assert torch.equal(m.backbone.layers[0].norm.weight, torch.ones(cfg.d_model))

    m2 = Mamba2LM(MAMBA2_ARCH.config("small"))
    mix2 = m2.backbone.layers[0].mixer
    A = torch.exp(mix2.A_log)
    assert A.min() >= 1 and A.max() <= 16
    dt2 = F.softplus(mix2.dt_bias.detach())
    assert dt2.min() >= 1e-3 * 0.999 and dt2.max() <= 0.1 * 1.001
    assert torch.equal(mix2.D, torch.ones_like(mix2.D))
    assert torch.equal(mix2.norm.weight, torch.ones_like(mix2.norm.weight))


def test_cpu_runs_the_reference_and_never_imports_mamba_ssm():
    had = "mamba_ssm" in sys.modules
    m = MambaLM(ARCH.config("tiny"))
    m(torch.randint(0, 512, (1, 10)))
    assert m.last_backend == dispatch.REFERENCE == m.scan_backend()
    assert dispatch.scan_backend("cpu") == dispatch.REFERENCE
    m2 = Mamba2LM(MAMBA2_ARCH.config("tiny"))
    m2(torch.randint(0, 512, (1, 10)))
    assert m2.last_backend == dispatch.REFERENCE
    assert had or "mamba_ssm" not in sys.modules


def test_meta_device_builds_without_memory():
    m = Mamba2LM(MAMBA2_ARCH.config("2.7b"), device="meta")
    assert all(p.is_meta for p in m.parameters())
    assert m.counted_params() == m.num_params() == 2_702_599_680  # test_published_counts' inventory of the release


# ==========================================================================================================
# 5. cached decoding across chunk boundaries (prompt longer than one scan / SSD chunk)
# ==========================================================================================================
@pytest.mark.parametrize("arch,overrides", [
    (ARCH, dict(scan_chunk_size=16)),
    (MAMBA2_ARCH, dict(chunk_size=16)),
])
def test_decode_after_prompt_longer_than_a_chunk(arch, overrides):
    torch.manual_seed(0)
    model = arch.model_cls(arch.config("tiny", **overrides)).eval()
    x = torch.randint(0, 512, (2, 70))
    with torch.no_grad():
        full = model(x)
        cache = model.allocate_cache(2, 70)
        parts = [model.step(x[:, :40], cache)]  # 2.5 chunks of prompt
        parts += [model.step(x[:, t:t + 1], cache) for t in range(40, 45)]
        parts.append(model.step(x[:, 45:67], cache))  # warm prefill across a chunk boundary
        parts += [model.step(x[:, t:t + 1], cache) for t in range(67, 70)]
    assert cache.pos == 70
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", [ARCH, MAMBA2_ARCH])
def test_decode_after_prompt_shorter_than_the_conv(arch):
    torch.manual_seed(0)
    model = arch.model_cls(arch.config("tiny")).eval()
    x = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        full = model(x)
        cache = model.allocate_cache(1, 8)
        parts = [model.step(x[:, :2], cache)] + [model.step(x[:, t:t + 1], cache) for t in range(2, 8)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)


# ==========================================================================================================
# 3. parity with mamba-ssm's own python code, on CPU
# ==========================================================================================================
class _StubRMSNorm(torch.nn.Module):
    """Stands in for mamba_ssm.ops.triton.layer_norm.RMSNorm (Triton) with its reference semantics."""

    def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class _StubGatedRMSNorm(torch.nn.Module):
    """Stands in for mamba_ssm.ops.triton.layernorm_gated.RMSNorm (rms_norm_ref semantics)."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)

    def forward(self, x, z=None):
        dtype, x = x.dtype, x.float()
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.float())
        gs = self.group_size or x.shape[-1]
        xg = x.view(*x.shape[:-1], -1, gs)
        out = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + self.eps)).view(x.shape) * self.weight.float()
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.float())
        return out.to(dtype)


def _causal_conv1d_ref(x, weight, bias=None, activation=None, **_):
    """Stands in for causal_conv1d_fn (CUDA): x (b, c, l), weight (c, w)."""
    y = F.conv1d(x, weight.unsqueeze(1), bias, padding=weight.shape[-1] - 1, groups=x.shape[1])[..., : x.shape[-1]]
    return F.silu(y) if activation in ("silu", "swish") else y


@pytest.fixture
def mamba_ssm_cpu(monkeypatch):
    """mamba-ssm's python modules, importable on CPU: its CUDA extension, its Triton modules and the
    transformers / huggingface_hub imports of the package are replaced by stubs, and the package __init__
    (which imports all of that eagerly) is bypassed. Everything is removed from sys.modules afterwards."""
    if not HAS_MAMBA_SSM:
        pytest.skip(f"mamba-ssm (and einops) not installed; CPU install: {_MAMBA_SSM_CPU_INSTALL}")
    # on a CUDA machine the real package may already be imported (kernels): set it aside, re-import with stubs
    for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
        monkeypatch.delitem(sys.modules, name)
    before = set(sys.modules)

    def stub(name, **attrs):
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, mod)
        return mod

    spec = importlib.util.find_spec("mamba_ssm")
    monkeypatch.setitem(sys.modules, "mamba_ssm", importlib.util.module_from_spec(spec))  # no __init__
    stub("selective_scan_cuda")
    stub("mamba_ssm.ops.triton.layer_norm", RMSNorm=_StubRMSNorm, layer_norm_fn=None, rms_norm_fn=None,
         _layer_norm_fwd=None)
    stub("mamba_ssm.ops.triton.layernorm_gated", RMSNorm=_StubGatedRMSNorm)
    ssd_combined = stub("mamba_ssm.ops.triton.ssd_combined", mamba_chunk_scan_combined=None,
                        mamba_split_conv1d_scan_combined=None)  # the first is filled in below
    stub("mamba_ssm.ops.triton.selective_state_update", selective_state_update=None)
    stub("mamba_ssm.utils.generation", GenerationMixin=type("GenerationMixin", (), {}))
    stub("mamba_ssm.utils.hf", load_config_hf=None, load_state_dict_hf=None)
    if importlib.util.find_spec("huggingface_hub") is None:
        stub("huggingface_hub", PyTorchModelHubMixin=type("PyTorchModelHubMixin", (), {}))
    for name in ("causal_conv1d", "causal_conv1d.cpp_functions"):  # make sure no CUDA conv is picked up
        monkeypatch.setitem(sys.modules, name, None)
    try:
        ns = types.SimpleNamespace(
            ssi=importlib.import_module("mamba_ssm.ops.selective_scan_interface"),
            ssd_minimal=importlib.import_module("mamba_ssm.modules.ssd_minimal"),
        )
    except ImportError as e:
        pytest.skip(f"mamba-ssm's python modules do not import on CPU with stubs: {e}")

    def chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                   cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False,
                   return_varlen_states=False):
        """mamba_chunk_scan_combined (Triton) rebuilt from mamba-ssm's ssd_minimal_discrete (fp32)."""
        assert z is None and seq_idx is None
        dtype, x, B, C = x.dtype, x.float(), B.float(), C.float()
        dt = dt.float() + dt_bias.float() if dt_bias is not None else dt.float()
        dt = F.softplus(dt) if dt_softplus else dt
        L, h = x.shape[1], x.shape[2]
        Bh, Ch = (t.repeat_interleave(h // t.shape[2], dim=2) for t in (B, C))
        pad = (-L) % chunk_size
        args = [x * dt[..., None], A * dt, Bh, Ch]
        args = [F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in args]
        init = None if initial_states is None else initial_states.float()[:, None]  # (b, 1, h, p, n)
        y, final = ns.ssd_minimal.ssd_minimal_discrete(*args, chunk_size, initial_states=init)
        y = (y[:, :L] + x * D.float()[:, None]).to(dtype)
        return (y, final) if return_final_states else y

    ssd_combined.mamba_chunk_scan_combined = chunk_scan
    ns.chunk_scan = chunk_scan
    yield ns
    for name in set(sys.modules) - before:  # (monkeypatch then puts back whatever was set aside above)
        if name == "mamba_ssm" or name.startswith("mamba_ssm."):
            sys.modules.pop(name, None)


def test_selective_scan_matches_mamba_ssm_selective_scan_ref(mamba_ssm_cpu):
    u, delta, A, B, C, D, z, delta_bias, _ = _scan_inputs(2, 8, 16, 150, seed=3, dtype=torch.float32)
    want_y, want_h = mamba_ssm_cpu.ssi.selective_scan_ref(u, delta, A, B, C, D, z=z, delta_bias=delta_bias,
                                                          delta_softplus=True, return_last_state=True)
    y, h = selective_scan.selective_scan_ref(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=True,
                                             return_last_state=True, chunk_size=64)
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, want_h, rtol=1e-4, atol=1e-4)


def test_mixer_matches_mamba_ssm_mamba_inner_ref(mamba_ssm_cpu, monkeypatch):
    ssi = mamba_ssm_cpu.ssi
    monkeypatch.setattr(ssi, "causal_conv1d_fn", _causal_conv1d_ref)
    monkeypatch.setattr(ssi, "selective_scan_fn", ssi.selective_scan_ref)
    torch.manual_seed(0)
    mixer = MambaLM(ARCH.config("tiny")).backbone.layers[0].mixer
    h = torch.randn(2, 33, 64)
    xz = mixer.in_proj(h).transpose(1, 2)
    want = ssi.mamba_inner_ref(xz, mixer.conv1d.weight, mixer.conv1d.bias, mixer.x_proj.weight,
                               mixer.dt_proj.weight, mixer.out_proj.weight, mixer.out_proj.bias,
                               -torch.exp(mixer.A_log.float()), None, None, mixer.D.float(),
                               delta_bias=mixer.dt_proj.bias.float(), delta_softplus=True)
    torch.testing.assert_close(mixer(h), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_ssd_matches_mamba_ssm_ssd_minimal(mamba_ssm_cpu, ngroups):
    g = torch.Generator().manual_seed(ngroups)
    b, L, h, p, n, chunk = 2, 96, 4, 8, 16, 32
    x, dt = torch.randn(b, L, h, p, generator=g), F.softplus(torch.randn(b, L, h, generator=g) - 2)
    A = -torch.exp(torch.rand(h, generator=g))
    B, C = torch.randn(b, L, ngroups, n, generator=g), torch.randn(b, L, ngroups, n, generator=g)
    Bh, Ch = (t.repeat_interleave(h // ngroups, dim=2) for t in (B, C))
    want_y, want_s = mamba_ssm_cpu.ssd_minimal.ssd_minimal_discrete(x * dt[..., None], A * dt, Bh, Ch, chunk)
    y, s = ssd.ssd_chunked_ref(x, dt, A, B, C, chunk, return_final_states=True)
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, want_s, rtol=1e-4, atol=1e-4)


def _mamba_ssm_lm(ssm_cfg, pad_multiple, **cfg):
    try:
        config_mamba = importlib.import_module("mamba_ssm.models.config_mamba")
        mss = importlib.import_module("mamba_ssm.models.mixer_seq_simple")
    except ImportError as e:
        pytest.skip(f"mamba_ssm.models.mixer_seq_simple does not import on CPU with stubs: {e}")
    config = config_mamba.MambaConfig(ssm_cfg=ssm_cfg, rms_norm=True, residual_in_fp32=True, fused_add_norm=False,
                                      pad_vocab_size_multiple=pad_multiple, **cfg)
    return mss.MambaLMHeadModel(config).eval()


def test_whole_mamba1_lm_matches_mamba_ssm(mamba_ssm_cpu, monkeypatch):
    theirs = _mamba_ssm_lm({"layer": "Mamba1", "use_fast_path": False}, 8, d_model=64, n_layer=2, vocab_size=500)
    mamba_simple = sys.modules["mamba_ssm.modules.mamba_simple"]
    monkeypatch.setattr(mamba_simple, "causal_conv1d_fn", None)  # -> its nn.Conv1d path
    monkeypatch.setattr(mamba_simple, "selective_scan_fn", mamba_ssm_cpu.ssi.selective_scan_ref)
    ours = MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=500)).eval()
    assert list(shapes(ours).items()) == [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    ours.load_state_dict(theirs.state_dict())  # strict: same names, same shapes
    x = torch.randint(0, 500, (2, 77))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits[..., :500], rtol=1e-4, atol=1e-4)


def test_whole_mamba2_lm_matches_mamba_ssm(mamba_ssm_cpu):
    ssm_cfg = {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16, "use_mem_eff_path": False}
    theirs = _mamba_ssm_lm(ssm_cfg, 16, d_model=64, n_layer=2, vocab_size=500)
    mamba2_mod = sys.modules["mamba_ssm.modules.mamba2"]
    assert mamba2_mod.mamba_chunk_scan_combined is mamba_ssm_cpu.chunk_scan
    assert mamba2_mod.causal_conv1d_fn is None
    ours = Mamba2LM(Mamba2Config(d_model=64, n_layer=2, vocab_size=500, d_state=16, headdim=16, chunk_size=16)).eval()
    assert list(shapes(ours).items()) == [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    ours.load_state_dict(theirs.state_dict())
    x = torch.randint(0, 500, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits[..., :500], rtol=1e-4, atol=1e-4)


def _causal_conv1d_update_double(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None):
    """causal_conv1d_update's contract: x (b, c) or (b, c, l); conv_state (b, c, s) updated in place."""
    squeeze = x.dim() == 2
    x3 = x.unsqueeze(-1) if squeeze else x
    full = torch.cat([conv_state, x3], -1)
    conv_state.copy_(full[..., -conv_state.shape[-1]:])
    out = F.conv1d(full.to(weight.dtype), weight.unsqueeze(1), bias, groups=x3.shape[1])[..., -x3.shape[-1]:]
    out = F.silu(out) if activation in ("silu", "swish") else out
    return (out.squeeze(-1) if squeeze else out).to(x.dtype)


def _fake_triton(monkeypatch):
    """Just enough of triton's import-time surface for mamba-ssm's Triton modules to import (their *_ref
    functions are plain torch); no Triton kernel is ever launched."""
    def jit(fn=None, **_):
        return fn if fn is not None else (lambda f: f)

    tl = types.ModuleType("triton.language")
    tl.constexpr, tl.math = object, types.SimpleNamespace()
    triton = types.ModuleType("triton")
    triton.__version__, triton.language, triton.jit = "3.0.0", tl, jit
    triton.heuristics = triton.autotune = lambda *a, **k: (lambda f: f)
    triton.Config = lambda *a, **k: None
    triton.next_power_of_2 = lambda n: 1 << max(0, int(n) - 1).bit_length()
    monkeypatch.setitem(sys.modules, "triton", triton)
    monkeypatch.setitem(sys.modules, "triton.language", tl)


@pytest.fixture
def simulated_kernels(mamba_ssm_cpu, monkeypatch):
    """The kernel path of models.ops / the models, run on CPU: every kernel is replaced by mamba-ssm's own
    reference implementation of the same signature (selective_scan_ref for selective_scan_fn, mamba_inner_ref
    for mamba_inner_fn, selective_state_update_ref for selective_state_update, ssd_minimal for
    mamba_chunk_scan_combined) or a test double of causal-conv1d's. This checks the dispatch plumbing --
    argument order, layouts, in-place state updates, returned states -- without a GPU."""
    ssi = mamba_ssm_cpu.ssi
    monkeypatch.setattr(ssi, "causal_conv1d_fn", _causal_conv1d_ref)
    monkeypatch.setattr(ssi, "selective_scan_fn", ssi.selective_scan_ref)
    _fake_triton(monkeypatch)
    monkeypatch.delitem(sys.modules, "mamba_ssm.ops.triton.selective_state_update")  # the fixture's None stub
    try:
        ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    except ImportError as e:
        pytest.skip(f"mamba_ssm.ops.triton.selective_state_update does not import with a triton stub: {e}")
    fake = dispatch.Kernels(
        selective_scan_fn=ssi.selective_scan_ref, mamba_inner_fn=ssi.mamba_inner_ref,
        selective_state_update=ssu.selective_state_update_ref, mamba_chunk_scan_combined=mamba_ssm_cpu.chunk_scan,
        causal_conv1d_fn=_causal_conv1d_ref, causal_conv1d_update=_causal_conv1d_update_double,
    )
    monkeypatch.setattr(dispatch, "kernels_for", lambda t: None if dispatch.reference_forced() else fake)
    return fake


@pytest.mark.parametrize("arch", [ARCH, MAMBA2_ARCH])
def test_kernel_path_plumbing_on_cpu(simulated_kernels, arch):
    torch.manual_seed(0)
    model = arch.model_cls(arch.config("tiny", **({"chunk_size": 16} if arch is MAMBA2_ARCH else {})))
    x = torch.randint(0, 512, (2, 60))

    def run():
        model.zero_grad()
        logits = model(x)
        backends = [model.last_backend]
        logits.logsumexp(-1).mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        with torch.no_grad():
            cache = model.allocate_cache(2, 60)
            parts = [model.step(x[:, :30], cache)]
            backends.append(model.last_backend)
            parts += [model.step(x[:, t:t + 1], cache) for t in range(30, 40)]
            backends.append(model.last_backend)
            parts.append(model.step(x[:, 40:], cache))  # warm prefill (Mamba-1's kernel cannot start from a state)
        return logits.detach(), grads, torch.cat(parts, 1), cache, backends

    logits, grads, decoded, cache, backends = run()
    assert backends == [dispatch.MAMBA_SSM] * 3  # forward, cold prefill, decode
    with dispatch.use_reference():
        ref_logits, ref_grads, ref_decoded, ref_cache, ref_backends = run()
    assert ref_backends == [dispatch.REFERENCE] * 3
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decoded, ref_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref_decoded, ref_logits, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5)
    for a, b in zip(cache.ssm_states + cache.conv_states, ref_cache.ssm_states + ref_cache.conv_states):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ==========================================================================================================
# 4. kernels vs reference on CUDA (bf16)
# ==========================================================================================================
def _rel_err(a, b):
    """Norm-relative error: bf16 kernels and the fp32-internal reference differ by rounding, elementwise
    tolerances are brittle near zero."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def needs_kernels(fn):
    """The project's ``gpu`` marker, plus a skip without CUDA or without mamba-ssm installed."""
    skip = pytest.mark.skipif(not (HAS_CUDA and HAS_MAMBA_SSM), reason="needs CUDA and mamba-ssm's kernels")
    return pytest.mark.gpu(skip(fn))


@needs_kernels
def test_kernel_selective_scan_matches_reference():
    k = dispatch.kernels()
    if k.selective_scan_fn is None:
        pytest.skip(f"selective_scan kernel unavailable: {k.errors}")
    u, delta, A, B, C, D, z, delta_bias, _ = _scan_inputs(2, 64, 16, 300, seed=5, dtype=torch.float32)
    args = [t.cuda() for t in (u, delta, A, B, C, D, z, delta_bias)]
    u, delta, A, B, C, D, z, delta_bias = args
    bf = lambda t: t.bfloat16()  # noqa: E731
    y, h = selective_scan.selective_scan(bf(u), bf(delta), A, bf(B), bf(C), D, z=bf(z), delta_bias=delta_bias,
                                         delta_softplus=True, return_last_state=True)
    assert dispatch.last_backend() == dispatch.MAMBA_SSM
    with dispatch.use_reference():
        y_ref, h_ref = selective_scan.selective_scan(bf(u), bf(delta), A, bf(B), bf(C), D, z=bf(z),
                                                     delta_bias=delta_bias, delta_softplus=True, return_last_state=True)
    assert dispatch.last_backend() == dispatch.REFERENCE
    assert _rel_err(y, y_ref) < 1e-2 and _rel_err(h, h_ref) < 1e-2


@needs_kernels
def test_kernel_ssd_matches_reference():
    k = dispatch.kernels()
    if k.mamba_chunk_scan_combined is None:
        pytest.skip(f"mamba_chunk_scan_combined unavailable: {k.errors}")
    g = torch.Generator().manual_seed(0)
    b, L, h, p, n = 2, 300, 8, 64, 128
    x, dt = torch.randn(b, L, h, p, generator=g), torch.randn(b, L, h, generator=g) - 2
    A, D, dt_bias = -torch.exp(torch.rand(h, generator=g)), torch.ones(h), torch.zeros(h)
    B, C = torch.randn(b, L, 1, n, generator=g), torch.randn(b, L, 1, n, generator=g)
    h0 = torch.randn(b, h, p, n, generator=g)
    x, dt, A, D, dt_bias, B, C, h0 = (t.cuda() for t in (x, dt, A, D, dt_bias, B, C, h0))
    kw = dict(D=D, dt_bias=dt_bias, dt_softplus=True, initial_states=h0, return_final_states=True)
    y, s = ssd.ssd_scan(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 64, **kw)
    assert dispatch.last_backend() == dispatch.MAMBA_SSM
    with dispatch.use_reference():
        y_ref, s_ref = ssd.ssd_scan(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 64, **kw)
    assert _rel_err(y, y_ref) < 2e-2 and _rel_err(s, s_ref) < 2e-2  # the kernel rounds C.B^T to bf16 inside


@needs_kernels
@pytest.mark.parametrize("arch", [ARCH, MAMBA2_ARCH])
def test_kernel_model_matches_reference_bf16(arch):
    torch.manual_seed(0)
    model = arch.model_cls(arch.config("small")).cuda().to(torch.bfloat16).eval()
    if model.scan_backend() != dispatch.MAMBA_SSM:
        pytest.skip(f"kernels unavailable: {dispatch.kernel_status()}")
    x = torch.randint(0, 512, (2, 200), device="cuda")
    with torch.no_grad():
        fast = model(x).float()
        assert model.last_backend == dispatch.MAMBA_SSM
        with dispatch.use_reference():
            ref = model(x).float()
        assert model.last_backend == dispatch.REFERENCE
        # kernels in decode: prefill + single steps against the kernel forward
        cache = model.allocate_cache(2, 200)
        parts = [model.step(x[:, :150], cache)] + [model.step(x[:, t:t + 1], cache) for t in range(150, 160)]
    assert _rel_err(fast, ref) < 2e-2
    assert _rel_err(torch.cat(parts, 1), fast[:, :160]) < 2e-2


@needs_kernels
@pytest.mark.parametrize("arch", [ARCH, MAMBA2_ARCH])
def test_kernel_backward_matches_reference(arch):
    torch.manual_seed(0)
    model = arch.model_cls(arch.config("tiny")).cuda()
    if model.scan_backend() != dispatch.MAMBA_SSM:
        pytest.skip(f"kernels unavailable: {dispatch.kernel_status()}")
    x = torch.randint(0, 512, (2, 128), device="cuda")

    def grads():
        model.zero_grad()
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    fast = grads()
    with dispatch.use_reference():
        ref = grads()
    assert _rel_err(fast, ref) < 1e-2
