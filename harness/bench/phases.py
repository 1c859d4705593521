"""One bench row: the model built from its config, then its phases -- training steps, the decoding cache,
prefill, cached decode -- each timed, each failing on its own (an OOM marks the row "OOM", any other error
"failed", and the other phases still run)."""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from models import registry

from ..model_config import resolve_model_config
from ..runtime import autocast, device_name  # the training loop's autocast: bench times what the loop runs
from .memory import MemoryMeter, is_oom, release_memory, saved_activation_bytes
from .spec import BenchSpec
from .timing import attention_backend, sdpa_context, throughput, time_repeats


# ==========================================================================================================
# The steps the phases time
# ==========================================================================================================
def make_loss_fn(model, compile: bool = False) -> Callable:
    """forward + cross-entropy; compiled with torch.compile when asked (backward follows through AOTAutograd)."""
    def loss_fn(inputs, targets):
        logits = model(inputs)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    return torch.compile(loss_fn) if compile else loss_fn


def train_step(model, optimizer, loss_fn, inputs, targets, amp_dtype):
    """One training step: forward + loss under autocast, backward, AdamW step, zero_grad."""
    with autocast(inputs.device, amp_dtype):
        loss = loss_fn(inputs, targets)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def prefill_step(model, tokens, cache):
    """A prefill: every prompt token through the cache API (the cache advances by T)."""
    return model.step(tokens, cache)


def decode_step(model, tokens, cache):
    """One cached decoding step for (B, 1) tokens; returns the greedy next tokens (B, 1)."""
    return model.step(tokens, cache)[:, -1].argmax(-1, keepdim=True)


# ==========================================================================================================
# The phases
# ==========================================================================================================
def train_phase(spec: BenchSpec, model, seq_len: int, batch: int, vocab: int,
                meter: MemoryMeter | None = None) -> dict[str, Any]:
    """Timed training steps on random tokens, then (CPU) one untimed step sampled for peak memory; the
    optimizer and data die with this frame."""
    from ..config import OptimConfig
    from ..train.optim import build_optimizer
    device = spec.device
    model.train()
    optimizer = build_optimizer(model, OptimConfig(), device)
    loss_fn = make_loss_fn(model, spec.compile)
    g = torch.Generator(device="cpu").manual_seed(1)
    data = torch.randint(0, vocab, (batch, seq_len + 1), generator=g).to(device)
    inputs, targets = data[:, :-1], data[:, 1:]
    try:
        times, first = time_repeats(
            lambda _: train_step(model, optimizer, loss_fn, inputs, targets, spec.amp_dtype),
            device, spec.warmup, spec.repeats)
        if meter is not None and device.type != "cuda":  # CUDA: max_memory_allocated saw the timed steps
            with meter.sampling():
                train_step(model, optimizer, loss_fn, inputs, targets, spec.amp_dtype)
        saved = ({} if spec.compile else
                 saved_activation_bytes(model, loss_fn, inputs, targets, spec.amp_dtype))
    finally:
        model.zero_grad(set_to_none=True)
    out = {f"train_{k}": v for k, v in throughput(times, batch * seq_len).items()}
    out.update(saved)
    out["train_first_step_s"] = first
    if meter is not None:
        out["peak_memory_bytes"] = meter.peak()
    return out


def prefill_phase(spec: BenchSpec, model, seq_len: int, batch: int, vocab: int,
                  meter: MemoryMeter | None = None) -> dict[str, Any]:
    """Prefill of ``batch`` prompts of seq_len tokens into a fresh cache (allocation not timed); then (CPU) one
    untimed prefill sampled for peak memory."""
    g = torch.Generator(device="cpu").manual_seed(2)
    prompt = torch.randint(0, vocab, (batch, seq_len), generator=g).to(spec.device)
    times, _ = time_repeats(lambda c: prefill_step(model, prompt, c), spec.device, spec.warmup, spec.repeats,
                            setup=lambda: model.allocate_cache(batch, seq_len))
    out = {f"prefill_{k}": v for k, v in throughput(times, batch * seq_len).items()}
    out["prefill_batch"] = batch
    if meter is not None and spec.device.type != "cuda":
        cache = model.allocate_cache(batch, seq_len)
        with meter.sampling():
            prefill_step(model, prompt, cache)
    return out


def decode_phase(spec: BenchSpec, model, seq_len: int, batch: int, vocab: int) -> dict[str, Any]:
    """Greedy cached decoding of ``new`` tokens after a prompt of seq_len - new (prefill not timed), so the
    context ends at seq_len; ``new`` = min(decode_tokens, seq_len // 2)."""
    new = max(1, min(spec.decode_tokens, seq_len // 2))
    g = torch.Generator(device="cpu").manual_seed(3)
    prompt = torch.randint(0, vocab, (batch, seq_len - new), generator=g).to(spec.device)

    def setup():
        cache = model.allocate_cache(batch, seq_len)
        nxt = prefill_step(model, prompt, cache)[:, -1].argmax(-1, keepdim=True)
        return cache, nxt

    def run(state):
        cache, tok = state
        for _ in range(new):
            tok = decode_step(model, tok, cache)
        return tok

    times, _ = time_repeats(run, spec.device, spec.warmup, spec.repeats, setup=setup)
    tp = throughput(times, batch * new)
    return {"batch": batch, "prompt_len": seq_len - new, "new_tokens": new, "status": "ok",
            "ms_per_token": 1e3 * tp["time_s_median"] / new, **tp}


# ==========================================================================================================
# One row
# ==========================================================================================================
def bench_row(spec: BenchSpec, model_name: str, preset: str, seq_len: int, batch: int,
              peak: dict[str, Any], pattention_impl: str | None = None) -> dict[str, Any]:
    """Measure one (model, preset, seq_len, batch[, Pattention implementation]) row. Phases fail
    independently: an OOM in one marks the row "OOM" (any other error: "failed", with the message) and the
    other phases still run."""
    device = spec.device
    row = _row_header(spec, model_name, preset, seq_len, batch, peak)
    cfg = _row_config(model_name, preset, seq_len, pattention_impl)
    row.update(params=cfg.num_params(), non_embedding_params=cfg.num_params(non_embedding=True),
               flops_per_token=cfg.flops_per_token(seq_len),
               # the configured path (a label); None: the model has no Pattention
               pattention_impl=cfg.implementation_fields().get("pattention_impl"))
    if spec.compile:
        torch._dynamo.reset()

    meter = MemoryMeter(device).start()
    row["memory_method"] = meter.method
    model = None
    try:
        with sdpa_context(spec.backend, device):
            try:
                torch.manual_seed(0)
                model = registry.build_from_config(cfg, model_name, device=device)
            except Exception as e:  # noqa: BLE001 - recorded in the row
                _failed(row, "build", e)
                return row
            row.update(_backends_expected(spec, model, seq_len))
            _train_into(row, spec, model, seq_len, batch, cfg.vocab_size, peak, meter)
            release_memory(device, collect=bool(row["errors"]))
            _inference_into(row, spec, model, seq_len, batch, cfg.vocab_size, meter)
    finally:
        meter.stop()
        model = None
        release_memory(device, collect=device.type == "cuda" or bool(row["errors"]))
    return row


def _row_header(spec: BenchSpec, model_name: str, preset: str, seq_len: int, batch: int,
                peak: dict[str, Any]) -> dict[str, Any]:
    """What identifies the row and how it was measured; the phases add their results after these keys."""
    device = spec.device
    return {
        "model": model_name, "preset": preset, "seq_len": seq_len, "batch_size": batch,
        "device": device.type if device.index is None else str(device), "device_name": device_name(device),
        "dtype": spec.dtype, "compile": spec.compile, "backend": spec.backend,
        "repeats": spec.repeats, "warmup": spec.warmup, "status": "ok", "errors": {},
        "torch": torch.__version__, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **peak,
    }


def _row_config(model_name: str, preset: str, seq_len: int, pattention_impl: str | None):
    """The preset's config (its vocabulary) built for seq_len (learned positions / rotary: max_seq_len raised
    when shorter), the Pattention implementation overridden when asked."""
    overrides = {"pattention_impl": pattention_impl} if pattention_impl is not None else None
    cfg, _ = resolve_model_config(model_name, preset, seq_len=seq_len, overrides=overrides)
    return cfg


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _failed(row: dict[str, Any], phase: str, exc: BaseException) -> str:
    """Record a phase's error in the row (an OOM marks the row "OOM" unless it already failed otherwise; any
    other error marks it "failed"); returns the phase's status."""
    oom = is_oom(exc)
    row["errors"][phase] = ("OOM: " if oom else "") + _first_line(exc)
    if oom and row["status"] == "ok":
        row["status"] = "OOM"
    elif not oom:
        row["status"] = "failed"
    return "OOM" if oom else "failed"


def _backends_expected(spec: BenchSpec, model, seq_len: int) -> dict[str, Any]:
    """The SDPA backend the dispatcher selects for the training / prefill / decode shapes (call inside
    sdpa_context), and the scan backend the model expects to run."""
    device, dt = spec.device, spec.compute_dtype
    backends = {
        "train": attention_backend(model, device, dt, seq_len, seq_len, grad=True),
        "prefill": attention_backend(model, device, dt, seq_len, seq_len, mask=True),
        "decode": attention_backend(model, device, dt, 1, seq_len),
    }
    return {"attention_backends": backends, "attention_backend": backends["train"],
            "scan_backend_expected": model.backends().get("scan")}


def _train_into(row: dict[str, Any], spec: BenchSpec, model, seq_len: int, batch: int, vocab: int,
                peak: dict[str, Any], meter: MemoryMeter) -> None:
    """The training phase's results, throughput in FLOP/s and MFU, and the backends the timed steps ran."""
    try:
        row.update(train_phase(spec, model, seq_len, batch, vocab, meter))
        row["train_flops_per_s"] = row["train_tokens_per_s"] * row["flops_per_token"]
        row["mfu"] = row["train_flops_per_s"] / peak["peak_flops"]
        ran = model.backends_ran()  # what the timed steps ran ("auto" resolves per device and shape)
        if "scan" in ran:
            row["scan_backend"] = ran["scan"]
        if ran.get("pattention"):
            row["pattention_impl_ran"] = ran["pattention"]
    except Exception as e:  # noqa: BLE001 - recorded in the row
        _failed(row, "train", e)


def _inference_into(row: dict[str, Any], spec: BenchSpec, model, seq_len: int, batch: int, vocab: int,
                    meter: MemoryMeter) -> None:
    """The cache's bytes per sequence, prefill, then cached decode at each decode batch; and the inference
    peak memory."""
    device, dt = spec.device, spec.compute_dtype
    # inference: weights and cache in the row's dtype (bf16 on GPU; Mamba's SSM state stays fp32)
    model.eval()
    if dt != torch.float32:
        model.to(dt)
    meter.reset_peak()
    with torch.inference_mode():
        try:
            cache = model.allocate_cache(1, seq_len)
            row.update(cache_bytes_per_seq=cache.nbytes(), cache_kind=type(cache).__name__,
                       cache_len=seq_len)
            cache = None
        except Exception as e:  # noqa: BLE001 - recorded in the row
            _failed(row, "cache", e)
        try:
            row.update(prefill_phase(spec, model, seq_len, batch, vocab, meter))
        except Exception as e:  # noqa: BLE001
            _failed(row, "prefill", e)
        release_memory(device, collect=bool(row["errors"]))
        row["decode"] = {}
        for db in spec.decode_batches:
            try:
                row["decode"][str(db)] = decode_phase(spec, model, seq_len, db, vocab)
            except Exception as e:  # noqa: BLE001
                row["decode"][str(db)] = {"batch": db, "status": _failed(row, f"decode_b{db}", e)}
            release_memory(device, collect=bool(row["errors"]))
        ran = model.backends_ran()
        if "scan" in ran:
            row["decode_scan_backend"] = ran["scan"]
    row["inference_peak_memory_bytes"] = meter.peak()
