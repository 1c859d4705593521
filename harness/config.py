"""Run and matrix settings as validated dataclasses.

YAML (or a dict) becomes these dataclasses through :func:`from_dict`, which rejects unknown keys and wrong
types with the dotted name of the field (``defaults.optim.lr: expected a number, got 'fast'``), so a typo
never silently falls back to a default.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad setting; the message names the field (dotted path) or the file."""


@dataclass
class DataConfig:
    # embedded | paths/globs of .txt, .jsonl[.gz|.zst], .parquet | a save_to_disk dir[:split] |
    # bin:[uint16:|uint32:]<paths of pre-tokenized .bin> | hf:<dataset>[:<config>]  (harness/data/corpus.py)
    source: str = "embedded"
    tokenizer: str = "byte"         # byte | gpt2 | neox | path to a tokenizer.json
    val_fraction: float = 0.05      # of documents, split deterministically by document id
    text_field: str = "text"        # JSONL field / parquet or dataset column holding the text
    max_documents: int | None = None
    cache_dir: str | None = None    # token shards (default ~/.cache/tokenformer-bench or $TFB_CACHE)

    def validate(self, path: str = "data"):
        if isinstance(self.source, str) and not self.source.strip():
            raise ConfigError(f"{path}.source: must not be empty (embedded, hf:<dataset>, bin:<.bin files>, a "
                              f"saved dataset, or paths/globs of .txt/.jsonl/.parquet files)")
        if isinstance(self.tokenizer, str) and not self.tokenizer.strip():
            raise ConfigError(f"{path}.tokenizer: must not be empty (byte, gpt2, neox, or a tokenizer.json path)")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"{path}.val_fraction: must be in (0, 1), got {self.val_fraction}")
        if not self.text_field:
            raise ConfigError(f"{path}.text_field: must not be empty")
        if self.max_documents is not None and not self.max_documents > 0:
            raise ConfigError(f"{path}.max_documents: must be > 0 when set, got {self.max_documents}")


@dataclass
class BudgetConfig:
    """Exactly one of steps, tokens, flops. FLOPs are training FLOPs from the model's flops_per_token."""
    steps: int | None = None
    tokens: float | None = None
    flops: float | None = None

    def validate(self, path: str = "budget"):
        set_ = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if len(set_) != 1:
            raise ConfigError(f"{path}: give exactly one of steps, tokens, flops (got {', '.join(set_) or 'none'})")
        (k, v), = set_.items()
        if not v > 0:
            raise ConfigError(f"{path}.{k}: must be > 0, got {v}")
        if not math.isfinite(v):
            raise ConfigError(f"{path}.{k}: must be finite, got {v}")

    def label(self) -> str:
        for k in ("steps", "tokens", "flops"):
            v = getattr(self, k)
            if v is not None:
                return f"{k}={v:.3g}" if k != "steps" else f"steps={v}"
        return "none"


@dataclass
class OptimConfig:
    """AdamW. Weight decay applies to matrices (every parameter with >= 2 dims: linear weights, embeddings,
    and Pattention key/value parameter tokens, which are the model's projection matrices) and never to
    norms, biases or parameters a model marks ``_no_weight_decay`` (Mamba's A_log and D).
    ``decay_pattention_tokens: false`` exempts the parameter tokens too."""
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_pattention_tokens: bool = True
    grad_clip: float = 1.0

    def validate(self, path: str = "optim"):
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"{path}.lr: must be > 0, got {self.lr}")
        if not self.grad_clip > 0:  # a negative max norm flips every gradient: gradient ascent
            raise ConfigError(f"{path}.grad_clip: must be > 0, got {self.grad_clip}")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise ConfigError(f"{path}.eps: must be > 0, got {self.eps}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"{path}.weight_decay: must be >= 0, got {self.weight_decay}")
        for i, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                raise ConfigError(f"{path}.betas[{i}]: must be in [0, 1), got {beta}")


@dataclass
class ScheduleConfig:
    """Linear warmup, then cosine to ``min_lr_ratio`` of the peak (default), or WSD: warmup, stable, then a
    linear decay over the last ``decay_fraction`` of training; or constant after warmup."""
    kind: str = "cosine"            # cosine | wsd | constant
    warmup_steps: int | None = None
    warmup_fraction: float = 0.05   # used when warmup_steps is None
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2     # wsd only
    # the schedule spans this many tokens counted from step 0 of the chain (a grown run with schedule=continue
    # counts its base's steps) instead of ending with this run's budget: a Staged Training base stops part-way
    # through the one schedule its grown stage finishes. None: the run's own end.
    horizon_tokens: float | None = None

    def validate(self, path: str = "schedule"):
        if self.kind not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"{path}.kind: {self.kind!r} is not one of cosine, wsd, constant")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{path}.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps is not None and not self.warmup_steps >= 0:
            raise ConfigError(f"{path}.warmup_steps: must be >= 0 when set, got {self.warmup_steps}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"{path}.warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"{path}.decay_fraction: must be in (0, 1], got {self.decay_fraction}")
        if self.horizon_tokens is not None and not self.horizon_tokens > 0:
            raise ConfigError(f"{path}.horizon_tokens: must be > 0 when set, got {self.horizon_tokens}")


@dataclass
class TrainConfig:
    model: str = "tokenformer"
    preset: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    seq_len: int | None = None          # default: the preset's max_seq_len
    batch_size: int = 16                # global batch, in sequences
    micro_batch_size: int | None = None # per forward pass; batch_size / micro_batch_size = accumulation steps
    budget: BudgetConfig = field(default_factory=lambda: BudgetConfig(steps=100))
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    seed: int = 0
    init_from: str | None = None        # a checkpoint to start from (e.g. a grown model) when the run has none
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    precision: str = "auto"             # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    compile: bool = False
    parallel: str = "auto"              # under torchrun: auto (= ddp) | ddp | fsdp (FSDP2 fully_shard per block)
    eval_every: int = 50                # steps; the final step is always evaluated
    eval_batches: int = 20              # batches per intermediate evaluation, spread over the split (0: all);
                                        # the final evaluation always scores the whole validation split
    log_every: int = 10
    checkpoint_every: int = 100         # steps; the final step is always checkpointed
    tensorboard: bool = False
    progress: bool = True
    # lm-eval tasks run on the final checkpoint when a matrix cell completes (e.g. [paper] or [piqa, arc_easy]);
    # they do not change training, so adding them to a finished matrix evaluates without retraining
    eval_tasks: list[str] = field(default_factory=list)
    eval_limit: int | None = None
    eval_bootstrap_iters: int = 1000

    def validate(self, path: str = "") -> "TrainConfig":
        p = f"{path}." if path else ""
        self.budget.validate(f"{p}budget")
        self.optim.validate(f"{p}optim")
        self.schedule.validate(f"{p}schedule")
        self.data.validate(f"{p}data")
        for name in ("batch_size", "eval_every", "log_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{p}{name}: must be > 0, got {getattr(self, name)}")
        if self.eval_batches < 0:
            raise ConfigError(f"{p}eval_batches: must be >= 0, got {self.eval_batches}")
        if self.seq_len is not None and self.seq_len <= 0:
            raise ConfigError(f"{p}seq_len: must be > 0, got {self.seq_len}")
        mb = self.micro_batch_size or self.batch_size
        if mb <= 0 or self.batch_size % mb:
            raise ConfigError(f"{p}micro_batch_size: {mb} must be > 0 and divide batch_size {self.batch_size}")
        if self.parallel not in ("auto", "ddp", "fsdp"):
            raise ConfigError(f"{p}parallel: {self.parallel!r} is not one of auto, ddp, fsdp")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"{p}precision: {self.precision!r} is not one of auto, fp32, bf16")
        if self.seed < 0:
            raise ConfigError(f"{p}seed: must be >= 0, got {self.seed}")
        if self.eval_bootstrap_iters < 0:
            raise ConfigError(f"{p}eval_bootstrap_iters: must be >= 0, got {self.eval_bootstrap_iters}")
        if self.eval_limit is not None and self.eval_limit <= 0:
            raise ConfigError(f"{p}eval_limit: must be > 0 when set, got {self.eval_limit}")
        if isinstance(self.device, str) and not self.device.strip():
            raise ConfigError(f"{p}device: must not be empty (auto, cpu, cuda or cuda:N)")
        return self

    @property
    def grad_accum(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)


# ----------------------------------------------------------------------------------- dict -> dataclass
def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (dict,):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e12 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{path}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


# fields added after results were stored: a config's identity (a matrix cell's hash, a resume check) leaves
# them out while they hold their default, so every stored cell and checkpoint keeps the identity it had
LATE_FIELDS = {("schedule", "horizon_tokens"): None}


def identity_dict(config: "TrainConfig | dict[str, Any]") -> dict[str, Any]:
    """asdict(config) (or a stored config dict) without the late fields at their defaults."""
    d = copy.deepcopy(config if isinstance(config, dict) else asdict(config))
    for (section, name), default in LATE_FIELDS.items():
        sub = d.get(section)
        if isinstance(sub, dict) and name in sub and sub[name] == default:
            del sub[name]
    return d


def from_dict(cls, data: Any, path: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types by dotted path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key {where}{unknown[0]} (valid: {', '.join(fields)})")
    kwargs = {k: _coerce(v, hints[k], f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


REPLACED_WHOLE = ("budget",)  # a one-of mapping: an override replaces it rather than merging into it


def merge(base: dict, override: dict) -> dict:
    """Deep merge of plain dicts (override wins); used for matrix defaults + cell settings."""
    out = dict(base)
    for k, v in (override or {}).items():
        deep = isinstance(v, dict) and isinstance(out.get(k), dict) and k not in REPLACED_WHOLE
        out[k] = merge(out[k], v) if deep else v
    return out


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} malformed YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
