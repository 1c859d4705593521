"""``harness import DIR --from hf|mamba_ssm|tokenformer --out CKPT``: a harness training checkpoint from
someone else's weights.

CKPT is written by :func:`harness.train.checkpoint.save_checkpoint` (model.safetensors, an empty optimizer,
rng, state.json at step 0 with model_name / model_config and a run config naming the closest preset), so
``harness eval CKPT`` scores it and ``harness train --model M --preset P --set model_overrides=... --set
init_from=CKPT`` (printed by the command) trains from it. Written into ``CKPT.importing``, renamed into place.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from models import registry

from .export import check_out
from .mapping import HFError, decode_json, from_hf_config, from_hf_weights, hf_config
from .releases import load_weights, read_mamba_ssm, read_tensors, read_tokenformer
from .tokenizer_files import NAMED, guess_tokenizer
from harness.store import replace_dir

FORMATS = ("hf", "mamba_ssm", "tokenformer")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise HFError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HFError(f"{path}: unreadable ({e})") from None


def _hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """model.safetensors / pytorch_model.bin, or their sharded forms (``*.index.json``)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            sd = {}
            for shard in sorted(set(_read_json(src / index).get("weight_map", {}).values())):
                sd.update(read_tensors(src / shard))
            return sd
    return load_weights(src)[0]


def _agrees(mine: dict, hf: dict) -> bool:
    """The harness block's config would export to this very config.json (so it is not stale)."""
    norm = json.loads(json.dumps(hf))
    for k, v in json.loads(json.dumps(mine)).items():
        if k == "rope_theta":
            rp = norm.get("rope_parameters") or {}
            if float(rp.get("rope_theta", norm.get("rope_theta", 10000.0))) != v:
                return False
        elif norm.get(k) != v:
            return False
    return True


def read_hf(src: Path):
    """(name, config, held token counts, state dict, tokenizer hint) of a Hugging Face model directory."""
    where = src / "config.json"
    hf = decode_json(_read_json(where))
    name, cfg, scale = from_hf_config(hf, str(where))
    block = hf.get("harness") or {}
    if block.get("model_name") == name:  # written by harness export: the exact config, unless edited since
        try:
            exact = registry.get(name).config_cls(**block["model_config"])
            if _agrees(hf_config(name, exact, scale), hf):
                cfg = exact
        except (KeyError, TypeError, ValueError):
            pass
    sd = from_hf_weights(name, cfg, _hf_weights(src), str(src))
    return name, cfg, scale, sd, block.get("tokenizer")


def nearest_preset(name: str, cfg) -> tuple[str, dict[str, Any]]:
    """The registry preset with the fewest differing fields, and the overrides that rebuild ``cfg`` from it
    (vocab_size and max_seq_len always: the training loop otherwise takes them from the tokenizer / preset)."""
    want = cfg.to_dict()
    best = None
    for preset in registry.presets(name):
        base = registry.get_config(name, preset).to_dict()
        diff = {k: v for k, v in want.items() if base.get(k) != v}
        if best is None or len(diff) < len(best[1]):
            best = (preset, diff)
    preset, diff = best
    return preset, {**diff, "vocab_size": cfg.vocab_size, "max_seq_len": cfg.max_seq_len}


def _tokenizer(explicit, hint, src: Path, vocab: int, out: Path) -> tuple[str, str, Path | None]:
    """(tokenizer spec for the run config, why, tokenizer.json to copy into the checkpoint or None)."""
    if explicit:
        return explicit, "given with --tokenizer", None
    if hint in NAMED:
        return hint, f"{hint}, as the exported run named it", None
    if (src / "tokenizer.json").is_file():
        final = (out / "tokenizer.json").resolve()
        return str(final), f"the source's tokenizer.json, copied to {final}", src / "tokenizer.json"
    spec, why = guess_tokenizer(vocab)
    return spec, why, None


def import_checkpoint(src: str | os.PathLike, out: str | os.PathLike, fmt: str, *, config: str | None = None,
                      tokenizer: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Import ``src`` (format ``fmt``) as the harness checkpoint ``out``; returns a summary."""
    from harness.config import TrainConfig, from_dict
    from harness.train.checkpoint import save_checkpoint
    if fmt not in FORMATS:
        raise HFError(f"--from {fmt!r}: not one of {', '.join(FORMATS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise HFError(f"{src}: no such directory")
    if config is not None and not Path(config).is_file():
        raise HFError(f"--config {config}: not found")
    check_out(out, src, overwrite)
    scale, hint = {}, None
    if fmt == "hf":
        name, cfg, scale, sd, hint = read_hf(src)
    elif fmt == "mamba_ssm":
        name, cfg, sd, _ = read_mamba_ssm(src, _read_json(src / "config.json"))
    else:
        name, cfg, sd, _ = read_tokenformer(src, Path(config) if config else None)
    model = registry.build_from_config(cfg, name)
    expected = set(model.state_dict())
    if set(sd) != expected:
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        raise HFError(f"{src}: weights do not fit the {name} config (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, p in model.state_dict().items():
        if tuple(sd[k].shape) != tuple(p.shape):
            raise HFError(f"{src}: tensor for {k} has shape {tuple(sd[k].shape)}, the config needs {tuple(p.shape)}")
    model.load_state_dict(sd, strict=True)  # copies (and casts fp16 / bf16 releases to the fp32 parameters)
    spec, why, copy = _tokenizer(tokenizer, hint, src, cfg.vocab_size, out)
    preset, overrides = nearest_preset(name, cfg)
    run = dataclasses.asdict(from_dict(TrainConfig, {"model": name, "preset": preset, "model_overrides": overrides,
                                                     "data": {"tokenizer": spec}, "init_from": str(out)}))
    state = {"step": 0, "data_position": 0, "flops_offset": 0.0, "flops_spent": 0.0, "run_start": 0,
             "wall_time": 0.0, "world_size": 1, "config": run, "model_name": name, "model_config": cfg.to_dict(),
             "pattention_scale_tokens": scale, "imported": {"format": fmt, "source": str(src.resolve())}}
    staging = out.with_name(out.name + ".importing")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_checkpoint(staging, model, None, state)
        if copy is not None:
            shutil.copyfile(copy, staging / "tokenizer.json")
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    sets = f"--set model_overrides='{json.dumps(overrides)}' --set data.tokenizer={spec} --set init_from={out}"
    return {"from": fmt, "source": str(src), "out": str(out), "model": name, "preset": preset,
            "model_overrides": overrides, "params": model.num_params(), "tokenizer": spec, "tokenizer_note": why,
            "eval": f"harness eval {out} --tasks paper",
            "train": f"harness train --model {name} --preset {preset} {sets} --out RUN"}
