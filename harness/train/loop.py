"""The training loop shared by every registry entry, on CPU and GPU.

AdamW + warmup/cosine (or WSD), gradient clipping, gradient accumulation, bf16 autocast on CUDA and fp32 on
CPU, optional torch.compile, periodic validation, JSONL metrics, tqdm progress, and checkpoints from which a
run continues exactly: the batch order is a pure function of (seed, step), and model, optimizer, schedule
position and every RNG are restored, so on CPU an interrupted-and-resumed run ends bitwise equal to an
uninterrupted one.
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from models import registry
from models.pattention import scale_tokens_of

from .. import data as data_lib
from .. import faults
from ..config import ConfigError, TrainConfig, identity_dict
from ..model_config import resolve_model_config
from ..runtime import autocast, autocast_dtype, environment, peak_memory_bytes, resolve_device
from . import distributed
from .checkpoint import load_checkpoint, read_state, recover, save_checkpoint
from .distributed import DistInfo, all_reduce_sum
from .validate import evaluate
from .optim import build_optimizer, lr_at, no_decay_names

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"
# what a resume must not change: every field that changes the trained weights (not how often it logs,
# checkpoints, or evaluates, where it runs, or how a global batch is split into micro-batches and ranks: a
# checkpoint resumes on any world size)
RESUME_FIELDS = ("model", "preset", "model_overrides", "data", "seq_len", "batch_size", "budget", "optim",
                 "schedule", "seed", "precision")


class Diverged(FloatingPointError):
    """A non-finite loss or gradient norm: the run stops before the optimizer applies it, so no checkpoint
    ever holds a diverged state."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        super().__init__(f"diverged at step {step}: loss {loss}, gradient norm {grad_norm}")
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    """Refuse to continue a checkpoint under a config that trains differently (one line naming the field)."""
    now, saved = identity_dict(cfg), identity_dict(saved)
    for name in RESUME_FIELDS:
        old, new = saved.get(name), json.loads(json.dumps(now.get(name), default=str))
        if name == "data" and isinstance(old, dict) and isinstance(new, dict):
            old, new = ({k: v for k, v in d.items() if k != "cache_dir"} for d in (old, new))  # where, not what
        if name in saved and old != new:
            raise ConfigError(f"{where}: holds a run with a different {name} ({old!r}, now {new!r}); resume it "
                              f"with its own config, or start over (harness train --restart, harness run "
                              f"--force), or use another --out")


def build_model_config(cfg: TrainConfig, vocab_size: int):
    """(model config, seq_len) of ``cfg`` for a tokenizer of ``vocab_size`` (harness.model_config)."""
    return resolve_model_config(cfg.model, cfg.preset, seq_len=cfg.seq_len, tokenizer_vocab=vocab_size,
                                overrides=cfg.model_overrides)


def total_steps(cfg: TrainConfig, flops_per_token: float, seq_len: int) -> int:
    tokens_per_step = cfg.batch_size * seq_len
    b = cfg.budget
    if b.steps is not None:
        return int(b.steps)
    if b.tokens is not None:
        return max(1, math.ceil(b.tokens / tokens_per_step))
    return max(1, math.ceil(b.flops / (flops_per_token * tokens_per_step)))


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = True, max_steps_this_run: int | None = None,
          on_log: Callable[[dict], None] | None = None, guard: Callable[[], None] | None = None) -> dict[str, Any]:
    """Train ``cfg`` into ``out_dir`` (metrics.jsonl, checkpoint/). Returns a summary of what was spent and
    reached. ``max_steps_this_run`` stops early without a final checkpoint, as a killed run would.
    Under torchrun it runs data-parallel (cfg.parallel); rank 0 alone writes. ``guard()`` runs before every
    checkpoint save and may raise to stop the run without writing (a matrix runner whose lease was taken over)."""
    cfg.validate()
    joined_here = not torch.distributed.is_initialized()
    info, device_spec = distributed.setup(cfg.device)
    try:
        return _train(cfg, Path(out_dir), resume, max_steps_this_run, on_log, info, device_spec, guard)
    finally:
        if joined_here:
            distributed.teardown(info)


def _train(cfg, out_dir, resume, max_steps_this_run, on_log, info: DistInfo, device_spec, guard=None) -> dict[str, Any]:
    device = resolve_device(device_spec, error=ConfigError)
    amp_dtype = autocast_dtype(cfg.precision, device)
    mode = distributed.resolve_mode(cfg.parallel, info)
    micro = cfg.micro_batch_size or cfg.batch_size // info.world_size
    if cfg.batch_size % (micro * info.world_size):
        raise ConfigError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size {micro} x "
                          f"{info.world_size} ranks")
    rows = cfg.batch_size // info.world_size  # this rank's share of every global batch
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    dataset = data_lib.prepare_dataset(cfg.data)
    model_cfg, seq_len = build_model_config(cfg, dataset.tokenizer.vocab_size)
    torch.manual_seed(cfg.seed)
    model = registry.build_from_config(model_cfg, cfg.model, device=device)
    model.train()
    exempt = no_decay_names(model, cfg.optim)
    wrapped = distributed.wrap(model, mode, device, amp_dtype if mode == "fsdp" else None)
    # named on the unwrapped module (DDP prefixes names with "module."); the same Parameter objects
    optimizer = build_optimizer(distributed.unwrap(wrapped), cfg.optim, device, exempt)
    if mode == "fsdp":
        amp_dtype = None  # FSDP2's mixed-precision policy already computes in bf16
    flops_per_token = model.flops_per_token(seq_len)
    own_steps = total_steps(cfg, flops_per_token, seq_len)  # this run's budget, counted from run_start
    batcher = dataset.batcher(seq_len, cfg.batch_size, cfg.seed)
    tokens_per_step = cfg.batch_size * seq_len

    ckpt_dir = out_dir / CHECKPOINT_DIR
    metrics_path = out_dir / METRICS_FILE
    # data_offset: batches are a pure function of (seed, data_offset + step); a run started from a grown
    # checkpoint continues the data stream where its base stopped. flops_offset: training FLOPs spent before
    # step 0 of this run (the base run of a growth chain), so records can count cumulative compute.
    # run_start: the step this run started at (non-zero when a grown checkpoint continues its base's schedule);
    # this run's tokens and FLOPs count from there
    start_step, wall_before, data_offset, flops_offset, lineage, run_start = 0, 0.0, 0, 0.0, [], 0
    resumed_state: dict[str, Any] = {}
    init_dir = None
    if resume and info.is_main:
        recover(ckpt_dir)  # an interrupted save: put the newest complete checkpoint back in place
    distributed.barrier(info)
    if resume and ckpt_dir.exists():
        init_dir = ckpt_dir
        check_resume_config(read_state(ckpt_dir).get("config") or {}, cfg, ckpt_dir)
    elif cfg.init_from:
        init_dir = Path(cfg.init_from)
    if init_dir is not None:
        own = init_dir == ckpt_dir
        state = load_checkpoint(init_dir, wrapped, optimizer if _has_optimizer_state(init_dir) else None,
                                distributed=info.enabled, is_main=info.is_main, restore_rng=own)
        start_step = state["step"]
        data_offset = state.get("data_position", start_step) - start_step
        lineage = state.get("growth", [])
        if own:  # resuming this run
            wall_before, flops_offset = state.get("wall_time", 0.0), state.get("flops_offset", 0.0)
            run_start = state.get("run_start", 0)
            resumed_state = state
            if info.is_main:
                _truncate_metrics(metrics_path, start_step)
        else:  # a new run from another run's (e.g. grown) checkpoint: its compute counts as spent before
            flops_offset = state.get("flops_offset", 0.0) + state.get("flops_spent", 0.0)
            run_start = start_step
            if info.is_main and metrics_path.exists():
                metrics_path.unlink()
    elif info.is_main and metrics_path.exists():
        metrics_path.unlink()
    distributed.barrier(info)
    # the run ends own_steps after it started (a grown run under schedule=continue starts at its base's step);
    # the LR schedule spans the run, or schedule.horizon_tokens from step 0 of the chain when set (Staged
    # Training: one schedule through growth)
    steps = run_start + own_steps
    horizon = steps if cfg.schedule.horizon_tokens is None else max(1, math.ceil(cfg.schedule.horizon_tokens
                                                                                 / tokens_per_step))

    init_eval: dict[str, Any] = {}
    if init_dir is not None and init_dir != ckpt_dir:
        # the starting point's validation loss (e.g. just after growth: the function-preservation gap)
        init_eval = evaluate(wrapped, dataset, seq_len, cfg.batch_size, micro, cfg.eval_batches, device, amp_dtype, info,
                             full=True)
        if info.is_main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": start_step, "tokens": 0, "flops": 0.0, "cumulative_flops": flops_offset,
                                    **init_eval}) + "\n")

    step_fn = torch.compile(wrapped) if cfg.compile else wrapped
    writer = _tensorboard(out_dir) if cfg.tensorboard and info.is_main else None
    summary: dict[str, Any] = {"params": model.num_params(), "non_embedding_params": model.num_params(True),
                               "flops_per_token": flops_per_token, "seq_len": seq_len, "total_steps": steps,
                               "tokens_per_step": tokens_per_step, "device": str(device),
                               "precision": "bfloat16" if (amp_dtype or mode == "fsdp" and device.type == "cuda") else "float32",
                               "world_size": info.world_size, "parallel": mode, "model_config": model_cfg.to_dict()}
    last_eval: dict[str, Any] = {}
    window_loss, window_n, window_t0, window_tokens = 0.0, 0, time.perf_counter(), 0
    run_t0 = time.perf_counter()
    end_step = steps if max_steps_this_run is None else min(steps, start_step + max_steps_this_run)
    bar = _progress(cfg.progress and info.is_main, start_step, steps, f"{cfg.model}/{cfg.preset}")
    train_loss, bar_rate = float("nan"), "-"
    fault = _fault_injection(info)
    nan_at = faults.nan_step()
    metrics = open(metrics_path, "a") if info.is_main else None
    try:
        for step in range(start_step, end_step):
            if fault is not None and step + 1 == fault:
                os.kill(os.getpid(), signal.SIGKILL)
            lr = lr_at(step, horizon, cfg.optim.lr, cfg.schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x_all, y_all = batcher.get_batch(data_offset + step, info.rank, info.world_size)
            loss_sum = 0.0
            for i in range(0, rows, micro):
                x, y = x_all[i:i + micro].to(device), y_all[i:i + micro].to(device)
                with autocast(device, amp_dtype):
                    logits = step_fn(x)
                # each micro-batch's share of this rank's mean; DDP / FSDP average the ranks' gradients
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) * (micro / rows)
                loss.backward()
                loss_sum += loss.item()
            if nan_at is not None and step + 1 == nan_at:
                for p in wrapped.parameters():
                    if p.grad is not None:
                        p.grad.fill_(float("nan"))
            grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), cfg.optim.grad_clip)
            grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
            if info.enabled:
                loss_sum = all_reduce_sum([loss_sum], info, device)[0] / info.world_size
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                raise Diverged(step + 1, loss_sum, grad_norm)  # before the step: no state of it is ever saved
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            train_loss = loss_sum
            window_loss, window_n, window_tokens = window_loss + loss_sum, window_n + 1, window_tokens + tokens_per_step
            done = step + 1
            record = None
            if done % cfg.log_every == 0 or done == steps:
                elapsed = time.perf_counter() - window_t0
                spent = (done - run_start) * tokens_per_step
                record = {"step": done, "tokens": spent, "flops": spent * flops_per_token,
                          "cumulative_flops": flops_offset + spent * flops_per_token,
                          "loss": window_loss / window_n, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
                window_loss, window_n, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
            if done % cfg.eval_every == 0 or done == steps:
                # the final evaluation scores the whole validation split; intermediate ones may subsample
                last_eval = evaluate(wrapped, dataset, seq_len, cfg.batch_size, micro, cfg.eval_batches, device,
                                     amp_dtype, info, full=done == steps)
                spent = (done - run_start) * tokens_per_step
                record = record or {"step": done, "tokens": spent, "flops": spent * flops_per_token,
                                    "cumulative_flops": flops_offset + spent * flops_per_token}
                record.update(last_eval)
            if record is not None and metrics is not None:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if writer is not None:
                    for k, v in record.items():
                        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                            writer.add_scalar(k, v, done)
                if on_log:
                    on_log(record)
            if bar is not None:
                if record and "tokens_per_s" in record:
                    bar_rate = f"{record['tokens_per_s']:.0f}"
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=bar_rate, refresh=False)
            if done % cfg.checkpoint_every == 0 or done == steps:
                if guard is not None:
                    guard()
                save_checkpoint(ckpt_dir, wrapped, optimizer, {
                    "step": done, "data_position": data_offset + done, "flops_offset": flops_offset,
                    "flops_spent": (done - run_start) * tokens_per_step * flops_per_token, "run_start": run_start,
                    "growth": lineage,
                    "pattention_scale_tokens": scale_tokens_of(model),
                    "wall_time": wall_before + time.perf_counter() - run_t0,
                    "world_size": info.world_size, "config": asdict(cfg), "model_name": cfg.model,
                    "model_config": model_cfg.to_dict(),
                    # the final checkpoint carries the final measurements, so a record can always be rebuilt
                    # from it (a kill after this save and before the record is written loses nothing)
                    **({"final_eval": last_eval, "final_train_loss": train_loss,
                        "final_tokens_per_s": (done - start_step) * tokens_per_step
                        / max(time.perf_counter() - run_t0, 1e-9) if done > start_step else None,
                        "final_peak_memory_bytes": peak_memory_bytes(device),
                        "init_val_loss": init_eval.get("val_loss")} if done == steps else {})},
                    is_main=info.is_main)
                distributed.barrier(info)
                if done == steps:
                    faults.point("after_final_checkpoint")
    finally:
        if metrics is not None:
            metrics.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    done = end_step
    if start_step >= steps and not last_eval:
        # nothing left to train: the run finished before; its final measurements come from the checkpoint
        last_eval = dict(resumed_state.get("final_eval") or {})
        train_loss = resumed_state.get("final_train_loss", train_loss)
        if resumed_state.get("init_val_loss") is not None:
            init_eval = {"val_loss": resumed_state["init_val_loss"]}
        if not last_eval:  # a checkpoint written before final measurements were kept: measure again
            last_eval = evaluate(wrapped, dataset, seq_len, cfg.batch_size, micro, cfg.eval_batches, device,
                                 amp_dtype, info, full=True)
    wall = wall_before + time.perf_counter() - run_t0
    spent = (done - run_start) * tokens_per_step
    summary.update({"steps": done, "tokens": spent, "flops": spent * flops_per_token,
                    "flops_offset": flops_offset, "cumulative_flops": flops_offset + spent * flops_per_token,
                    "data_offset": data_offset, "growth": lineage, "init_from": cfg.init_from,
                    **({"init_val_loss": init_eval["val_loss"]} if init_eval else {}),
                    "wall_time_s": wall, "tokens_per_s": (done - start_step) * tokens_per_step / max(time.perf_counter() - run_t0, 1e-9),
                    "peak_memory_bytes": peak_memory_bytes(device), "final_train_loss": train_loss,
                    "complete": done >= steps, "resumed_from_step": start_step or None,
                    "dataset": dataset.meta_summary(), "environment": environment()})
    summary.update({k: v for k, v in last_eval.items()})
    if start_step >= steps and resumed_state.get("final_tokens_per_s"):
        # a record rebuilt from the final checkpoint reports the run's own throughput and memory, not this
        # (training-free) process's
        summary["tokens_per_s"] = resumed_state["final_tokens_per_s"]
        summary["peak_memory_bytes"] = resumed_state.get("final_peak_memory_bytes", summary["peak_memory_bytes"])
    return summary


def _has_optimizer_state(path: Path) -> bool:
    """A grown checkpoint with a fresh optimizer holds no optimizer state: the new AdamW starts empty."""
    state = read_state(path)
    return bool(state.get("optimizer", {}).get("state"))


def _fault_injection(info: DistInfo) -> int | None:
    """HARNESS_FAULT_KILL=RANK:STEP makes that rank SIGKILL itself before STEP: how the tests show that a
    dead rank ends the job with a clear error and leaves the last complete checkpoint usable."""
    spec = os.environ.get("HARNESS_FAULT_KILL")
    if not spec:
        return None
    rank, step = (int(v) for v in spec.split(":"))
    return step if rank == info.rank else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after the checkpoint we resume from (they will be logged again)."""
    if not path.exists():
        return
    kept, lines = [], path.read_text().splitlines()
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill mid-write: it is logged again from the checkpoint
    if len(kept) != len(lines):
        from ..store import write_text_atomic
        write_text_atomic(path, "".join(l + "\n" for l in kept))  # a kill here leaves the old log whole


def _progress(enabled: bool, start: int, total: int, desc: str):
    if not enabled:
        return None
    from .progress import progress
    return progress(total, start, desc)  # a bar on a terminal, a line every 30 s in a log


def _tensorboard(out_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # tensorboard is optional
        raise ConfigError(f"tensorboard: true needs the tensorboard package ({e})") from None
    return SummaryWriter(str(out_dir / "tensorboard"))


