"""``harness export RUN --to hf --out DIR``: a training checkpoint as a Hugging Face model directory.

DIR holds ``config.json`` (the stock class's config, plus a ``harness`` block with the exact harness config so
that ``harness import`` restores it bit for bit), ``model.safetensors`` and, when the run's tokenizer can be
written offline, ``tokenizer.json`` + its two small JSON files. TokenFormer has no stock class: DIR also gets
``modeling_tokenformer.py`` (a copy of harness/hf/tokenformer_hf.py) and ``auto_map``, so that
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads it without this package.
Everything is written into ``DIR.exporting`` and renamed into place: a failed export leaves no half directory.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from models.pattention import scale_tokens_of

from .mapping import CLASSES, HFError, hf_config, to_hf_weights
from .tokenizer_files import write_tokenizer
from harness.store import replace_dir

TARGETS = ("hf",)
REMOTE_FILE = "modeling_tokenformer.py"
CONFIG_CLASSES = {"LlamaForCausalLM": "LlamaConfig", "GPT2LMHeadModel": "GPT2Config",
                  "MambaForCausalLM": "MambaConfig", "Mamba2ForCausalLM": "Mamba2Config"}


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise HFError("Hugging Face export needs transformers: run `python -m pip install "
                      "'tokenformer-bench[hf]'` (or `pip install transformers`)") from None
    return transformers


def check_out(out: Path, src: Path, overwrite: bool, flag: str = "--out") -> None:
    """Refuse an output that is, holds or sits inside the source, or that exists (unless overwrite)."""
    o, s = out.resolve(), src.resolve()
    if o == s or o in s.parents or s in o.parents:
        raise HFError(f"{flag} {out}: overlaps the source {src}; choose another {flag}")
    if out.exists() and not out.is_dir():
        raise HFError(f"{flag} {out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise HFError(f"{flag} {out}: already exists (choose another {flag}, or --force)")


def _config_object(transformers, cls: str, kwargs: dict):
    if cls == "TokenFormerForCausalLM":
        from .tokenformer_hf import TokenFormerConfig
        return TokenFormerConfig(**kwargs)
    return getattr(transformers, CONFIG_CLASSES[cls])(**kwargs)


def export_checkpoint(src: str | os.PathLike, out: str | os.PathLike, to: str = "hf",
                      overwrite: bool = False) -> dict[str, Any]:
    """Export the checkpoint ``src`` (or a run directory holding checkpoint/) to ``out``; returns a summary."""
    from harness.train.checkpoint import load_model_from_checkpoint, resolve_checkpoint_dir
    if to not in TARGETS:
        raise HFError(f"--to {to!r}: not one of {', '.join(TARGETS)}")
    ckpt, out = resolve_checkpoint_dir(src), Path(out)
    if not ckpt.is_dir():
        raise HFError(f"{ckpt}: no such checkpoint directory")
    check_out(out, ckpt, overwrite)
    model, state = load_model_from_checkpoint(ckpt)
    name, cfg = state["model_name"], model.config
    scale = scale_tokens_of(model)
    kwargs = hf_config(name, cfg, scale)  # an unrepresentable config fails here, before anything is written
    cls = CLASSES[name]
    transformers = transformers_module()
    spec = ((state.get("config") or {}).get("data") or {}).get("tokenizer", "byte")

    staging = out.with_name(out.name + ".exporting")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        eot, note = write_tokenizer(staging, spec, cfg.max_seq_len)
        if eot is not None and eot >= kwargs["vocab_size"]:
            eot = None  # a tokenizer bigger than the model: no id to name
        config = _config_object(transformers, cls, dict(kwargs, bos_token_id=eot, eos_token_id=eot))
        config.architectures = [cls]
        # the exact harness config: import(export(x)) restores x even where HF has no field (max_seq_len of a
        # Mamba, the unpadded vocabulary, init settings)
        config.harness = {"model_name": name, "model_config": cfg.to_dict(), "tokenizer": spec,
                          "step": state.get("step")}
        if cls == "TokenFormerForCausalLM":
            shutil.copyfile(Path(__file__).with_name("tokenformer_hf.py"), staging / REMOTE_FILE)
            config.auto_map = {"AutoConfig": f"{REMOTE_FILE[:-3]}.TokenFormerConfig",
                               "AutoModelForCausalLM": f"{REMOTE_FILE[:-3]}.TokenFormerForCausalLM"}
        config.save_pretrained(str(staging))
        if "rope_theta" in kwargs:  # transformers 5 nests it in rope_parameters; 4.x reads it at the top level
            path = staging / "config.json"
            path.write_text(json.dumps({**json.loads(path.read_text()), "rope_theta": kwargs["rope_theta"]}, indent=2))
        from safetensors.torch import save_file
        save_file(to_hf_weights(name, cfg, model.state_dict()), str(staging / "model.safetensors"),
                  metadata={"format": "pt"})
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    remote = ", trust_remote_code=True" if cls == "TokenFormerForCausalLM" else ""
    return {"to": to, "class": cls, "model": name, "params": model.num_params(), "source": str(ckpt),
            "step": state.get("step"), "out": str(out), "files": sorted(os.listdir(out)), "tokenizer": note,
            "load": f"AutoModelForCausalLM.from_pretrained({str(out)!r}{remote})"}
