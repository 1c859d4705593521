"""The two research releases the paper's comparison uses, read into harness configs and state dicts.

mamba-ssm (``state-spaces/mamba-*``, ``mamba2-*``): ``config.json`` (d_model, n_layer, vocab_size, ssm_cfg,
rms_norm, residual_in_fp32, fused_add_norm, pad_vocab_size_multiple[, d_intermediate, attn_layer_idx,
tie_embeddings]) + ``pytorch_model.bin`` keyed exactly as models/mamba.py (its layout was built to match).

Official TokenFormer (``Haiyang-W/TokenFormer-*``): ``pytorch_model.bin``, the state dict of GPT-NeoX's
to_sequential() model (``sequential.0.word_embeddings.weight``, ``sequential.{i+2}.attention.{query,key,value,
proj}.{key,value}_param_tokens``, ``sequential.{i+2}.mlp.*``, ``sequential.{L+3}.norm.{weight,bias}``), and the
NeoX YAML of configs/tokenformer/ (qkv_slot_num, proj_slot_num, ffn_slot_num, rotary_pct, norm_activation_type,
norm, final_norm...). Their Pattention normalizations, non-affine LayerNorm and NeoX-layout partial rotary are
the harness's; any setting that is not (RMSNorm/ScaleNorm, ALiBi, MoE, GPT-J residual...) is refused.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from models import registry
from models.pattention import NORMALIZATIONS

from .mapping import IGNORABLE, MAMBA_CONTEXT, HFError, make_config


def read_tensors(f: Path) -> dict[str, torch.Tensor]:
    """One weights file: safetensors, or a torch pickle loaded with weights_only (never unpickles code)."""
    try:
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(f))
        else:
            sd = torch.load(str(f), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise several types
        raise HFError(f"{f}: unreadable ({str(e).splitlines()[0]})") from None
    for wrapper in ("module", "state_dict", "model"):  # DeepSpeed / trainer wrappers
        if isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    return sd


def load_weights(src: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The state dict of a release directory: model.safetensors or pytorch_model.bin."""
    for name in ("model.safetensors", "pytorch_model.bin", "model.pt"):
        if (src / name).is_file():
            return read_tensors(src / name), src / name
    raise HFError(f"{src}: no model.safetensors or pytorch_model.bin")


def _tied_head(sd: dict, emb: str, where: Path) -> None:
    if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], sd[emb]):
        raise HFError(f"{where}: lm_head.weight differs from {emb}, but the release ties them")
    sd["lm_head.weight"] = sd[emb]


# ------------------------------------------------------------------------------------------------ mamba-ssm
# mixer settings with a harness config field of the same name
MAMBA1_KEYS = {"d_state", "d_conv", "expand", "dt_min", "dt_max", "dt_init_floor"}
MAMBA2_KEYS = MAMBA1_KEYS | {"headdim", "ngroups", "chunk_size"}
# mixer settings that only change init, parallelism or which kernel runs, never the function
INIT_ONLY = {"dt_init", "dt_scale", "use_fast_path", "conv_init", "use_mem_eff_path", "layer_idx",
             "process_group", "sequence_parallel"}
# settings the harness mixers hard-code: the value they must have
FIXED = {"bias": False, "conv_bias": True, "rmsnorm": True, "norm_before_gate": False, "D_has_hdim": False,
         "d_ssm": None, "dt_limit": [0.0, float("inf")]}


def read_mamba_ssm(src: Path, hf: dict):
    """(model name, config, state dict, weights file) of a mamba-ssm release with its config.json ``hf``."""
    where = src / "config.json"
    for field, ok in (("rms_norm", hf.get("rms_norm", True)), ("d_intermediate", not hf.get("d_intermediate")),
                      ("attn_layer_idx", not hf.get("attn_layer_idx")), ("tie_embeddings", hf.get("tie_embeddings", True))):
        if not ok:
            raise HFError(f"{where}: config field {field}={hf.get(field)!r} has no harness equivalent "
                          f"(RMSNorm-only, MLP-free, attention-free Mamba with a tied head)")
    ssm = dict(hf.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise HFError(f"{where}: config field ssm_cfg.layer={layer!r} is not Mamba1 or Mamba2")
    name, keys = ("mamba", MAMBA1_KEYS) if layer == "Mamba1" else ("mamba2", MAMBA2_KEYS)
    V, mult = hf["vocab_size"], hf.get("pad_vocab_size_multiple", 8)
    padded = -(-V // mult) * mult if mult > 1 else V
    # vocab_size = the padded rows: mamba-ssm scores all of them, and the neox tokenizer has 50280 ids
    fields = dict(d_model=hf["d_model"], n_layer=hf["n_layer"], vocab_size=padded, pad_vocab_size_multiple=mult,
                  residual_in_fp32=hf.get("residual_in_fp32", True), norm_eps=hf.get("norm_epsilon", 1e-5),
                  max_seq_len=MAMBA_CONTEXT)
    for k, v in ssm.items():
        if k in keys:
            fields[k] = v
        elif k == "dt_rank":
            fields["dt_rank"] = 0 if v == "auto" else int(v)
        elif k == "A_init_range" and name == "mamba2":
            fields["A_init_min"], fields["A_init_max"] = (float(x) for x in v)
        elif k in FIXED:
            if (list(v) if isinstance(v, (list, tuple)) else v) != FIXED[k]:
                raise HFError(f"{where}: config field ssm_cfg.{k}={v!r}: the harness {name} mixer has {FIXED[k]!r}")
        elif k not in INIT_ONLY:
            raise HFError(f"{where}: config field ssm_cfg.{k}={v!r} is not a setting the harness {name} mixer has")
    cfg = make_config(name, fields, where)
    sd, file = load_weights(src)
    _tied_head(sd, "backbone.embedding.weight", file)
    return name, cfg, sd, file


# ------------------------------------------------------------------------------------- official TokenFormer
def neox_config(path: Path) -> dict:
    """A GPT-NeoX YAML (keys may be written with '-'; NeoX treats them as '_')."""
    import yaml
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise HFError(f"{path}: not a readable NeoX YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise HFError(f"{path}: not a NeoX YAML mapping")
    return {k.replace("-", "_"): v for k, v in raw.items()}


def _norm_kind(value, field: str, where) -> bool:
    """NeoX norm name -> affine (LayerNorm with weight and bias) or not; anything else is refused: NeoX's
    RMSNorm divides by (rms + eps) with eps 1e-8 and ScaleNorm is another function altogether."""
    if value not in ("layernorm", "layernorm_nonparam"):
        raise HFError(f"{where}: config field {field}={value!r}: the harness TokenFormer has LayerNorm, with "
                      f"(layernorm) or without (layernorm_nonparam) weight and bias")
    return value == "layernorm"


def _official_layout(sd: dict, where: Path):
    """Strip the wrapper prefixes; return (tensors keyed '<index>.<rest>', layer indices)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^(module\.)?(sequential\.)?", "", k).replace("tied_modules.embed.", "0.")
        out[k] = v
    layers = sorted(int(m.group(1)) for k in out if (m := re.match(r"^(\d+)\.attention\.query\.key_param_tokens$", k)))
    if "0.word_embeddings.weight" not in out or not layers:
        raise HFError(f"{where}: not an official TokenFormer state dict (no sequential.0.word_embeddings.weight "
                      f"or sequential.N.attention.query.key_param_tokens)")
    if layers != list(range(2, 2 + len(layers))):
        raise HFError(f"{where}: layer indices {layers[:3]}... are not consecutive from 2")
    return out, layers


def read_tokenformer(src: Path, config_path: Path | None):
    """(name, config, state dict, weights file) of an official TokenFormer release."""
    sd, file = load_weights(src)
    w, layers = _official_layout(sd, file)
    L = len(layers)
    V, d = w["0.word_embeddings.weight"].shape
    shape = dict(num_layers=L, hidden_size=d, qkv_slot_num=w["2.attention.query.key_param_tokens"].shape[0],
                 proj_slot_num=w["2.attention.proj.key_param_tokens"].shape[0],
                 ffn_slot_num=w["2.mlp.key_param_tokens"].shape[0])
    if config_path is None:
        ymls = sorted(p for p in src.iterdir() if p.suffix in (".yml", ".yaml"))
        if len(ymls) > 1:
            raise HFError(f"{src}: several NeoX YAMLs ({', '.join(p.name for p in ymls)}); choose one with --config")
        config_path = ymls[0] if ymls else None
    where = config_path or file
    if config_path is not None:
        neox = neox_config(config_path)
    else:  # no YAML: the official config of these shapes (the registry's presets mirror configs/tokenformer/)
        arch = registry.get("tokenformer")
        match = [p for p in ("150m", "450m", "900m", "1.5b") if (lambda c: (c.n_layers, c.d_model, c.qkv_tokens,
                 c.proj_tokens, c.ffn_hidden) == tuple(shape.values()))(arch.config(p))]
        if not match:
            raise HFError(f"{src}: no NeoX YAML and the shapes {shape} are no official config's: give --config "
                          f"(num_attention_heads and the rotary / norm settings are not in the weights)")
        c = arch.config(match[0])
        neox = dict(shape, num_attention_heads=c.n_heads, pos_emb="rotary", rotary_pct=c.rotary_fraction,
                    norm="layernorm_nonparam", final_norm="layernorm", norm_activation_type=c.pattention_norm,
                    seq_length=c.max_seq_len)
    for field, value in shape.items():  # the YAML describes these weights
        if field in neox and neox[field] != value:
            raise HFError(f"{where}: config field {field}={neox[field]!r} but the weights have {value}")

    def refuse_unless(field, ok):
        if not ok:
            raise HFError(f"{where}: config field {field}={neox.get(field)!r} has no harness TokenFormer equivalent")
    refuse_unless("pos_emb", neox.get("pos_emb", "learned") == "rotary")
    refuse_unless("gpt_j_residual", not neox.get("gpt_j_residual", False))
    refuse_unless("num_experts", neox.get("num_experts", 1) in (None, 1) and neox.get("moe_num_experts", 1) in (None, 1))
    refuse_unless("use_mup", not neox.get("use_mup", False))
    refuse_unless("transformer_increase_dim", not neox.get("transformer_increase_dim", 0))
    refuse_unless("use_qk_layernorm", not neox.get("use_qk_layernorm", False))
    refuse_unless("sliding_window_width", neox.get("sliding_window_width") is None)
    # NeoX expands [[types, n], ...] to n repeats of each types list; any other layer type is a plain
    # transformer (or Mamba, gMLP) layer, which a harness TokenFormer does not have
    types = {t for spec, n in neox.get("attention_config") or [[["tokenformer"], L]] for t in spec}
    refuse_unless("attention_config", types == {"tokenformer"})
    heads = neox.get("num_attention_heads")
    if not heads or d % heads:
        raise HFError(f"{where}: config field num_attention_heads={heads!r} does not divide hidden_size {d}")
    refuse_unless("num_kv_heads", neox.get("num_kv_heads") in (None, heads))
    norm_act = neox.get("norm_activation_type", "l2_norm_gelu")
    refuse_unless("norm_activation_type", norm_act in NORMALIZATIONS)
    pct = float(neox.get("rotary_pct", 1.0))
    rot = int((d // heads) * pct)
    refuse_unless("rotary_pct", 0 < pct <= 1 and rot % 2 == 0)  # NeoX rotates int(hd * pct) dims, the harness an even count
    affine = _norm_kind(neox.get("norm", "layernorm"), "norm", where)
    final_affine = _norm_kind(neox.get("final_norm") or neox.get("norm", "layernorm"), "final_norm", where)
    tied = not neox.get("no_weight_tying", False)
    fields = dict(n_layers=L, d_model=d, n_heads=heads, qkv_tokens=shape["qkv_slot_num"],
                  proj_tokens=shape["proj_slot_num"], ffn_hidden=shape["ffn_slot_num"], pattention_norm=norm_act,
                  rotary_fraction=pct, rope_base=float(neox.get("rotary_emb_base", 10000)), vocab_size=V,
                  max_seq_len=int(neox.get("max_position_embeddings") or neox.get("seq_length") or 2048),
                  norm_affine=affine, norm_bias=affine, final_norm_affine=final_affine, final_norm_bias=final_affine,
                  norm_eps=float(neox.get("layernorm_epsilon", 1e-5)), tied_embeddings=tied)
    cfg = make_config("tokenformer", fields, where)
    return "tokenformer", cfg, _official_to_harness(w, cfg, file), file


def _official_to_harness(w: dict, cfg, where: Path) -> dict[str, torch.Tensor]:
    L, used, sd = cfg.n_layers, set(), {}

    def take(key, ours):
        if key not in w:
            raise HFError(f"{where}: no tensor {key} (sequential.{key})")
        sd[ours] = w[key]
        used.add(key)
    take("0.word_embeddings.weight", "tok_emb.weight")
    for i in range(L):
        n, b = i + 2, f"blocks.{i}."
        for theirs, ours in (("attention.query", "attn.wq"), ("attention.key", "attn.wk"), ("attention.value", "attn.wv"),
                             ("attention.proj", "attn.wo"), ("mlp", "ffn")):
            for kind in ("key_param_tokens", "value_param_tokens"):
                take(f"{n}.{theirs}.{kind}", f"{b}{ours}.{kind}")
        if cfg.norm_affine:
            for theirs, ours in (("input_layernorm", "norm1"), ("post_attention_layernorm", "norm2")):
                for s in ("weight", "bias"):
                    take(f"{n}.{theirs}.{s}", f"{b}{ours}.{s}")
    if cfg.final_norm_affine:
        for s in ("weight", "bias"):
            take(f"{L + 3}.norm.{s}", f"norm_f.{s}")
    if cfg.tied_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    else:
        take(f"{L + 4}.final_linear.weight", "lm_head.weight")
    extra = sorted(k for k in w if k not in used and not IGNORABLE.search(k))
    if extra:
        raise HFError(f"{where}: tensor sequential.{extra[0]} has no place in the harness TokenFormer"
                      + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    return sd
