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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from models import registry
from models.pattention import scale_tokens_of

from .. import data as data_lib
from .. import faults
from ..config import ConfigError, TrainConfig
from ..model_config import resolve_model_config
from ..runtime import autocast, autocast_dtype, environment, peak_memory_bytes, resolve_device
from . import distributed
from .accounting import Accounting
from .checkpoint import save_checkpoint
from .distributed import DistInfo, all_reduce_sum
from .resume import StartState, start_state
from .validate import evaluate
from .optim import build_optimizer, lr_at, no_decay_names

CHECKPOINT_DIR = "checkpoint"
METRICS_FILE = "metrics.jsonl"


class Diverged(FloatingPointError):
    """A non-finite loss or gradient norm: the run stops before the optimizer applies it, so no checkpoint
    ever holds a diverged state."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        super().__init__(f"diverged at step {step}: loss {loss}, gradient norm {grad_norm}")
        self.step, self.loss, self.grad_norm = step, loss, grad_norm


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


@dataclass
class _Run:
    """A run's pieces, built once by :func:`_build`: where it runs, its data, model and optimizer."""
    cfg: TrainConfig
    info: DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None   # None: fp32 (or FSDP2, whose mixed-precision policy computes in bf16)
    mode: str                       # none | ddp | fsdp
    micro: int                      # rows per forward/backward
    rows: int                       # this rank's share of every global batch
    dataset: Any
    batcher: Any
    model_cfg: Any
    seq_len: int
    model: torch.nn.Module          # the registry model
    wrapped: torch.nn.Module        # ... under DDP / FSDP2 (the model itself when not distributed)
    optimizer: torch.optim.Optimizer
    flops_per_token: float
    forward: Callable | None = None  # wrapped, or torch.compile(wrapped); set once the starting point is scored

    def train_step(self, step: int, lr: float, data_offset: int) -> tuple[float, float]:
        """One optimizer step (0-based ``step``) at rate ``lr`` over the micro-batches of global batch
        ``data_offset + step``: (training loss averaged over ranks, gradient norm before clipping). Raises
        Diverged before the optimizer applies a non-finite loss or gradient norm."""
        info, device, micro, rows = self.info, self.device, self.micro, self.rows
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x_all, y_all = self.batcher.get_batch(data_offset + step, info.rank, info.world_size)
        loss_sum = 0.0
        for i in range(0, rows, micro):
            x, y = x_all[i:i + micro].to(device), y_all[i:i + micro].to(device)
            with autocast(device, self.amp_dtype):
                logits = self.forward(x)
            # each micro-batch's share of this rank's mean; DDP / FSDP average the ranks' gradients
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) * (micro / rows)
            loss.backward()
            loss_sum += loss.item()
        faults.nan_gradients(self.wrapped.parameters(), step + 1)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), self.cfg.optim.grad_clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        if info.enabled:
            loss_sum = all_reduce_sum([loss_sum], info, device)[0] / info.world_size
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            raise Diverged(step + 1, loss_sum, grad_norm)  # before the step: no state of it is ever saved
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm

    def evaluate(self, full: bool) -> dict[str, Any]:
        """Validation loss: the whole split when ``full``, else cfg.eval_batches batches spread over it."""
        cfg = self.cfg
        return evaluate(self.wrapped, self.dataset, self.seq_len, cfg.batch_size, self.micro, cfg.eval_batches,
                        self.device, self.amp_dtype, self.info, full=full)


def _build(cfg: TrainConfig, out_dir: Path, info: DistInfo, device_spec: str) -> _Run:
    """Device, data, the model (seeded with cfg.seed), its DDP / FSDP2 wrapper and the optimizer."""
    device = resolve_device(device_spec, error=ConfigError)
    amp_dtype = autocast_dtype(cfg.precision, device)
    mode = distributed.resolve_mode(cfg.parallel, info)
    micro = cfg.micro_batch_size or cfg.batch_size // info.world_size
    if cfg.batch_size % (micro * info.world_size):
        raise ConfigError(f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size {micro} x "
                          f"{info.world_size} ranks")
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
    batcher = dataset.batcher(seq_len, cfg.batch_size, cfg.seed)
    return _Run(cfg=cfg, info=info, device=device, amp_dtype=amp_dtype, mode=mode, micro=micro,
                rows=cfg.batch_size // info.world_size, dataset=dataset, batcher=batcher, model_cfg=model_cfg,
                seq_len=seq_len, model=model, wrapped=wrapped, optimizer=optimizer, flops_per_token=flops_per_token)


def _train(cfg, out_dir, resume, max_steps_this_run, on_log, info: DistInfo, device_spec, guard=None) -> dict[str, Any]:
    run = _build(cfg, out_dir, info, device_spec)
    tokens_per_step = cfg.batch_size * run.seq_len
    metrics_path = out_dir / METRICS_FILE
    start = start_state(cfg, resume, out_dir / CHECKPOINT_DIR, metrics_path, run.wrapped, run.optimizer, info)
    # the run ends its budget's steps after it started (a grown run under schedule=continue starts at its base's
    # step); the LR schedule spans the run, or schedule.horizon_tokens from step 0 of the chain when set (Staged
    # Training: one schedule through growth)
    steps = start.run_start + total_steps(cfg, run.flops_per_token, run.seq_len)
    horizon = steps if cfg.schedule.horizon_tokens is None else max(1, math.ceil(cfg.schedule.horizon_tokens
                                                                                 / tokens_per_step))
    init_eval = _score_start(run, start, metrics_path) if start.from_other_run else {}
    run.forward = torch.compile(run.wrapped) if cfg.compile else run.wrapped
    acct = Accounting(step=start.start_step, run_start=start.run_start, tokens_per_step=tokens_per_step,
                      flops_per_token=run.flops_per_token, flops_offset=start.flops_offset)
    end_step = steps if max_steps_this_run is None else min(steps, start.start_step + max_steps_this_run)
    last_eval, train_loss = _train_steps(run, out_dir, start, acct, steps, end_step, horizon, init_eval, on_log,
                                         guard)
    # (already there, unless a checkpoint lies past the budget: the summary then reports the budget's end)
    acct.step = end_step
    if start.start_step >= steps and not last_eval:
        # nothing left to train: the run finished before; its final measurements come from the checkpoint
        last_eval, train_loss, init_eval = _final_measurements(run, start.resumed_state, train_loss, init_eval)
    return _summary(run, start, acct, steps, init_eval, last_eval, train_loss)


def _score_start(run: _Run, start: StartState, metrics_path: Path) -> dict[str, Any]:
    """The validation loss of another run's checkpoint this run starts from (e.g. just after growth: the
    function-preservation gap), logged as the first metrics line."""
    init_eval = run.evaluate(full=True)
    if run.info.is_main:
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"step": start.start_step, "tokens": 0, "flops": 0.0,
                                "cumulative_flops": start.flops_offset, **init_eval}) + "\n")
    return init_eval


def _train_steps(run: _Run, out_dir: Path, start: StartState, acct: Accounting, steps: int, end_step: int,
                 horizon: int, init_eval: dict[str, Any], on_log, guard) -> tuple[dict[str, Any], float]:
    """Train from acct.step to ``end_step`` of ``steps``: each step, then its hooks (log, evaluate, write the
    record, progress bar, checkpoint). Returns (the last evaluation, the last step's training loss)."""
    cfg, info = run.cfg, run.info
    writer = _tensorboard(out_dir) if cfg.tensorboard and info.is_main else None
    bar = _progress(cfg.progress and info.is_main, acct.step, steps, f"{cfg.model}/{cfg.preset}")
    last_eval: dict[str, Any] = {}
    train_loss, bar_rate = float("nan"), "-"
    metrics = open(out_dir / METRICS_FILE, "a") if info.is_main else None
    try:
        for step in range(acct.step, end_step):
            faults.kill_before_step(info.rank, step + 1)
            lr = lr_at(step, horizon, cfg.optim.lr, cfg.schedule)
            train_loss, grad_norm = run.train_step(step, lr, start.data_offset)
            acct.advance(train_loss)
            final = acct.step == steps
            record = None
            if acct.step % cfg.log_every == 0 or final:
                window = acct.close_window()
                record = {**acct.counts(), "loss": window["loss"], "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": window["tokens_per_s"]}
            if acct.step % cfg.eval_every == 0 or final:
                # the final evaluation scores the whole validation split; intermediate ones may subsample
                last_eval = run.evaluate(full=final)
                record = {**(record or acct.counts()), **last_eval}
            if record is not None and metrics is not None:
                _write_record(record, metrics, writer, on_log)
            if bar is not None:
                if record and "tokens_per_s" in record:
                    bar_rate = f"{record['tokens_per_s']:.0f}"
                bar.update(1)
                bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=bar_rate, refresh=False)
            if acct.step % cfg.checkpoint_every == 0 or final:
                if guard is not None:
                    guard()
                # the final checkpoint carries the final measurements, so a record can always be rebuilt from
                # it (a kill after this save and before the record is written loses nothing)
                _save(run, out_dir / CHECKPOINT_DIR, acct, start, {
                    "final_eval": last_eval, "final_train_loss": train_loss, "final_tokens_per_s": acct.tokens_per_s(),
                    "final_peak_memory_bytes": peak_memory_bytes(run.device),
                    "init_val_loss": init_eval.get("val_loss")} if final else {})
                if final:
                    faults.point("after_final_checkpoint")
    finally:
        if metrics is not None:
            metrics.close()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    return last_eval, train_loss


def _summary(run: _Run, start: StartState, acct: Accounting, steps: int, init_eval: dict[str, Any],
             last_eval: dict[str, Any], train_loss: float) -> dict[str, Any]:
    """What train() returns: the model, what was spent and reached, where and how it ran."""
    cfg, info, device = run.cfg, run.info, run.device
    summary: dict[str, Any] = {
        "params": run.model.num_params(), "non_embedding_params": run.model.num_params(True),
        "flops_per_token": run.flops_per_token, "seq_len": run.seq_len, "total_steps": steps,
        "tokens_per_step": acct.tokens_per_step, "device": str(device),
        "precision": "bfloat16" if (run.amp_dtype or run.mode == "fsdp" and device.type == "cuda") else "float32",
        "world_size": info.world_size, "parallel": run.mode, "model_config": run.model_cfg.to_dict(),
        "steps": acct.step, "tokens": acct.tokens, "flops": acct.flops,
        "flops_offset": acct.flops_offset, "cumulative_flops": acct.cumulative_flops,
        "data_offset": start.data_offset, "growth": start.lineage, "init_from": cfg.init_from,
        **({"init_val_loss": init_eval["val_loss"]} if init_eval else {}),
        "wall_time_s": start.wall_before + acct.elapsed(), "tokens_per_s": acct.tokens_per_s(),
        "peak_memory_bytes": peak_memory_bytes(device), "final_train_loss": train_loss,
        "complete": acct.step >= steps, "resumed_from_step": start.start_step or None,
        "dataset": run.dataset.meta_summary(), "environment": environment(), **last_eval}
    resumed = start.resumed_state
    if start.start_step >= steps and resumed.get("final_tokens_per_s"):
        # a record rebuilt from the final checkpoint reports the run's own throughput and memory, not this
        # (training-free) process's
        summary["tokens_per_s"] = resumed["final_tokens_per_s"]
        summary["peak_memory_bytes"] = resumed.get("final_peak_memory_bytes", summary["peak_memory_bytes"])
    return summary


def _write_record(record: dict[str, Any], metrics, writer, on_log) -> None:
    """One metrics line (flushed), its scalars to TensorBoard, and the caller's on_log."""
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()
    if writer is not None:
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                writer.add_scalar(k, v, record["step"])
    if on_log:
        on_log(record)


def _save(run: _Run, ckpt_dir: Path, acct: Accounting, start: StartState, final: dict[str, Any]) -> None:
    """The checkpoint at the current step (every rank calls it; rank 0 writes), then a barrier. ``final``: the
    final measurements the last checkpoint carries."""
    cfg, info = run.cfg, run.info
    save_checkpoint(ckpt_dir, run.wrapped, run.optimizer, {
        "step": acct.step, "data_position": start.data_offset + acct.step, "flops_offset": acct.flops_offset,
        "flops_spent": acct.flops, "run_start": acct.run_start, "growth": start.lineage,
        "pattention_scale_tokens": scale_tokens_of(run.model),
        "wall_time": start.wall_before + acct.elapsed(),
        "world_size": info.world_size, "config": asdict(cfg), "model_name": cfg.model,
        "model_config": run.model_cfg.to_dict(), **final},
        is_main=info.is_main)
    distributed.barrier(info)


def _final_measurements(run: _Run, state: dict[str, Any], train_loss: float, init_eval: dict[str, Any]):
    """(final eval, final train loss, init eval) of a run that finished before, from its final checkpoint's
    ``state``; a checkpoint written before final measurements were kept is evaluated again."""
    last_eval = dict(state.get("final_eval") or {})
    train_loss = state.get("final_train_loss", train_loss)
    if state.get("init_val_loss") is not None:
        init_eval = {"val_loss": state["init_val_loss"]}
    if not last_eval:
        last_eval = run.evaluate(full=True)
    return last_eval, train_loss, init_eval


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


