"""LLaMA Pro block expansion (method="expand", arXiv 2401.02415): layout, exactness, trainability, checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from harness.cli import main
from harness.grow import (GrowthError, METHODS, expand_blocks, grow_checkpoint, grow_model, grow_tokens,
                          growth_gap, random_batch, read_optimizer_state)
from harness.train.checkpoint import load_model_from_checkpoint, read_state
from harness.train.loop import train
from models import registry
from tests.fixtures import tiny_train_config, trained_like

V = 320
# the residual-writing parameters of one block (relative names), per family: what a new block gets zeroed
ZEROED = {"transformer_pp": {"attn.wo.weight", "ffn.w2.weight"},
          "tokenformer": {"attn.wo.value_param_tokens", "ffn.value_param_tokens"},
          "gpt2": {"attn.wo.weight", "attn.wo.bias", "ffn.proj.weight", "ffn.proj.bias"},
          "mamba": {"mixer.out_proj.weight"}}
DEPTH = {"mamba": "n_layer"}


def build(name, **kw):
    return trained_like(registry.build(name, "tiny", vocab_size=V, **kw))


def cfg(name, **kw):
    return registry.get_config(name, "tiny", vocab_size=V, **kw)


def deeper(name, depth, **kw):
    return cfg(name, **{DEPTH.get(name, "n_layers"): depth}, **kw)


def same_params(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.fixture(scope="module")
def batch():
    return random_batch(V, 32)


# ------------------------------------------------------------------------------------------------- layout
def test_expand_2_to_4_layout_zeros_and_exactness(batch):
    """L = 2, L' = 4: P = 2 groups of one block; new blocks at 1 and 3, copies of old blocks 0 and 1."""
    old = build("transformer_pp")
    g = expand_blocks(old, deeper("transformer_pp", 4))
    new, small = g.model.block_modules(), old.block_modules()
    assert len(new) == 4 and g.info["new_blocks"] == [1, 3] and g.info["groups"] == 2
    assert g.info["function_preserving"] and "LLaMA Pro" in g.info["construction"]
    assert same_params(new[0], small[0]) and same_params(new[2], small[1])  # old blocks: 0 -> 0, 1 -> 2
    for pos, src in ((1, 0), (3, 1)):
        copied = dict(small[src].named_parameters())
        for n, p in new[pos].named_parameters():
            if n in ZEROED["transformer_pp"]:
                assert not p.any(), (pos, n)                       # wo, w2: exactly zero
                assert copied[n].abs().sum() > 0                   # (the source's are not)
            else:
                assert torch.equal(p, copied[n]), (pos, n)         # the rest: the group's last block
    # embeddings, final norm, head: copied
    for n in ("tok_emb.weight", "norm_f.weight"):
        assert torch.equal(dict(g.model.named_parameters())[n], dict(old.named_parameters())[n])
    gap = growth_gap(old, g.model, batch)
    assert gap["rel_logit_change"] < 1e-6, gap
    assert abs(gap["loss_after"] - gap["loss_before"]) < 1e-5
    # the plans say the same: zero=True exactly on the 2 x 2 zeroed projections, sources per LLaMA Pro
    assert sorted(k for k, p in g.plans.items() if p.zero) == [
        "blocks.1.attn.wo.weight", "blocks.1.ffn.w2.weight", "blocks.3.attn.wo.weight", "blocks.3.ffn.w2.weight"]
    assert g.plans["blocks.2.attn.wq.weight"].src == "blocks.1.attn.wq.weight"
    assert g.plans["blocks.3.ffn.w1.weight"].src == "blocks.1.ffn.w1.weight"


def test_expand_4_to_6_groups_of_two(batch):
    """L = 4, L' = 6: P = 2 groups [0, 1], [2, 3] -> [0, 1, 1', 2, 3, 3']."""
    old = build("transformer_pp", n_layers=4)
    g = expand_blocks(old, deeper("transformer_pp", 6))
    assert g.info["new_blocks"] == [2, 5] and g.info["block_sources"] == [0, 1, 1, 2, 3, 3]
    new, small = g.model.block_modules(), old.block_modules()
    for pos, src in ((0, 0), (1, 1), (3, 2), (4, 3)):
        assert same_params(new[pos], small[src]), pos
    for pos in (2, 5):
        assert not new[pos].attn.wo.weight.any() and not new[pos].ffn.w2.weight.any()
    assert torch.equal(new[5].ffn.w1.weight, small[3].ffn.w1.weight)
    assert growth_gap(old, g.model, batch)["rel_logit_change"] < 1e-6


@pytest.mark.parametrize("name", ["tokenformer", "gpt2", "mamba"])
def test_expand_other_families_is_exact(batch, name):
    old = build(name)
    g = grow_model(old, deeper(name, 4), "expand")
    assert g.info["new_blocks"] == [1, 3]
    gap = growth_gap(old, g.model, batch)
    assert gap["rel_logit_change"] < 1e-6, gap
    new, small = g.model.block_modules(), old.block_modules()
    for pos, src in ((1, 0), (3, 1)):
        copied = dict(small[src].named_parameters())
        zeroed = {n for n, p in new[pos].named_parameters() if not torch.equal(p, copied[n])}
        assert zeroed == ZEROED[name], (pos, zeroed)
        assert all(not p.any() for n, p in new[pos].named_parameters() if n in zeroed)


def test_expand_keeps_a_held_sqrt_n(batch):
    """After preserving token growth (sqrt(n) held at the old n) the copies hold the same n: still exact."""
    old = build("tokenformer")
    grown = grow_tokens(old, cfg("tokenformer", ffn_hidden=384), init="preserving").model
    g = expand_blocks(grown, cfg("tokenformer", ffn_hidden=384, n_layers=4))
    assert [b.ffn.scale_tokens for b in g.model.block_modules()] == [256] * 4
    assert growth_gap(old, g.model, batch)["rel_logit_change"] < 1e-5


# -------------------------------------------------------------------------------------------- trainability
def test_zeroed_projections_train(batch):
    """The identity init is trainable: the zero projections get gradients and move on the first AdamW step."""
    old = build("transformer_pp")
    model = expand_blocks(old, deeper("transformer_pp", 4)).model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    F.cross_entropy(model(batch)[:, :-1].flatten(0, 1), batch[:, 1:].flatten()).backward()
    for pos in (1, 3):
        blk = model.blocks[pos]
        for p in (blk.attn.wo.weight, blk.ffn.w2.weight):
            assert not p.any() and p.grad.abs().sum() > 0
    opt.step()
    for pos in (1, 3):
        blk = model.blocks[pos]
        assert blk.attn.wo.weight.abs().sum() > 0 and blk.ffn.w2.weight.abs().sum() > 0
        assert not same_params(blk, old.blocks[pos // 2])  # every block trains (pre-training growth)


# ------------------------------------------------------------------------------------------------- refusals
def test_expand_refusals_name_the_field():
    old = build("transformer_pp", n_layers=3)
    with pytest.raises(GrowthError, match=r"n_layers=3 is not divisible by 2") as e:  # 3 -> 5: P = 2
        expand_blocks(old, deeper("transformer_pp", 5))
    assert "\n" not in str(e.value)
    with pytest.raises(GrowthError, match="not more than"):
        expand_blocks(old, deeper("transformer_pp", 3))
    with pytest.raises(GrowthError, match="changes only the depth"):
        expand_blocks(old, cfg("transformer_pp", n_layers=4, d_model=128))
    with pytest.raises(GrowthError, match="keeps the architecture"):
        expand_blocks(old, deeper("mamba", 4))
    with pytest.raises(GrowthError, match="n_layer=2 is not divisible by 3"):  # mamba: its own field
        expand_blocks(build("mamba"), deeper("mamba", 5))
    assert "expand" in METHODS


# ------------------------------------------------------------------------------------ checkpoints and training
def run_config(corpus, cache, **kw):
    return tiny_train_config(corpus, cache, **{"budget": {"steps": 3}, "eval_every": 3, "eval_batches": 1, **kw})


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
    """A 3-step training checkpoint of tiny transformer_pp (2 layers)."""
    root = tmp_path_factory.mktemp("runs")
    train(run_config(corpus, root / "cache", model="transformer_pp"), root / "tpp")
    return root / "tpp"


def test_expand_checkpoint_carry_fresh_and_train_on(run, corpus, tmp_path):
    src = run / "checkpoint"
    old_opt = read_optimizer_state(src)
    ev = grow_checkpoint(src, tmp_path / "carry", method="expand", to={"n_layers": 4}, optimizer="carry")
    assert ev["method"] == "expand" and ev["function_preserving"] and ev["gap"]["rel_logit_change"] < 1e-6
    assert ev["info"]["new_blocks"] == [1, 3] and ev["changes"] == {"n_layers": [2, 4]}
    state = read_state(tmp_path / "carry")
    assert state["model_config"]["n_layers"] == 4 and state["step"] == 0 and state["data_position"] == 3
    # carry: copied entries keep their source's moments (new block 1 <- old 0, old 1 -> 2, new 3 <- old 1)
    moved = read_optimizer_state(tmp_path / "carry")
    for new, old in (("blocks.0.attn.wq.weight", "blocks.0.attn.wq.weight"),
                     ("blocks.1.attn.wq.weight", "blocks.0.attn.wq.weight"),
                     ("blocks.2.ffn.w2.weight", "blocks.1.ffn.w2.weight"),
                     ("blocks.3.ffn.w1.weight", "blocks.1.ffn.w1.weight")):
        assert moved[new]["step"] == old_opt[old]["step"] == 3
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moved[new][key], old_opt[old][key]), (new, key)
    for zeroed in ("blocks.1.attn.wo.weight", "blocks.1.ffn.w2.weight", "blocks.3.attn.wo.weight",
                   "blocks.3.ffn.w2.weight"):  # zeroed at growth: fresh Adam state
        assert moved[zeroed]["step"] == 0 and not moved[zeroed]["exp_avg"].any()
        assert not moved[zeroed]["exp_avg_sq"].any()
    # reloaded, the grown checkpoint computes the source's function
    old_model, _ = load_model_from_checkpoint(src)
    grown, _ = load_model_from_checkpoint(tmp_path / "carry")
    assert growth_gap(old_model, grown, random_batch(V, 32))["rel_logit_change"] < 1e-6
    assert not grown.blocks[3].attn.wo.weight.any()
    # fresh (through the CLI): no Adam state; the loop trains on from it
    assert main(["grow", str(run), "--set", "n_layers=4", "--method", "expand", "--out", str(tmp_path / "fresh")]) == 0
    assert read_optimizer_state(tmp_path / "fresh") == {}
    fresh_ev = read_state(tmp_path / "fresh")["growth"][-1]
    cfg_ = run_config(corpus, tmp_path / "cache", **fresh_ev["train_config"], init_from=str(tmp_path / "fresh"),
                      budget={"steps": 2}, eval_every=2)
    summary = train(cfg_, tmp_path / "run")
    assert summary["complete"] and summary["params"] == fresh_ev["params_after"]
    trained, _ = load_model_from_checkpoint(tmp_path / "run")
    assert trained.blocks[1].ffn.w2.weight.abs().sum() > 0  # the identity blocks trained
