"""CONTRIBUTING.md's "add an architecture" path, walked in a test: a fifth architecture defined here, registered
the way a new module would be, passes the whole conformance suite unchanged -- and a contract break in it is
caught (so the suite is not passing it vacuously).

The example is a minimal retention / gated-linear-attention LM (RetNet, arXiv 2307.08621, fixed per-head
decays): o_t = sum_{s<=t} gamma^(t-s) (q_t . k_s) v_s / sqrt(hd). The parallel form runs training, the
recurrent form (state S = gamma S + k^T v) runs decoding, so cached decoding really is a second computation.
"""
from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import registry
from models.base import Architecture, CausalLM, DecodeCache, ModelConfig
from tests.models import test_conformance as conformance


# ---- 1. the config owns the counts --------------------------------------------------------------------------
@dataclasses.dataclass
class RetentionConfig(ModelConfig):
    vocab_size: int = 512
    max_seq_len: int = 128
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4

    @property
    def width(self) -> int:
        return self.d_model

    def num_params(self, non_embedding: bool = False) -> int:
        d = self.d_model
        per_layer = 4 * d * d + 2 * 4 * d * d + 2 * d  # q k v o, the 4d MLP, two RMSNorm weights
        embedding = self.vocab_size * d  # tied head
        total = embedding + self.n_layers * per_layer + d  # + final norm
        return total - embedding if non_embedding else total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        S, d = seq_len or self.max_seq_len, self.d_model
        # projections and MLP: 2 per weight; q k^T and A v over the whole (S, S) parallel form: 2 S d each
        per_layer = 2 * (4 * d * d + 8 * d * d) + 4 * S * d
        return 3.0 * (self.n_layers * per_layer + 2 * self.vocab_size * d)


# ---- 2. the model: forward, decoding, init, and the declared pieces -----------------------------------------
class RetentionCache(DecodeCache):
    def __init__(self, states: list[torch.Tensor]):
        self.states = states  # per layer (B, H, hd, hd); DecodeCache.nbytes counts them
        self.pos = 0


class RetentionBlock(nn.Module):
    def __init__(self, cfg: RetentionConfig):
        super().__init__()
        d, H = cfg.d_model, cfg.n_heads
        self.H, self.hd = H, d // H
        self.norm1, self.norm2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.w1, self.w2 = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)
        # RetNet's decays 1 - 2^(-5-h): each head remembers on its own time scale
        self.register_buffer("log_gamma", torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(H))), persistent=False)

    def heads(self, x):  # (B, T, d) -> (B, H, T, hd)
        return x.unflatten(-1, (self.H, self.hd)).transpose(1, 2)

    def retention(self, x, state=None):  # (B, T, d) -> (B, T, d) [, state]
        q, k, v = self.heads(self.q(x)) / math.sqrt(self.hd), self.heads(self.k(x)), self.heads(self.v(x))
        if state is None:  # parallel form: (q k^T * D) v, D[t, s] = gamma^(t-s) for s <= t
            t = torch.arange(x.shape[1], device=x.device)
            decay = (t[:, None] - t[None, :]).clamp(min=0) * self.log_gamma[:, None, None]  # (H, T, T)
            D = torch.where(t[:, None] >= t[None, :], decay.exp(), 0.0)
            y = ((q @ k.transpose(-1, -2)) * D) @ v
        else:  # recurrent form, one token at a time: S = gamma S + k^T v, o = q S
            g = self.log_gamma.exp()[:, None, None]
            ys = []
            for i in range(x.shape[1]):
                state = g * state + k[:, :, i, :, None] * v[:, :, i, None, :]
                ys.append(q[:, :, i, None, :] @ state)
            y = torch.cat(ys, dim=2)
        y = self.o(y.transpose(1, 2).flatten(2))
        return y if state is None else (y, state)

    def forward(self, x, state=None):
        if state is None:
            x = x + self.retention(self.norm1(x))
        else:
            h, state = self.retention(self.norm1(x), state)
            x = x + h
        x = x + self.w2(F.gelu(self.w1(self.norm2(x))))
        return x if state is None else (x, state)


class RetentionLM(CausalLM):
    def __init__(self, config: RetentionConfig, device=None):
        super().__init__()
        self.config = config
        with torch.device(device) if device is not None else torch.device("cpu"):
            self.emb = nn.Embedding(config.vocab_size, config.d_model)
            self.blocks = nn.ModuleList(RetentionBlock(config) for _ in range(config.n_layers))
            self.norm_f = nn.RMSNorm(config.d_model)
            self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.emb.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        writers = {id(p) for p in self.residual_output_parameters()}
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * self.config.n_layers) if id(m.weight) in writers else 0.02
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, nn.RMSNorm):
                m.reset_parameters()

    def forward(self, input_ids):  # (B, S) -> (B, S, V)
        x = self.emb(input_ids)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm_f(x))

    def allocate_cache(self, batch_size, max_len, device=None, dtype=None) -> RetentionCache:
        p, c = self.emb.weight, self.config
        hd = c.d_model // c.n_heads
        return RetentionCache([torch.zeros(batch_size, c.n_heads, hd, hd, device=device or p.device,
                                           dtype=dtype or p.dtype) for _ in range(c.n_layers)])

    def step(self, input_ids, cache: RetentionCache):
        x = self.emb(input_ids)
        for i, blk in enumerate(self.blocks):
            x, cache.states[i] = blk(x, cache.states[i])
        cache.pos += input_ids.shape[1]
        return self.head(self.norm_f(x))

    def embedding_parameters(self):
        return [self.emb.weight]

    def block_modules(self):
        return list(self.blocks)

    def residual_outputs(self):
        return [["o.weight", "w2.weight"] for _ in self.blocks]


# ---- 3. the registry entry (a new module's ARCH, one line in registry._MODULES) -----------------------------
ARCH = Architecture(
    name="example_retention", config_cls=RetentionConfig, model_cls=RetentionLM,
    presets={"tiny": dict(), "small": dict(n_layers=3, d_model=96, n_heads=4, max_seq_len=96)},
    description="CONTRIBUTING.md's example: a retention (gated linear attention) LM",
)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(registry.ARCHITECTURES, ARCH.name, ARCH)
    return ARCH.name


CHECKS = [f for n, f in sorted(vars(conformance).items()) if n.startswith("test_") and callable(f)]


def run_check(check, name, tmp_path):
    """Call one conformance test as pytest would for this registry entry (its presets, or its published
    sizes for the published-count check: none here)."""
    params = inspect.signature(check).parameters
    kwargs = {"name": name}
    if "tmp_path" in params:
        kwargs["tmp_path"] = tmp_path
    if "preset" not in params:
        return check(**kwargs)
    presets = registry.get(name).published if "published" in check.__name__ else ("tiny", "small")
    for preset in presets:
        check(preset=preset, **kwargs)


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_example_passes_conformance(check, registered, tmp_path):
    run_check(check, registered, tmp_path)


def test_conformance_suite_covers_the_contract():
    """Every conformance test is run above, and the contract's methods each have a check."""
    names = {f.__name__ for f in CHECKS}
    assert {"test_residual_outputs_are_the_only_writers", "test_cache_contract", "test_shape_contract",
            "test_flops_per_token_matches_counter", "test_cached_decoding_matches_forward",
            "test_backend_and_implementation_contract", "test_num_params_equals_counted"} <= names


@pytest.mark.parametrize("fault,check", [
    ("undeclared writer", "test_residual_outputs_are_the_only_writers"),   # w2 left out of residual_outputs
    ("flop constant", "test_flops_per_token_matches_counter"),             # the 4 S d term counted as 2 S d
    ("param count", "test_num_params_equals_counted"),                     # a norm weight forgotten
    ("cache pos", "test_cached_decoding_matches_forward"),                 # step does not advance pos
])
def test_conformance_catches_a_broken_example(fault, check, monkeypatch, tmp_path):
    """Each injected contract break makes the matching conformance check fail."""
    if fault == "undeclared writer":
        monkeypatch.setattr(RetentionLM, "residual_outputs", lambda self: [["o.weight"] for _ in self.blocks])
    elif fault == "flop constant":
        good = RetentionConfig.flops_per_token
        monkeypatch.setattr(RetentionConfig, "flops_per_token", lambda self, S=None: good(self, S) - 3.0 * self.n_layers
                            * 2 * (S or self.max_seq_len) * self.d_model)
    elif fault == "param count":
        good_p = RetentionConfig.num_params
        monkeypatch.setattr(RetentionConfig, "num_params", lambda self, non_embedding=False: good_p(self, non_embedding) - self.d_model)
    else:
        good_s = RetentionLM.step

        def step(self, ids, cache):
            out = good_s(self, ids, cache)
            cache.pos -= ids.shape[1]
            return out
        monkeypatch.setattr(RetentionLM, "step", step)
    monkeypatch.setitem(registry.ARCHITECTURES, ARCH.name, ARCH)
    with pytest.raises(AssertionError):
        run_check(getattr(conformance, check), ARCH.name, tmp_path)
