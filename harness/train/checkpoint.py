"""Checkpoints with no pickle anywhere: tensors in safetensors, everything else in JSON.

A checkpoint is a directory:
    model.safetensors      the weights (tied weights stored once)
    optimizer.safetensors  every optimizer-state tensor, keyed "<param index>.<name>"
    rng.safetensors        torch CPU / CUDA generator states (byte tensors)
    state.json             step, data position, optimizer param groups and non-tensor state, Python and
                           NumPy RNG states, the resolved run config and model config
It is written into a temporary sibling (``checkpoint.tmp``, state.json last: a directory with every file is
complete) and renamed into place; the previous one is moved aside to ``checkpoint.old`` first. A crash
mid-write leaves the previous checkpoint intact and never a half one, and a crash between the two renames
leaves both complete directories aside: ``recover`` (run before every resume) puts the newest complete one
back, so the newest complete checkpoint is never ignored.
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
from safetensors.torch import load_file, save_file

from .. import faults
from ..store import write_text_atomic

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


def json_safe(value):
    """An optimizer param-group value as JSON: a 0-d tensor (a tensor lr) as its number, a tuple as a list."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return value


def _aliases(model: torch.nn.Module) -> dict[str, str]:
    """Tied parameters: alias name -> the name stored (safetensors keeps one copy of a shared tensor)."""
    from .distributed import unwrap
    first: dict[int, str] = {}
    aliases = {}
    for name, p in unwrap(model).named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any], is_main: bool = True) -> Path:
    """Atomically write a checkpoint directory at ``path`` (replacing an older one).

    The model may be plain, DDP- or FSDP2-wrapped: its full (consolidated) state dict and the optimizer's,
    keyed by parameter name, are gathered from every rank (all ranks must call this) and written by rank 0
    alone, so a checkpoint resumes on any world size."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_sd = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    optim_sd = (get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
                if optimizer is not None else {"state": {}, "param_groups": []})
    path = Path(path)
    if not is_main:
        return path
    aliases = _aliases(model)
    tensors = {k: v.detach().contiguous() for k, v in model_sd.items() if k not in aliases}
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"aliases": json.dumps(aliases)})
    opt_tensors, opt_plain = {}, {"state": {}, "param_groups": []}
    for fqn, entry in optim_sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                # 0-dim tensors (AdamW's step) are stored as shape (1,) and restored to 0-dim
                opt_tensors[f"{fqn}/{key}"] = value.detach().reshape(-1) if value.ndim == 0 else value.detach().contiguous()
                opt_plain["state"].setdefault(fqn, {})[key] = "scalar_tensor" if value.ndim == 0 else "tensor"
            else:
                opt_plain["state"].setdefault(fqn, {})[key] = value
    opt_plain["param_groups"] = [{k: json_safe(v) for k, v in g.items()} for g in optim_sd["param_groups"]]
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors, rng_plain = _rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    for name in FILES[:3]:
        _fsync(tmp / name)
    # state.json last and atomically: a directory holding a parseable state.json is a complete checkpoint
    write_text_atomic(tmp / "state.json", json.dumps({**state, "optimizer": opt_plain, "rng": rng_plain}, indent=1))
    _fsync(tmp)
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
        faults.point("checkpoint_renamed_old")
    os.replace(tmp, path)
    _fsync(path.parent)  # the renames themselves are durable before the previous checkpoint goes
    shutil.rmtree(old, ignore_errors=True)
    return path


def _fsync(path: Path) -> None:
    """Flush a file's or a directory's contents to disk (directories: their entries, i.e. renames)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def _complete(path: Path) -> bool:
    """Every file present and state.json parseable (it is written last)."""
    return complete_step(path) is not None


def complete_step(path: Path) -> int | None:
    """The step of the complete checkpoint at ``path`` (every file present, state.json readable), else None."""
    if not (path.is_dir() and all((path / f).is_file() for f in FILES)):
        return None
    try:
        return int(json.loads((path / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recover(path: str | Path) -> Path | None:
    """Make ``path`` the newest complete checkpoint after an interrupted save: when it is missing, the
    complete ``.tmp`` (the newer save) or else the complete ``.old`` (the previous one) is renamed into place.
    Returns the checkpoint directory, or None when there is no complete checkpoint."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    current = complete_step(path)
    # the newest complete one of the three wins (a complete .tmp beside an older checkpoint: killed after
    # the new save finished and before the renames)
    best = max(((s, c) for c, s in ((tmp, complete_step(tmp)), (old, complete_step(old)), (path, current)) if s is not None),
               key=lambda sc: sc[0], default=None)
    if best is not None and best[1] != path:
        older = path.with_name(path.name + ".older")
        if current is not None:
            os.replace(path, older)  # a complete but older checkpoint steps aside until the newer is in place
        elif path.exists():
            shutil.rmtree(path, ignore_errors=True)  # an incomplete one
        os.replace(best[1], path)
        shutil.rmtree(older, ignore_errors=True)
    if complete_step(path) is not None:
        for leftover in (tmp, old):
            shutil.rmtree(leftover, ignore_errors=True)
        return path
    return None


def has_checkpoint(run_dir: str | Path, name: str = "checkpoint") -> bool:
    """A complete checkpoint in place, or one an interrupted save left aside (recover() puts it back)."""
    base = Path(run_dir) / name
    return any(_complete(p) for p in (base, base.with_name(name + ".tmp"), base.with_name(name + ".old")))


def read_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"{path}: not a complete checkpoint (missing {', '.join(missing)})")
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'state.json'}: unreadable ({e})") from None


def read_model_tensors(path: str | Path, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint as a full state dict (tied aliases restored)."""
    file = Path(path) / "model.safetensors"
    try:
        tensors = load_file(str(file))
        from safetensors import safe_open
        with safe_open(str(file), "pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    return tensors


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True, distributed: bool = False, is_main: bool = True) -> dict[str, Any]:
    """Load weights (strict), optimizer state and RNG states into a plain, DDP or FSDP2 model; returns the
    JSON state (step, data position...). With ``distributed``, rank 0 reads the files and broadcasts."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    state = read_state(path)
    model_sd: dict[str, torch.Tensor] = {}
    optim_sd: dict[str, Any] = {"state": {}, "param_groups": []}
    if is_main or not distributed:
        model_sd = read_model_tensors(path)
        bad = [k for k, v in model_sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"{path / 'model.safetensors'}: non-finite weights in {bad[0]}"
                                  + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
        expected = set(k for k in _unwrapped_state_keys(model))
        missing, unexpected = sorted(expected - set(model_sd)), sorted(set(model_sd) - expected)
        if missing or unexpected:
            raise CheckpointError(f"{path / 'model.safetensors'}: does not fit this model "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        if optimizer is not None:
            optim_sd["state"] = read_optimizer_state(path, state)
            optim_sd["param_groups"] = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g
                                        for g in state["optimizer"]["param_groups"]]
    opts = _full_options(broadcast_from_rank0=True) if distributed else _full_options()
    set_model_state_dict(model, model_sd, options=opts)
    if state.get("pattention_scale_tokens"):  # growth that held sqrt(n) at the old token count
        from models.pattention import set_scale_tokens

        from .distributed import unwrap
        set_scale_tokens(unwrap(model), state["pattention_scale_tokens"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd, options=opts)
    if restore_rng and is_main:
        _set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


def read_optimizer_state(path: str | Path, state: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """A checkpoint's optimizer state keyed by parameter name ({} when it holds none, e.g. a grown
    checkpoint with a fresh optimizer)."""
    path = Path(path)
    plain = (state if state is not None else read_state(path)).get("optimizer", {})
    if not plain.get("state"):
        return {}
    try:
        tensors = load_file(str(path / "optimizer.safetensors"))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{path / 'optimizer.safetensors'}: unreadable ({e})") from None
    out: dict[str, dict[str, Any]] = {}
    for fqn, entry in plain["state"].items():
        for key, kind in entry.items():
            if kind == "scalar_tensor":
                value = tensors[f"{fqn}/{key}"].reshape(())
            elif kind == "tensor":
                value = tensors[f"{fqn}/{key}"]
            else:
                value = kind
            out.setdefault(fqn, {})[key] = value
    return out


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory holding one in checkpoint/."""
    path = Path(path)
    if path.is_dir() and not (path / "state.json").exists() and (path / "checkpoint").is_dir():
        return path / "checkpoint"
    return path


def _unwrapped_state_keys(model: torch.nn.Module) -> list[str]:
    from .distributed import unwrap
    return list(unwrap(model).state_dict().keys())


def load_model_from_checkpoint(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the model a training checkpoint holds (architecture and config from state.json, weights from
    model.safetensors). Returns (model in eval mode, state dict). Unknown architecture or an unreadable
    checkpoint: CheckpointError naming the path."""
    from models import registry

    path = resolve_checkpoint_dir(path)
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
