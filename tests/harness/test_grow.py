"""Model growth: Tokenformer token growth, G_stack, width growth, optimizer-state transfer, grown checkpoints."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from harness.grow import (GrowthError, apply_scale_tokens, grow_checkpoint, grow_model, grow_tokens, grow_width,
                          growth_gap, gstack, random_batch, read_optimizer_state)
from harness.grow.plan import gather
from harness.train.checkpoint import load_model_from_checkpoint, read_state
from harness.train.loop import train
from models import registry
from models.pattention import Pattention
from tests.fixtures import tiny_train_config, trained_like

V = 320
TOKENS = dict(qkv_tokens=96, proj_tokens=96, ffn_hidden=384)


def build(name, **kw):
    return trained_like(registry.build(name, "tiny", vocab_size=V, **kw))


def cfg(name, **kw):
    return registry.get_config(name, "tiny", vocab_size=V, **kw)


@pytest.fixture(scope="module")
def batch():
    return random_batch(V, 32)


# ------------------------------------------------------------------------------------------- token growth
@pytest.mark.parametrize("norm", ["l2_norm_gelu", "gelu_l2_norm"])
def test_preserving_token_growth_is_exact(batch, norm):
    old = build("tokenformer", pattention_norm=norm)
    g = grow_tokens(old, cfg("tokenformer", pattention_norm=norm, **TOKENS), init="preserving")
    gap = growth_gap(old, g.model, batch)
    assert gap["rel_logit_change"] < 1e-5, gap
    assert g.info["function_preserving"]
    for (name, m), (_, o) in zip(g.model.named_modules(), old.named_modules()):
        if isinstance(m, Pattention):
            n = o.n_tokens
            assert m.n_tokens == {"ffn": 384}.get(name.rsplit(".", 1)[-1], 96) and m.scale_tokens == n
            assert torch.equal(m.key_param_tokens[:n], o.key_param_tokens)      # old tokens in front
            assert torch.equal(m.value_param_tokens[:n], o.value_param_tokens)
            assert not m.key_param_tokens[n:].any()                              # new keys zero
            assert m.value_param_tokens[n:].std() > 0                            # values random: they train


def test_zero_token_growth_is_not_preserving_because_of_sqrt_n(batch):
    old = build("tokenformer")
    gaps = {}
    for ffn in (320, 512, 1024):  # only the FFN grows: m = 64, 256, 768 new tokens on n = 256
        zero = grow_tokens(old, cfg("tokenformer", ffn_hidden=ffn), init="zero").model
        gaps[ffn] = growth_gap(old, zero, batch)["rel_logit_change"]
        # the whole gap is the factor: holding sqrt(n) at the old n on the same weights restores the function
        apply_scale_tokens(zero, {f"blocks.{i}.ffn": 256 for i in range(2)})
        assert growth_gap(old, zero, batch)["rel_logit_change"] < 1e-5
    assert gaps[320] > 1e-3, gaps
    assert gaps[320] < gaps[512] < gaps[1024], gaps  # grows with sqrt(n + m) / sqrt(n)
    rand = grow_tokens(old, cfg("tokenformer", ffn_hidden=320), init="random").model
    assert growth_gap(old, rand, batch)["rel_logit_change"] > gaps[320]  # random keys score: changes more


def test_new_zero_tokens_train_unless_values_are_zero_too(batch):
    """Zero keys with random values (the default zero / preserving init) get gradients; all-zero tokens get
    none, ever (score, GELU and value vanish together): why the values keep the official init."""
    old = build("tokenformer")
    for zero_values, trains in ((False, True), (True, False)):
        new = grow_tokens(old, cfg("tokenformer", **TOKENS), init="preserving", zero_values=zero_values).model
        new.train()
        F.cross_entropy(new(batch)[:, :-1].flatten(0, 1), batch[:, 1:].flatten()).backward()
        ffn = new.blocks[0].ffn
        assert (ffn.key_param_tokens.grad[256:].abs().sum() > 0) == trains
        assert ffn.value_param_tokens.grad[256:].abs().sum() == 0  # their weights GELU(0) = 0 at growth


def test_preserving_refused_for_softmax():
    old = build("tokenformer", pattention_norm="softmax")
    with pytest.raises(GrowthError, match="softmax"):
        grow_tokens(old, cfg("tokenformer", pattention_norm="softmax", **TOKENS), init="preserving")


# --------------------------------------------------------------------------------------------------- G_stack
@pytest.mark.parametrize("name,depth", [("tokenformer", "n_layers"), ("transformer_pp", "n_layers"),
                                        ("gpt2", "n_layers"), ("mamba", "n_layer")])
def test_gstack_layout_and_identity_variant(batch, name, depth):
    old = build(name)
    plain = gstack(old, cfg(name, **{depth: 6}))
    blocks, small = plain.model.block_modules(), old.block_modules()
    assert len(blocks) == 6
    for i, blk in enumerate(blocks):  # [0, 1] x 3: block i is a copy of block i mod 2
        for (n, p), (_, q) in zip(blk.named_parameters(), small[i % 2].named_parameters()):
            assert torch.equal(p, q), (i, n)
    assert growth_gap(old, plain.model, batch)["rel_logit_change"] > 1e-3  # G_stack is not function-preserving
    ident = gstack(old, cfg(name, **{depth: 6}), identity=True)
    assert growth_gap(old, ident.model, batch)["rel_logit_change"] < 1e-5
    assert ident.info["function_preserving"] and not plain.info["function_preserving"]


def test_gstack_depth_must_be_a_multiple():
    with pytest.raises(GrowthError, match="not a multiple of the source depth 2"):
        gstack(build("transformer_pp"), cfg("transformer_pp", n_layers=5))


# ----------------------------------------------------------------------------------------------------- width
WIDTHS = [dict(d_model=128, n_heads=8), dict(d_model=128, n_heads=4), dict(ffn_hidden=320),
          dict(d_model=256, n_heads=8, ffn_hidden=640)]


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("to", WIDTHS)
def test_width_growth_is_exact(batch, to, tied):
    old = build("transformer_pp", tied_embeddings=tied)
    for noise in (0.0, 0.1):
        g = grow_width(old, cfg("transformer_pp", tied_embeddings=tied, **to), noise=noise)
        assert g.model.config.tied_embeddings == tied
        gap = growth_gap(old, g.model, batch)
        assert gap["rel_logit_change"] < 1e-5, (to, noise, gap)


def _grads(model, batch):
    model.zero_grad()
    F.cross_entropy(model(batch)[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("to", WIDTHS[:2])
def test_width_gradient_factors_behind_staged_adam_transfer(batch, to):
    """The grown (noise-free) clone's gradient of every entry with a source is g x its source's: the factors
    the staged transfer scales the Adam moments by."""
    old = build("transformer_pp")
    g = grow_width(old, cfg("transformer_pp", **to))
    old_g, new_g = _grads(old.train(), batch), _grads(g.model.train(), batch)
    for name, plan in g.plans.items():
        expect = gather(old_g[plan.src], plan.axes, "grad")
        mapped = torch.ones_like(expect, dtype=torch.bool)
        for dim, ax in enumerate(plan.axes):
            if ax is not None:
                mapped &= (ax.src >= 0).view([-1 if d == dim else 1 for d in range(expect.ndim)])
        torch.testing.assert_close(new_g[name][mapped], expect[mapped], rtol=1e-4, atol=1e-7, msg=name)


def test_width_noise_breaks_the_clone_symmetry(batch):
    old = build("transformer_pp")
    for noise, symmetric in ((0.0, True), (0.1, False)):
        new = grow_width(old, cfg("transformer_pp", d_model=128, n_heads=8), noise=noise).model.train()
        grads = _grads(new, batch)
        # the rows writing the two copies of each residual coordinate, and the two copies of each SwiGLU unit
        w2, w1 = grads["blocks.0.ffn.w2.weight"], grads["blocks.0.ffn.w1.weight"]
        assert torch.allclose(w2[:64], w2[64:], rtol=0, atol=1e-8) == symmetric
        assert torch.allclose(w1[:192], w1[192:], rtol=0, atol=1e-8) == symmetric


def test_hypercloning_noise_lets_the_clones_drift_apart_from_an_exact_start(batch):
    """d64 -> d128 width growth trained 5 AdamW steps: the pure clone's two halves of every embedding row stay
    bitwise equal (the degenerate case: a d64 model paying for d128), while with HyperCloning's 10 dB noise
    (the default of growth matrices and harness grow) they differ by more than 1e-3 relative, although both
    grown models start within 1e-5 (relative logit change) of the small model."""
    from harness.grow.width import DEFAULT_NOISE
    assert DEFAULT_NOISE == pytest.approx(0.3162, abs=1e-4)  # 10 dB: noise power a tenth of the signal's
    old = trained_like(build("transformer_pp"))
    drift = {}
    for noise in (0.0, DEFAULT_NOISE):
        new = grow_width(old, cfg("transformer_pp", d_model=128, n_heads=8), noise=noise, seed=3).model
        assert growth_gap(old, new, batch)["rel_logit_change"] < 1e-5
        opt = torch.optim.AdamW(new.parameters(), lr=1e-3)
        new.train()
        gen = torch.Generator().manual_seed(0)
        for _ in range(5):
            x = torch.randint(0, new.config.vocab_size, (4, 33), generator=gen)
            F.cross_entropy(new(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
        emb = new.tok_emb.weight.detach()
        drift[noise] = float((emb[:, :64] - emb[:, 64:]).norm() / emb[:, :64].norm())
    assert drift[0.0] == 0.0
    assert drift[DEFAULT_NOISE] > 1e-3, drift


# ------------------------------------------------------------------------------------ checkpoints and training
def run_config(corpus, cache, **kw):
    return tiny_train_config(corpus, cache, **{"budget": {"steps": 3}, "eval_every": 3, "eval_batches": 1, **kw})


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """3-step training checkpoints of tiny tokenformer and transformer_pp."""
    root = tmp_path_factory.mktemp("runs")
    for name in ("tokenformer", "transformer_pp"):
        train(run_config(corpus, root / "cache", model=name), root / name)
    return root


def _model_of(path):
    model, state = load_model_from_checkpoint(path)
    return model, state


def test_grown_checkpoint_trains_on(runs, corpus, tmp_path):
    dst = tmp_path / "grown"
    event = grow_checkpoint(runs / "tokenformer", dst, method="tokens", to=TOKENS, init="preserving",
                            optimizer="carry")
    assert event["gap"]["rel_logit_change"] < 1e-5 and event["function_preserving"]
    assert event["params_after"] > event["params_before"] and event["step"] == 0
    state = read_state(dst)
    assert state["step"] == 0 and state["data_position"] == 3 and state["growth"][-1]["method"] == "tokens"
    assert state["config"]["model_overrides"] == TOKENS and state["model_config"]["ffn_hidden"] == 384
    assert state["pattention_scale_tokens"]["blocks.0.ffn"] == 256
    # save -> load keeps the held sqrt(n): the reloaded grown model computes the source's function
    old, _ = _model_of(runs / "tokenformer")
    grown, _ = _model_of(dst)
    assert grown.blocks[1].attn.wq.scale_tokens == 64
    assert growth_gap(old, grown, random_batch(V, 32))["rel_logit_change"] < 1e-5
    # ... and the loop starts from it: weights, carried Adam state, data position, cumulative compute
    cfg_ = run_config(corpus, tmp_path / "cache", **event["train_config"], init_from=str(dst))
    summary = train(cfg_, tmp_path / "run")
    assert summary["complete"] and math.isfinite(summary["final_train_loss"])
    assert summary["data_offset"] == 3 and summary["flops_offset"] == read_state(runs / "tokenformer/checkpoint")["flops_spent"]
    after = read_state(tmp_path / "run/checkpoint")
    assert after["pattention_scale_tokens"] == state["pattention_scale_tokens"] and after["growth"] == state["growth"]


def test_optimizer_carry_keeps_old_entries(runs, corpus, tmp_path):
    src = runs / "tokenformer/checkpoint"
    old = read_optimizer_state(src)
    grow_checkpoint(src, tmp_path / "carry", method="tokens", to=TOKENS, init="zero", optimizer="carry",
                    schedule="continue")
    new = read_optimizer_state(tmp_path / "carry")
    assert read_state(tmp_path / "carry")["step"] == 3
    for name, entry in new.items():
        o = old[name]
        assert entry["step"] == o["step"] == 3
        n = o["exp_avg"].shape[0]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(entry[key][:n], o[key])
            assert not entry[key][n:].any()  # new tokens: zero moments
    # G_stack with carry: block i takes block i mod L's moments; zeroed projections start fresh
    grow_checkpoint(src, tmp_path / "stack", method="gstack_identity", to={"n_layers": 4}, optimizer="carry")
    stacked = read_optimizer_state(tmp_path / "stack")
    assert torch.equal(stacked["blocks.3.attn.wq.key_param_tokens"]["exp_avg"], old["blocks.1.attn.wq.key_param_tokens"]["exp_avg"])
    assert stacked["blocks.2.ffn.value_param_tokens"]["step"] == 0 and not stacked["blocks.2.ffn.value_param_tokens"]["exp_avg"].any()
    assert torch.equal(stacked["blocks.0.ffn.value_param_tokens"]["exp_avg"], old["blocks.0.ffn.value_param_tokens"]["exp_avg"])
    # fresh: no Adam state (the loop starts a new AdamW), step 0, and the loop trains from it
    ev = grow_checkpoint(src, tmp_path / "fresh", method="gstack", to={"n_layers": 4})
    assert read_optimizer_state(tmp_path / "fresh") == {} and read_state(tmp_path / "fresh")["step"] == 0
    cfg_ = run_config(corpus, tmp_path / "cache", **ev["train_config"], init_from=str(tmp_path / "fresh"))
    summary = train(cfg_, tmp_path / "run")
    assert summary["complete"] and summary["params"] == ev["params_after"]


def test_width_staged_optimizer_halves_and_quarters(runs, corpus, tmp_path):
    src = runs / "transformer_pp/checkpoint"
    old = read_optimizer_state(src)
    to = dict(d_model=128, n_heads=8)  # k = 2 residual copies, c = 2 head copies, SwiGLU 192 -> 384 (2 copies)
    ev = grow_checkpoint(src, tmp_path / "staged", method="width", to=to, optimizer="staged")
    assert ev["gap"]["rel_logit_change"] < 1e-5
    grow_checkpoint(src, tmp_path / "carry", method="width", to=to, optimizer="carry")
    staged, carry = read_optimizer_state(tmp_path / "staged"), read_optimizer_state(tmp_path / "carry")
    w2, w2_old = staged["blocks.0.ffn.w2.weight"], old["blocks.0.ffn.w2.weight"]  # (2d, 2f) from (d, f)
    for rows in (slice(0, 64), slice(64, 128)):
        for cols in (slice(0, 192), slice(192, 384)):
            assert torch.allclose(w2["exp_avg"][rows, cols], w2_old["exp_avg"] / 2)
            assert torch.allclose(w2["exp_avg_sq"][rows, cols], w2_old["exp_avg_sq"] / 4)
            assert torch.equal(carry["blocks.0.ffn.w2.weight"]["exp_avg"][rows, cols], w2_old["exp_avg"])
    emb, emb_old = staged["tok_emb.weight"], old["tok_emb.weight"]
    assert torch.allclose(emb["exp_avg"][:, 64:], emb_old["exp_avg"] / 2) and emb["step"] == emb_old["step"]
    # the tied head reads the cloned stream through norm_f / 2: that weight's gradient is unchanged
    assert torch.allclose(staged["norm_f.weight"]["exp_avg"][64:], old["norm_f.weight"]["exp_avg"])
    cfg_ = run_config(corpus, tmp_path / "cache", **ev["train_config"], init_from=str(tmp_path / "staged"))
    assert train(cfg_, tmp_path / "run")["complete"]


def test_incompatible_growth_fails_with_one_clear_line(runs, tmp_path):
    src = runs / "tokenformer"
    cases = [
        (dict(method="tokens", to_preset="small"), "token growth changes only"),
        (dict(method="width", to={"d_model": 128}), "width growth is implemented for transformer_pp"),
        (dict(method="gstack", to={"n_layers": 3}), "not a multiple of the source depth 2"),
        (dict(method="gstack", to={"n_layers": 4, "d_model": 128}), "G_stack changes only the depth"),
        (dict(method="tokens", to={"ffn_hidden": 128}), "cannot shrink"),
        (dict(method="tokens", to_preset="tf150m"), "unknown preset"),
        (dict(method="tokens", to=TOKENS, optimizer="staged"), "staged"),
        (dict(method="gstack", to={"n_layers": 4}, init="zero"), "token growth only"),
        (dict(method="tokens", to={"vocab_size": 512}), "follow the source"),
    ]
    for kw, message in cases:
        with pytest.raises(GrowthError, match=message) as e:
            grow_checkpoint(src, tmp_path / "x", **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(GrowthError, match="n_heads"):
        grow_checkpoint(runs / "transformer_pp", tmp_path / "x", method="width", to={"d_model": 128, "n_heads": 16})
    assert not (tmp_path / "x").exists()
    grow_checkpoint(src, tmp_path / "y", method="gstack", to={"n_layers": 4})
    with pytest.raises(GrowthError, match="already exists"):
        grow_checkpoint(src, tmp_path / "y", method="gstack", to={"n_layers": 4})
    grow_checkpoint(src, tmp_path / "y", method="gstack", to={"n_layers": 6}, overwrite=True)
    assert read_state(tmp_path / "y")["model_config"]["n_layers"] == 6


def test_cli_grow(runs, tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "harness", "grow", *args], capture_output=True, text=True,
                              cwd=tmp_path, env=env)

    ok = cli(str(runs / "transformer_pp"), "--set", "n_layers=4", "--method", "gstack_identity",
             "--out", str(tmp_path / "g"))
    assert ok.returncode == 0, ok.stderr
    event = json.loads(ok.stdout)
    assert event["from"]["params"] < event["to"]["params"] and event["gap"]["rel_logit_change"] < 1e-5
    bad = cli(str(runs / "transformer_pp"), "--to", "small", "--method", "gstack", "--out", str(tmp_path / "h"))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "G_stack" in bad.stderr


def test_grow_model_dispatch_rejects_unknown_method():
    with pytest.raises(GrowthError, match="method"):
        grow_model(build("transformer_pp"), cfg("transformer_pp"), "deeper")


def test_staged_training_carries_one_schedule_through_growth(corpus, tmp_path):
    """Staged Training (arXiv 2203.06211): the base stops half-way through one 8-step schedule
    (schedule.horizon_tokens), width growth carries the scaled Adam state and the step (schedule=continue), and
    the grown run trains its own 4 steps from there. The learning rates of the two stages, step by step, are
    those of an ungrown 8-step run (an independent run of the same loop, no horizon), and compute adds up."""
    sched = {"kind": "cosine", "warmup_fraction": 0.25, "min_lr_ratio": 0.1}
    tokens_per_step = 4 * 32
    lrs = lambda path: [m["lr"] for m in map(json.loads, (path / "metrics.jsonl").read_text().splitlines())
                        if "lr" in m]
    whole = tmp_path / "whole"
    train(run_config(corpus, tmp_path / "cache", model="transformer_pp", budget={"steps": 8}, log_every=1,
                     schedule=sched), whole)
    base_cfg = run_config(corpus, tmp_path / "cache", model="transformer_pp", budget={"steps": 4}, log_every=1,
                          schedule={**sched, "horizon_tokens": 8 * tokens_per_step})
    base = train(base_cfg, tmp_path / "base")
    ev = grow_checkpoint(tmp_path / "base", tmp_path / "grown", method="width", to={"d_model": 128, "n_heads": 8},
                         optimizer="staged", schedule="continue")
    assert ev["step"] == 4 and read_state(tmp_path / "grown")["config"]["schedule"] == base_cfg.schedule.__dict__
    grown = train(run_config(corpus, tmp_path / "cache", **ev["train_config"], budget={"steps": 4}, log_every=1,
                             schedule=base_cfg.schedule.__dict__, init_from=str(tmp_path / "grown")),
                  tmp_path / "run")
    assert lrs(tmp_path / "base") + lrs(tmp_path / "run") == pytest.approx(lrs(whole), rel=1e-12)
    assert len(lrs(whole)) == 8 and lrs(whole)[3] > lrs(whole)[-1]  # growth sits mid-decay, not at a restart
    assert grown["steps"] == 8 and grown["complete"] and grown["tokens"] == 4 * tokens_per_step
    assert grown["cumulative_flops"] == pytest.approx(base["flops"] + grown["flops"])
