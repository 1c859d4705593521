"""Checkpoints with no pickle anywhere: tensors in safetensors, everything else in JSON.

A checkpoint is a directory:
    model.safetensors      the weights (tied weights stored once)
    optimizer.safetensors  every optimizer-state tensor, keyed "<param index>.<name>"
    rng.safetensors        torch CPU / CUDA generator states (byte tensors)
    state.json             step, data position, optimizer param groups and non-tensor state, Python and
                           NumPy RNG states, the resolved run config and model config
It is written into a temporary sibling and renamed into place, so a crash mid-write leaves the previous
checkpoint intact and never a half one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


class CheckpointError(ValueError):
    """An unreadable or incomplete checkpoint; the message names the path."""


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [version, list(state), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, plain


def _set_rng_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _json_safe(value):
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any]) -> Path:
    """Atomically write a checkpoint directory at ``path`` (replacing an older one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    opt_tensors, opt_plain = {}, {"state": {}, "param_groups": []}
    if optimizer is not None:
        sd = optimizer.state_dict()
        for idx, entry in sd["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0:
                    opt_tensors[f"{idx}.{key}"] = value.detach().contiguous()
                elif isinstance(value, torch.Tensor):  # 0-dim (AdamW's step): keep dtype and value exactly
                    opt_tensors[f"{idx}.{key}"] = value.detach().reshape(1)
                    opt_plain["state"].setdefault(str(idx), {})[key] = "scalar_tensor"
                else:
                    opt_plain["state"].setdefault(str(idx), {})[key] = value
        opt_plain["param_groups"] = [{k: _json_safe(v) for k, v in g.items()} for g in sd["param_groups"]]
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_plain = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_plain, "rng": rng_plain}, indent=1))
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def read_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: not a complete checkpoint (missing {', '.join(missing)})")
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'state.json'}: unreadable ({e})") from None


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Load weights (strict), optimizer state and RNG states; returns the JSON state (step, data position...)."""
    path = Path(path)
    state = read_state(path)
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path / 'model.safetensors'}: unreadable ({e})") from None
    if missing or unexpected:
        raise CheckpointError(f"{path / 'model.safetensors'}: does not fit this model "
                              f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"))
        plain = state["optimizer"]
        opt_state: dict[int, dict] = {}
        for key, value in tensors.items():
            idx, name = key.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = value
        for idx, entry in plain["state"].items():
            for name, value in entry.items():
                if value == "scalar_tensor":
                    opt_state[int(idx)][name] = opt_state[int(idx)][name].reshape(())
                else:
                    opt_state.setdefault(int(idx), {})[name] = value
        groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in plain["param_groups"]]
        optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
    if restore_rng:
        _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the model a training checkpoint holds (architecture and config from state.json, weights from
    model.safetensors). Returns (model in eval mode, state dict). Unknown architecture or an unreadable
    checkpoint: CheckpointError naming the path."""
    from models import registry

    path = Path(path)
    if path.is_dir() and not (path / "state.json").exists() and (path / "checkpoint").is_dir():
        path = path / "checkpoint"  # a run directory was given
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    state = read_state(path)
    name = state.get("model_name")
    try:
        arch = registry.get(name)
        config = arch.config_cls(**state["model_config"])
    except registry.UnknownModelError as e:
        raise CheckpointError(f"{path}: checkpoint of an unknown architecture ({e})") from None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'state.json'}: model config does not fit architecture {name!r} ({e})") from None
    model = registry.build_from_config(config, name, device=device)
    load_checkpoint(path, model, None, restore_rng=False)
    return model.eval(), state
