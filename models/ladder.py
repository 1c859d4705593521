"""Size ladders: one shape rule per architecture family, applied along a list of widths.

A compute-optimal comparison trains each architecture at several sizes per budget (an IsoFLOP profile), so a
size must come from the family's own width/depth rule rather than from hand-picked presets:

* depth grows with width at a fixed aspect ratio d / L (Kaplan et al. 2001.08361 find loss nearly flat in
  the aspect ratio over a wide range; Porian et al. 2406.19146 use the same kind of rule), head dim fixed;
* tokenformer: parameter tokens scale with d as in the official presets (qkv = proj = d, ffn = 4 d);
* transformer_pp: SwiGLU hidden 8/3 d (rounded up to 64 by the config), head dim fixed;
* gpt2: 4 d GELU MLP;
* mamba / mamba2: d_state fixed, expand 2, twice the transformer's depth at the same width (a Mamba block
  holds ~6 d^2 against a transformer layer's 12 d^2, as in the Mamba paper's ladder: 125m = 24 x 768).

A rung is ``(model, preset, overrides)``: the base preset carries the recipe and vocabulary, the overrides the
shape, so a rung is an ordinary registry config and its counts are the components' own (the tests check them
against a meta-device build).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import registry


@dataclass(frozen=True)
class LadderScale:
    """Where a ladder lives: the widths, the depth and head rules, and the context and vocabulary it trains at."""
    name: str
    widths: tuple[int, ...]
    aspect: int                      # d / L of the transformer family (mamba: d / (L / 2))
    head_dim: int
    seq_len: int
    base: dict[str, str]             # architecture -> base preset (recipe, vocabulary)
    vocab_size: int
    ssm: dict[str, dict[str, int]] = field(default_factory=dict)  # fixed state sizes per SSM architecture
    description: str = ""


SCALES = {
    # byte-level, 2-core CPU: ~1k to ~21M non-embedding parameters (transformer_pp), vocab 512
    "cpu": LadderScale(
        "cpu", widths=(8, 16, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384), aspect=32, head_dim=16, seq_len=256,
        base={"tokenformer": "tiny", "transformer_pp": "tiny", "gpt2": "tiny", "mamba": "tiny", "mamba2": "tiny"},
        vocab_size=512, ssm={"mamba": {"d_state": 16}, "mamba2": {"d_state": 16, "headdim": 16, "chunk_size": 64}},
        description="byte-level CPU ladder (vocab 512, context 256)"),
    # GPT-NeoX tokenizer, one H100/H200: ~20M to ~600M parameters in total
    "gpu": LadderScale(
        "gpu", widths=(256, 384, 512, 640, 768, 896, 1024, 1280), aspect=64, head_dim=64, seq_len=2048,
        base={"tokenformer": "150m", "transformer_pp": "125m", "gpt2": "124m", "mamba": "130m", "mamba2": "130m"},
        vocab_size=50304, ssm={"mamba": {"d_state": 16}, "mamba2": {"d_state": 128, "headdim": 64}},
        description="GPT-NeoX-tokenizer GPU ladder (vocab 50304, context 2048)"),
}


@dataclass(frozen=True)
class Rung:
    model: str
    name: str                        # "d128": unique within a ladder
    preset: str
    overrides: dict[str, Any]
    n_layers: int
    width: int
    params: int
    non_embedding: int
    flops_per_token: float           # training FLOPs per token at the ladder's seq_len

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "rung": self.name, "preset": self.preset, "overrides": dict(self.overrides),
                "n_layers": self.n_layers, "width": self.width, "params": self.params,
                "non_embedding": self.non_embedding, "flops_per_token": self.flops_per_token}


def shape(model: str, d: int, scale: LadderScale) -> dict[str, Any]:
    """The family rule: config overrides for width ``d`` on ``scale``."""
    L = max(1, round(d / scale.aspect))
    common = {"d_model": d, "vocab_size": scale.vocab_size, "max_seq_len": scale.seq_len}
    heads = max(1, d // scale.head_dim)
    if model == "tokenformer":
        return {**common, "n_layers": L, "n_heads": heads, "qkv_tokens": d, "proj_tokens": d, "ffn_hidden": 4 * d}
    if model == "transformer_pp":
        return {**common, "n_layers": L, "n_heads": heads}
    if model == "gpt2":
        return {**common, "n_layers": L, "n_heads": heads, "ffn_hidden": 4 * d}
    if model in ("mamba", "mamba2"):
        return {**common, "n_layer": 2 * L, "expand": 2, **scale.ssm.get(model, {})}
    raise registry.UnknownModelError(f"no size ladder for model {model!r}; ladders exist for "
                                     f"{', '.join(names())}")


def names() -> list[str]:
    return [n for n in registry.names() if n in SCALES["cpu"].base]


def get_scale(name: str) -> LadderScale:
    try:
        return SCALES[name]
    except KeyError:
        raise registry.UnknownModelError(f"unknown ladder scale {name!r}; valid: {', '.join(SCALES)}") from None


def ladder(model: str, scale: str = "cpu") -> list[Rung]:
    """Every rung of ``model``'s ladder on ``scale``, smallest first, with exact counts from its config."""
    sc = get_scale(scale)
    if model not in sc.base:
        shape(model, sc.widths[0], sc)  # raises the one-line error naming the valid models
    rungs = []
    for d in sc.widths:
        overrides = shape(model, d, sc)
        cfg = registry.get_config(model, sc.base[model], **overrides)
        rungs.append(Rung(model, f"d{d}", sc.base[model], overrides, cfg.n_layers, d, cfg.num_params(),
                          cfg.num_params(non_embedding=True), cfg.flops_per_token(sc.seq_len)))
    return rungs


def rung(model: str, name: str, scale: str = "cpu") -> Rung:
    for r in ladder(model, scale):
        if r.name == name:
            return r
    raise registry.UnknownModelError(f"no rung {name!r} in the {scale} ladder of {model!r}; rungs: "
                                     + ", ".join(r.name for r in ladder(model, scale)))
