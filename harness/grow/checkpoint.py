"""Grow a training checkpoint directory into a new one the training loop starts from.

``grow_checkpoint(src, dst, method=..., to_preset=... / to={...})`` loads the source checkpoint, builds the
target model config (the registry's preset with overrides; vocabulary and context follow the source, which the
run had overridden from its tokenizer and seq_len), grows the model, transfers the optimizer state, and writes
``dst`` in exactly the format of :func:`harness.train.checkpoint.save_checkpoint` (it is written by it):

    model.safetensors, optimizer.safetensors, rng.safetensors (the source's), state.json with
    step                 0 (schedule=restart: fresh warmup + cosine) or the source's step (schedule=continue)
    data_position        the source's: the data stream continues where the base run stopped
    flops_offset / flops_spent   the source's, so the grown run's records count cumulative compute
    run_start            = step (this run's tokens and FLOPs count from there)
    config               the source run's TrainConfig with model/preset/model_overrides of the target
                         (init_from = dst): train the grown model with it
    model_name, model_config     the target
    pattention_scale_tokens      {module: held n} after preserving token growth (load_checkpoint applies it)
    growth               the source's growth events + this one
    optimizer            param groups keyed by name; state empty for optimizer=fresh (the loop then starts a
                         new AdamW), the carried / staged Adam state otherwise

Start training from it with ``TrainConfig(..., init_from=dst)`` (model/preset/model_overrides as in
``event["train_config"]``): the loop loads weights (+ optimizer state when present), step and data position.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from models import registry
from models.pattention import scale_tokens_of

from harness.train.checkpoint import json_safe, read_optimizer_state, resolve_checkpoint_dir
from harness.store import replace_dir

from .expand import expand_blocks
from .plan import (INITS, METHODS, OPTIMIZERS, SCHEDULES, Growth, GrowthError, config_diff, growth_gap,
                   random_batch, transfer_optimizer_state)
from .stack import gstack
from .tokens import grow_tokens
from .width import grow_width

FOLLOW_SOURCE = ("vocab_size", "max_seq_len")


def grow_model(model: torch.nn.Module, target, method: str, *, init: str | None = None, seed: int = 0,
               noise: float = 0.0, zero_values: bool = False, name: str | None = None) -> Growth:
    """Grow an in-memory model to the ``target`` config with one of :data:`METHODS`."""
    if method not in METHODS:
        raise GrowthError(f"method={method!r} is not one of {', '.join(METHODS)}")
    if init is not None and method != "tokens":
        raise GrowthError(f"init={init!r} applies to token growth only (method={method} has its own construction)")
    if noise and method != "width":
        raise GrowthError("noise applies to width growth only")
    if method == "tokens":
        return grow_tokens(model, target, init=init or "random", seed=seed, zero_values=zero_values, name=name)
    if method in ("gstack", "gstack_identity"):
        return gstack(model, target, identity=method == "gstack_identity", seed=seed, name=name)
    if method == "expand":
        return expand_blocks(model, target, seed=seed, name=name)
    return grow_width(model, target, seed=seed, noise=noise, name=name)


def target_config(state: dict[str, Any], to: dict[str, Any] | None, to_preset: str | None):
    """(config, preset, model_overrides) of the target: the preset (default: the source run's) with overrides
    (``to``; without ``to_preset`` on top of the source run's own overrides); vocab and context follow the
    source. ``model_overrides`` is what a TrainConfig needs to rebuild exactly this config."""
    name, run = state.get("model_name"), state.get("config")
    if not isinstance(run, dict) or "preset" not in run:
        raise GrowthError("source checkpoint has no run config (state.json 'config'): cannot name the target preset")
    src_cfg = state["model_config"]
    # a target may restate the source's vocabulary and context (a matrix entry names its whole shape), not change them
    to = {k: v for k, v in (to or {}).items() if not (k in FOLLOW_SOURCE and v == src_cfg.get(k))}
    fixed = sorted(k for k in FOLLOW_SOURCE if k in to)
    if fixed:
        raise GrowthError(f"{', '.join(fixed)} follow the source checkpoint and cannot be changed by growth")
    if to_preset is None and not to:
        raise GrowthError("give a target: a preset (--to) and/or config overrides (--set key=value)")
    preset = to_preset or run["preset"]
    base = {} if to_preset else {k: v for k, v in (run.get("model_overrides") or {}).items() if k not in FOLLOW_SOURCE}
    overrides = {**base, **to}
    try:
        config = registry.get_config(name, preset, **overrides,
                                     **{k: src_cfg[k] for k in FOLLOW_SOURCE})
    except (registry.UnknownModelError, ValueError, TypeError) as e:
        raise GrowthError(f"target {name}/{preset} {overrides or ''}: {e}") from None
    return config, preset, overrides


def _check_destination(given: Path, src: Path, dst: Path) -> None:
    """Refuse a destination that would replace or sit inside the source: the source checkpoint itself, the
    run directory holding it (given as the source, or the parent of ``checkpoint/``), any directory above
    the source (replacing it deletes the source with it), or a directory inside the source checkpoint."""
    s, d = src.resolve(), dst.resolve()
    run = given.resolve() if given.resolve() != s else (s.parent if s.name == "checkpoint" else s)
    if d == s or d == run or d in s.parents or s in d.parents:
        what = ("is the source checkpoint" if d == s else "is the source's run directory" if d == run
                else "holds the source checkpoint" if d in s.parents else "is inside the source checkpoint")
        raise GrowthError(f"--out {dst}: {what} ({src}); the grown checkpoint must not replace or overwrite "
                          f"its source: choose another --out")


def grow_checkpoint(src_dir: str | Path, dst_dir: str | Path, *, method: str, to: dict[str, Any] | None = None,
                    to_preset: str | None = None, init: str | None = None, optimizer: str = "fresh",
                    schedule: str = "restart", seed: int = 0, noise: float = 0.0, zero_values: bool = False,
                    overwrite: bool = False, measure_batch: torch.Tensor | None = None) -> dict[str, Any]:
    """Grow the checkpoint ``src_dir`` (or a run directory holding ``checkpoint/``) into ``dst_dir``.

    method: tokens | gstack | gstack_identity | expand | width. init (tokens only): random | zero | preserving.
    optimizer: fresh | carry | staged (staged: width only). schedule: restart (step 0) | continue.
    Returns the growth event (also appended to state.json["growth"]), with ``gap``: growth_gap of the old and
    the grown model on ``measure_batch`` (default: a fixed batch of random tokens)."""
    from harness.train.checkpoint import load_model_from_checkpoint

    _check_options(method, init, optimizer, schedule, noise)
    src, dst = resolve_checkpoint_dir(src_dir), Path(dst_dir)
    _check_destination(Path(src_dir), src, dst)
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise GrowthError(f"{dst}: already exists (choose another --out, or overwrite)")
    old, state = load_model_from_checkpoint(src)
    target, preset, overrides = target_config(state, to, to_preset)
    growth = grow_model(old, target, method, init=init, seed=seed, noise=noise, zero_values=zero_values,
                        name=state["model_name"])
    opt = _grown_optimizer(growth, state["config"], src, optimizer)
    run = dict(state["config"])
    seq = run.get("seq_len") or state["model_config"]["max_seq_len"]
    if measure_batch is None:
        measure_batch = random_batch(state["model_config"]["vocab_size"], min(64, seq))
    gap = growth_gap(old, growth.model, measure_batch)

    keep = {k: v for k, v in (run.get("model_overrides") or {}).items() if k in FOLLOW_SOURCE}
    train_config = {**run, "preset": preset, "model_overrides": {**keep, **overrides}, "init_from": str(dst)}
    step = int(state.get("step", 0)) if schedule == "continue" else 0
    event = _growth_event(state, src, old, growth, target, train_config, step, gap, method=method, init=init,
                          optimizer=optimizer, schedule=schedule, seed=seed, noise=noise)
    new_state = {
        "step": step, "data_position": state.get("data_position", int(state.get("step", 0))),
        "flops_offset": state.get("flops_offset", 0.0), "flops_spent": _flops_spent(state, old, seq),
        "run_start": step, "growth": list(state.get("growth") or []) + [event],
        "pattention_scale_tokens": scale_tokens_of(growth.model),
        "wall_time": 0.0, "world_size": state.get("world_size", 1), "config": train_config,
        "model_name": state["model_name"], "model_config": target.to_dict(),
    }
    _write_grown(src, dst, growth.model, opt, optimizer != "fresh", new_state)
    return event


def _check_options(method: str, init: str | None, optimizer: str, schedule: str, noise: float) -> None:
    if optimizer not in OPTIMIZERS:
        raise GrowthError(f"optimizer={optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise GrowthError(f"schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
    if init is not None and init not in INITS:
        raise GrowthError(f"init={init!r} is not one of {', '.join(INITS)}")
    if optimizer == "staged" and method != "width":
        raise GrowthError("optimizer=staged (Staged Training's scaled Adam moments) is for width growth; use "
                          "fresh or carry")
    if not (noise >= 0 and math.isfinite(noise)):
        raise GrowthError(f"noise: must be >= 0, got {noise}")


def _grown_optimizer(growth: Growth, run: dict[str, Any], src: Path, optimizer: str) -> torch.optim.Optimizer:
    """The source run's AdamW over the grown model: empty (fresh), or holding the source's moments moved onto
    the grown parameters (carry / staged)."""
    from harness.config import OptimConfig, from_dict
    from harness.train.optim import build_optimizer

    new = growth.model
    opt = build_optimizer(new, from_dict(OptimConfig, run.get("optim") or {}), torch.device("cpu"))
    if optimizer != "fresh":
        old_state = read_optimizer_state(src)
        if not old_state:
            raise GrowthError(f"{src}: holds no optimizer state to carry (use optimizer=fresh)")
        moved = transfer_optimizer_state(new, growth.plans, old_state, optimizer)
        for pname, p in new.named_parameters():
            opt.state[p] = moved[pname]
    return opt


def _flops_spent(state: dict[str, Any], old: torch.nn.Module, seq: int) -> float:
    """The source run's training FLOPs (recomputed for checkpoints from before the loop recorded them)."""
    flops_spent = state.get("flops_spent")
    if flops_spent is None:
        src_step = int(state.get("step", 0))
        flops_spent = src_step * state["config"].get("batch_size", 0) * seq * old.flops_per_token(seq)
    return flops_spent


def _growth_event(state: dict[str, Any], src: Path, old: torch.nn.Module, growth: Growth, target,
                  train_config: dict[str, Any], step: int, gap, *, method: str, init: str | None, optimizer: str,
                  schedule: str, seed: int, noise: float) -> dict[str, Any]:
    """The growth event: what grew into what, how, from where, and the function-preservation gap."""
    new, run, name = growth.model, state["config"], state["model_name"]
    preset, src_step = train_config["preset"], int(state.get("step", 0))
    return {
        "method": method, "init": (init or "random") if method == "tokens" else None, "optimizer": optimizer,
        "schedule": schedule, "seed": seed, **({"noise": noise} if method == "width" else {}),
        "model": name,
        "from": {"preset": run["preset"], "model_overrides": run.get("model_overrides") or {},
                 "params": old.num_params(), "non_embedding_params": old.num_params(True)},
        "to": {"preset": preset, "model_overrides": train_config["model_overrides"],
               "params": new.num_params(), "non_embedding_params": new.num_params(True)},
        "changes": {k: [a, b] for k, (a, b) in config_diff(old.config, target).items()},
        "params_before": old.num_params(), "params_after": new.num_params(),
        "function_preserving": bool(growth.info.get("function_preserving")),
        "construction": growth.info.get("construction"),
        "info": {k: v for k, v in growth.info.items() if k not in ("construction", "function_preserving")},
        "source": str(src), "source_step": src_step, "data_position": state.get("data_position", src_step),
        "step": step, "source_wall_time": state.get("wall_time"), "gap": gap,
        "train_config": {"model": name, "preset": preset, "model_overrides": train_config["model_overrides"]},
    }


def _write_grown(src: Path, dst: Path, new: torch.nn.Module, opt: torch.optim.Optimizer, with_state: bool,
                 new_state: dict[str, Any]) -> None:
    """Write the grown checkpoint as save_checkpoint does, into a staging sibling that then replaces ``dst``:
    the optimizer's param groups keyed by name (its state only ``with_state``) and the source run's RNG."""
    from harness.train.checkpoint import save_checkpoint

    staging = dst.with_name(dst.name + ".growing")
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(staging, new, opt if with_state else None, new_state)
    written = json.loads((staging / "state.json").read_text())
    if not with_state:  # no state (the loop starts a new AdamW), but the groups, keyed by name
        names = {id(p): n for n, p in new.named_parameters()}
        written["optimizer"] = {"state": {}, "param_groups": [
            {**{k: json_safe(v) for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
            for g in opt.param_groups]}
    shutil.copyfile(src / "rng.safetensors", staging / "rng.safetensors")  # the source run's RNG states
    written["rng"] = json.loads((src / "state.json").read_text())["rng"]
    (staging / "state.json").write_text(json.dumps(written, indent=1))
    replace_dir(staging, dst)


def summary_line(event: dict[str, Any]) -> dict[str, Any]:
    """The fields `harness grow` prints."""
    keys = ("method", "init", "optimizer", "schedule", "model", "from", "to", "changes", "params_before",
            "params_after", "function_preserving", "construction", "step", "data_position", "gap")
    return {k: event.get(k) for k in keys}
