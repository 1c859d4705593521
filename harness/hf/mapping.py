"""Harness <-> Hugging Face: the config fields and weight names of each target class, both directions.

    transformer_pp -> LlamaForCausalLM     gpt2   -> GPT2LMHeadModel
    mamba          -> MambaForCausalLM     mamba2 -> Mamba2ForCausalLM
    tokenformer    -> TokenFormerForCausalLM (harness/hf/tokenformer_hf.py, shipped as remote code)

Rotary needs no q/k permutation: models/components.Rotary and HF Llama both use the GPT-NeoX halves layout
(rotate_half on a (d/2, d/2) split, cos = cat(freqs, freqs), inv_freq = base^(-2i/d)); the permutation in
HF's convert_llama_weights_to_hf exists only for Meta's interleaved checkpoints. Configs a stock class cannot
represent are refused with an HFError naming the field; nothing is approximated.
"""
from __future__ import annotations

import math
import re

import torch

from models import registry

CLASSES = {"transformer_pp": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "mamba": "MambaForCausalLM",
           "mamba2": "Mamba2ForCausalLM", "tokenformer": "TokenFormerForCausalLM"}
MODEL_TYPES = {"llama": "transformer_pp", "gpt2": "gpt2", "mamba": "mamba", "mamba2": "mamba2",
               "tokenformer_bench": "tokenformer"}
# tensors a checkpoint may hold that are not weights: causal-mask and rotary buffers of older versions
IGNORABLE = re.compile(r"(\.attn\.(masked_)?bias|rotary_emb\.inv_freq)$")
MAMBA_CONTEXT = 2048  # the released Mamba models' training context (no Mamba config file states it)


class HFError(ValueError):
    """A config or checkpoint that cannot be converted; the message names the field or file."""


def _require(cfg, target: str, **wanted) -> None:
    for field, value in wanted.items():
        got = getattr(cfg, field)
        if got != value:
            raise HFError(f"config field {field}={got!r}: {target} needs {field}={value!r}; this model cannot be "
                          f"exported to it")


# ------------------------------------------------------------------------------------------ harness -> HF
def hf_config(name: str, cfg, scale_tokens: dict | None = None) -> dict:
    """Keyword arguments of the target class's config for a harness config (HFError if unrepresentable)."""
    if name not in CLASSES:
        raise HFError(f"model {name!r}: no Hugging Face class for it (exportable: {', '.join(CLASSES)})")
    if name == "transformer_pp":
        _require(cfg, "LlamaForCausalLM", projection="linear", ffn="swiglu", norm="rmsnorm", norm_affine=True,
                 final_norm_affine=True, positions="rope", rotary_fraction=1.0)
        if (cfg.d_model // cfg.n_heads) % 2:
            raise HFError(f"config field n_heads={cfg.n_heads}: head dim {cfg.d_model // cfg.n_heads} is odd "
                          f"(Llama rotary needs an even head dim)")
        return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
                    num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                    num_key_value_heads=cfg.n_heads, head_dim=cfg.d_model // cfg.n_heads, hidden_act="silu",
                    max_position_embeddings=cfg.max_seq_len, initializer_range=cfg.init_std,
                    rms_norm_eps=cfg.norm_eps, rope_theta=float(cfg.rope_base), attention_bias=cfg.bias,
                    mlp_bias=cfg.bias, tie_word_embeddings=cfg.tied_embeddings)
    if name == "gpt2":
        _require(cfg, "GPT2LMHeadModel", projection="linear", ffn="gelu_mlp", norm="layernorm", norm_affine=True,
                 norm_bias=True, final_norm_affine=True, final_norm_bias=True, positions="learned", bias=True)
        return dict(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                    n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.ffn_hidden,
                    activation_function="gelu_pytorch_tanh" if cfg.gelu_approximate == "tanh" else "gelu",
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps,
                    initializer_range=cfg.init_std, tie_word_embeddings=cfg.tied_embeddings)
    if name in ("mamba", "mamba2"):
        # HF has no vocabulary padding: its vocab_size is the embedding's (padded) row count
        common = dict(vocab_size=cfg.padded_vocab_size, hidden_size=cfg.d_model, state_size=cfg.d_state,
                      num_hidden_layers=cfg.n_layer, layer_norm_epsilon=cfg.norm_eps, expand=cfg.expand,
                      conv_kernel=cfg.d_conv, use_bias=False, use_conv_bias=True, hidden_act="silu",
                      initializer_range=cfg.initializer_range, residual_in_fp32=cfg.residual_in_fp32,
                      time_step_min=cfg.dt_min, time_step_max=cfg.dt_max, time_step_floor=cfg.dt_init_floor,
                      tie_word_embeddings=True)
        if name == "mamba":
            return dict(common, time_step_rank=cfg.time_step_rank)
        return dict(common, num_heads=cfg.nheads, head_dim=cfg.headdim, n_groups=cfg.ngroups,
                    chunk_size=cfg.chunk_size, time_step_limit=[0.0, float("inf")])
    _require(cfg, "TokenFormerForCausalLM", projection="pattention", ffn="pattention", positions="rope")
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, qkv_slot_num=cfg.qkv_tokens, proj_slot_num=cfg.proj_tokens,
                ffn_slot_num=cfg.ffn_hidden, norm_activation_type=cfg.pattention_norm,
                rotary_pct=cfg.rotary_fraction, rotary_emb_base=float(cfg.rope_base),
                max_position_embeddings=cfg.max_seq_len, norm=cfg.norm, norm_affine=cfg.norm_affine,
                norm_bias=cfg.norm_bias, final_norm_affine=cfg.final_norm_affine,
                final_norm_bias=cfg.final_norm_bias, layer_norm_eps=cfg.norm_eps, initializer_range=cfg.init_std,
                pattention_scale_tokens=dict(scale_tokens or {}), tie_word_embeddings=cfg.tied_embeddings)


def _renames(name: str, cfg) -> list[tuple[str, str]]:
    """(harness name, HF name) of every stored tensor, for the targets that only rename (all but GPT-2)."""
    if name == "transformer_pp":
        pairs = [("tok_emb.weight", "model.embed_tokens.weight"), ("norm_f.weight", "model.norm.weight")]
        suffixes = ("weight", "bias") if cfg.bias else ("weight",)
        for i in range(cfg.n_layers):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            pairs += [(b + "norm1.weight", h + "input_layernorm.weight"),
                      (b + "norm2.weight", h + "post_attention_layernorm.weight")]
            for ours, theirs in (("attn.wq", "self_attn.q_proj"), ("attn.wk", "self_attn.k_proj"),
                                 ("attn.wv", "self_attn.v_proj"), ("attn.wo", "self_attn.o_proj"),
                                 ("ffn.w1", "mlp.gate_proj"), ("ffn.w3", "mlp.up_proj"), ("ffn.w2", "mlp.down_proj")):
                pairs += [(f"{b}{ours}.{s}", f"{h}{theirs}.{s}") for s in suffixes]
        return pairs + ([] if cfg.tied_embeddings else [("lm_head.weight", "lm_head.weight")])
    # mamba, mamba2 (mamba-ssm's names; HF only says "embeddings"), tokenformer (the harness's own names)
    keys = registry.build_from_config(cfg, name, device="meta").state_dict().keys()
    tied = name != "tokenformer" or cfg.tied_embeddings
    return [(k, k.replace("backbone.embedding.", "backbone.embeddings.")) for k in keys
            if not (tied and k == "lm_head.weight")]


def _gpt2_layer(cfg, i: int):
    """(harness names, HF name, combine) of GPT-2's fused / transposed (Conv1D, (in, out)) tensors."""
    b, h = f"blocks.{i}.", f"transformer.h.{i}."
    qkv = [b + f"attn.{w}." for w in ("wq", "wk", "wv")]
    return [([n + "weight" for n in qkv], h + "attn.c_attn.weight", "cat_t"),
            ([n + "bias" for n in qkv], h + "attn.c_attn.bias", "cat"),
            ([b + "attn.wo.weight"], h + "attn.c_proj.weight", "t"), ([b + "attn.wo.bias"], h + "attn.c_proj.bias", ""),
            ([b + "ffn.fc.weight"], h + "mlp.c_fc.weight", "t"), ([b + "ffn.fc.bias"], h + "mlp.c_fc.bias", ""),
            ([b + "ffn.proj.weight"], h + "mlp.c_proj.weight", "t"), ([b + "ffn.proj.bias"], h + "mlp.c_proj.bias", "")]


def _gpt2_plain(cfg) -> list[tuple[str, str]]:
    pairs = [("tok_emb.weight", "transformer.wte.weight"), ("pos_emb.weight", "transformer.wpe.weight"),
             ("norm_f.weight", "transformer.ln_f.weight"), ("norm_f.bias", "transformer.ln_f.bias")]
    for i in range(cfg.n_layers):
        for n, hn in (("norm1", "ln_1"), ("norm2", "ln_2")):
            pairs += [(f"blocks.{i}.{n}.{s}", f"transformer.h.{i}.{hn}.{s}") for s in ("weight", "bias")]
    return pairs + ([] if cfg.tied_embeddings else [("lm_head.weight", "lm_head.weight")])


def to_hf_weights(name: str, cfg, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A harness state dict -> the target class's state dict (contiguous; a tied head is left to HF's tying)."""
    if name != "gpt2":
        return {theirs: sd[ours].contiguous() for ours, theirs in _renames(name, cfg)}
    out = {theirs: sd[ours].contiguous() for ours, theirs in _gpt2_plain(cfg)}
    for i in range(cfg.n_layers):
        for ours, theirs, how in _gpt2_layer(cfg, i):
            parts = [sd[k].t() if how.endswith("t") else sd[k] for k in ours]
            out[theirs] = (torch.cat(parts, dim=-1) if how.startswith("cat") else parts[0]).contiguous()
    return out


# ------------------------------------------------------------------------------------------ HF -> harness
def _get(hf: dict, key: str, where: str) -> torch.Tensor:
    """A tensor by its full name, or without the base-model prefix (checkpoints saved from the bare model)."""
    for k in (key, key.split(".", 1)[1] if key.split(".", 1)[0] in ("model", "transformer", "backbone") else key):
        if k in hf:
            return hf[k]
    raise HFError(f"{where}: no tensor {key}")


def from_hf_weights(name: str, cfg, hf: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The target class's tensors -> a harness state dict for ``cfg`` (tied head restored); every HF tensor
    must be used, except buffers and a tied head equal to the embedding."""
    used, sd = set(), {}

    def take(key):
        t = _get(hf, key, where)
        used.add(id(t))
        return t
    if name != "gpt2":
        for ours, theirs in _renames(name, cfg):
            sd[ours] = take(theirs)
    else:
        for ours, theirs in _gpt2_plain(cfg):
            sd[ours] = take(theirs)
        d = cfg.d_model
        for i in range(cfg.n_layers):
            for ours, theirs, how in _gpt2_layer(cfg, i):
                t = take(theirs)
                parts = t.split(d, dim=-1) if how.startswith("cat") else [t]
                for k, p in zip(ours, parts):
                    sd[k] = (p.t() if how.endswith("t") else p).contiguous()
    emb = "backbone.embedding.weight" if name in ("mamba", "mamba2") else "tok_emb.weight"
    if name in ("mamba", "mamba2") or cfg.tied_embeddings:
        head = next((hf[k] for k in ("lm_head.weight",) if k in hf), None)
        if head is not None:
            if not torch.equal(head, sd[emb]):
                raise HFError(f"{where}: lm_head.weight differs from the embedding, but the config ties them "
                              f"(tie_word_embeddings)")
            used.add(id(head))
        sd["lm_head.weight"] = sd[emb]
    extra = sorted(k for k, t in hf.items() if id(t) not in used and not IGNORABLE.search(k))
    if extra:
        raise HFError(f"{where}: tensor {extra[0]} has no place in a {name} model"
                      + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return sd


def decode_json(value):
    """config.json values as numbers: transformers 5 writes non-finite floats as {"__float__": "Infinity"}."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: decode_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_json(v) for v in value]
    return value


def _rope_theta(hf: dict) -> float:
    rp = hf.get("rope_parameters") or {}
    return float(rp.get("rope_theta", hf.get("rope_theta", 10000.0)))


def from_hf_config(hf: dict, where: str):
    """A config.json (dict) -> (harness model name, config, held pattention token counts)."""
    mtype = hf.get("model_type")
    if mtype not in MODEL_TYPES:
        raise HFError(f"{where}: model_type {mtype!r} is not one of {', '.join(MODEL_TYPES)}")
    name = MODEL_TYPES[mtype]

    def need(field, ok, value):
        if not ok:
            raise HFError(f"{where}: config field {field}={value!r} has no harness {name} equivalent")
    scale = {}
    if name == "transformer_pp":
        d, h = hf["hidden_size"], hf["num_attention_heads"]
        need("num_key_value_heads", hf.get("num_key_value_heads") in (None, h), hf.get("num_key_value_heads"))
        need("head_dim", hf.get("head_dim") in (None, d // h), hf.get("head_dim"))
        need("hidden_act", hf.get("hidden_act", "silu") == "silu", hf.get("hidden_act"))
        need("rope_scaling", not hf.get("rope_scaling"), hf.get("rope_scaling"))
        rp = hf.get("rope_parameters") or {}
        need("rope_parameters.rope_type", rp.get("rope_type", "default") == "default", rp.get("rope_type"))
        prf = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        need("partial_rotary_factor", prf == 1.0, prf)
        bias = bool(hf.get("attention_bias", False))
        need("mlp_bias", bool(hf.get("mlp_bias", False)) == bias, hf.get("mlp_bias"))
        fields = dict(n_layers=hf["num_hidden_layers"], d_model=d, n_heads=h, ffn_hidden=hf["intermediate_size"],
                      vocab_size=hf["vocab_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
                      norm_eps=hf.get("rms_norm_eps", 1e-6), rope_base=_rope_theta(hf), bias=bias,
                      tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
                      init_std=hf.get("initializer_range", 0.02))
    elif name == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        need("activation_function", act in ("gelu_new", "gelu_pytorch_tanh", "gelu"), act)
        need("scale_attn_weights", hf.get("scale_attn_weights", True), hf.get("scale_attn_weights"))
        need("scale_attn_by_inverse_layer_idx", not hf.get("scale_attn_by_inverse_layer_idx"), True)
        d = hf["n_embd"]
        fields = dict(n_layers=hf["n_layer"], d_model=d, n_heads=hf["n_head"], ffn_hidden=hf.get("n_inner") or 4 * d,
                      vocab_size=hf["vocab_size"], max_seq_len=hf.get("n_positions", 1024),
                      gelu_approximate="none" if act == "gelu" else "tanh", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                      tied_embeddings=bool(hf.get("tie_word_embeddings", True)), init_std=hf.get("initializer_range", 0.02))
    elif name in ("mamba", "mamba2"):
        need("use_bias", not hf.get("use_bias", False), hf.get("use_bias"))
        need("use_conv_bias", hf.get("use_conv_bias", True), hf.get("use_conv_bias"))
        need("hidden_act", hf.get("hidden_act", "silu") == "silu", hf.get("hidden_act"))
        need("tie_word_embeddings", hf.get("tie_word_embeddings", True), hf.get("tie_word_embeddings"))
        V = hf["vocab_size"]
        default_pad = registry.get_config(name).pad_vocab_size_multiple
        fields = dict(vocab_size=V, pad_vocab_size_multiple=default_pad if V % default_pad == 0 else 1,
                      d_model=hf["hidden_size"], n_layer=hf["num_hidden_layers"], d_state=hf["state_size"],
                      d_conv=hf.get("conv_kernel", 4), expand=hf.get("expand", 2),
                      norm_eps=hf.get("layer_norm_epsilon", 1e-5), residual_in_fp32=hf.get("residual_in_fp32", True),
                      dt_min=hf.get("time_step_min", 1e-3), dt_max=hf.get("time_step_max", 0.1),
                      dt_init_floor=hf.get("time_step_floor", 1e-4), initializer_range=hf.get("initializer_range", 0.02),
                      max_seq_len=MAMBA_CONTEXT)
        if name == "mamba":
            rank = hf.get("time_step_rank", "auto")  # "auto" (and its value) is ceil(d / 16): the harness's 0
            fields["dt_rank"] = 0 if rank in ("auto", math.ceil(fields["d_model"] / 16)) else int(rank)
        else:
            limit = [float(x) for x in hf.get("time_step_limit", (0.0, float("inf")))]
            need("time_step_limit", limit == [0.0, float("inf")], limit)  # the harness never clamps dt
            need("num_heads", hf["num_heads"] * hf["head_dim"] == fields["expand"] * fields["d_model"], hf["num_heads"])
            fields.update(headdim=hf["head_dim"], ngroups=hf.get("n_groups", 1), chunk_size=hf.get("chunk_size", 256))
    else:
        fields = dict(n_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"], n_heads=hf["num_attention_heads"],
                      qkv_tokens=hf["qkv_slot_num"], proj_tokens=hf["proj_slot_num"], ffn_hidden=hf["ffn_slot_num"],
                      pattention_norm=hf.get("norm_activation_type", "l2_norm_gelu"),
                      rotary_fraction=hf.get("rotary_pct", 0.25), rope_base=hf.get("rotary_emb_base", 10000.0),
                      max_seq_len=hf.get("max_position_embeddings", 2048), vocab_size=hf["vocab_size"],
                      norm=hf.get("norm", "layernorm"), norm_affine=hf.get("norm_affine", False),
                      norm_bias=hf.get("norm_bias", False), final_norm_affine=hf.get("final_norm_affine", True),
                      final_norm_bias=hf.get("final_norm_bias", True), norm_eps=hf.get("layer_norm_eps", 1e-5),
                      tied_embeddings=bool(hf.get("tie_word_embeddings", True)), init_std=hf.get("initializer_range", 0.02))
        scale = {k: int(v) for k, v in (hf.get("pattention_scale_tokens") or {}).items()}
    return name, make_config(name, fields, where), scale


def make_config(name: str, fields: dict, where) -> object:
    """The harness config of ``fields``. Attention models start from a preset (it sets the component choices
    of the architecture); Mamba configs from their class defaults, which are mamba-ssm's mixer defaults -- a
    release's empty ssm_cfg means those, never the tiny preset's sizes."""
    try:
        if name in ("mamba", "mamba2"):
            return registry.get(name).config_cls(**fields)
        return registry.get_config(name, None, **fields)
    except (registry.UnknownModelError, ValueError, TypeError) as e:
        raise HFError(f"{where}: {e}") from None
