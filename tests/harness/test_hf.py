"""Hugging Face export / import (harness.hf), mamba-ssm and official TokenFormer release import.

Every model is a tiny registry preset with perturbed weights; nothing is downloaded (HF_HUB_OFFLINE is set
before transformers is imported, and every load is from a local directory).
"""
import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from harness.cli import main  # noqa: E402
from harness.hf import HFError, export_checkpoint, import_checkpoint  # noqa: E402
from harness.train.checkpoint import load_model_from_checkpoint, read_state, save_checkpoint  # noqa: E402
from models import registry  # noqa: E402
from models.pattention import scale_tokens_of  # noqa: E402
from tests.fixtures import trained_like as _trained_like

ARCHS = ["transformer_pp", "gpt2", "mamba", "mamba2", "tokenformer"]
CLASS = {"transformer_pp": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "mamba": "MambaForCausalLM",
         "mamba2": "Mamba2ForCausalLM", "tokenformer": "TokenFormerForCausalLM"}


def trained_like(model, scale=0.1, seed=1):
    """Larger perturbations than the growth tests': greedy decoding must not collapse."""
    return _trained_like(model, scale, seed)


def build(name, **kw):
    return trained_like(registry.build(name, "tiny", **kw))


def run_dir(tmp_path, name, model, tokenizer="byte"):
    """A run directory holding checkpoint/, as the training loop writes it."""
    run = tmp_path / f"run-{name}"
    save_checkpoint(run / "checkpoint", model, None, {
        "step": 5, "model_name": name, "model_config": model.config.to_dict(),
        "pattention_scale_tokens": scale_tokens_of(model),
        "config": {"model": name, "preset": "tiny", "data": {"tokenizer": tokenizer}}})
    return run


def hf_load(path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()


def greedy(model, prompt, n):
    """The harness's cached decoding: a prefill, then one token per step."""
    cache = model.allocate_cache(prompt.shape[0], prompt.shape[1] + n)
    logits, out = model.step(prompt, cache), []
    for _ in range(n):
        out.append(logits[:, -1].argmax(-1, keepdim=True))
        logits = model.step(out[-1], cache)
    return torch.cat(out, dim=1)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", ARCHS)
def test_export_loads_in_the_stock_class_with_the_same_logits_and_decode(tmp_path, name):
    model = build(name)
    summary = export_checkpoint(run_dir(tmp_path, name, model), tmp_path / "hf")
    assert summary["class"] == CLASS[name] and (name == "tokenformer") == ("modeling_tokenformer.py" in summary["files"])
    hf = hf_load(tmp_path / "hf")
    assert type(hf).__name__ == CLASS[name]
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
        assert theirs.shape == ours.shape  # tiny vocab 512 is its own padding: HF sees the same rows
        assert (ours - theirs).abs().max() < 1e-4
        prompt = x[:, :8]
        decoded = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                              pad_token_id=0)[:, 8:]
        assert torch.equal(decoded, greedy(model, prompt, 8))


@pytest.mark.parametrize("name", ARCHS)
def test_import_of_export_round_trips_weights_and_config_bit_exactly(tmp_path, name):
    pytest.importorskip("transformers")
    # mamba at vocab 500: HF sees the padded 504 rows; the harness block in config.json restores 500
    model = build(name, **({"vocab_size": 500} if name == "mamba" else {}))
    export_checkpoint(run_dir(tmp_path, name, model), tmp_path / "hf")
    summary = import_checkpoint(tmp_path / "hf", tmp_path / "back", "hf")
    back, state = load_model_from_checkpoint(tmp_path / "back")
    assert back.config == model.config and same_weights(back, model)
    assert state["step"] == 0 and state["config"]["data"]["tokenizer"] == "byte" == summary["tokenizer"]


@pytest.mark.parametrize("name", ARCHS)
def test_hf_directory_without_the_harness_block_imports_from_the_stock_fields(tmp_path, name):
    """What a hub model looks like: config.json of the stock class only (and its own tokenizer.json)."""
    pytest.importorskip("transformers")
    model = build(name)
    export_checkpoint(run_dir(tmp_path, name, model), tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "harness"}))
    summary = import_checkpoint(tmp_path / "hf", tmp_path / "back", "hf")
    back, state = load_model_from_checkpoint(tmp_path / "back")
    # HF Mamba configs carry no context length: the released models' 2048
    want = dataclasses.replace(model.config, max_seq_len=2048) if name.startswith("mamba") else model.config
    assert back.config == want and same_weights(back, model)
    copied = tmp_path / "back" / "tokenizer.json"  # no named tokenizer: the source's file travels along
    assert copied.is_file() and state["config"]["data"]["tokenizer"] == str(copied.resolve()) == summary["tokenizer"]


def test_imported_checkpoint_evaluates_through_the_lm_eval_adapter(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("lm_eval")
    from harness.evaluate.adapter import HarnessLM
    from harness.preflight import check_eval_request
    model = build("mamba")
    export_checkpoint(run_dir(tmp_path, "mamba", model), tmp_path / "hf")
    import_checkpoint(tmp_path / "hf", tmp_path / "ckpt", "hf")
    check_eval_request(tmp_path / "ckpt", "cpu", "4", None, 0)
    lm = HarnessLM(checkpoint=str(tmp_path / "ckpt"), batch_size=4)
    assert lm.tok_encode("héllo") == list("héllo".encode()) and lm.max_length == 128 and lm.eot_token_id == 256


def test_grown_tokenformer_keeps_its_held_sqrt_n_through_export_and_import(tmp_path):
    from harness.grow import grow_tokens
    old = build("tokenformer")
    target = registry.get_config("tokenformer", "tiny", qkv_tokens=96, proj_tokens=96, ffn_hidden=384)
    grown = trained_like(grow_tokens(old, target, init="preserving").model, scale=0.0)
    held = scale_tokens_of(grown)
    assert held  # preserving growth holds sqrt(n) at the old counts: the exported class must too
    export_checkpoint(run_dir(tmp_path, "tokenformer", grown), tmp_path / "hf")
    x = torch.randint(0, 512, (2, 16))
    from harness.hf.tokenformer_hf import TokenFormerForCausalLM  # the plain import, no remote code
    plain = TokenFormerForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        assert (plain(x).logits - grown(x)).abs().max() < 1e-4
    import_checkpoint(tmp_path / "hf", tmp_path / "back", "hf")
    back, state = load_model_from_checkpoint(tmp_path / "back")
    assert state["pattention_scale_tokens"] == held and same_weights(back, grown)
    with torch.no_grad():
        assert torch.equal(back(x), grown(x))


def test_exported_byte_tokenizer_is_the_harness_byte_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    export_checkpoint(run_dir(tmp_path, "gpt2", build("gpt2")), tmp_path / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "Héllo wörld, ∑ 😀\n  end"
    assert tok(text)["input_ids"] == list(text.encode("utf-8"))
    assert tok.decode(list(text.encode("utf-8"))) == text and tok.eos_token_id == 256
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 256


def test_export_without_tokenizer_files_says_so(tmp_path):
    pytest.importorskip("transformers")
    summary = export_checkpoint(run_dir(tmp_path, "mamba", build("mamba"), tokenizer=str(tmp_path / "none.json")),
                                tmp_path / "hf")
    assert "no tokenizer files" in summary["tokenizer"] and "tokenizer.json" not in summary["files"]


def test_imported_checkpoint_trains_with_init_from(tmp_path, corpus):
    pytest.importorskip("transformers")
    from harness.config import TrainConfig, from_dict
    from harness.train.loop import build_model_config, train
    from tests.fixtures import tiny_train_config
    model = build("transformer_pp", vocab_size=320)
    export_checkpoint(run_dir(tmp_path, "transformer_pp", model), tmp_path / "hf")
    summary = import_checkpoint(tmp_path / "hf", tmp_path / "ckpt", "hf")
    run = from_dict(TrainConfig, read_state(tmp_path / "ckpt")["config"])
    assert build_model_config(run, 257)[0] == model.config  # the run config rebuilds exactly this model
    cfg = tiny_train_config(corpus, tmp_path / "cache", model=summary["model"], preset=summary["preset"],
                            model_overrides=summary["model_overrides"], init_from=str(tmp_path / "ckpt"),
                            budget={"steps": 1})
    assert train(cfg, tmp_path / "train")["steps"] == 1


# ------------------------------------------------------------------------------------------- refusals
def test_export_refuses_what_the_stock_class_cannot_represent(tmp_path, capsys):
    run = run_dir(tmp_path, "transformer_pp", build("transformer_pp", projection="pattention"))
    assert main(["export", str(run), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "projection='pattention'" in err and "LlamaForCausalLM" in err
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.exporting").exists()
    for argv, word in ((["export", str(run), "--to", "onnx", "--out", str(tmp_path / "x")], "--to"),
                       (["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")], "missing"),
                       (["import", str(run), "--from", "keras", "--out", str(tmp_path / "x")], "--from"),
                       (["import", str(tmp_path / "missing"), "--from", "hf", "--out", str(tmp_path / "x")], "missing"),
                       (["import", str(run), "--from", "hf", "--out", str(tmp_path / "x")], "config.json")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and word in err, err
        assert not (tmp_path / "x").exists()


def test_import_refuses_a_hf_config_the_harness_cannot_represent(tmp_path):
    pytest.importorskip("transformers")
    export_checkpoint(run_dir(tmp_path, "transformer_pp", build("transformer_pp")), tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_key_value_heads": 2}))
    with pytest.raises(HFError, match="num_key_value_heads=2"):
        import_checkpoint(tmp_path / "hf", tmp_path / "back", "hf")
    assert not (tmp_path / "back").exists()


# -------------------------------------------------------------------------------------------- mamba-ssm
# (model, its build overrides, the release's ssm_cfg); an ssm_cfg that names nothing means mamba-ssm's
# defaults (Mamba-2: d_state 128, headdim 64, chunk 256), never the tiny preset's sizes
MAMBA_SSM = {"mamba": ("mamba", {}, {}),
             "mamba2": ("mamba2", {}, {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 32}),
             "mamba2-defaults": ("mamba2", dict(d_state=128, headdim=64, chunk_size=256), {"layer": "Mamba2"})}


def write_mamba_ssm(path, model, ssm_cfg, **over):
    """A release directory as mamba-ssm's save_pretrained writes it: config.json + pytorch_model.bin, the
    tokenizer's (unpadded) vocab_size, and the state dict with mamba-ssm's names (tied head included)."""
    path.mkdir()
    cfg = model.config
    (path / "config.json").write_text(json.dumps({
        "d_model": cfg.d_model, "d_intermediate": 0, "n_layer": cfg.n_layer, "vocab_size": 500,
        "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True,
        "fused_add_norm": True, "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple, "tie_embeddings": True, **over}))
    torch.save(model.state_dict(), path / "pytorch_model.bin")


@pytest.mark.parametrize("case", list(MAMBA_SSM))
def test_mamba_ssm_release_imports_with_the_same_logits(tmp_path, case):
    name, kw, ssm_cfg = MAMBA_SSM[case]
    model = build(name, vocab_size=500, **kw)  # embedding padded to 504 (mamba) / 512 (mamba2), as the releases
    write_mamba_ssm(tmp_path / "release", model, ssm_cfg)
    summary = import_checkpoint(tmp_path / "release", tmp_path / "ckpt", "mamba_ssm")
    back, _ = load_model_from_checkpoint(tmp_path / "ckpt")
    # the imported vocabulary is the padded rows: mamba-ssm scores all of them
    assert back.config.vocab_size == model.config.padded_vocab_size and summary["tokenizer"] == "byte"
    assert dataclasses.replace(back.config, vocab_size=500, max_seq_len=128) == model.config
    x = torch.randint(0, 500, (2, 20))
    with torch.no_grad():
        assert torch.equal(back(x)[..., :500], model(x))


@pytest.mark.parametrize("over, field", [({"rms_norm": False}, "rms_norm"), ({"d_intermediate": 128}, "d_intermediate"),
                                         ({"ssm_cfg": {"bias": True}}, "ssm_cfg.bias"),
                                         ({"ssm_cfg": {"layer": "Mamba3"}}, "ssm_cfg.layer"),
                                         ({"ssm_cfg": {"d_staet": 8}}, "ssm_cfg.d_staet")])
def test_mamba_ssm_settings_the_harness_lacks_are_refused(tmp_path, capsys, over, field):
    write_mamba_ssm(tmp_path / "release", build("mamba", vocab_size=500), over.pop("ssm_cfg", {}), **over)
    assert main(["import", str(tmp_path / "release"), "--from", "mamba_ssm", "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err and not (tmp_path / "ckpt").exists()


# --------------------------------------------------------------------------------- official TokenFormer
L, D, HEADS, NQKV, NPROJ, NFFN, VOCAB = 2, 64, 4, 48, 40, 96, 384

NEOX_YAML = """# GPT-NeoX style, as configs/tokenformer/*_eval.yml (JSON-ish YAML, '#' comments, Python booleans)
{{
  "num_layers": {L},
  "hidden_size": {D},
  "num_attention_heads": {HEADS},
  "qkv_slot_num": {NQKV},
  "proj_slot_num": {NPROJ},
  "ffn_slot_num": {NFFN},
  "seq_length": 128,
  "max_position_embeddings": 128,
  "pos_emb": "{pos_emb}",
  "rotary_pct": {rotary_pct},
  "no_weight_tying": {untied},
  "norm": "{norm}",
  "final_norm": "layernorm",
  "attention_config": [[["{layer}"], {L}]],
  "norm_activation_type": "{act}", # "l2_norm_gelu", "gelu_l2_norm", "softmax"
  "tokenizer-type": "HFTokenizer",
  "checkpoint_validation_with_forward_pass": False,
}}
"""


def official_release(path, *, act="l2_norm_gelu", norm="layernorm_nonparam", untied=False, pos_emb="rotary",
                     rotary_pct=0.25, layer="tokenformer", yaml=True):
    """A synthetic official release: pytorch_model.bin with GPT-NeoX to_sequential() names + its NeoX YAML."""
    g = torch.Generator().manual_seed(3)

    def rnd(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std
    w = {"sequential.0.word_embeddings.weight": rnd(VOCAB, D, std=0.5)}
    for i in range(L):
        p = f"sequential.{i + 2}."
        for mod, n in (("attention.query", NQKV), ("attention.key", NQKV), ("attention.value", NQKV),
                       ("attention.proj", NPROJ), ("mlp", NFFN)):
            w[p + mod + ".key_param_tokens"] = rnd(n, D, std=0.1)
            w[p + mod + ".value_param_tokens"] = rnd(n, D, std=0.05)
        if norm == "layernorm":
            for ln in ("input_layernorm", "post_attention_layernorm"):
                w[p + ln + ".weight"], w[p + ln + ".bias"] = 1 + rnd(D), rnd(D)
    w[f"sequential.{L + 3}.norm.weight"], w[f"sequential.{L + 3}.norm.bias"] = 1 + rnd(D), rnd(D)
    if untied:
        w[f"sequential.{L + 4}.final_linear.weight"] = rnd(VOCAB, D, std=0.5)
    path.mkdir()
    torch.save(w, path / "pytorch_model.bin")
    if yaml:
        (path / "tokenformer_eval.yml").write_text(NEOX_YAML.format(
            L=L, D=D, HEADS=HEADS, NQKV=NQKV, NPROJ=NPROJ, NFFN=NFFN, act=act, norm=norm, pos_emb=pos_emb,
            rotary_pct=rotary_pct, untied="true" if untied else "false", layer=layer))
    return w


def official_forward(w, ids, act, affine_norm, untied):
    """The official model's math, written from its GPT-NeoX code (not from models/): [s, b, h] layout,
    Pattention without the harness's eps clamp, explicit masked softmax attention, NeoX partial rotary."""
    def pattention(x, prefix):
        k, v = w[prefix + ".key_param_tokens"], w[prefix + ".value_param_tokens"]
        s = x @ k.t()
        n = s.shape[-1]
        if act == "l2_norm_gelu":
            a = F.gelu(s / s.norm(p=2, dim=-1, keepdim=True) * math.sqrt(n))
        elif act == "gelu_l2_norm":
            a = F.gelu(s)
            a = a / a.norm(p=2, dim=-1, keepdim=True) * math.sqrt(n)
        else:
            e = torch.exp(s - s.amax(-1, keepdim=True))  # NeoX's exp(s) / ||exp(s)||_1 without its overflow
            a = e / e.norm(p=1, dim=-1, keepdim=True) * n
        return a @ v

    def layer_norm(x, prefix=None):
        wt = (w[prefix + ".weight"], w[prefix + ".bias"]) if prefix else (None, None)
        return F.layer_norm(x, (D,), *wt, eps=1e-5)
    hn = D // HEADS
    rot = int(hn * 0.25)
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    emb = torch.cat([torch.outer(torch.arange(ids.shape[1]).float(), inv)] * 2, dim=-1)
    cos, sin = emb.cos()[:, None, None, :], emb.sin()[:, None, None, :]   # (s, 1, 1, rot)

    def rotary(t):  # (s, b, np, hn)
        r, keep = t[..., :rot], t[..., rot:]
        half = torch.cat([-r[..., rot // 2:], r[..., :rot // 2]], dim=-1)
        return torch.cat([r * cos + half * sin, keep], dim=-1)
    x = w["sequential.0.word_embeddings.weight"][ids].transpose(0, 1)     # (s, b, h)
    S, B = x.shape[:2]
    mask = torch.ones(S, S, dtype=torch.bool).triu(1)
    for i in range(L):
        p = f"sequential.{i + 2}."
        h = layer_norm(x, p + "input_layernorm" if affine_norm else None)
        q, k, v = (pattention(h, p + f"attention.{m}").view(S, B, HEADS, hn) for m in ("query", "key", "value"))
        q, k = rotary(q), rotary(k)
        scores = torch.einsum("sbnh,tbnh->bnst", q, k) / math.sqrt(hn)
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
        ctx = torch.einsum("bnst,tbnh->sbnh", probs, v).reshape(S, B, D)
        x = x + pattention(ctx, p + "attention.proj")
        x = x + pattention(layer_norm(x, p + "post_attention_layernorm" if affine_norm else None), p + "mlp")
    x = layer_norm(x, f"sequential.{L + 3}.norm")
    head = w[f"sequential.{L + 4}.final_linear.weight"] if untied else w["sequential.0.word_embeddings.weight"]
    return (x @ head.t()).transpose(0, 1)                                  # (b, s, V)


@pytest.mark.parametrize("act, norm, untied", [("l2_norm_gelu", "layernorm_nonparam", False),
                                               ("softmax", "layernorm", True), ("gelu_l2_norm", "layernorm_nonparam", False)])
def test_official_tokenformer_release_imports_and_matches_the_official_math(tmp_path, capsys, act, norm, untied):
    w = official_release(tmp_path / "release", act=act, norm=norm, untied=untied)
    assert main(["import", str(tmp_path / "release"), "--from", "tokenformer", "--out", str(tmp_path / "ckpt")]) == 0
    summary = json.loads(capsys.readouterr().out)
    model, state = load_model_from_checkpoint(tmp_path / "ckpt")
    cfg = model.config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.qkv_tokens, cfg.proj_tokens, cfg.ffn_hidden) == (L, D, HEADS, NQKV, NPROJ, NFFN)
    assert cfg.pattention_norm == act and cfg.rotary_fraction == 0.25 and cfg.tied_embeddings == (not untied)
    assert torch.equal(model.blocks[1].attn.wo.key_param_tokens, w["sequential.3.attention.proj.key_param_tokens"])
    assert torch.equal(model.blocks[0].ffn.value_param_tokens, w["sequential.2.mlp.value_param_tokens"])
    assert summary["model"] == "tokenformer" and state["imported"]["format"] == "tokenformer"
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model(ids) - official_forward(w, ids, act, norm == "layernorm", untied)).abs().max() < 1e-4


@pytest.mark.parametrize("kw, field", [({"pos_emb": "learned"}, "pos_emb"), ({"norm": "rmsnorm"}, "norm"),
                                       ({"act": "relu_l1"}, "norm_activation_type"),
                                       ({"rotary_pct": 0.2}, "rotary_pct"),  # head dim 16: int(3.2) = 3, odd
                                       ({"layer": "global"}, "attention_config"), ({"yaml": False}, "--config")])
def test_official_tokenformer_settings_the_harness_lacks_are_refused(tmp_path, capsys, kw, field):
    official_release(tmp_path / "release", **kw)
    assert main(["import", str(tmp_path / "release"), "--from", "tokenformer", "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err, err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.importing").exists()
