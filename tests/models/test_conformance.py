"""The conformance suite: every registry entry passes these, automatically (they iterate the registry)."""
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_model, save_model
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from models import registry

ARCHS = registry.names()
SMALL_PRESETS = [(a, p) for a in ARCHS for p in ("tiny", "small")]
PUBLISHED = [(a, p) for a in ARCHS for p in registry.get(a).published]


def tiny(name, **kw):
    return registry.build(name, "tiny", **kw)


def tokens(model, batch=2, seq=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    seq = seq or model.config.max_seq_len
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)


@pytest.mark.parametrize("name", ARCHS)
def test_output_shape(name):
    model = tiny(name)
    x = tokens(model, 3, 17)
    assert model(x).shape == (3, 17, model.config.vocab_size)


@pytest.mark.parametrize("name", ARCHS)
def test_causality(name):
    model = tiny(name).eval()
    x = tokens(model, 2, 40)
    t = 23
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % model.config.vocab_size
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-5)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4  # the change is seen from t on


@pytest.mark.parametrize("name", ARCHS)
def test_optimizer_steps_lower_loss(name):
    model = tiny(name)
    x = tokens(model, 4, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("name", ARCHS)
def test_same_seed_same_model(name):
    torch.manual_seed(7)
    a = tiny(name)
    torch.manual_seed(7)
    b = tiny(name)
    torch.manual_seed(8)
    c = tiny(name)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    x = tokens(a)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert not torch.equal(a(x), c(x))


@pytest.mark.parametrize("name,preset", SMALL_PRESETS)
def test_num_params_equals_counted(name, preset):
    model = registry.build(name, preset)
    assert model.num_params() == model.counted_params()
    assert model.num_params(non_embedding=True) == model.counted_params(non_embedding=True)
    assert model.num_params(non_embedding=True) < model.num_params()


@pytest.mark.parametrize("name,preset", PUBLISHED)
def test_published_counts_on_meta(name, preset):
    arch = registry.get(name)
    model = registry.build(name, preset, device="meta")
    assert all(p.is_meta for p in model.parameters()) and all(b.is_meta for b in model.buffers())
    counted = model.counted_params()
    assert counted == model.num_params()
    published = arch.published[preset]
    assert abs(counted - published) / published <= arch.published_tolerance, (counted, published)


def reference_flops(model, x):
    """FLOPs torch's counter sees on the reference path (SDPA's math backend decomposes into visible bmm's),
    plus what it cannot see, counted by hand by the config (e.g. Mamba's scan: elementwise work)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    B, S = x.shape
    return counter.get_total_flops() + 3 * model.config.uncounted_flops_per_token(S) * B * S


@pytest.mark.parametrize("name", ARCHS)
def test_flops_per_token_matches_counter(name):
    model = tiny(name)
    x = tokens(model, 2)
    S = x.shape[1]
    analytic = model.flops_per_token(S) * x.numel()
    counted = reference_flops(model, x)
    assert abs(counted - analytic) / analytic < 0.02, (counted, analytic)


@pytest.mark.parametrize("name", ARCHS)
def test_cached_decoding_matches_forward(name):
    model = tiny(name).eval()
    x = tokens(model, 2, 50)
    with torch.no_grad():
        full = model(x)
        cache = model.allocate_cache(2, 64)
        parts = [model.step(x[:, :20], cache)]                     # prefill
        parts += [model.step(x[:, t:t + 1], cache) for t in range(20, 45)]  # decode one token at a time
        parts.append(model.step(x[:, 45:], cache))                 # a second prefill chunk on a warm cache
    assert cache.pos == 50
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ARCHS)
def test_safetensors_round_trip(name, tmp_path):
    model = tiny(name).eval()
    path = tmp_path / "model.safetensors"
    save_model(model, str(path))
    torch.manual_seed(123)
    other = tiny(name).eval()
    x = tokens(model)
    with torch.no_grad():
        assert not torch.equal(other(x), model(x))
        load_model(other, str(path))
        assert torch.equal(other(x), model(x))


# ---- the declared contract (models/base.py): what the harness reads from every model ----------------------
@pytest.mark.parametrize("name", ARCHS)
def test_shape_contract(name):
    """n_layers / width are declared by the config and are the model's: one block per layer, and the residual
    stream (the embedding's output) is `width` wide."""
    model = tiny(name)
    cfg = model.config
    assert isinstance(cfg.n_layers, int) and isinstance(cfg.width, int)
    assert len(model.block_modules()) == cfg.n_layers
    hidden = {}
    handle = model.block_modules()[0].register_forward_pre_hook(lambda m, args: hidden.setdefault("x", args[0]))
    with torch.no_grad():
        model(tokens(model, 1, 5))
    handle.remove()
    assert hidden["x"].shape == (1, 5, cfg.width)
    row = next(r for r in registry.table() if r["model"] == name and r["preset"] == "tiny")
    assert (row["layers"], row["width"]) == (cfg.n_layers, cfg.width)
    # depth growth writes depth_field: it is the config field that n_layers reports
    assert getattr(cfg, cfg.depth_field) == cfg.n_layers and cfg.depth_field in cfg.__dataclass_fields__
    deeper = registry.get_config(name, "tiny", **{cfg.depth_field: cfg.n_layers + 1})
    assert len(registry.build_from_config(deeper, name, device="meta").block_modules()) == cfg.n_layers + 1
    # pre-flight's memory estimate reads embedding_rows (the token embedding's rows) and activation_share
    assert model.embedding_parameters()[0].shape == (cfg.embedding_rows, cfg.width)
    assert 0 < cfg.activation_share <= 1 and isinstance(cfg.position_table, bool)


@pytest.mark.parametrize("name", ARCHS)
def test_residual_outputs_are_the_only_writers(name):
    """With every block's declared residual writers zeroed, every block is the identity: no other parameter of
    any block (norms, input projections, keys, SSM parameters ...) changes the logits any more. Perturbing them
    before zeroing does change the logits (so the check can fail), and so it does if one writer is left out."""
    model = tiny(name).eval()
    names = model.residual_outputs()
    assert len(names) == len(model.block_modules()) and all(names)
    writers = {id(p) for p in model.residual_output_parameters()}
    others = [p for b in model.block_modules() for p in b.parameters() if id(p) not in writers]
    x = tokens(model, 2, 12)
    g = torch.Generator().manual_seed(0)

    def perturbed_logits():
        saved = [p.detach().clone() for p in others]
        with torch.no_grad():
            for p in others:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
            out = model(x)
            for p, v in zip(others, saved):
                p.copy_(v)
        return out

    with torch.no_grad():
        assert (perturbed_logits() - model(x)).abs().max() > 1e-4
        writer_params = model.residual_output_parameters()
        kept = writer_params[0].detach().clone()
        for p in writer_params:
            p.zero_()
        torch.testing.assert_close(perturbed_logits(), model(x), rtol=0, atol=1e-5)
        writer_params[0].copy_(kept)  # one writer back: its block is no identity, the others' params matter
        assert (perturbed_logits() - model(x)).abs().max() > 1e-5


@pytest.mark.parametrize("name", ARCHS)
def test_cache_contract(name):
    """allocate_cache returns a DecodeCache: pos starts at 0 and counts tokens; nbytes is every tensor it holds
    (linear in the batch: twice the sequences, twice the bytes) and changes nothing as decoding goes on."""
    from models.base import DecodeCache
    model = tiny(name).eval()
    one, two = model.allocate_cache(1, 32), model.allocate_cache(2, 32)
    assert isinstance(one, DecodeCache) and one.pos == 0
    assert one.nbytes() > 0 and two.nbytes() == 2 * one.nbytes()
    before = two.nbytes()
    with torch.no_grad():
        model.step(tokens(model, 2, 7), two)
    assert two.pos == 7 and two.nbytes() == before


@pytest.mark.parametrize("name", ARCHS)
def test_backend_and_implementation_contract(name):
    """backends() names what a forward would take; after a forward backends_ran() reports the same families.
    implementation_fields() are config fields that change no count."""
    model = tiny(name)
    expected = model.backends()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in expected.items())
    with torch.no_grad():
        model(tokens(model, 1, 8))
    assert set(model.backends_ran()) == set(expected)
    assert all(v is not None for v in model.backends_ran().values())
    cfg = model.config
    for field_name, value in cfg.implementation_fields().items():
        assert field_name in cfg.__dataclass_fields__ and getattr(cfg, field_name) == value
    assert cfg.uncounted_flops_per_token(cfg.max_seq_len) >= 0
