"""Checks that run before anything is written: a request that cannot work fails here with one line naming the
field or the file (the CLI prints it and exits 2), instead of after a run directory, a failed record or a
report exists.

- :func:`check_model_fit`: the registry config the training loop will build (the same overrides as
  ``harness.model_config.resolve_model_config``), the context it supports, and a rough estimate of one micro-batch's
  training memory against the memory available on the device.
- :func:`check_data`: the data source exists and holds documents (read lazily: at most the first two
  documents, never tokenized), the tokenizer is known and its files are installed (never loaded).
- :func:`check_device`: the device exists here (``cuda`` on a machine without CUDA is refused).
- :func:`preflight_train` / :func:`preflight_matrix`: all of the above for ``harness train`` / ``harness run``,
  plus the output paths (a matrix name may not lead outside the results root).
"""
from __future__ import annotations

import importlib.util
import itertools
import math
import os
from pathlib import Path
from typing import Any

import torch

from models import registry

from . import runtime
from .config import ConfigError, DataConfig, TrainConfig
from .model_config import resolve_model_config

# the training loop's bookkeeping, mirrored here (harness.train.loop)
CHECKPOINT_DIR = "checkpoint"
# vocabulary of the named tokenizers without loading them (harness.data.tokenizers; neox: 50277 + 3 specials)
TOKENIZER_VOCAB = {"byte": 257, "gpt2": 50257, "neox": 50280}

# ---------------------------------------------------------------------------------------------------------
# memory

# Activation bytes per token, per layer and per unit of width for one training micro-batch, at 16-bit
# activations: Korthikanti et al. 2022 ("Reducing activation recomputation") count 34 s*b*h per transformer
# layer, plus 5 a*s^2*b for the attention scores -- a term left out here, because attention goes through
# scaled_dot_product_attention, whose flash / memory-efficient kernels (on CUDA and on CPU) never materialise
# the S x S scores. fp32 activations double it. Measured on CPU (fp32, the tiny and small presets) the peak is
# about 2x this (~140 B instead of 68: SwiGLU, rotary and norm temporaries), so the estimate is a low one: a
# refusal means the run cannot fit, while passing does not promise that it will.
ACTIVATION_BYTES_16BIT = 34
LOGIT_BYTES = 4 * 3            # fp32 logits, their log-softmax and its gradient, per token and vocabulary entry
TRAIN_BYTES_PER_PARAM = 16     # fp32 weights, gradients, AdamW exp_avg and exp_avg_sq
INFER_BYTES_PER_PARAM = 4


def available_memory(device: torch.device, world_size: int = 1) -> tuple[int, str] | None:
    """(bytes, what) a run on ``device`` may use, or None when unknown (then no memory check runs): free GPU
    memory (total memory under torchrun, so that the parent never opens a CUDA context on the children's
    devices), or MemAvailable on Linux for the CPU."""
    if device.type == "cuda":
        try:
            index = device.index if device.index is not None else torch.cuda.current_device()
            if world_size > 1:
                return int(torch.cuda.get_device_properties(index).total_memory), f"cuda:{index} memory"
            free, _ = torch.cuda.mem_get_info(index)
            return int(free), f"free on cuda:{index}"
        except Exception:  # noqa: BLE001 - no figure, no check
            return None
    if device.type != "cpu":
        return None
    free = mem_available_bytes()
    return None if free is None else (free, "MemAvailable")


def mem_available_bytes() -> int | None:
    """Linux's MemAvailable (RAM a new allocation can get without swapping), or None where it is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def training_memory_bytes(model_cfg, seq_len: int, micro_batch: int, activation_bytes: int = 4) -> dict[str, float]:
    """A rough (low) estimate of the memory one training micro-batch of ``micro_batch`` x ``seq_len`` tokens
    needs: weights + gradients + AdamW state, the logits, and every layer's saved activations (see
    ``ACTIVATION_BYTES_16BIT``). ``activation_bytes``: 2 under bf16 autocast, 4 in fp32."""
    tokens = float(micro_batch) * float(seq_len)
    parts = {
        "params": float(model_cfg.num_params()) * TRAIN_BYTES_PER_PARAM,
        "logits": tokens * model_cfg.embedding_rows * LOGIT_BYTES,
        "layers": tokens * model_cfg.width * model_cfg.n_layers * ACTIVATION_BYTES_16BIT * activation_bytes / 2
        * model_cfg.activation_share,  # declared by the config (models.base.ModelConfig)
    }
    parts["total"] = sum(parts.values())
    return parts


def inference_memory_bytes(model_cfg, seq_len: int, batch: int, activation_bytes: int = 4) -> dict[str, float]:
    """The same estimate for a forward pass without gradients (lm-eval scoring): weights, the logits (and the
    log-softmax over them) and one layer's activations at a time."""
    tokens = float(batch) * float(seq_len)
    parts = {
        "params": float(model_cfg.num_params()) * INFER_BYTES_PER_PARAM,
        "logits": tokens * model_cfg.embedding_rows * 4 * 2,
        "layers": tokens * model_cfg.width * ACTIVATION_BYTES_16BIT * activation_bytes / 2,
    }
    parts["total"] = sum(parts.values())
    return parts


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def memory_message(parts: dict[str, float], memory: tuple[int, str]) -> str | None:
    """None when the estimate fits ``memory``; otherwise the reason, in words."""
    have, what = memory
    if parts["total"] <= have:
        return None
    return (f"needs an estimated {_gib(parts['total'])} (logits {_gib(parts['logits'])}, activations "
            f"{_gib(parts['layers'])}, weights/optimizer {_gib(parts['params'])}), more than the {_gib(have)} "
            f"available ({what})")


# ---------------------------------------------------------------------------------------------------------
# device

def check_device(spec: str, field: str = "device", world_size: int = 1) -> torch.device:
    """The device ``spec`` (auto | cpu | cuda | cuda:N) names, or ConfigError naming ``field``: what
    ``harness.runtime.resolve_device`` refuses, and a CUDA index or rank count beyond this machine's GPUs,
    MPS without MPS, or any other device type."""
    if spec in (None, ""):  # (runtime takes a blank spec for auto; a config or --device must say auto)
        raise ConfigError(f"{field}: {spec!r} is not a device (auto, cpu, cuda or cuda:N)")
    device = runtime.resolve_device(spec, error=ConfigError, field=field)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{field}: {spec!r} asked for but this machine has {count} CUDA device(s)")
        if world_size > count:
            raise ConfigError(f"{field}: {world_size} ranks on {spec!r} need {world_size} CUDA devices, "
                              f"this machine has {count}")
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError(f"{field}: {spec!r} asked for but MPS is not available on this machine")
    elif device.type != "cpu":
        raise ConfigError(f"{field}: {spec!r} is not one of auto, cpu, cuda, cuda:N")
    return device


def _activation_bytes(precision: str, device: torch.device) -> int:
    """2 under bf16 autocast (precision bf16, or auto on CUDA: harness.runtime.autocast_dtype), else 4."""
    return 4 if runtime.autocast_dtype(precision, device) is None else 2


# ---------------------------------------------------------------------------------------------------------
# the model

def build_model_config(cfg: TrainConfig, vocab_size: int | None = None):
    """(model config, seq_len) exactly as the training loop resolves them (harness.model_config): the
    vocabulary follows the tokenizer (rounded up to a multiple of 64) unless model_overrides sets it, and the
    context is raised to seq_len when the preset (or model_overrides.max_seq_len) is shorter, so every model
    -- learned positions included -- is built for the run's seq_len. A rejected field value is a ConfigError."""
    try:
        return resolve_model_config(cfg.model, cfg.preset, seq_len=cfg.seq_len, tokenizer_vocab=vocab_size,
                                    overrides=cfg.model_overrides)
    except registry.UnknownModelError:
        raise
    except (ValueError, TypeError) as e:  # a model config rejecting a field value
        raise ConfigError(f"model_overrides: {e}") from None


def tokenizer_vocab(spec: str) -> int | None:
    """The vocabulary size of a named tokenizer (None for a tokenizer.json path: known only once loaded)."""
    return TOKENIZER_VOCAB.get(spec)


def check_model_fit(cfg: TrainConfig, world_size: int = 1, device: torch.device | None = None) -> None:
    """Refuse a run its model cannot take: seq_len beyond the positions of the checkpoint it starts from
    (learned positions cannot grow when the weights come from ``init_from``), a vocabulary smaller than the
    tokenizer's, or one micro-batch whose estimated training memory exceeds what the device has free.
    ``device``: where it runs (default: ``cfg.device`` resolved); ``world_size``: ranks under torchrun."""
    vocab = tokenizer_vocab(cfg.data.tokenizer)
    model_cfg, seq_len = build_model_config(cfg, vocab)
    if vocab is not None and model_cfg.embedding_rows < vocab:  # (an SSM's embedding holds its padded vocabulary)
        raise ConfigError(f"model_overrides.vocab_size: {model_cfg.vocab_size} is smaller than the "
                          f"{cfg.data.tokenizer} tokenizer's vocabulary ({vocab})")
    if cfg.init_from and model_cfg.position_table:
        limit = _checkpoint_context(cfg.init_from)
        if limit is not None and seq_len > limit:
            raise ConfigError(f"seq_len: {seq_len} is beyond the {limit} learned positions of the init_from "
                              f"checkpoint {cfg.init_from} ({cfg.model} cannot extend learned positions of "
                              f"trained weights)")
    device = device if device is not None else check_device(cfg.device, world_size=world_size)
    memory = available_memory(device, world_size)
    if memory is None:
        return
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // max(1, world_size))
    parts = training_memory_bytes(model_cfg, seq_len, micro, _activation_bytes(cfg.precision, device))
    why = memory_message(parts, memory)
    if why:
        field = "seq_len" if cfg.seq_len and seq_len > registry.get_config(cfg.model, cfg.preset).max_seq_len \
            else "micro_batch_size"
        raise ConfigError(f"{field}: {cfg.model}/{cfg.preset} at seq_len {seq_len} x micro_batch_size {micro} "
                          f"{why}; lower seq_len or micro_batch_size")


def _checkpoint_context(path: str) -> int | None:
    """max_seq_len of the checkpoint at ``path`` (its state.json), or None when it cannot be read here."""
    import json
    for candidate in (Path(path), Path(path) / CHECKPOINT_DIR):
        try:
            state = json.loads((candidate / "state.json").read_text())
            return int(state["model_config"]["max_seq_len"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


# ---------------------------------------------------------------------------------------------------------
# data

def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_tokenizer(spec: str, field: str = "data.tokenizer") -> None:
    """The tokenizer ``spec`` names is known and its files are installed; nothing is loaded."""
    from .data import tokenizers as tk
    try:
        if spec == "byte":
            return
        if spec in ("gpt2", "neox") or str(spec).endswith(".json") or Path(str(spec)).expanduser().is_file():
            if spec == "gpt2":
                tk.gpt2_files()
            elif spec == "neox":
                tk.neox_file()
            elif not Path(str(spec)).expanduser().is_file():
                raise tk.DataError(f"tokenizer file not found: {spec!r}")
            if importlib.util.find_spec("tokenizers") is None:
                raise tk.DataError(f"BPE tokenizers need the `tokenizers` library: run "
                                   f"`{tk.TOKENIZERS_PIP_COMMAND}`")
            return
        raise tk.DataError(f"unknown tokenizer {spec!r}: valid are {', '.join(tk.NAMED)}, or a path to a "
                           f"tokenizer.json")
    except ValueError as e:
        raise ConfigError(f"{field}: {_one_line(e)}") from None


def check_source(data: DataConfig, field: str = "data.source") -> None:
    """The source exists and holds at least two documents (the split needs one of each side). Files are
    resolved and read lazily up to the second document; nothing is tokenized; a hub source is not contacted."""
    from .data.corpus import open_source
    from .data.formats import CORPORA_PIP_COMMAND
    try:
        corpus = open_source(data.source, data.text_field, data.max_documents, tokenizer=data.tokenizer)
        if str(data.source).startswith("hf:"):
            if importlib.util.find_spec("datasets") is None:
                raise ConfigError(f"source {data.source!r} needs `datasets` (the `corpora` extra): run "
                                  f"`{CORPORA_PIP_COMMAND}`")
            return
        found = sum(1 for _ in itertools.islice(corpus.documents(), 2))
    except ValueError as e:
        raise ConfigError(f"{field}: {_one_line(e)}") from None
    if found == 0:
        raise ConfigError(f"{field}: {data.source!r} holds no text (empty files, or no non-blank documents)")
    if found == 1:
        raise ConfigError(f"{field}: {data.source!r} holds a single document; the train/validation split is by "
                          f"document and needs at least 2")


def check_data(data: DataConfig, where: str = "data") -> None:
    check_tokenizer(data.tokenizer, f"{where}.tokenizer")
    check_source(data, f"{where}.source")


# ---------------------------------------------------------------------------------------------------------
# paths

def is_inside(path: str | os.PathLike, root: str | os.PathLike, strict: bool = True) -> bool:
    """Whether ``path`` resolves (symlinks and ``..`` followed) to ``root`` or below it (``strict``: below)."""
    p, r = Path(path).resolve(), Path(root).resolve()
    return (p != r or not strict) and (p == r or r in p.parents)


def check_output_dir(path: str | os.PathLike, field: str = "--out") -> None:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{field}: {p} exists and is not a directory")


def check_init_from(cfg: TrainConfig, out_dir: str | os.PathLike, resume: bool) -> None:
    """init_from names a readable checkpoint, unless the run resumes its own checkpoint (then it is unused),
    and never this run's own checkpoint directory (a fresh run would overwrite its own source)."""
    if not cfg.init_from:
        return
    from .train.checkpoint import read_state
    own = Path(out_dir) / CHECKPOINT_DIR
    if resume and own.exists():
        return  # resuming: the loop loads its own checkpoint and never reads init_from
    if is_inside(cfg.init_from, own, strict=False) or Path(cfg.init_from).resolve() == Path(out_dir).resolve():
        raise ConfigError(f"init_from: {cfg.init_from} is this run's own checkpoint directory ({own}); a fresh "
                          f"run would overwrite its own source: use another --out")
    try:
        read_state(cfg.init_from)
    except ValueError as e:
        raise ConfigError(f"init_from: {_one_line(e)}") from None


# ---------------------------------------------------------------------------------------------------------
# the commands

def preflight_train(cfg: TrainConfig, out_dir: str | os.PathLike, resume: bool = True, nproc: int = 1) -> None:
    """Everything `harness train` can check before it creates ``out_dir``."""
    world = max(1, nproc or 1)
    device = check_device(cfg.device, world_size=world)
    check_output_dir(out_dir)
    check_init_from(cfg, out_dir, resume)
    check_data(cfg.data)
    check_model_fit(cfg, world_size=world, device=device)


def _will_train(cell, root: Path | None, force: bool) -> bool:
    """Whether ``run_matrix`` trains ``cell`` (a cell complete in the store under the same config is skipped)."""
    if root is None or force:
        return True
    from . import store
    try:
        rec = store.read_record(store.cell_dir(root, cell.matrix, cell.cell_id))
    except ValueError:  # unreadable: run_matrix says so itself
        return True
    return not (rec and rec.get("status") == "complete" and rec.get("config_hash") == cell.config_hash)


def check_matrix_paths(matrix, root: str | os.PathLike) -> None:
    """The matrix directory (``root/name``) and every cell directory stay strictly inside the results root."""
    root = Path(root)
    check_output_dir(root)
    mdir = root / matrix.name
    if not is_inside(mdir, root):
        raise ConfigError(f"{matrix.source}: name {matrix.name!r} would write outside the results root "
                          f"{root} (it resolves to {mdir.resolve()}); give a plain name")
    for cell in matrix.cells:
        if not is_inside(mdir / cell.cell_id, mdir):
            raise ConfigError(f"{matrix.source}: cell id {cell.cell_id!r} would write outside {mdir}")


def preflight_matrix(matrix, root: str | os.PathLike | None = None, force: bool = False, nproc: int = 1) -> None:
    """Everything `harness run` can check before the first cell writes: the matrix and cell directories stay
    inside ``root``; for the cells that will train (all of them with ``force`` or without ``root``), every
    distinct data config (source and tokenizer), every distinct device, and every cell's model fit."""
    if root is not None:
        check_matrix_paths(matrix, root)
    cells = [c for c in matrix.cells if _will_train(c, Path(root) if root is not None else None, force)]
    world = max(1, nproc or 1)
    devices: dict[str, torch.device] = {}
    seen_data: set[str] = set()
    for cell in cells:
        cfg: TrainConfig = cell.config
        where = f"{matrix.source}: {cell.cell_id}"
        try:
            if cfg.device not in devices:
                devices[cfg.device] = check_device(cfg.device, world_size=world)
            key = repr(sorted(vars(cfg.data).items()))
            if key not in seen_data:
                check_data(cfg.data)
                seen_data.add(key)
            check_model_fit(cfg, world_size=world, device=devices[cfg.device])
        except (ConfigError, registry.UnknownModelError) as e:
            raise ConfigError(f"{where}: {e}") from None


def check_eval_request(checkpoint: str | os.PathLike, device: str, batch_size: Any, limit: float | None,
                       bootstrap_iters: int, output_path: str | os.PathLike | None = None) -> None:
    """`harness eval`: the checkpoint is a complete, readable one; the numbers are in range; the device is
    here; lm-eval's files do not go into the checkpoint directory (the next save of that run replaces the
    directory); one batch of the checkpoint's context fits (estimated, forward only)."""
    from .train.checkpoint import read_state, resolve_checkpoint_dir
    if limit is not None and not (limit > 0 and math.isfinite(limit)):
        raise ConfigError(f"--limit: must be > 0 (a count, or a fraction < 1), got {limit}")
    if bootstrap_iters < 0:
        raise ConfigError(f"--bootstrap-iters: must be >= 0, got {bootstrap_iters}")
    from .evaluate.adapter import parse_batch_size
    try:
        batch = parse_batch_size(batch_size)
    except ValueError as e:
        raise ConfigError(f"--batch-size: {_one_line(e)}") from None
    dev = check_device(device, "--device")
    path = resolve_checkpoint_dir(checkpoint)
    if not path.is_dir():
        raise ConfigError(f"{path}: no such checkpoint directory")
    state = read_state(path)  # CheckpointError (a ValueError) naming the path
    if output_path is not None and is_inside(output_path, path, strict=False):
        raise ConfigError(f"--output-path: {output_path} is inside the checkpoint {path} it evaluates; write "
                          f"lm-eval's files elsewhere (e.g. the run directory's lm_eval/)")
    try:
        model_cfg = registry.get(state.get("model_name")).config_cls(**state["model_config"])
    except (registry.UnknownModelError, KeyError, TypeError, ValueError):
        return  # loading it says what is wrong, in its own words (harness.train.checkpoint)
    memory = available_memory(dev)
    if memory is not None:
        parts = inference_memory_bytes(model_cfg, model_cfg.max_seq_len, batch, 4)
        why = memory_message(parts, memory)
        if why:
            raise ConfigError(f"--batch-size: {batch} sequences of {model_cfg.max_seq_len} tokens {why}")
